"""Every pattern that must fold: count, no BN left, checker, ORT numerics vs the unfolded model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import (
    assert_same_outputs,
    bn_node,
    bn_params,
    count_ops,
    model,
    rng,
    tensor,
)
from onnx import TensorProto, helper

import bnfold
from bnfold.folding.api import fold_sites


def fold_and_check(m: onnx.ModelProto, feed, expected_folded: int, rtol: float = 1e-5):
    before = m.SerializeToString()
    result = bnfold.fold(m)
    assert m.SerializeToString() == before, "fold modified its input model"
    assert result.report.folded_count == expected_folded, result.report.to_dict()
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model, feed, rtol)
    return result


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn(dims, group, bias):
    c_in, c_out = 4, 4
    groups = c_in if group == "depthwise" else group
    r = rng(dims * 10 + groups)
    k = (3,) * dims
    inits = [tensor("W", r.standard_normal((c_out, c_in // groups) + k)), *bn_params("bn", c_out)]
    inputs = ["x", "W"] + (["B"] if bias else [])
    if bias:
        inits.append(tensor("B", r.standard_normal(c_out)))
    conv = helper.make_node("Conv", inputs, ["c"], group=groups, pads=[1] * 2 * dims,
                            strides=[2] * dims, dilations=[1] + [2] * (dims - 1), name="conv")
    m = model([conv, bn_node("c", "y")], [("x", [2, c_in] + [9] * dims)], [("y", None)], inits)
    feed = {"x": r.standard_normal((2, c_in) + (9,) * dims).astype(np.float32)}
    result = fold_and_check(m, feed, 1)
    assert count_ops(result.model, "BatchNormalization") == 0
    assert count_ops(result.model, "Conv") == 1
    assert result.report.folded[0].into == "conv"


@pytest.mark.parametrize("group,c_in,c_out", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (3, 6, 9)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_convtranspose_bn(group, c_in, c_out, bias, dims):
    """Weight [Cin, Cout/g, k…]: the scale applies on axis 1 within each group."""
    r = rng(group + c_out)
    k = (3,) * dims
    inits = [tensor("W", r.standard_normal((c_in, c_out // group) + k)), *bn_params("bn", c_out)]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", r.standard_normal(c_out)))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["c"], group=group, strides=[2] * dims)
    m = model([node, bn_node("c", "y")], [("x", [2, c_in] + [5] * dims)], [("y", None)], inits)
    feed = {"x": r.standard_normal((2, c_in) + (5,) * dims).astype(np.float32)}
    fold_and_check(m, feed, 1)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", [None, "vector", "row", "matrix", "scalar"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
def test_gemm_bn(trans_a, trans_b, c_kind, alpha, beta):
    m_rows, k, n = 3, 5, 6
    r = rng(trans_a * 2 + trans_b)
    b_shape = (n, k) if trans_b else (k, n)
    inits = [tensor("Bm", r.standard_normal(b_shape)), *bn_params("bn", n)]
    inputs = ["a", "Bm"]
    c_shapes = {"vector": (n,), "row": (1, n), "matrix": (m_rows, n), "scalar": ()}
    if c_kind:
        inits.append(tensor("C", r.standard_normal(c_shapes[c_kind])))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], transA=trans_a, transB=trans_b, alpha=alpha,
                            beta=beta, name="gemm")
    a_shape = [k, m_rows] if trans_a else [m_rows, k]
    m = model([gemm, bn_node("g", "y")], [("a", a_shape)], [("y", [m_rows, n])], inits)
    feed = {"a": r.standard_normal(a_shape).astype(np.float32)}
    fold_and_check(m, feed, 1)


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_bn_becomes_gemm(with_add):
    r = rng(3)
    inits = [tensor("Bm", r.standard_normal((5, 6))), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["a", "Bm"], ["mm"])]
    bn_input = "mm"
    if with_add:
        inits.append(tensor("bias", r.standard_normal(6)))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["mm_b"]))
        bn_input = "mm_b"
    nodes.append(bn_node(bn_input, "y"))
    m = model(nodes, [("a", [4, 5])], [("y", [4, 6])], inits)
    result = fold_and_check(m, {"a": r.standard_normal((4, 5)).astype(np.float32)}, 1)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]


def test_bn_before_unpadded_conv_folds_forward():
    r = rng(4)
    inits = [*bn_params("bn", 4), tensor("W", r.standard_normal((6, 2, 3, 3))),
             tensor("B", r.standard_normal(6))]
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "W", "B"], ["y"], group=2,
                                                  strides=[2, 2], name="conv")]
    m = model(nodes, [("x", [2, 4, 9, 9])], [("y", None)], inits)
    result = fold_and_check(m, {"x": r.standard_normal((2, 4, 9, 9)).astype(np.float32)}, 1)
    assert result.report.folded[0].rule == "bn-conv"


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_bn_before_gemm_folds_forward(trans_b, beta):
    r = rng(5)
    k, n = 5, 3
    inits = [*bn_params("bn", k), tensor("Bm", r.standard_normal((n, k) if trans_b else (k, n))),
             tensor("C", r.standard_normal(n))]
    nodes = [bn_node("x", "n"), helper.make_node("Gemm", ["n", "Bm", "C"], ["y"], transB=trans_b,
                                                  alpha=0.7, beta=beta)]
    m = model(nodes, [("x", [4, k])], [("y", [4, n])], inits)
    result = fold_and_check(m, {"x": r.standard_normal((4, k)).astype(np.float32)}, 1)
    assert result.report.folded[0].rule == "bn-gemm"


@pytest.mark.parametrize("producer", ["Conv", "Gemm"])
def test_frozen_bn_as_mul_add_folds(producer):
    r = rng(6)
    if producer == "Conv":
        inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), tensor("s", r.uniform(0.5, 2, (4, 1, 1))),
                 tensor("t", r.standard_normal((1, 4, 1, 1)))]
        shape, out = [2, 3, 8, 8], None
    else:
        inits = [tensor("W", r.standard_normal((4, 3))), tensor("s", r.uniform(0.5, 2, 4)),
                 tensor("t", r.standard_normal((1, 4)))]
        shape, out = [2, 3], [2, 4]
    nodes = [helper.make_node(producer, ["x", "W"], ["p"], **({"transB": 1} if producer == "Gemm" else {})),
             helper.make_node("Mul", ["s", "p"], ["q"]),  # constant first: order must not matter
             helper.make_node("Add", ["q", "t"], ["y"])]
    m = model(nodes, [("x", shape)], [("y", out)], inits)
    result = fold_and_check(m, {"x": r.standard_normal(shape).astype(np.float32)}, 0)
    assert [n.op_type for n in result.model.graph.node] == [producer]
    assert [e.op_type for e in result.report.folded] == ["Mul", "Add"]


def test_mul_with_spatial_constant_is_not_folded():
    r = rng(7)
    inits = [tensor("W", r.standard_normal((4, 3, 1, 1))), tensor("s", r.standard_normal((1, 1, 5, 5)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["p"]), helper.make_node("Mul", ["p", "s"], ["y"])]
    m = model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], inits)
    result = bnfold.fold(m)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Mul"]


def test_chain_conv_bn_bn():
    r = rng(8)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn1", 4, 1), *bn_params("bn2", 4, 2)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "m", "bn1", "bn1"),
             bn_node("m", "y", "bn2", "bn2")]
    m = model(nodes, [("x", [2, 3, 7, 7])], [("y", None)], inits)
    result = fold_and_check(m, {"x": r.standard_normal((2, 3, 7, 7)).astype(np.float32)}, 2)
    assert count_ops(result.model, "BatchNormalization") == 0
    # The BN parameters are gone from the file, not just unused.
    assert {t.name for t in result.model.graph.initializer} == {"W", "W_bias_bnfold"}


def test_bn_parameters_from_constant_nodes():
    r = rng(9)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in bn_params("bn", 4)]
    nodes = [*consts, helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], [tensor("W", r.standard_normal((4, 3, 3, 3)))])
    result = fold_and_check(m, {"x": r.standard_normal((1, 3, 6, 6)).astype(np.float32)}, 1)
    assert count_ops(result.model, "Constant") == 0


def test_shared_weight_gets_its_own_folded_copy():
    r = rng(10)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"),
             bn_node("c1", "y1")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y1", None), ("c2", None)], inits)
    result = fold_and_check(m, {"x": r.standard_normal((1, 3, 6, 6)).astype(np.float32)}, 1)
    conv1, conv2 = result.model.graph.node
    assert conv2.input[1] == "W" and conv1.input[1] != "W"
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(weights["W"], onnx.numpy_helper.to_array(inits[0]))


def test_two_convs_sharing_a_weight_both_fold():
    r = rng(11)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bna", 4, 1), *bn_params("bnb", 4, 2)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"]), helper.make_node("Conv", ["x", "W"], ["c2"]),
             bn_node("c1", "y1", "bna", "bna"), bn_node("c2", "y2", "bnb", "bnb")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y1", None), ("y2", None)], inits)
    result = fold_and_check(m, {"x": r.standard_normal((1, 3, 6, 6)).astype(np.float32)}, 2)
    w1, w2 = (n.input[1] for n in result.model.graph.node)
    assert w1 != w2


def _if_model():
    r = rng(12)
    outer = [tensor("W", r.standard_normal((3, 3, 3, 3))), *bn_params("bn", 3)]
    shape = [1, 3, 4, 4]

    def value(name, elem=onnx.TensorProto.FLOAT, dims=shape):
        return helper.make_tensor_value_info(name, elem, dims)

    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y_then")],
        "then", [], [value("y_then")])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                                   [value("y_else")])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph([node], "g", [value("x"), value("cond", onnx.TensorProto.BOOL, [])],
                              [value("y")], outer)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), r


def test_bn_inside_if_branch_with_outer_scope_weights():
    m, r = _if_model()
    x = r.standard_normal((1, 3, 4, 4)).astype(np.float32)
    result = fold_and_check(m, {"x": x, "cond": np.array(True)}, 1)
    assert result.report.folded[0].graph.startswith("main/")
    assert count_ops(result.model, "BatchNormalization") == 0
    # The outer BN parameters were only read by the branch: they are removed.
    assert not {"bn_scale", "bn_var"} & {t.name for t in result.model.graph.initializer}


def test_bn_inside_loop_body():
    r = rng(13)
    inits = [tensor("W", r.standard_normal((3, 3, 1, 1))), *bn_params("bn", 3)]
    body = helper.make_graph(
        [helper.make_node("Conv", ["state_in", "W"], ["c"]), bn_node("c", "state_out"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)
    graph = helper.make_graph(
        [loop], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("trip", onnx.TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = {"x": r.standard_normal((1, 3, 4, 4)).astype(np.float32), "trip": np.array(3)}
    fold_and_check(m, feed, 1)


@pytest.mark.parametrize("opset,attrs", [
    (7, {"spatial": 1}),
    (9, {}),
    (14, {"training_mode": 0}),
    (15, {}),
    (15, {"epsilon": 1e-2}),
])
def test_batchnorm_opsets(opset, attrs):
    r = rng(opset)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", **attrs)]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], inits, opset=opset)
    fold_and_check(m, {"x": r.standard_normal((2, 3, 6, 6)).astype(np.float32)}, 1)


def test_batchnorm_opset6_is_test():
    """Opset 6 has no ORT kernel; check the fold with onnx's reference evaluator instead."""
    from onnx.reference import ReferenceEvaluator

    r = rng(6)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", is_test=1, epsilon=1e-3)]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 4, 4, 4])], inits, opset=6, ir_version=4)
    result = bnfold.fold(m)
    assert result.report.folded_count == 1
    x = r.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = onnx.numpy_helper.to_array(inits[0]).astype(np.float64)
    gamma, beta, mean, var = (onnx.numpy_helper.to_array(t).astype(np.float64) for t in inits[1:])
    conv = ReferenceEvaluator(model([helper.make_node("Conv", ["x", "W"], ["c"])], [("x", [2, 3, 6, 6])],
                                    [("c", [2, 4, 4, 4])], [tensor("W", w, np.float64)],
                                    elem=onnx.TensorProto.DOUBLE))
    c = conv.run(None, {"x": x.astype(np.float64)})[0]
    expected = (c - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    folded = ReferenceEvaluator(result.model).run(None, {"x": x})[0]
    assert np.abs(folded - expected).max() <= 1e-5 * np.abs(expected).max()


def test_float16_model_folds_within_half_precision():
    r = rng(14)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3)) * 0.3, np.float16), *bn_params("bn", 4, dtype=np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], inits, elem=onnx.TensorProto.FLOAT16)
    result = fold_and_check(m, {"x": r.standard_normal((1, 3, 6, 6)).astype(np.float16)}, 1, rtol=4e-3)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)


