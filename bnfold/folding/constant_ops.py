"""The shape and copy ops that exporters compute weights with, in plain numpy.

bnfold.folding.constants evaluates the few constant subgraphs a fold reads. Over the third-party
models in tools/real_models.py those are four ops: ConstantOfShape (the IR-3 zoo's weight-free
models), Unsqueeze (paddle2onnx's BN parameters), Reshape and Identity (torch.onnx). Running
each through onnx.reference costs an import of every reference op (~45 ms, most of the fold of a
small model) and building an evaluator per node. These are the same numpy calls onnx.reference
makes, following the ONNX spec where the two differ (Unsqueeze-1/11 axes name output positions,
as in Unsqueeze-13, not an order of insertion); `run` answers None for anything else (another
op, an attribute it does not know, a dtype beyond plain numpy's), and the caller runs the
reference instead.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

# Cast targets whose numpy dtype is numpy's own: astype is exactly what the reference does
_PLAIN_CAST_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
    onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})
_PLAIN_KINDS = "biuf"


def run(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int
        ) -> list[np.ndarray] | None:
    """`node`'s outputs for these inputs, or None where the reference should run it. Raises
    what numpy raises for inputs the op rejects (a shape that does not fit, an axis out of
    range), as the reference would."""
    op = _OPS.get(node.op_type)
    if op is None or len(node.output) != 1:
        return None
    known, compute = op
    attributes = {attr.name: attr for attr in node.attribute}
    if not set(attributes) <= known:
        return None
    if any(value is not None and value.dtype.kind not in _PLAIN_KINDS for value in inputs):
        return None
    result = compute(attributes, inputs, opset)
    return None if result is None else [result]


def _identity(attributes, inputs, opset):
    return inputs[0].copy() if len(inputs) == 1 and inputs[0] is not None else None


def _reshape(attributes, inputs, opset):
    if len(inputs) != 2 or any(value is None for value in inputs):
        return None
    data, shape = inputs
    if shape.ndim != 1 or shape.dtype != np.int64:
        return None
    allowzero = "allowzero" in attributes and attributes["allowzero"].i == 1
    new_shape = [int(d) for d in shape]
    if not allowzero:
        for axis, size in enumerate(new_shape):
            if size == 0:
                if axis >= data.ndim:
                    raise ValueError(f"Reshape: 0 at axis {axis} of a rank-{data.ndim} input")
                new_shape[axis] = data.shape[axis]
    return np.reshape(data, new_shape)


def _axes(attributes, inputs, opset) -> tuple[int, ...] | None | bool:
    """The axes of Squeeze/Unsqueeze (from the attribute before opset 13, the second input
    from 13 on); None where absent; False where given in a way this module does not take."""
    if opset < 13:
        if len(inputs) != 1:
            return False
        axes = attributes.get("axes")
        return None if axes is None else tuple(int(a) for a in axes.ints)
    if "axes" in attributes or len(inputs) > 2:
        return False
    if len(inputs) < 2 or inputs[1] is None:
        return None
    if inputs[1].ndim != 1 or inputs[1].dtype != np.int64:
        return False
    return tuple(int(a) for a in inputs[1])


def _unsqueeze(attributes, inputs, opset):
    axes = _axes(attributes, inputs, opset)
    if axes is False or inputs[0] is None:
        return None
    if not axes:
        raise ValueError("Unsqueeze needs axes")
    return np.expand_dims(inputs[0], axes)


def _squeeze(attributes, inputs, opset):
    axes = _axes(attributes, inputs, opset)
    if axes is False or inputs[0] is None:
        return None
    return np.squeeze(inputs[0], axis=axes if axes else None)


def _flatten(attributes, inputs, opset):
    if len(inputs) != 1 or inputs[0] is None:
        return None
    data = inputs[0]
    axis = attributes["axis"].i if "axis" in attributes else 1
    if not -data.ndim <= axis <= data.ndim:
        raise ValueError(f"Flatten: axis {axis} out of range for rank {data.ndim}")
    if axis < 0:
        axis += data.ndim
    return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))


def _transpose(attributes, inputs, opset):
    if len(inputs) != 1 or inputs[0] is None:
        return None
    perm = tuple(int(p) for p in attributes["perm"].ints) if "perm" in attributes else None
    return np.transpose(inputs[0], perm)


def _constant_of_shape(attributes, inputs, opset):
    if len(inputs) != 1 or inputs[0] is None or inputs[0].dtype != np.int64:
        return None
    if "value" in attributes:
        value = numpy_helper.to_array(attributes["value"].t)
        if value.size != 1 or value.dtype.kind not in _PLAIN_KINDS:
            return None
        value = value.reshape(-1)[0]
    else:
        value = np.float32(0)
    return np.full(tuple(int(d) for d in inputs[0].reshape(-1)), value)


def _cast(attributes, inputs, opset):
    if len(inputs) != 1 or inputs[0] is None or "to" not in attributes:
        return None
    to = attributes["to"].i
    if to not in _PLAIN_CAST_TYPES:
        return None
    return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))


# op type -> (the attributes it may have, its numpy implementation)
_OPS = {
    "Identity": (set(), _identity),
    "Reshape": ({"allowzero"}, _reshape),
    "Unsqueeze": ({"axes"}, _unsqueeze),
    "Squeeze": ({"axes"}, _squeeze),
    "Flatten": ({"axis"}, _flatten),
    "Transpose": ({"perm"}, _transpose),
    "ConstantOfShape": ({"value"}, _constant_of_shape),
    "Cast": ({"to", "saturate"}, _cast),
}
