"""Realistic BatchNormalization-heavy ONNX models, built from onnx.helper and numpy alone.

Four families, shaped like the torchvision originals (no torch needed, so the fold benchmark runs
in a bare environment):

    resnet50     bottleneck blocks, Conv→BN→Relu, residual Add, Gemm head   53 BN, all foldable
    mobilenetv2  inverted residuals, depthwise (group=C) + pointwise convs,
                 BN after each, Clip(0, 6)                                  52 BN, all foldable
    densenet121  dense layers BN→Relu→Conv1x1→BN→Relu→Conv3x3 + Concat     121 BN, 62 foldable
                 (the pre-activation BN→Relu ones cannot be folded; the
                 transitions here are post-activation Conv→BN→Relu→AvgPool)
    vgg16        thirteen 3x3 Conv→BN→Relu, MaxPool, Gemm→BN→Relu head      15 BN, all foldable

Weights are He-initialised and BN statistics drawn like a trained net's (γ ~ U(0.5, 1.5),
β ~ N(0, 0.1), μ ~ N(0, 0.1), σ² ~ U(0.5, 2)), so activations stay finite through the depth.
Opset 17, one input `input` [N, 3, R, R] with symbolic batch N, one output `logits` [N, 1000].
`width` and `resolution` shrink a model for tests:

    >>> model = build("resnet50", seed=0, width=0.125, resolution=32)

    python tools/onnx_models.py --out models/            # full size (ResNet-50 ≈ 100 MB)
    python tools/onnx_models.py --out small/ --width 0.125 --resolution 32
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAMES = ("resnet50", "mobilenetv2", "densenet121", "vgg16")
OPSET = 17
IR_VERSION = 8  # what opset 17 shipped with; older runtimes in a peer's venv still load it
NUM_CLASSES = 1000
# γ multiplier of the last BN in a residual branch. Running statistics drawn at random do not
# renormalise like trained ones, so each identity block would grow the signal by ≈ √2 (ResNet-50's
# logits reach ~5e3); trained ResNets learn small residual gains (torchvision's zero_init_residual
# starts them at 0), and 0.3 keeps the logits O(10).
RESIDUAL_GAIN = 0.3
# The classifier's hidden width for vgg16. torchvision's 4096 makes a 550 MB model, dominated by
# one 25088x4096 Gemm; 1024 keeps the big convs and the Gemm→BN head at ≈ 165 MB.
VGG_HIDDEN = 1024


class GraphBuilder:
    """Accumulates nodes and initializers with fresh names and seeded random weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}
        self._clip_bounds: tuple[str, str] | None = None

    def fresh(self, stem: str) -> str:
        index = self._counts.get(stem, 0)
        self._counts[stem] = index + 1
        return f"{stem}_{index}"

    def constant(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        name = self.fresh(op)
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1,
             group: int = 1, bias: bool = False) -> str:
        fan_in = c_in // group * kernel * kernel
        weight = self.rng.standard_normal((c_out, c_in // group, kernel, kernel), dtype=np.float32)
        weight *= np.float32(np.sqrt(2.0 / fan_in))
        inputs = [x, self.constant("conv_w", weight)]
        if bias:
            inputs.append(self.constant("conv_b", self._small((c_out,))))
        pad = kernel // 2
        return self.node("Conv", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def gemm(self, x: str, n_in: int, n_out: int, gain: float = 2.0) -> str:
        # transB=1, the layout torch.onnx exports for nn.Linear
        weight = self.rng.standard_normal((n_out, n_in), dtype=np.float32)
        weight *= np.float32(np.sqrt(gain / n_in))
        bias = self._small((n_out,))
        return self.node("Gemm", [x, self.constant("fc_w", weight), self.constant("fc_b", bias)],
                         transB=1)

    def batchnorm(self, x: str, channels: int, gain: float = 1.0) -> str:
        gamma = (self.rng.uniform(0.5, 1.5, channels) * gain).astype(np.float32)
        beta = self._small((channels,))
        mean = self._small((channels,))
        var = self.rng.uniform(0.5, 2.0, channels).astype(np.float32)
        names = [self.constant(stem, value) for stem, value in
                 (("bn_gamma", gamma), ("bn_beta", beta), ("bn_mean", mean), ("bn_var", var))]
        return self.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        if self._clip_bounds is None:
            self._clip_bounds = (self.constant("clip_min", np.array(0.0, np.float32)),
                                 self.constant("clip_max", np.array(6.0, np.float32)))
        return self.node("Clip", [x, *self._clip_bounds])

    def conv_bn(self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1,
                group: int = 1, activation: str | None = "relu", gain: float = 1.0) -> str:
        y = self.batchnorm(self.conv(x, c_in, c_out, kernel, stride, group), c_out, gain)
        if activation == "relu":
            return self.relu(y)
        if activation == "relu6":
            return self.relu6(y)
        return y

    def classifier(self, x: str, channels: int) -> str:
        pooled = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        return self.gemm(pooled, channels, NUM_CLASSES, gain=1.0)

    def _small(self, shape: tuple[int, ...]) -> np.ndarray:
        return (self.rng.standard_normal(shape) * 0.1).astype(np.float32)


def _scaled(channels: int, width: float, divisor: int = 1) -> int:
    return max(divisor, int(round(channels * width / divisor)) * divisor)


def _resnet50(g: GraphBuilder, x: str, width: float) -> str:
    c = _scaled(64, width)
    x = g.conv_bn(x, 3, c, 7, stride=2)
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = c
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        mid, c_out = _scaled(planes, width), _scaled(planes * 4, width)
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = g.conv_bn(x, c_in, mid, 1)
            y = g.conv_bn(y, mid, mid, 3, stride=stride)
            y = g.conv_bn(y, mid, c_out, 1, activation=None, gain=RESIDUAL_GAIN)
            shortcut = x
            if block == 0:
                shortcut = g.conv_bn(x, c_in, c_out, 1, stride=stride, activation=None)
            x = g.relu(g.node("Add", [y, shortcut]))
            c_in = c_out
    return g.classifier(x, c_in)


# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
_MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenetv2(g: GraphBuilder, x: str, width: float) -> str:
    c_in = _scaled(32, width, 8)
    x = g.conv_bn(x, 3, c_in, 3, stride=2, activation="relu6")
    for expansion, c, repeats, first_stride in _MOBILENETV2_BLOCKS:
        c_out = _scaled(c, width, 8)
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            hidden = c_in * expansion
            y = x
            if expansion != 1:
                y = g.conv_bn(y, c_in, hidden, 1, activation="relu6")
            y = g.conv_bn(y, hidden, hidden, 3, stride=stride, group=hidden, activation="relu6")
            y = g.conv_bn(y, hidden, c_out, 1, activation=None)
            x = g.node("Add", [x, y]) if stride == 1 and c_in == c_out else y
            c_in = c_out
    c_last = _scaled(1280, width, 8)
    x = g.conv_bn(x, c_in, c_last, 1, activation="relu6")
    return g.classifier(x, c_last)


def _densenet121(g: GraphBuilder, x: str, width: float) -> str:
    growth = _scaled(32, width)
    c = _scaled(64, width)
    x = g.conv_bn(x, 3, c, 7, stride=2)
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for block, layers in enumerate((6, 12, 24, 16)):
        features = [x]
        for _ in range(layers):
            joined = features[0] if len(features) == 1 else g.node("Concat", features, axis=1)
            # pre-activation BN→Relu→Conv: the BN sits on a Concat, with a Relu before the conv
            y = g.relu(g.batchnorm(joined, c))
            y = g.conv_bn(y, c, 4 * growth, 1)
            y = g.conv(y, 4 * growth, growth, 3)
            features.append(y)
            c += growth
        x = g.node("Concat", features, axis=1)
        if block < 3:
            c_out = c // 2
            x = g.conv_bn(x, c, c_out, 1)
            x = g.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            c = c_out
    x = g.relu(g.batchnorm(x, c))
    return g.classifier(x, c)


_VGG16_STAGES = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _vgg16(g: GraphBuilder, x: str, width: float, resolution: int) -> str:
    c_in = 3
    for convs, c in _VGG16_STAGES:
        c_out = _scaled(c, width)
        for _ in range(convs):
            x = g.conv_bn(x, c_in, c_out, 3)
            c_in = c_out
        x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    side = resolution // 32
    x = g.node("Flatten", [x], axis=1)
    n_in, hidden = c_in * side * side, _scaled(VGG_HIDDEN, width)
    for _ in range(2):
        x = g.relu(g.batchnorm(g.gemm(x, n_in, hidden), hidden))
        n_in = hidden
    return g.gemm(x, n_in, NUM_CLASSES, gain=1.0)


def build(name: str, seed: int = 0, width: float = 1.0, resolution: int = 224) -> onnx.ModelProto:
    """Build model `name` (one of NAMES); `width` scales channels, `resolution` the input side."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")
    if resolution % 32 or resolution <= 0:
        raise ValueError(f"resolution {resolution} must be a positive multiple of 32")
    if width <= 0:
        raise ValueError(f"width {width} must be positive")
    g = GraphBuilder(seed)
    if name == "resnet50":
        logits = _resnet50(g, "input", width)
    elif name == "mobilenetv2":
        logits = _mobilenetv2(g, "input", width)
    elif name == "densenet121":
        logits = _densenet121(g, "input", width)
    else:
        logits = _vgg16(g, "input", width, resolution)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output_identity"))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-tools-onnx_models")
    model.ir_version = IR_VERSION
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder to write NAME.onnx into.")
    parser.add_argument("--models", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=1.0, help="Channel multiplier.")
    parser.add_argument("--resolution", type=int, default=224, help="Input side (multiple of 32).")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        model = build(name, args.seed, args.width, args.resolution)
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(model, path)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"{path}: {params / 1e6:.1f}M parameters, {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