def test_lower_standalone_bn_to_mul_add():
    r = rng(15)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    m = model(nodes, [("x", [2, 4, 5, 5])], [("y", [2, 4, 5, 5])], bn_params("bn", 4))
    kept = bnfold.fold(m)
    assert kept.report.kept and count_ops(kept.model, "BatchNormalization") == 1
    result = bnfold.fold(m, lower_standalone=True)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add"]
    assert result.report.lowered[0].node == "bn"
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model, {"x": r.standard_normal((2, 4, 5, 5)).astype(np.float32)})


def test_folding_a_folded_model_changes_nothing():
    from bnfold.sample_model import build_sample_model

    once = bnfold.fold(build_sample_model()).model
    twice = bnfold.fold(once)
    assert twice.model.SerializeToString() == once.SerializeToString()
    assert twice.report.folded_count == 0


def test_sample_model_report():
    from bnfold.sample_model import build_sample_model

    m = build_sample_model()
    result = bnfold.fold(m)
    summary = result.report.to_dict()["summary"]
    assert summary == {"batchnorm": 7, "folded": 6, "lowered": 0, "kept": 1,
                       "mul_add_folded": 0, "mul_add_kept": 0, "convs_merged": 0}
    rules = {e.node: e.rule for e in result.report.folded}
    assert rules["up_bn"] == "convtranspose-bn" and rules["pre_bn"] == "bn-conv"
    assert rules["head_bn"] == "gemm-bn"
    assert "post_relu" in result.report.kept[0].reasons[0]
    feed = {"input": rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    assert_same_outputs(m, result.model, feed)


def test_fold_function_and_its_modules_are_both_reachable():
    import importlib

    math_module = importlib.import_module("bnfold.folding.math")
    import bnfold.folding.report as report_module  # `import a.b.c as x` walks attributes

    assert callable(bnfold.fold) and bnfold.fold.__name__ == "fold"
    assert callable(bnfold.verify) and bnfold.verify.__name__ == "verify"
    assert hasattr(math_module, "bn_scale_shift") and hasattr(report_module, "FoldReport")


def test_matmul_bn_at_opset6_gets_a_broadcasting_gemm():
    from onnx.reference import ReferenceEvaluator

    r = rng(16)
    inits = [tensor("Bm", r.standard_normal((5, 6))), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["a", "Bm"], ["mm"]), bn_node("mm", "y", is_test=1)]
    m = model(nodes, [("a", [4, 5])], [("y", [4, 6])], inits, opset=6, ir_version=4)
    result = bnfold.fold(m)
    (gemm,) = result.model.graph.node
    assert gemm.op_type == "Gemm" and helper.get_attribute_value(gemm.attribute[0]) == 1
    a = r.standard_normal((4, 5)).astype(np.float32)
    expected = ReferenceEvaluator(m).run(None, {"a": a})[0]
    folded = ReferenceEvaluator(result.model).run(None, {"a": a})[0]
    assert np.abs(folded - expected).max() <= 1e-5 * np.abs(expected).max()


