"""Outputs and fold sites past the noise cap are judged against float64: a model that amplifies
rounding verifies when its fold is as exact as the original, and a wrong fold still fails."""

from __future__ import annotations

import numpy as np
from golden import rng, tensor
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.folding.api import fold_sites
from bnfold.verification.comparison import OutputMetrics
from bnfold.verification.exactness import rejudge


def cancelling_model(channels=8, big=1e4):
    """Conv → BN → Conv → BN → Sigmoid. The first Conv makes pairs of nearly equal channels of
    ~1e4; the second takes their differences, ~1: float32 rounding of the pair is ~1e-3 of the
    difference, so the model's own noise at the second BN is over comparison's 1e-3 cap."""
    r = rng(0)
    w1 = np.repeat(r.standard_normal((channels // 2, 4, 1, 1)) * big, 2, axis=0)
    w1[1::2] *= 1 + 1e-4 * r.standard_normal(w1[1::2].shape)
    w2 = np.zeros((channels, channels, 1, 1))
    for k in range(0, channels, 2):
        w2[k, k], w2[k, k + 1], w2[k + 1, k], w2[k + 1, k + 1] = 1, -1, -1, 1

    def bn(i, scale):
        return [tensor(f"g{i}", scale), tensor(f"b{i}", r.standard_normal(channels) * 0.1),
                tensor(f"m{i}", r.standard_normal(channels)), tensor(f"v{i}", np.ones(channels))]

    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"]),
             helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"]),
             helper.make_node("Conv", ["n1", "W2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["n2"]),
             helper.make_node("Sigmoid", ["n2"], ["y"])]
    inits = [tensor("W1", w1), tensor("W2", w2),
             *bn(1, np.repeat(r.uniform(0.5, 1.5, channels // 2), 2)),
             *bn(2, r.uniform(0.5, 1.5, channels))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def verify_fold(original, folded, report, **options):
    return bnfold.verify(original, folded, sites=fold_sites(folded, report), **options)


def test_fold_of_a_model_that_amplifies_rounding_passes_against_float64():
    original = cancelling_model()
    folded = bnfold.fold(original)
    result = verify_fold(original, folded.model, folded.report)
    site = next(m for m in result.sites if m.name == "n2")
    assert "(capped)" in site.note  # the model's own noise is over the cap there
    assert site.ok and site.note.endswith("as exact as the original")
    assert result.ok
    assert any("judged against the original in float64" in note for note in result.notes)


def test_ground_truth_of_a_model_that_amplifies_rounding_is_reported():
    # 1e-2 of the scale from float32: over the 1e-3 rule of thumb, within 4x its own noise
    original = cancelling_model(big=1e5)
    folded = bnfold.fold(original)
    result = verify_fold(original, folded.model, folded.report)
    assert result.ok and result.ground_truth_skipped is None
    errors = result.ground_truth["y"]
    assert errors["reference_rel_error"] > 1e-3
    assert errors["candidate_rel_error"] < 4 * errors["reference_rel_error"]


def test_wrong_fold_in_a_model_that_amplifies_rounding_still_fails():
    original = cancelling_model()
    folded = bnfold.fold(original)
    model = folded.model
    conv2 = model.graph.node[1]
    bias = next(t for t in model.graph.initializer if t.name == conv2.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 0.05  # the second layer's outputs are ~1
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    result = verify_fold(original, model, folded.report)
    assert not result.ok
    assert not next(m for m in result.sites if m.name == "n2").ok


def test_without_float64_a_model_over_the_noise_cap_fails_and_says_why():
    original = cancelling_model()
    folded = bnfold.fold(original)
    result = verify_fold(original, folded.model, folded.report, ground_truth=False)
    assert not result.ok
    assert any("could not be judged against float64: not requested" in n for n in result.notes)


def metrics(noise):
    return OutputMetrics("t", 1.0, 1.0, 1.0, 0.5, False, scale=10.0, noise_floor=noise,
                         note="… (capped)")


def test_float64_further_from_the_original_than_its_noise_is_not_used():
    truth = np.zeros(4)
    # the original 1.0 off float64 with a noise of 0.01: the evaluators disagree on the model
    judged = metrics(0.01)
    rejudge(judged, [truth + 1.0], [truth + 1.0], [truth + 10.0 * np.eye(4)[0]])
    assert not judged.ok and "not used" in judged.note


def test_a_model_too_noisy_to_tell_is_not_judged():
    exact = np.full(4, 10.0)
    judged = metrics(1.0)
    # the original 0.3 (3% of the scale) off float64: no wrong fold could be told from noise
    rejudge(judged, [exact + 0.3], [exact - 0.3], [exact])
    assert not judged.ok and "too noisy to judge" in judged.note


def test_candidate_further_from_float64_than_allowed_fails():
    exact = np.full(4, 10.0)
    judged = metrics(0.01)
    rejudge(judged, [exact + 0.01], [exact + 0.1], [exact])
    assert not judged.ok and "more than 4× the original's" in judged.note
    passed = metrics(0.01)
    rejudge(passed, [exact + 0.01], [exact - 0.02], [exact])
    assert passed.ok
