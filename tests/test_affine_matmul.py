"""A frozen BN written as Mul → Add (tf2onnx) in front of Dense layers (MatMul → bias Add).

Named for the Keras habit it reproduces: one BatchNormalization feeding several Dense heads
(a captcha model's five digit classifiers). add-matmul moves the shift into each head's bias,
then mul-matmul the scale into each B; outputs are compared with the unfolded model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, count_ops, rng, tensor
from onnx import TensorProto, helper

import bnfold

K, N = 8, 5
FEED = {"x": rng(1).standard_normal((4, K)).astype(np.float32)}


def heads(count=3, scale_shape=(K,), shift_shape=(K,), bias=True, x_shape=(4, K),
          first="relu"):
    """x → Relu → Mul(s) → Add(t) → `count` × (MatMul(B_i) → Add(b_i)) → y_i."""
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Mul", ["h", "s"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "t"], ["a"], name="bn_add")]
    inits = [tensor("s", rng(2).uniform(0.5, 1.5, scale_shape)),
             tensor("t", rng(3).standard_normal(shift_shape))]
    outputs = []
    for i in range(count):
        inits.append(tensor(f"B{i}", rng(10 + i).standard_normal((K, N))))
        out = f"y{i}"
        if bias:
            nodes += [helper.make_node("MatMul", ["a", f"B{i}"], [f"mm{i}"], name=f"head{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"bias{i}")]
            inits.append(tensor(f"b{i}", rng(20 + i).standard_normal(N)))
        else:
            nodes.append(helper.make_node("MatMul", ["a", f"B{i}"], [out], name=f"head{i}"))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                     [f"d{j}" for j in range(len(x_shape))]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return m


def folds(result):
    return [(e.node, e.rule, e.into) for e in result.report.folded]


@pytest.mark.parametrize("count", [1, 3])
def test_keras_bn_before_dense_heads_folds_into_every_head(count):
    m = heads(count)
    result = bnfold.fold(m)
    into = ", ".join(f"head{i}" for i in range(count))
    assert folds(result) == [("bn_add", "add-matmul", into), ("bn_mul", "mul-matmul", into)]
    assert count_ops(result.model, "Mul") == 0
    assert count_ops(result.model, "Add") == count  # the heads' biases, shifted
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model, FEED)
    assert result.report.kept == []


def test_a_batch_of_sequences_folds_at_rank_three():
    feed = {"x": rng(1).standard_normal((2, 3, K)).astype(np.float32)}
    m = heads(2, x_shape=(2, 3, K))
    result = bnfold.fold(m)
    assert [e.rule for e in result.report.folded] == ["add-matmul", "mul-matmul"]
    assert_same_outputs(m, result.model, feed)


def test_matmul_without_a_bias_add_keeps_the_shift_with_the_reason():
    m = heads(2, bias=False)
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert [(e.node, e.op_type) for e in result.report.kept] == [("bn_add", "Add")]
    assert result.report.kept[0].reasons == [
        "into head0: head0 output is not read by one bias Add alone, where the shift would go"]
    assert_same_outputs(m, result.model, FEED)


def test_a_reader_that_is_not_a_matmul_keeps_the_pair():
    m = heads(2)
    m.graph.node.append(helper.make_node("Relu", ["a"], ["z"], name="other"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "k"]))
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert [(e.node, e.op_type) for e in result.report.kept] == [("bn_mul", "Mul")]


def test_a_constant_with_leading_axes_needs_the_input_rank():
    m = heads(2, scale_shape=(1, K), shift_shape=(1, K))
    del m.graph.input[0].type.tensor_type.shape.dim[:]  # rank unknown
    m.graph.input[0].type.tensor_type.ClearField("shape")
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert "rank of its input is unknown" in result.report.kept[0].reasons[0]


def test_layer_norm_affine_before_qkv_stays_for_the_runtime_to_fuse():
    # torch.onnx before opset 17 writes LayerNorm out: ... Div → Mul γ → Add β → Q, K, V.
    m = heads(3)
    relu = m.graph.node[0]
    relu.CopyFrom(helper.make_node("Div", ["x", "d"], ["h"], name="normalise"))
    m.graph.initializer.append(tensor("d", np.array(2.0)))
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert count_ops(result.model, "Mul") == 1


def test_a_dense_bias_before_the_next_dense_is_not_moved():
    nodes = [helper.make_node("MatMul", ["x", "B0"], ["mm0"], name="dense0"),
             helper.make_node("Add", ["mm0", "b0"], ["h"], name="bias0"),
             helper.make_node("MatMul", ["h", "B1"], ["mm1"], name="dense1"),
             helper.make_node("Add", ["mm1", "b1"], ["y"], name="bias1")]
    inits = [tensor("B0", rng(2).standard_normal((K, K))), tensor("b0", rng(3).standard_normal(K)),
             tensor("B1", rng(4).standard_normal((K, N))), tensor("b1", rng(5).standard_normal(N))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    result = bnfold.fold(m)
    assert result.report.entries == []