def mixconv(axis=1, extra_reader=None, concat_reader=None):
    """MixNet's MixConv: Split → Conv 3x3 (bias) and Conv 5x5 (none) → Concat → BN."""
    r = rng(7)
    nodes = [helper.make_node("Split", ["x", "halves"], ["x1", "x2"], axis=1),
             helper.make_node("Conv", ["x1", "W3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="k3"),
             helper.make_node("Conv", ["x2", "W5"], ["c5"], pads=[2, 2, 2, 2], name="k5"),
             helper.make_node("Concat", ["c3", "c5"], ["cat"], axis=axis, name="cat"),
             bn_node("cat", "y")]
    outputs = [("y", None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", [extra_reader], ["other"]))
        outputs.append(("other", None))
    across = axis in (1, -3)  # the channels; else both Convs give 3 channels, joined along H
    inits = [tensor("halves", [2, 2], np.int64), tensor("W3", r.standard_normal((3, 2, 3, 3))),
             tensor("b3", r.standard_normal(3)),
             tensor("W5", r.standard_normal((2 if across else 3, 2, 5, 5))),
             *bn_params("bn", 5 if across else 3)]
    return model(nodes, [("x", [1, 4, 6, 6])], outputs, inits, opset=13)


@pytest.mark.parametrize("axis", [1, -3])
def test_bn_after_a_concat_of_convs_folds_into_each_conv(axis):
    m = mixconv(axis)
    result = fold_and_check(m, {"x": rng(8).standard_normal((1, 4, 6, 6)).astype(np.float32)}, 1)
    (entry,) = result.report.folded
    assert entry.rule == "concat-bn" and entry.into == "k3, k5"
    assert [n.op_type for n in result.model.graph.node] == ["Split", "Conv", "Conv", "Concat"]
    assert result.model.graph.node[-1].output[0] == "y"


@pytest.mark.parametrize("variant,reason", [
    ({"extra_reader": "c5"}, "k5 output 'c5' also feeds"),
    ({"extra_reader": "cat"}, "cat output 'cat' also feeds"),
    ({"axis": 2}, "cat joins axis 2, not the channels"),
])
def test_concat_bn_is_refused_when_a_link_has_another_reader(variant, reason):
    result = bnfold.fold(mixconv(**variant))
    (kept,) = result.report.kept
    assert kept.reasons[0].startswith("into cat:") and reason in kept.reasons[0]
    assert count_ops(result.model, "BatchNormalization") == 1


def ibn(part=0, opset=13, sizes="input", axis=1, conv_reader=False):
    """IBN-Net: Conv → Split(axis 1) → BN on one part, InstanceNorm on the other → Concat."""
    r = rng(9)
    split_inputs = ["c", "sizes"] if sizes == "input" else ["c"]
    split_attrs = {"split": [3, 3]} if sizes == "attribute" else {}
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Split", split_inputs, ["p0", "p1"], axis=axis, name="split",
                              **split_attrs),
             bn_node(f"p{part}", "normed"),
             helper.make_node("InstanceNormalization", [f"p{1 - part}", "in_s", "in_b"],
                              ["inst"]),
             helper.make_node("Concat", ["normed", "inst"] if part == 0 else ["inst", "normed"],
                              ["y"], axis=1)]
    outputs = [("y", None)]
    if conv_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["other"]))
        outputs.append(("other", None))
    across = axis == 1
    inits = [tensor("W", r.standard_normal((6, 4, 3, 3))), tensor("b", r.standard_normal(6)),
             tensor("in_s", r.uniform(0.5, 1.5, 3 if across else 6)),
             tensor("in_b", r.standard_normal(3 if across else 6)),
             *bn_params("bn", 3 if across else 6)]
    if sizes == "input":
        inits.append(tensor("sizes", [3, 3], np.int64))
    return model(nodes, [("x", [1, 4, 6, 6])], outputs, inits, opset=opset)


