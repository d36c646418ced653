"""The numpy shape/copy ops (bnfold.folding.constant_ops) give what onnx.reference gives, value,
dtype and shape, or refuse where it does; anything else is left to the reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.folding import constant_ops
from bnfold.folding.constants import reference_run

R = np.random.default_rng(0)
X = R.normal(size=(2, 3, 4)).astype(np.float32)
I64 = np.array


def _node(op_type, n_inputs, **attributes):
    return helper.make_node(op_type, [f"i{k}" for k in range(n_inputs)], ["o"], **attributes)


CASES = [
    ("Identity", [X], {}, 13),
    ("Identity", [X.astype(np.float16)], {}, 13),
    ("Reshape", [X, I64([6, 4])], {}, 13),
    ("Reshape", [X, I64([0, -1])], {}, 13),
    ("Reshape", [X, I64([0, 0, 2, 2])], {}, 13),
    ("Reshape", [X, I64([-1])], {}, 13),
    ("Reshape", [np.zeros((0, 3), np.float32), I64([0, 3])], {"allowzero": 1}, 14),
    ("Reshape", [X, I64([5, -1])], {}, 13),  # 24 values do not fit: both refuse
    ("Reshape", [X, I64([2, 3, 4, 0])], {}, 13),  # 0 past the input's rank: both refuse
    ("Unsqueeze", [X], {"axes": [0]}, 11),
    ("Unsqueeze", [X], {"axes": [0, 4]}, 11),
    ("Unsqueeze", [X], {"axes": [-1]}, 11),
    ("Unsqueeze", [X, I64([1, 2])], {}, 13),
    ("Unsqueeze", [X, I64([-1, 0])], {}, 13),
    ("Unsqueeze", [np.float32(2.5).reshape(()), I64([0])], {}, 13),
    ("Unsqueeze", [X, I64([7])], {}, 13),  # out of range: both refuse
    ("Squeeze", [X[:1]], {"axes": [0]}, 11),
    ("Squeeze", [X[:1, :1]], {}, 11),
    ("Squeeze", [X[:1, :1], I64([1])], {}, 13),
    ("Squeeze", [X[:1, :1]], {}, 13),
    ("Squeeze", [X, I64([1])], {}, 13),  # size 3, not 1: both refuse
    ("Flatten", [X], {}, 13),
    ("Flatten", [X], {"axis": 0}, 13),
    ("Flatten", [X], {"axis": 3}, 13),
    ("Flatten", [X], {"axis": -1}, 13),
    ("Transpose", [X], {}, 13),
    ("Transpose", [X], {"perm": [1, 0, 2]}, 13),
    ("Transpose", [X], {"perm": [0, 0, 1]}, 13),  # not a permutation: both refuse
    ("ConstantOfShape", [I64([2, 3])], {}, 13),
    ("ConstantOfShape", [I64([4])], {"value": helper.make_tensor("v", TensorProto.FLOAT, [1],
                                                                   [1.5])}, 13),
    ("ConstantOfShape", [I64([2, 2])], {"value": helper.make_tensor("v", TensorProto.INT64, [1],
                                                                      [7])}, 13),
    ("ConstantOfShape", [I64([3])], {"value": helper.make_tensor("v", TensorProto.FLOAT16, [1],
                                                                   [0.1])}, 13),
    ("ConstantOfShape", [np.zeros(0, np.int64)], {}, 13),  # a scalar
    ("Cast", [X * 100], {"to": TensorProto.INT32}, 13),
    ("Cast", [X], {"to": TensorProto.FLOAT16}, 13),
    ("Cast", [X], {"to": TensorProto.DOUBLE}, 13),
    ("Cast", [I64([0, 1, 5])], {"to": TensorProto.BOOL}, 13),
    ("Cast", [I64([-1, 300])], {"to": TensorProto.UINT8}, 13),
]


@pytest.mark.parametrize("op_type, inputs, attributes, opset", CASES,
                         ids=[f"{c[0]}-{k}" for k, c in enumerate(CASES)])
def test_numpy_op_equals_the_reference(op_type, inputs, attributes, opset):
    node = _node(op_type, len(inputs), **attributes)
    try:
        expected = reference_run(node, inputs, opset)
    except Exception:  # noqa: BLE001 (the reference raises whatever numpy raises)
        expected = None
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017
            constant_ops.run(node, inputs, opset)
        return
    with np.errstate(invalid="ignore"):
        ours = constant_ops.run(node, inputs, opset)
    assert ours is not None, "answered by the reference, not numpy"
    assert len(ours) == len(expected) == 1
    assert ours[0].dtype == np.asarray(expected[0]).dtype
    assert ours[0].shape == np.asarray(expected[0]).shape
    assert np.array_equal(ours[0], expected[0])


def test_unsqueeze_axes_name_output_positions_in_any_order():
    """Unsqueeze-11's reference inserts the axes one by one in the listed order; the spec (and
    ONNX Runtime) reads them as positions in the output, whatever their order."""
    node = _node("Unsqueeze", 1, axes=[3, 0])
    assert constant_ops.run(node, [X], 11)[0].shape == (1, 2, 3, 1, 4)


@pytest.mark.parametrize("node, inputs", [
    (_node("Pow", 2), [X, X]),  # not one of these ops
    (_node("Cast", 1, to=TensorProto.BFLOAT16), [X]),  # not numpy's own dtype
    (_node("Cast", 1, to=TensorProto.FLOAT8E4M3FN, saturate=0), [X]),
    (_node("Reshape", 2), [X, np.array([6, 4], np.int32)]),  # not the spec's int64 shape
    (_node("Identity", 1, unknown=1), [X]),  # an attribute it does not know
    (_node("Identity", 1), [np.array(["a"], dtype=object)]),  # strings
    (_node("Unsqueeze", 1, axes=[0]), [X]),  # opset 13 takes axes as an input
])
def test_anything_else_is_left_to_the_reference(node, inputs):
    assert constant_ops.run(node, inputs, 13) is None
