"""The float64 ground truth: agrees with ORT's float32 run to float32 rounding, grouped
ConvTranspose included (onnx.reference's own grouped ConvTranspose is wrong)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from golden import model, rng, run, tensor
import onnx
from onnx import helper

import bnfold
from bnfold.verification.float64 import evaluate_float64
from bnfold.sample_model import build_sample_model


@pytest.mark.parametrize("group,c_in,c_out_per_group,bias", [(1, 4, 3, True), (2, 4, 3, True),
                                                             (4, 4, 1, False), (3, 6, 2, True)])
def test_grouped_conv_transpose_matches_onnx_runtime(group, c_in, c_out_per_group, bias):
    r = rng(group)
    inits = [tensor("W", r.standard_normal((c_in, c_out_per_group, 3, 3)))]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", r.standard_normal(group * c_out_per_group)))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["y"], group=group, strides=[2, 2],
                            pads=[1, 0, 0, 1], output_padding=[1, 0])
    m = model([node], [("x", [2, c_in, 5, 5])], [("y", None)], inits)
    x = r.standard_normal((2, c_in, 5, 5)).astype(np.float32)
    expected = run(m, {"x": x})[0]
    truth = evaluate_float64(m, {"x": x})["y"]
    assert truth.dtype == np.float64 and truth.shape == expected.shape
    assert np.abs(truth - expected).max() <= 1e-6 * np.abs(truth).max()


@pytest.mark.parametrize("shape,kernel,attrs", [
    ((2, 4, 9, 7), (6, 2, 3, 2), {"group": 2, "dilations": [2, 1], "pads": [1, 0, 2, 1],
                                  "strides": [2, 1]}),
    ((1, 3, 10), (4, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2]}),
    ((1, 3, 10), (4, 3, 4), {"auto_pad": "SAME_LOWER", "strides": [3]}),
    ((1, 6, 5, 5, 5), (6, 1, 3, 3, 3), {"group": 6, "auto_pad": "VALID"}),
    # WaveNet-style: onnx.reference's own Conv would build a 2,049-tap dense kernel here
    ((1, 16, 4000), (16, 16, 3), {"dilations": [1024], "pads": [2048, 0]}),
])
def test_conv_matches_onnx_runtime(shape, kernel, attrs):
    r = rng(7)
    inits = [tensor("W", r.standard_normal(kernel)), tensor("B", r.standard_normal(kernel[0]))]
    m = model([helper.make_node("Conv", ["x", "W", "B"], ["y"], **attrs)], [("x", list(shape))],
              [("y", None)], inits)
    x = r.standard_normal(shape).astype(np.float32)
    expected = run(m, {"x": x})[0]
    truth = evaluate_float64(m, {"x": x})["y"]
    assert truth.dtype == np.float64 and truth.shape == expected.shape
    assert np.abs(truth - expected).max() <= 1e-6 * np.abs(truth).max()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cap is Linux's RLIMIT_AS")
def test_float64_evaluation_past_the_memory_cap_is_skipped_not_fatal(monkeypatch):
    import resource

    from bnfold.errors import BnfoldError
    from bnfold.verification import float64

    # A cap 64 MB above the process's present size: widening this input alone needs 128 MB.
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    before = resource.getrlimit(resource.RLIMIT_AS)
    monkeypatch.setattr(float64, "_address_space_limits", lambda: (before, size + (64 << 20)))
    m = model([helper.make_node("Neg", ["x"], ["y"])], [("x", [4000, 4000])], [("y", None)], [])
    x = np.ones((4000, 4000), np.float32)
    with pytest.raises(BnfoldError, match="more than half of the free memory"):
        evaluate_float64(m, {"x": x})
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert evaluate_float64(m, {"x": x[:2]})["y"].shape == (2, 4000)  # the cap is gone


def test_verify_reports_ground_truth_for_the_sample_model():
    original = build_sample_model()
    result = bnfold.verify(original, bnfold.fold(original).model)
    assert result.ok and result.ground_truth_skipped is None
    (errors,) = result.ground_truth.values()
    # Both are float32 computations of the same function: each within float32 noise of the truth.
    assert errors["reference_rel_error"] < 1e-5 and errors["candidate_rel_error"] < 1e-5


def test_ground_truth_is_skipped_above_the_node_limit_and_says_why(monkeypatch):
    from bnfold.verification import ground_truth

    original = build_sample_model()
    nodes = len(original.graph.node)
    monkeypatch.setattr(ground_truth, "GROUND_TRUTH_MAX_NODES", nodes - 1)
    result = bnfold.verify(original, bnfold.fold(original).model)
    assert result.ok and not result.ground_truth
    assert result.ground_truth_skipped == (
        f"graph too large for the float64 reference evaluator ({nodes:,} nodes, limit "
        f"{nodes - 1:,}; --ground-truth forces it)")
    forced = bnfold.verify(original, bnfold.fold(original).model, ground_truth=True)
    assert forced.ground_truth_skipped is None and forced.ground_truth


def test_ground_truth_stops_at_its_time_budget_and_says_why(monkeypatch):
    """Unasked, the float64 evaluation gets GROUND_TRUTH_SECONDS: a node that would start later
    is not run, the ground truth is skipped with that reason and the verification stands;
    --ground-truth runs it to the end."""
    from bnfold.verification import ground_truth

    original = build_sample_model()
    folded = bnfold.fold(original).model
    monkeypatch.setattr(ground_truth, "GROUND_TRUTH_SECONDS", 0.0)
    result = bnfold.verify(original, folded)
    assert result.ok and not result.ground_truth
    assert result.ground_truth_skipped == (
        "the float64 reference evaluator ran past its 0 s budget (onnx.reference is pure "
        "numpy; --ground-truth runs it to the end)")
    forced = bnfold.verify(original, folded, ground_truth=True)
    assert forced.ground_truth_skipped is None and forced.ground_truth


def test_float64_evaluation_within_its_budget_is_the_unbounded_one():
    original = build_sample_model()
    feed = {v.name: rng(1).standard_normal(
        [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]).astype(np.float32)
        for v in original.graph.input}
    bounded = evaluate_float64(original, feed, seconds=60.0)
    unbounded = evaluate_float64(original, feed)
    assert bounded.keys() == unbounded.keys()
    for name, values in unbounded.items():
        assert values.dtype == np.float64
        np.testing.assert_array_equal(bounded[name], values)


def test_budget_counts_generated_weights_and_says_which():
    """onnx's light_* zoo models store a few thousand values and make millions with
    ConstantOfShape: the float64 evaluator holds the millions, and the message says so."""
    from bnfold.verification.ground_truth import float64_budget_problem

    r = rng(0)
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [4], [32, 4, 500, 1000])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["W"],
                              value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Conv", ["x", "W"], ["y"])]
    m = model(nodes, [("x", [1, 4, 250, 250])], [("y", None)],
              [shape, tensor("unused", r.standard_normal(3))])
    feed = {"x": np.zeros((1, 4, 250, 250), np.float32)}
    # stored: the shape (4), the unused vector (3) and ConstantOfShape's own value (1)
    assert float64_budget_problem(m, feed, None) == (
        "model too large for the float64 reference evaluator (64,000,008 weight values: 8 "
        "stored, 64,000,000 made by ConstantOfShape, limit 64,000,000; --ground-truth forces "
        "it)")


def test_nested_local_functions_are_inlined_and_widened():
    """torch's export_modules_as_functions writes functions that call functions, which
    onnx.reference cannot run ("known functions: []"); a Cast to float32 inside one must
    become float64 like the graph's own."""
    inner = helper.make_function(
        "pkg.inner", "Scale", ["a", "w"], ["b"],
        [helper.make_node("Mul", ["a", "w"], ["m"]),
         helper.make_node("Cast", ["m"], ["b"], to=onnx.TensorProto.FLOAT)],
        [helper.make_opsetid("", 17)])
    outer = helper.make_function(
        "pkg.outer", "Block", ["x", "w"], ["y"],
        [helper.make_node("Scale", ["x", "w"], ["s"], domain="pkg.inner"),
         helper.make_node("Tanh", ["s"], ["y"])],
        [helper.make_opsetid("", 17), helper.make_opsetid("pkg.inner", 1)])
    w = np.float32(1.0 + 2.0 ** -20)  # rounds away in float32 products, not in float64
    graph = helper.make_graph(
        [helper.make_node("Block", ["x", "w"], ["y"], domain="pkg.outer")], "functions",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [tensor("w", np.array(w))])
    m = helper.make_model(graph, functions=[inner, outer], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("pkg.outer", 1),
        helper.make_opsetid("pkg.inner", 1)])
    onnx.checker.check_model(m)
    x = np.array([0.1, 0.5, 1.0, 3.0], np.float32)
    exact = evaluate_float64(m, {"x": x})["y"]
    assert exact.dtype == np.float64
    np.testing.assert_array_equal(exact, np.tanh(x.astype(np.float64) * np.float64(w)))