@pytest.mark.parametrize("part,opset,sizes", [(0, 13, "input"), (1, 13, "input"),
                                              (1, 11, "attribute"), (1, 13, "equal")])
def test_bn_on_one_part_of_a_split_conv_folds_into_its_rows(part, opset, sizes):
    m = ibn(part, opset, sizes)
    result = fold_and_check(m, {"x": rng(10).standard_normal((1, 4, 6, 6)).astype(np.float32)}, 1)
    assert [e.rule for e in result.report.folded] == ["split-bn"]
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert split.output[part] == "normed"


@pytest.mark.parametrize("variant,reason", [
    ({"conv_reader": True}, "conv output 'c' also feeds"),
    ({"axis": 2}, "split splits axis 2, not the channels"),
])
def test_split_bn_is_refused_with_its_reason(variant, reason):
    result = bnfold.fold(ibn(**variant))
    (kept,) = result.report.kept
    assert kept.reasons[0].startswith("into conv:") and reason in kept.reasons[0]


def octconv(mode="nearest", opset=17, resize="scales", both_resized=False, conv_reader=False):
    """OctConv's output: Conv of the high-frequency input + Resize(Conv of the low-frequency
    one) → Add → BN. The low Conv has no bias; `both_resized` puts a Resize on each branch."""
    r = rng(11)
    nodes = [helper.make_node("AveragePool", ["x"], ["low"], kernel_shape=[2, 2], strides=[2, 2])]
    inits = [tensor("Wh", r.standard_normal((6, 4, 3, 3))), tensor("bh", r.standard_normal(6)),
             tensor("Wl", r.standard_normal((6, 4, 3, 3))), *bn_params("bn", 6)]
    sources = {"hi": "low" if both_resized else "x", "lo": "low"}
    resized = ["lo", "hi"] if both_resized else ["lo"]
    for name, bias in (("hi", ["bh"]), ("lo", [])):
        nodes.append(helper.make_node("Conv", [sources[name], f"W{name[0]}", *bias], [f"c_{name}"],
                                      pads=[1, 1, 1, 1], name=name))
    for name in resized:
        attrs = {"mode": mode}
        if opset < 9:
            nodes.append(helper.make_node("Upsample", [f"c_{name}"], [f"up_{name}"],
                                          scales=[1.0, 1.0, 2.0, 2.0], **attrs))
            continue
        if opset == 9:
            inputs, op = [f"c_{name}", "scales"], "Upsample"
        elif resize == "sizes":
            inputs, op = [f"c_{name}", "", "", "sizes"], "Resize"
        elif resize == "axes":
            inputs, op = [f"c_{name}", "", "spatial"], "Resize"
            attrs["axes"] = [2, 3]
        else:
            inputs, op = [f"c_{name}", "", "scales"], "Resize"
        nodes.append(helper.make_node(op, inputs, [f"up_{name}"], name=f"resize_{name}", **attrs))
    inits += [tensor("scales", [1, 1.01 if resize == "channels" else 1, 2, 2]),
              tensor("spatial", [2, 2]), tensor("sizes", [1, 6, 8, 8], np.int64)]
    terms = [f"up_{n}" if n in resized else f"c_{n}" for n in ("hi", "lo")]
    nodes += [helper.make_node("Add", terms, ["sum"], name="add"), bn_node("sum", "y")]
    outputs = [("y", None)]
    if conv_reader:
        nodes.append(helper.make_node("Relu", ["c_lo"], ["other"]))
        outputs.append(("other", None))
    return model(nodes, [("x", [1, 4, 8, 8])], outputs, inits, opset=opset)


