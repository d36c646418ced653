"""A small built-in BN network that exercises every fold pattern, for the demo and for tests.

Pure onnx.helper + numpy (no torch): Conv→BN→Relu, a depthwise Conv→BN, a grouped
ConvTranspose→BN, an unpadded 1×1 Conv fed by a BN (BN first), a pre-activation BN→Relu→Conv
(not foldable: kept with its reason), and a Gemm→BN classifier head.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what ONNX Runtime 1.18+ accepts


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv(self, name: str, x: str, c_in: int, c_out: int, k: int, *, group=1, pad=0, bias=False):
        fan_in = c_in // group * k * k
        w = self.rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.const(f"{name}.weight", w)]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.rng.normal(0, 0.1, c_out)))
        self.nodes.append(helper.make_node(
            "Conv", inputs, [f"{name}.out"], name=name, group=group, pads=[pad] * 4,
            kernel_shape=[k, k]))
        return f"{name}.out"

    def bn(self, name: str, x: str, channels: int) -> str:
        rng = self.rng
        params = [
            self.const(f"{name}.scale", rng.uniform(0.5, 1.5, channels)),
            self.const(f"{name}.bias", rng.normal(0, 0.1, channels)),
            self.const(f"{name}.mean", rng.normal(0, 0.1, channels)),
            self.const(f"{name}.var", rng.uniform(0.5, 2.0, channels)),
        ]
        self.nodes.append(helper.make_node(
            "BatchNormalization", [x, *params], [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    def op(self, op_type: str, name: str, inputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"


def build_sample_model(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """The demo network: input [N, 3, 32, 32] → logits [N, classes]."""
    b = _Builder(seed)
    x = b.op("Relu", "stem_relu", [b.bn("stem_bn", b.conv("stem_conv", "input", 3, 16, 3, pad=1), 16)])
    x = b.op("Relu", "dw_relu", [b.bn("dw_bn", b.conv("dw_conv", x, 16, 16, 3, group=16, pad=1), 16)])
    x = b.bn("pw_bn", b.conv("pw_conv", x, 16, 32, 1, bias=True), 32)
    # BN first, then an unpadded 1×1 Conv: folds forward into the Conv.
    x = b.conv("post_conv", b.bn("pre_bn", b.op("Relu", "pw_relu", [x]), 32), 32, 32, 1)
    # Pre-activation: BN → Relu → Conv cannot fold (Relu is in between): kept, with the reason.
    x = b.op("Relu", "post_relu", [x])
    x = b.conv("preact_conv", b.op("Relu", "preact_relu", [b.bn("preact_bn", x, 32)]), 32, 32, 3, pad=1)
    w = b.rng.standard_normal((32, 8, 2, 2)) * np.sqrt(2.0 / 32)
    up = b.op("ConvTranspose", "up_deconv", [x, b.const("up_deconv.weight", w)], group=2,
              strides=[2, 2], kernel_shape=[2, 2])
    x = b.op("Relu", "up_relu", [b.bn("up_bn", up, 16)])
    x = b.op("GlobalAveragePool", "pool", [x])
    x = b.op("Flatten", "flatten", [x], axis=1)
    fc_w = b.rng.standard_normal((classes, 16)) * np.sqrt(1.0 / 16)
    x = b.op("Gemm", "fc", [x, b.const("fc.weight", fc_w), b.const("fc.bias", np.zeros(classes))],
             transB=1)
    logits = b.bn("head_bn", x, classes)
    graph = helper.make_graph(
        b.nodes,
        "bnfold_sample",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])],
        b.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="bnfold-sample")
    onnx.checker.check_model(model)
    return model