def test_float64_evaluation_holds_the_weights_once_and_drops_spent_activations():
    """Eight 1024x1024 MatMuls (32 MB of float32 weights): the evaluator's own run held them
    twice in float64 (128 MB) plus every activation; now they stay float32, each widened only
    while its node runs, and each activation goes after its last reader."""
    import tracemalloc

    r = rng(4)
    size, layers = 1024, 8
    inits = [tensor(f"W{k}", r.standard_normal((size, size)) / 32) for k in range(layers)]
    nodes = [helper.make_node("MatMul", [f"h{k}", f"W{k}"], [f"h{k + 1}"]) for k in range(layers)]
    m = model(nodes, [("h0", [256, size])], [(f"h{layers}", None)], inits)
    x = r.standard_normal((256, size)).astype(np.float32)
    expected = x.astype(np.float64)
    for k in range(layers):
        expected = expected @ onnx.numpy_helper.to_array(m.graph.initializer[k]).astype(np.float64)
    tracemalloc.start()
    try:
        truth = evaluate_float64(m, {"h0": x})[f"h{layers}"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(truth, expected)  # the same float64 products, in the same order
    weights = layers * size * size * 4
    assert peak < weights + 3 * size * size * 8  # float32 weights + one widened + a few MB


def test_subgraphs_read_outer_values_widened():
    """If branches read an outer float32 initializer and an outer activation by name: the
    run keeps both for them, widened, and the result is the float64 one."""
    r = rng(5)
    scale = r.standard_normal(4)
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "S"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["a", "S"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Exp", ["x"], ["a"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_graph,
                         else_branch=else_graph),
    ]
    m = model(nodes, [("x", [4])], [("y", None)],
              [tensor("S", scale), tensor("zero", np.zeros((), np.float32))])
    for sign in (1, -1):
        x = (sign * np.abs(r.standard_normal(4)) + sign * 0.1).astype(np.float32)
        truth = evaluate_float64(m, {"x": x})["y"]
        wide_scale = scale.astype(np.float32).astype(np.float64)
        a = np.exp(x.astype(np.float64))
        assert truth.dtype == np.float64
        assert np.array_equal(truth, a * wide_scale if sign > 0 else a - wide_scale)
        assert np.allclose(truth, run(m, {"x": x})[0], rtol=1e-6)


