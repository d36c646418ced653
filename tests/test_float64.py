"""The float64 ground truth: agrees with ORT's float32 run to float32 rounding, grouped
ConvTranspose included (onnx.reference's own grouped ConvTranspose is wrong)."""

from __future__ import annotations

import numpy as np
import pytest
from golden import model, rng, run, tensor
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
