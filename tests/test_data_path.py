"""The dominator chain a --locate bisection walks: parallel branches and shape computations
are left out, since a tensor there can agree although it comes after the cause."""

from __future__ import annotations

import onnx
from onnx import helper

from bnfold.verification.data_path import data_inputs, dominator_chain


def _residual_with_shape_branch() -> onnx.GraphProto:
    """x → Conv a → Relu b → Conv c; d = b + c (a residual); e = Reshape(d, Shape(x))."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Conv", ["b", "w2"], ["c"]),
             helper.make_node("Add", ["b", "c"], ["d"]),
             helper.make_node("Reshape", ["d", "s"], ["e"])]
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor("w1", onnx.TensorProto.FLOAT, [2, 2, 1, 1], [1.0] * 4),
         helper.make_tensor("w2", onnx.TensorProto.FLOAT, [2, 2, 1, 1], [1.0] * 4)])


def _is_data(name: str) -> bool:
    return name not in ("s", "w1", "w2")


def test_the_chain_skips_the_branch_and_the_shape():
    graph = _residual_with_shape_branch()
    assert dominator_chain(graph, "e", _is_data) == ["x", "a", "b", "d", "e"]
    # without the data test, Shape(x) → Reshape bypasses every data tensor
    assert dominator_chain(graph, "e", lambda name: True) == ["x", "e"]


def test_a_branch_output_is_its_own_chain_end():
    assert dominator_chain(_residual_with_shape_branch(), "c", _is_data) == [
        "x", "a", "b", "c"]


def test_unknown_or_non_data_outputs_have_no_chain():
    graph = _residual_with_shape_branch()
    assert dominator_chain(graph, "s", _is_data) == []
    assert dominator_chain(graph, "nowhere", _is_data) == []


def test_data_inputs_look_through_tensors_that_cannot_be_compared():
    graph = _residual_with_shape_branch()
    assert data_inputs(graph, "d", _is_data, {"b", "c"}) == ["b", "c"]
    assert data_inputs(graph, "e", _is_data, {"d"}) == ["d"]
    # a folded-away tensor (a) is replaced by what makes it
    assert data_inputs(graph, "b", _is_data, {"x", "b"}) == ["x"]
