"""Verification of models ONNX Runtime does not run: opsets before 7, in float64.

ONNX Runtime implements opset 7 and later, so it cannot load a model from the first model
zoo or from PyTorch's 2017 exporter (opset 1-6: BatchNormalization-6 with `is_test`, Add with
`broadcast`). onnx.reference evaluates every opset. For such a reference both models are
evaluated in float64 by it instead (bnfold.verification.float64), on the same inputs, and
compared at float32's tolerance: a fold's only effect there is its float32 weights' rounding
(about 1e-7 of each output's scale), while a wrong fold moves the output by far more. This is
the check plain verify (and so `bnfold fold`) runs; there is no float32 run to compare and no
noise floor, and each model's evaluation is bounded by the verify timeout.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.errors import BnfoldError

ORT_MIN_OPSET = 7  # the oldest default-domain opset ONNX Runtime implements


def opset_before_ort(model: onnx.ModelProto | None) -> int | None:
    """The model's default-domain opset when ONNX Runtime cannot run it, else None."""
    if model is None:
        return None
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < ORT_MIN_OPSET:
            return entry.version
    return None


def verify_in_float64(reference, candidate, ref_model: onnx.ModelProto, opset: int, *,
                      inputs=None, seed: int = 0, runs: int = 1, atol=None, rtol=None,
                      shapes=None, timeout: float | None = None):
    """`verify(reference, candidate)` for a reference ONNX Runtime cannot load."""
    from bnfold.verification.comparison import blind_note, blind_outputs
    from bnfold.verification.ground_truth import full_model
    from bnfold.verification.model_sources import load_source
    from bnfold.verification.ort_runner import check_interfaces
    from bnfold.verification.runs import VerifyResult, _feeds, judge_outputs

    ref_full = full_model(reference, ref_model)
    cand_full = full_model(candidate, load_source(candidate)[0])
    check_interfaces(_interface(ref_full), _interface(cand_full))

    def evaluate(model, feed, role):
        try:
            return _evaluate(model, feed, timeout)
        except BnfoldError as exc:
            raise BnfoldError(f"the {role} model cannot be evaluated in float64 ({exc}); "
                              f"ONNX Runtime runs opset {ORT_MIN_OPSET} and later, this model "
                              f"is opset {opset}: skip verification with --no-verify") from None

    def try_feed(feed):
        try:
            _evaluate(ref_full, feed, timeout)
        except BnfoldError as exc:
            return str(exc)
        return None

    feeds, notes = _feeds(ref_model, None, None, inputs, seed, runs, shapes, try_feed=try_feed)
    ref_outputs = [evaluate(ref_full, feed, "reference") for feed in feeds]
    cand_outputs = [evaluate(cand_full, feed, "candidate") for feed in feeds]
    # float32's tolerance: the candidate's weights were rounded to float32, not its arithmetic.
    metrics = judge_outputs(None, None, feeds, ref_outputs, cand_outputs, atol, rtol,
                            "float32", noise_floor=False)
    notes.insert(0, f"ONNX Runtime runs opset {ORT_MIN_OPSET} and later and this model is opset "
                    f"{opset}: both models were evaluated in float64 by onnx.reference instead, "
                    f"and judged at float32 tolerance")
    blind = blind_outputs(metrics)
    if blind:
        notes.append(blind_note(blind))
    result = VerifyResult(all(m.ok for m in metrics), metrics, len(feeds), seed, notes=notes,
                          shapes={k: list(v.shape) for k, v in feeds[0].items()})
    result.ground_truth_skipped = "the check itself ran in float64"
    result.evaluator = "onnx.reference float64"
    return result


def _evaluate(model: onnx.ModelProto, feed: dict, timeout: float | None) -> dict:
    from bnfold.verification.float64 import evaluate_float64

    outputs = evaluate_float64(model, feed, seconds=timeout)
    return {name: np.asarray(value) for name, value in outputs.items()}


def _interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    from bnfold.verification.inputs import graph_inputs

    return (sorted(v.name for v in graph_inputs(model)),
            sorted(o.name for o in model.graph.output))