@pytest.mark.parametrize("op_type,attrs", [("Erf", {}), ("Gelu", {}),
                                           ("Gelu", {"approximate": "tanh"})])
def test_erf_and_gelu_are_float64_not_rounded_through_float32(op_type, attrs):
    """onnx.reference computes Erf through float32 (Gelu's function body is an Erf), which put
    errors of 3e-8 into the truth of every GELU model: the truth must agree with math.erf in
    float64 to a few ulp."""
    import math

    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], **attrs)], "erf",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [7])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [7])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.array([-4.5, -1.1, -0.3, 0.0, 0.2345678, 1.7, 2.9], np.float32)
    exact = evaluate_float64(m, {"x": x})["y"]
    wide = [float(v) for v in x.astype(np.float64)]
    if op_type == "Erf":
        expected = [math.erf(v) for v in wide]
    elif attrs:  # the schema's body, float32 constants and all
        k, c = math.sqrt(float(np.float32(0.63661975))), float(np.float32(0.044715))
        expected = [0.5 * v * (1.0 + math.tanh(k * (v + c * v ** 3))) for v in wide]
    else:
        expected = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in wide]
    assert exact.dtype == np.float64
    np.testing.assert_allclose(exact, expected, rtol=4e-16, atol=1e-300)


def test_ground_truth_is_skipped_above_the_input_limit_and_says_why(monkeypatch):
    from bnfold.verification import ground_truth

    original = build_sample_model()
    folded = bnfold.fold(original).model
    assert bnfold.verify(original, folded).ground_truth  # under the limit: run
    monkeypatch.setattr(ground_truth, "GROUND_TRUTH_MAX_INPUT_VALUES", 1)
    result = bnfold.verify(original, folded)
    assert result.ok and not result.ground_truth
    assert result.ground_truth_skipped.startswith(
        "inputs too large for the float64 reference evaluator (")
    assert result.ground_truth_skipped.endswith(" values, limit 1; --ground-truth forces it)")
    assert bnfold.verify(original, folded, ground_truth=True).ground_truth


