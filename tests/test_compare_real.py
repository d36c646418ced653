"""tools/compare_real.py's count of frozen-BN Mul/Add left, on graphs whose answer is known."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import onnx
import pytest
from golden import tensor
from onnx import TensorProto, helper

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def count_affine_left():
    sys.path.insert(0, str(TOOLS))
    try:
        import compare_real
    finally:
        sys.path.remove(str(TOOLS))
    return compare_real.count_affine_left


def save(tmp_path, nodes, inits):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph), path)
    return path


WEIGHTS = [tensor("W", np.ones((3, 3, 1, 1))), tensor("B", np.ones((4, 3))),
           tensor("s", np.ones((1, 3, 1, 1))), tensor("t", np.ones((1, 3, 1, 1)))]


def test_frozen_bn_after_a_conv_and_a_squeeze_counts(tmp_path, count_affine_left):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Identity", ["c"], ["i"]),
             helper.make_node("Mul", ["i", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("Conv", ["a", "W"], ["c2"]),
             helper.make_node("Add", ["c2", "t"], ["y"])]
    assert count_affine_left(save(tmp_path, nodes, WEIGHTS)) == 2  # the Mul, the last Add


def test_bias_add_of_a_matmul_and_a_shared_output_do_not_count(tmp_path, count_affine_left):
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"]),
             helper.make_node("Add", ["mm", "t"], ["a"]),           # MatMul's bias add
             helper.make_node("Conv", ["a", "W"], ["c"]),
             helper.make_node("Add", ["c", "t"], ["hs"]),           # hard-swish: x·f(x + 3)
             helper.make_node("Mul", ["c", "hs"], ["y"])]
    assert count_affine_left(save(tmp_path, nodes, WEIGHTS)) == 0
