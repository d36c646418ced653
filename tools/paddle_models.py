"""Export PaddlePaddle BatchNorm networks with paddle2onnx, the way Paddle users get ONNX files,
into the folder tools/real_models.py gathers third-party models in (never committed).

paddle2onnx keeps every BatchNormalization node, writes Linear as MatMul → Add, puts Identity
nodes after Adds and declares the batch as a symbolic dimension. These files are what bnfold
meets from that exporter:

    paddle2onnx_mlp          BatchNorm1D → Linear → BatchNorm1D → ReLU → Linear (tabular data)
    paddle2onnx_small        Conv2D / depthwise Conv2D / Conv2DTranspose, each → BN, then
                             Linear → BatchNorm1D and a BN before a Linear
    paddle2onnx_sequence     Conv1D → BatchNorm1D on [batch, channels, time], then a Linear over
                             time (a rank-3 MatMul: its BN is not foldable)
    paddle2onnx_resnet18     paddle.vision.models.resnet18 (64x64)
    paddle2onnx_mobilenetv3  paddle.vision.models.mobilenet_v3_small (64x64)
    paddle2onnx_densenet121  paddle.vision.models.densenet121 (64x64): pre-activation BNs

BN statistics are drawn like a trained net's so no fold is an identity. Paddle does not belong
in the project's venv; use one of its own (pinned: these versions export these files):

    python3 -m venv .venv-paddle
    .venv-paddle/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 packaging
    .venv-paddle/bin/python tools/paddle_models.py --out real-models/
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys


def _layers(paddle):
    nn = paddle.nn

    class Mlp(nn.Layer):
        def __init__(self):
            super().__init__()
            self.bn_in, self.fc1 = nn.BatchNorm1D(16), nn.Linear(16, 32)
            self.bn1, self.fc2 = nn.BatchNorm1D(32), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc2(nn.functional.relu(self.bn1(self.fc1(self.bn_in(x)))))

    class Small(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(3, 16, 3, padding=1, bias_attr=False)
            self.bn = nn.BatchNorm2D(16)
            self.dw = nn.Conv2D(16, 16, 3, padding=1, groups=16, bias_attr=False)
            self.bn_dw = nn.BatchNorm2D(16)
            self.up = nn.Conv2DTranspose(16, 8, 2, stride=2)
            self.bn_up = nn.BatchNorm2D(8)
            self.fc = nn.Linear(8, 24)
            self.bn_fc = nn.BatchNorm1D(24)
            self.head_bn, self.head = nn.BatchNorm1D(24), nn.Linear(24, 10)

        def forward(self, x):
            relu = nn.functional.relu
            x = relu(self.bn(self.conv(x)))
            x = relu(self.bn_dw(self.dw(x)))
            x = relu(self.bn_up(self.up(x)))
            x = paddle.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            x = nn.functional.sigmoid(self.bn_fc(self.fc(x)))
            return self.head(self.head_bn(x))

    class Sequence(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1D(8, 16, 3, padding=1)
            self.bn = nn.BatchNorm1D(16)
            self.bn_time, self.over_time = nn.BatchNorm1D(16), nn.Linear(20, 4)

        def forward(self, x):
            return self.over_time(self.bn_time(nn.functional.relu(self.bn(self.conv(x)))))

    vision = paddle.vision.models
    image = [None, 3, 64, 64]
    return {
        "paddle2onnx_mlp": (Mlp, [None, 16]),
        "paddle2onnx_small": (Small, [None, 3, 32, 32]),
        "paddle2onnx_sequence": (Sequence, [None, 8, 20]),
        "paddle2onnx_resnet18": (lambda: vision.resnet18(num_classes=10), image),
        "paddle2onnx_mobilenetv3": (lambda: vision.mobilenet_v3_small(num_classes=10), image),
        "paddle2onnx_densenet121": (lambda: vision.densenet121(num_classes=10), image),
    }


def _trained_statistics(paddle, model, rng):
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            shape = layer.weight.shape
            for param, values in ((layer.weight, rng.uniform(0.5, 1.5, shape)),
                                  (layer.bias, rng.normal(0, 0.1, shape)),
                                  (layer._mean, rng.normal(0, 0.1, shape)),
                                  (layer._variance, rng.uniform(0.5, 2.0, shape))):
                param.set_value(values.astype("float32"))
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder to write the models into.")
    args = parser.parse_args(argv)
    try:
        import numpy as np
        import paddle
        import paddle2onnx  # noqa: F401  (paddle.onnx.export needs it)
    except ImportError as exc:
        print(f"paddle_models.py needs paddlepaddle and paddle2onnx ({exc}): see its docstring",
              file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for number, (name, (make, shape)) in enumerate(_layers(paddle).items()):
        path = os.path.join(args.out, f"{name}.onnx")
        if os.path.exists(path):
            continue
        paddle.seed(number)  # the same file whichever others are present
        model = _trained_statistics(paddle, make(), np.random.default_rng(number))
        spec = [paddle.static.InputSpec(shape, "float32", "x")]
        with contextlib.redirect_stdout(io.StringIO()):  # paddle2onnx's progress lines
            paddle.onnx.export(model, path[: -len(".onnx")], input_spec=spec, opset_version=13)
        if not os.path.exists(path):
            print(f"{name}: paddle2onnx wrote nothing", file=sys.stderr)
            return 1
        print(f"{name}.onnx  {os.path.getsize(path) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