@pytest.mark.parametrize("op_type,attrs,opset,shape", [
    ("MeanVarianceNormalization", {}, 13, [2, 3, 4, 5]),
    ("MeanVarianceNormalization", {"axes": [1]}, 13, [2, 3, 4]),
    ("Upsample", {"mode": "linear"}, 9, [1, 2, 3, 4]),
    ("Upsample", {"mode": "linear", "scales": [1.0, 1.0, 2.0, 1.5]}, 7, [1, 2, 3, 4]),
    ("Upsample", {"mode": "linear"}, 9, [2, 5]),
])
def test_kernels_onnx_reference_lacks_in_float64_match_onnx_runtime(op_type, attrs, opset,
                                                                    shape):
    """onnx.reference cannot run MeanVarianceNormalization in float64 (its body's constants
    are float32) nor a linear Upsample: without these the ground truth was skipped."""
    inputs, inits = ["x"], []
    if op_type == "Upsample" and opset >= 9:
        factors = [1.0] * (len(shape) - 2) + [2.0, 1.5]
        inits.append(tensor("scales", np.array(factors, np.float32)))
        inputs.append("scales")
    out = shape if op_type == "MeanVarianceNormalization" else None  # a body inference skips
    m = model([helper.make_node(op_type, inputs, ["y"], **attrs)], [("x", shape)],
              [("y", out)], inits, opset=opset, ir_version=7 if opset < 9 else 8)
    x = rng(9).standard_normal(shape).astype(np.float32)
    expected = run(m, {"x": x})[0]
    truth = evaluate_float64(m, {"x": x})["y"]
    assert truth.dtype == np.float64 and truth.shape == expected.shape
    assert np.abs(truth - expected).max() <= 2e-6 * np.abs(truth).max()


def test_ground_truth_of_a_tiny_output_is_given_in_absolute_terms(tmp_path):
    # (1 + 1e-6·v) − 1 in float32 keeps v to about 6e-8 absolute: several percent of an output
    # whose values are all ~1e-6, well within float32's absolute tolerance (1e-7). A PP-OCRv4
    # detector on random inputs (a sigmoid near 0) reported "original 0.0219" this way.
    r = rng(7)
    one = tensor("one", np.ones(1))
    inits = [tensor("W", r.standard_normal((3, 3, 1, 1)) * 1e-6), tensor("g", r.uniform(1, 2, 3)),
             tensor("b", r.standard_normal(3) * 1e-7), tensor("m", r.standard_normal(3) * 1e-7),
             tensor("v", r.uniform(0.5, 2, 3)), one]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Add", ["n", "one"], ["p"]),
             helper.make_node("Sub", ["p", "one"], ["y"])]
    original = model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], inits)
    folded = bnfold.fold(original)
    assert folded.report.folded
    from bnfold.verification.runs import verify

    result = verify(original, folded.model, ground_truth=True)
    truth = result.ground_truth["y"]
    assert truth["reference_rel_error"] > 1e-2  # the figure that misled
    assert 0 < truth["reference_abs_error"] <= 1e-7
    assert truth["candidate_abs_error"] <= np.spacing(np.float32(1))  # one rounding of 1 + n
    assert truth["scale"] < 1e-5 and truth["atol"] == 1e-7
    from bnfold.cli.report_view import render_verification
    from rich.console import Console

    console = Console(width=200, record=True)
    render_verification(result.to_dict(), console)
    text = console.export_text()
    assert "(absolute error: its values reach only" in text and "scale-relative error)" not in text
