"""Evaluate a float32 model in float64 with onnx's reference evaluator: the ground truth.

Every float32 tensor (weights, Constant values, declared inputs/outputs, Cast targets) becomes
float64; the evaluator is pure numpy, so this is for small models only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.io import iter_tensors

_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of `model` (float32 tensors and types only; others untouched)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for tensor in iter_tensors(wide):
        if tensor.data_type == _FLOAT:
            values = numpy_helper.to_array(tensor).astype(np.float64)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    _widen_graph(wide.graph)
    return wide


def _widen_graph(graph: onnx.GraphProto) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == _FLOAT:
            value.type.tensor_type.elem_type = _DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i == _FLOAT:
                attr.i = _DOUBLE
            elif node.op_type == "RandomNormalLike" and attr.name == "dtype" and attr.i == _FLOAT:
                attr.i = _DOUBLE
            if attr.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _widen_graph(sub)


def _grouped_conv_transpose():
    """onnx.reference's ConvTranspose slices grouped weights along the wrong axis (weights are
    [Cin, Cout/g, k…]) and adds the whole bias to every group; run each group on its own."""
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose

    class ConvTranspose(ReferenceConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                 strides=None):
            attrs = dict(auto_pad=auto_pad, dilations=dilations, kernel_shape=kernel_shape,
                         output_padding=output_padding, output_shape=output_shape, pads=pads,
                         strides=strides)
            group = group or 1
            per_in, per_out = X.shape[1] // group, W.shape[1]
            outputs = []
            for g in range(group):
                bias = None if B is None else B[g * per_out:(g + 1) * per_out]
                rows = slice(g * per_in, (g + 1) * per_in)
                outputs.append(super()._run(X[:, rows], W[rows], bias, group=1, **attrs)[0])
            return (np.concatenate(outputs, axis=1),)

    return ConvTranspose


def evaluate_float64(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` computed in float64 on `feed` (float32 inputs are widened)."""
    from onnx.reference import ReferenceEvaluator

    wide_feed = {
        name: value.astype(np.float64) if value.dtype == np.float32 else value
        for name, value in feed.items()
    }
    try:
        evaluator = ReferenceEvaluator(to_float64(model), new_ops=[_grouped_conv_transpose()])
        names = [o.name for o in model.graph.output]
        values = evaluator.run(names, wide_feed)
    except Exception as exc:  # the reference evaluator raises anything from numpy
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise BnfoldError(
            f"onnx.reference could not evaluate the model in float64 ({type(exc).__name__}: "
            f"{detail})"
        ) from None
    return dict(zip(names, values))
