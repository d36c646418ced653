"""BatchNormalization → MatMul (→ bias Add) on a 2-D input becomes one Gemm (bn-matmul).

The shape paddle2onnx writes for BatchNorm1D → Linear (Linear is MatMul → Add there); the
folded model is compared with the unfolded one, and every refusal names its reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, bn_node, bn_params, count_ops, model, rng, tensor
from onnx import helper

import bnfold

K, N = 6, 4
FEED = {"x": rng(7).standard_normal((3, K)).astype(np.float32)}


def bn_linear(bias="right", bias_shape=(N,), x_shape=(3, K), opset=17, matmul_output=False,
              shared_b=False):
    """x → BN → MatMul(B) [→ Add(c)] → y; `bias`: "right" (Add(z, c)), "left" (Add(c, z)) or
    None; `matmul_output`: the MatMul's output is a graph output too; `shared_b`: a second
    MatMul reads B from x."""
    r = rng(8)
    inits = [*bn_params("bn", K), tensor("B", r.standard_normal((K, N)))]
    nodes = [bn_node("x", "n"), helper.make_node("MatMul", ["n", "B"], ["z"], name="linear")]
    outputs = [("y" if bias else "z", None)]
    if bias:
        inits.append(tensor("c", r.standard_normal(bias_shape)))
        operands = ["z", "c"] if bias == "right" else ["c", "z"]
        nodes.append(helper.make_node("Add", operands, ["y"], name="linear_bias"))
    if matmul_output and bias:
        outputs.append(("z", None))
    if shared_b:
        nodes.append(helper.make_node("MatMul", ["x", "B"], ["w"], name="other"))
        outputs.append(("w", None))
    return model(nodes, [("x", list(x_shape))], outputs, inits, opset=opset)


def folded(m):
    result = bnfold.fold(m)
    onnx.checker.check_model(result.model)
    return result


@pytest.mark.parametrize("bias,bias_shape", [("right", (N,)), ("left", (1, N)), (None, None)])
def test_bn_before_a_linear_becomes_one_gemm(bias, bias_shape):
    m = bn_linear(bias, bias_shape)
    result = folded(m)
    assert [(e.node, e.rule, e.into) for e in result.report.folded] == [
        ("bn", "bn-matmul", "linear")]
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert result.model.graph.node[0].input[0] == "x"
    assert_same_outputs(m, result.model, FEED)


def test_symbolic_batch_and_an_old_opset_fold_too():
    m = bn_linear(x_shape=("batch", K), opset=9)
    result = folded(m)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert_same_outputs(m, result.model, {"x": rng(9).standard_normal((5, K)).astype(np.float32)})


@pytest.mark.parametrize("variant", ["full_bias", "matmul_output"])
def test_an_add_that_is_not_a_per_column_bias_stays_after_the_gemm(variant):
    if variant == "full_bias":
        m = bn_linear(bias_shape=(3, N))  # one value per row and column: not a Gemm C
    else:
        m = bn_linear(matmul_output=True)  # the MatMul's own output is read outside
    result = folded(m)
    assert [e.rule for e in result.report.folded] == ["bn-matmul"]
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Add"]
    assert_same_outputs(m, result.model, FEED)


def test_a_shared_b_gets_its_own_folded_copy():
    m = bn_linear(shared_b=True)
    result = folded(m)
    assert count_ops(result.model, "Gemm") == 1 and count_ops(result.model, "MatMul") == 1
    assert_same_outputs(m, result.model, FEED)


def test_rank_three_input_is_kept_with_the_reason():
    m = bn_linear(x_shape=(2, K, K))
    result = folded(m)
    assert result.report.folded == []
    assert result.report.kept[0].reasons == [
        "into linear: linear reads a rank-3 tensor: BN's channel axis 1 is not the axis a "
        "MatMul sums over (its last)"]


def test_unknown_rank_is_kept_with_the_reason():
    m = bn_linear()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    result = bnfold.fold(m)
    assert result.report.folded == []
    assert result.report.kept[0].reasons == [
        "into linear: rank of the BN input is unknown (add shapes or run shape inference)"]


def test_bn_read_as_matmul_b_is_kept_with_the_reason():
    inits = [*bn_params("bn", K)]
    nodes = [bn_node("x", "n"), helper.make_node("MatMul", ["a", "n"], ["y"], name="mm")]
    m = model(nodes, [("x", [2, K]), ("a", [3, 2])], [("y", None)], inits)
    result = folded(m)
    assert result.report.folded == []
    assert result.report.kept[0].reasons[0].startswith(
        "it feeds a MatMul, but not as the first input of a MatMul that alone reads it")


def linear_bn(noop_after_add=True, noop_before_add=False, tap=None):
    """x → MatMul(B) [→ Identity] → Add(c) [→ Identity] → BN → y: Linear → BatchNorm1D as
    paddle2onnx writes it; `tap`: "after_add" or "before_add" makes that Identity's output a
    graph output too."""
    r = rng(10)
    inits = [tensor("B", r.standard_normal((K, N))), tensor("c", r.standard_normal(N)),
             *bn_params("bn", N)]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["z"], name="linear")]
    outputs = [("y", None)]
    data = "z"
    if noop_before_add:
        nodes.append(helper.make_node("Identity", ["z"], ["z_id"], name="before_add"))
        data = "z_id"
    nodes.append(helper.make_node("Add", [data, "c"], ["a"], name="linear_bias"))
    data = "a"
    if noop_after_add:
        nodes.append(helper.make_node("Identity", ["a"], ["a_id"], name="after_add"))
        data = "a_id"
    nodes.append(bn_node(data, "y"))
    if tap:
        outputs.append(({"after_add": "a_id", "before_add": "z_id"}[tap], None))
    return model(nodes, [("x", [3, K])], outputs, inits, opset=13)


@pytest.mark.parametrize("before,after", [(False, True), (True, False), (True, True)])
def test_linear_then_bn_folds_through_identity_nodes(before, after):
    m = linear_bn(noop_after_add=after, noop_before_add=before)
    result = folded(m)
    assert [(e.node, e.rule) for e in result.report.folded] == [("bn", "matmul-bn")]
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(m, result.model, FEED)


@pytest.mark.parametrize("tap", ["after_add", "before_add"])
def test_an_identity_read_outside_keeps_the_bn_with_the_reason(tap):
    m = linear_bn(noop_before_add=True, tap=tap)
    result = folded(m)
    assert result.report.folded == []
    name = {"after_add": "a_id", "before_add": "z_id"}[tap]
    node = {"after_add": "after_add", "before_add": "before_add"}[tap]
    assert f"into linear: {node} output {name!r} is also a graph output" in (
        result.report.kept[0].reasons)
