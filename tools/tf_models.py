"""Export Keras BatchNormalization networks with tf2onnx, the way TensorFlow users get ONNX files,
into the folder tools/real_models.py gathers third-party models in (never committed).

tf2onnx does not keep a BatchNormalization node: TensorFlow's optimiser folds what it can into
the Conv and leaves the rest as Mul → Add (depthwise and transposed convolutions, Dense → BN, and
a BN over the last axis of a sequence). These files are what bnfold meets from that exporter.

    tf2onnx_keras_small        Conv2D / DepthwiseConv2D / Conv2DTranspose / Dense, each → BN
    tf2onnx_keras_sequence     Conv1D → BN and Dense → BN on [batch, time, features] (rank-3 MatMul)
    tf2onnx_keras_mobilenetv2  keras.applications.MobileNetV2 (alpha 0.35, 96x96, no weights)
    tf2onnx_keras_efficientnetb0  keras.applications.EfficientNetB0 (no weights)
    tf2onnx_keras_densenet121  keras.applications.DenseNet121 (64x64, no weights): pre-activation
                               BNs (Concat → BN → ReLU → Conv) that tf2onnx leaves as Mul → Add

BN statistics are drawn like a trained net's so no fold is an identity. TensorFlow does not
belong in the project's venv; use one of its own (pinned: these versions export these files):

    python3 -m venv .venv-tf
    .venv-tf/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    .venv-tf/bin/python tools/tf_models.py --out real-models/
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _small(keras):
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2D(32, 1)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2DTranspose(16, 2, strides=2)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Activation("sigmoid")(layers.BatchNormalization()(layers.Dense(64)(x)))
    return keras.Model(inputs, layers.Dense(10)(x))


def _sequence(keras):
    layers = keras.layers
    inputs = keras.Input((20, 8))
    x = layers.Conv1D(16, 3, padding="same")(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Dense(24)(x)  # a MatMul of rank 3, its BN over the last axis
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Dense(24, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return keras.Model(inputs, layers.Dense(4)(x))


MODELS = {
    "tf2onnx_keras_small": _small,
    "tf2onnx_keras_sequence": _sequence,
    "tf2onnx_keras_mobilenetv2": lambda keras: keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None),
    "tf2onnx_keras_efficientnetb0": lambda keras: keras.applications.EfficientNetB0(
        input_shape=(64, 64, 3), weights=None),
    "tf2onnx_keras_densenet121": lambda keras: keras.applications.DenseNet121(
        input_shape=(64, 64, 3), weights=None),
}


def _trained_statistics(keras, model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape).astype("float32"),
                               rng.normal(0, 0.1, shape).astype("float32"),
                               rng.normal(0, 0.1, shape).astype("float32"),
                               rng.uniform(0.5, 2.0, shape).astype("float32")])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder to write the models into.")
    args = parser.parse_args(argv)
    try:
        import keras
        import numpy as np
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        print(f"tf_models.py needs tensorflow and tf2onnx ({exc}): see its docstring",
              file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for number, (name, make) in enumerate(MODELS.items()):
        path = os.path.join(args.out, f"{name}.onnx")
        if os.path.exists(path):
            continue
        keras.utils.set_random_seed(number)  # the same file whichever others are present
        model = _trained_statistics(keras, make(keras), np.random.default_rng(number))
        spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
        function = tf.function(lambda x, model=model: model(x, training=False))
        tf2onnx.convert.from_function(function, input_signature=spec, opset=13,
                                      output_path=path)
        print(f"{name}.onnx  {os.path.getsize(path) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