@pytest.mark.parametrize("mode,opset,resize", [
    ("nearest", 17, "scales"), ("linear", 17, "scales"), ("cubic", 13, "sizes"),
    ("nearest", 18, "axes"), ("nearest", 9, "scales"), ("nearest", 8, "scales"),
])
def test_bn_after_an_add_of_convs_folds_into_both(mode, opset, resize):
    m = octconv(mode, opset, resize)
    result = fold_and_check(m, {"x": rng(12).standard_normal((1, 4, 8, 8)).astype(np.float32)}, 1)
    (entry,) = result.report.folded
    assert entry.rule == "add-bn" and entry.into == "hi, lo"
    assert count_ops(result.model, "BatchNormalization") == 0
    last = result.model.graph.node[-1]
    assert last.op_type == "Add" and last.output[0] == "y"
    # The shift went into the high branch's bias; the low Conv gained none.
    lo = next(n for n in result.model.graph.node if n.name == "lo")
    assert len(lo.input) == 2


def test_add_bn_puts_the_shift_through_a_nearest_resize_only():
    m = octconv("nearest", both_resized=True)
    fold_and_check(m, {"x": rng(12).standard_normal((1, 4, 8, 8)).astype(np.float32)}, 1)
    result = bnfold.fold(octconv("linear", both_resized=True))
    (kept,) = result.report.kept
    assert "every branch of add passes an interpolating Resize" in kept.reasons[0]


@pytest.mark.parametrize("variant,reason", [
    ({"conv_reader": True}, "lo output 'c_lo' also feeds"),
    ({"resize": "channels"}, "resize_lo resamples the channel axis (1.01"),
])
def test_add_bn_is_refused_with_its_reason(variant, reason):
    result = bnfold.fold(octconv(**variant))
    (kept,) = result.report.kept
    assert kept.reasons[0].startswith("into add:") and reason in kept.reasons[0], kept.reasons
    assert count_ops(result.model, "BatchNormalization") == 1


def octconv_cast(conv_type=TensorProto.FLOAT16, wide=TensorProto.FLOAT):
    """OctConv as onnxconverter-common writes it in float16: the low branch's Resize stays in
    float32, between Cast(to `wide`) and Cast back to `conv_type`."""
    r = rng(19)
    dtype = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}[conv_type]
    nodes = [helper.make_node("AveragePool", ["x"], ["low"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["x", "Wh", "bh"], ["c_hi"], pads=[1, 1, 1, 1], name="hi"),
             helper.make_node("Conv", ["low", "Wl"], ["c_lo"], pads=[1, 1, 1, 1], name="lo"),
             helper.make_node("Cast", ["c_lo"], ["wide"], to=wide),
             helper.make_node("Resize", ["wide", "", "scales"], ["up_wide"], mode="nearest"),
             helper.make_node("Cast", ["up_wide"], ["up"], to=conv_type),
             helper.make_node("Add", ["c_hi", "up"], ["sum"], name="add"), bn_node("sum", "y")]
    inits = [tensor("Wh", r.standard_normal((6, 4, 3, 3)) / 6, dtype),
             tensor("bh", r.standard_normal(6), dtype),
             tensor("Wl", r.standard_normal((6, 4, 3, 3)) / 6, dtype),
             *bn_params("bn", 6, dtype=dtype), tensor("scales", [1, 1, 2, 2])]
    return model(nodes, [("x", [1, 4, 8, 8])], [("y", None)], inits, elem=conv_type)


def test_add_bn_looks_through_the_float32_resize_of_a_float16_model():
    m = octconv_cast()
    feed = {"x": rng(12).standard_normal((1, 4, 8, 8)).astype(np.float16)}
    result = fold_and_check(m, feed, 1, rtol=1e-2)
    (entry,) = result.report.folded
    assert entry.rule == "add-bn" and entry.into == "hi, lo"
    assert count_ops(result.model, "Cast") == 2  # they stay, around the Resize
    # A Cast that narrows (float32 → float16 → float32) is no round trip: not looked through.
    result = bnfold.fold(octconv_cast(TensorProto.FLOAT, TensorProto.FLOAT16))
    assert result.report.folded_count == 0


def levit(to_2d="flatten", bias=False, value_reader=False):
    """LeViT's LinearNorm: MatMul on [B, L, C] tokens → Flatten(axis 2) (or a Reshape) → BN →
    Reshape back to the MatMul's own shape (read through a Shape node, as `reshape_as`)."""
    r = rng(13)
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"], name="linear")]
    inits = [tensor("B", r.standard_normal((4, 6))), *bn_params("bn", 6),
             tensor("to2d", [-1, 6] if to_2d == "reshape" else [2, 6, 5], np.int64),
             tensor("c", r.standard_normal((1, 1, 6)))]
    source = "mm"
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "c"], ["biased"], name="bias"))
        source = "biased"
    if to_2d == "flatten":
        nodes.append(helper.make_node("Flatten", [source], ["flat"], axis=2))
    else:
        nodes.append(helper.make_node("Reshape", [source, "to2d"], ["flat"]))
    nodes += [bn_node("flat", "normed"),
              helper.make_node("Shape", ["mm"], ["shape"]),
              helper.make_node("Reshape", ["normed", "shape"], ["y"])]
    outputs = [("y", None)]
    if value_reader:
        nodes.append(helper.make_node("Relu", ["mm"], ["other"]))
        outputs.append(("other", None))
    return model(nodes, [("x", [2, 5, 4])], outputs, inits, opset=17)


@pytest.mark.parametrize("to_2d,bias", [("flatten", False), ("reshape", False),
                                        ("flatten", True)])
def test_bn_over_flattened_matmul_tokens_folds_into_its_columns(to_2d, bias):
    m = levit(to_2d, bias)
    result = fold_and_check(m, {"x": rng(14).standard_normal((2, 5, 4)).astype(np.float32)}, 1)
    (entry,) = result.report.folded
    assert entry.rule == "matmul-reshape-bn"
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops
    # The shift joins the existing bias Add, or becomes one where the BN was.
    assert ops.count("Add") == 1 and ops.count("MatMul") == 1
    assert entry.into == ("linear" if bias else "linear + a bias Add")


@pytest.mark.parametrize("variant,reason", [
    ({"to_2d": "rank3"}, "makes a rank-3 tensor"),
    ({"value_reader": True}, "linear output 'mm' also feeds"),
])
def test_matmul_reshape_bn_is_refused_with_its_reason(variant, reason):
    result = bnfold.fold(levit(**variant))
    (kept,) = result.report.kept
    assert any(reason in r for r in kept.reasons), kept.reasons
    assert count_ops(result.model, "BatchNormalization") == 1


def repvgg(group=1, pads3=(1, 1, 1, 1), dilation=1, with_1x1=True, zero_add=False,
           combine="Add"):
    """RepVGG's training-form block: Conv3x3→BN (+ Conv1x1→BN) + BN(x), summed. `zero_add`
    adds the identity BN to a constant 0 first (MobileOne without a scale branch);
    `combine="Sub"` subtracts it instead (FastViT's RepMixer), "SubFrom" subtracts the sum from
    it."""
    r = rng(15)
    nodes = [helper.make_node("Conv", ["x", "W3", "b3"], ["c3"], pads=list(pads3), group=group,
                              dilations=[dilation, dilation], name="conv3"),
             bn_node("c3", "n3", prefix="bn3", name="bn3"),
             bn_node("x", "nid", prefix="bnid", name="identity")]
    if zero_add:
        nodes += [helper.make_node("Constant", [], ["zero"], value=tensor("zero", 0.0)),
                  helper.make_node("Add", ["zero", "nid"], ["nid0"], name="add_zero")]
    identity = "nid0" if zero_add else "nid"
    if with_1x1:
        nodes += [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
                  bn_node("c1", "n1", prefix="bn1", name="bn1"),
                  helper.make_node("Add", ["n3", "n1"], ["branches"], name="add")]
    branches = "branches" if with_1x1 else "n3"
    terms = [identity, branches] if combine == "SubFrom" else [branches, identity]
    nodes.append(helper.make_node(combine.replace("From", ""), terms, ["y"],
                                  name="add_identity"))
    inits = [tensor("W3", r.standard_normal((4, 4 // group, 3, 3))),
             tensor("b3", r.standard_normal(4)), *bn_params("bn3", 4, 2), *bn_params("bnid", 4, 4)]
    if with_1x1:
        inits += [tensor("W1", r.standard_normal((4, 4, 1, 1))), *bn_params("bn1", 4, 3)]
    return model(nodes, [("x", [1, 4, 6, 6])], [("y", None)], inits, opset=17)


@pytest.mark.parametrize("group,pads3", [(1, (1, 1, 1, 1)), (2, (1, 1, 1, 1)),
                                         (4, (2, 2, 0, 0))])
def test_identity_bn_joins_a_conv_of_the_same_input(group, pads3):
    m = repvgg(group, pads3)
    merged = group == 1  # conv1 is a plain 1×1: with group 1 the two Convs merge as well
    feed = {"x": rng(16).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    result = fold_and_check(m, feed, 3)
    rules = {e.node: (e.rule, e.into) for e in result.report.folded}
    assert rules == {"bn3": ("conv-bn", "conv3"), "bn1": ("conv-bn", "conv1"),
                     "identity": ("identity-bn", "conv3"),
                     **({"add": ("merge-convs", "conv3")} if merged else {})}
    assert [n.op_type for n in result.model.graph.node] == (
        ["Conv"] if merged else ["Conv", "Conv", "Add"])
    assert result.model.graph.node[-1].output[0] == "y"
    # conv3's output now carries the identity too: no longer a site to compare with bn3's.
    assert fold_sites(result.model, result.report) == (["y"] if merged else ["n1"])


def test_identity_bn_takes_the_next_conv_when_one_has_no_tap_over_each_position():
    # Dilation 2, pads 1 + 3: the output keeps the input's size but every tap is shifted.
    feed = {"x": rng(16).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    result = fold_and_check(repvgg(pads3=(1, 1, 3, 3), dilation=2), feed, 3)
    assert {e.node: e.into for e in result.report.folded}["identity"] == "conv1"
    result = bnfold.fold(repvgg(pads3=(1, 1, 3, 3), dilation=2, with_1x1=False))
    (kept,) = result.report.kept
    assert kept.node == "identity"
    assert any("conv3: its padding on axis 2 does not keep each position over itself" in r
               for r in kept.reasons), kept.reasons


@pytest.mark.parametrize("zero_add,combine", [(True, "Add"), (False, "Sub"), (True, "Sub")])
def test_identity_bn_passes_zero_adds_and_joins_a_sub_negated(zero_add, combine):
    m = repvgg(group=2, zero_add=zero_add, combine=combine)  # group 2: the Convs stay apart
    result = fold_and_check(m, {"x": rng(16).standard_normal((1, 4, 6, 6)).astype(np.float32)}, 3)
    assert {e.node: e.rule for e in result.report.folded}["identity"] == "identity-bn"
    # The BN, the zero Add with its Constant, and the Add/Sub that took the identity are gone.
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "Add"]
    assert result.model.graph.node[-1].output[0] == "y"


def test_identity_bn_leaves_a_bn_the_sum_is_subtracted_from():
    # BN(x) − (conv3 + conv1) would need the Convs negated: not this rule's pattern.
    m = repvgg(combine="SubFrom")
    result = fold_and_check(m, {"x": rng(16).standard_normal((1, 4, 6, 6)).astype(np.float32)}, 2)
    (kept,) = result.report.kept
    assert kept.node == "identity"
    assert count_ops(result.model, "Sub") == 1


def repvit(stem=True, pads3=(1, 1, 1, 1), dilation=1, order="convs_first", with_1x1=True):
    """RepViT's RepVggDw: BN(conv3(y) + conv1(y) + y), depthwise, no BN on the branches (they
    folded already); y is a stem Conv's output or the graph input."""
    r = rng(17)
    nodes, inits = [], [tensor("W3", r.standard_normal((4, 1, 3, 3))),
                        tensor("b3", r.standard_normal(4)),
                        tensor("W1", r.standard_normal((4, 1, 1, 1))),
                        tensor("b1", r.standard_normal(4)), *bn_params("bn", 4)]
    source = "x"
    if stem:
        nodes.append(helper.make_node("Conv", ["x", "Ws"], ["y"], pads=[1, 1, 1, 1], name="stem"))
        inits.append(tensor("Ws", r.standard_normal((4, 4, 3, 3))))
        source = "y"
    nodes.append(helper.make_node("Conv", [source, "W3", "b3"], ["c3"], pads=list(pads3), group=4,
                                  dilations=[dilation, dilation], name="conv3"))
    if not with_1x1:
        nodes.append(helper.make_node("Add", ["c3", source], ["s2"], name="add2"))
    elif order == "convs_first":
        nodes += [helper.make_node("Conv", [source, "W1", "b1"], ["c1"], group=4, name="conv1"),
                  helper.make_node("Add", ["c3", "c1"], ["s1"], name="add1"),
                  helper.make_node("Add", ["s1", source], ["s2"], name="add2")]
    else:  # the identity in the inner Add
        nodes += [helper.make_node("Conv", [source, "W1", "b1"], ["c1"], group=4, name="conv1"),
                  helper.make_node("Add", [source, "c1"], ["s1"], name="add1"),
                  helper.make_node("Add", ["c3", "s1"], ["s2"], name="add2")]
    nodes += [bn_node("s2", "out"), helper.make_node("Relu", [source], ["side"])]
    return model(nodes, [("x", [1, 4, 6, 6])], [("out", None), ("side", None)], inits, opset=17)


@pytest.mark.parametrize("stem,order", [(True, "convs_first"), (False, "convs_first"),
                                        (True, "identity_inside")])
def test_bn_after_a_sum_of_convs_and_their_input_folds_the_identity_into_one(stem, order):
    m = repvit(stem, order=order)
    result = fold_and_check(m, {"x": rng(18).standard_normal((1, 4, 6, 6)).astype(np.float32)}, 1)
    rules = {e.node: (e.rule, e.into) for e in result.report.folded}
    # With the Convs' Add first in node order, merge-convs joins them before the BN is reached;
    # else add-bn folds into both and the identity's Add goes, then they merge.
    assert rules["bn"] == ("add-bn", "conv3" if order == "convs_first" else "conv3, conv1")
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Conv", "Relu"] if stem else ["Conv", "Relu"]
    assert result.model.graph.node[-2].output[0] == "out"


def test_add_bn_names_why_no_summed_conv_absorbs_the_identity():
    # Dilation 2, pads 1 + 3: the output keeps the input's size but every tap is shifted.
    result = bnfold.fold(repvit(pads3=(1, 1, 3, 3), dilation=2, with_1x1=False))
    (kept,) = result.report.kept
    assert any("'y' is a summand no Conv of it can absorb (conv3: its padding on axis 2" in r
               for r in kept.reasons), kept.reasons
