"""The float64 ground truth: the original evaluated in float64 by onnx.reference, against
which both models' float32 outputs are measured, where the pure-numpy evaluator can afford the
model (bnfold.verification.runs reports it; bnfold.verification.exactness judges by it)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.onnxio.tensors import all_graphs
from bnfold.verification.comparison import default_tolerance

# onnx.reference is pure numpy: unasked, the float64 ground truth runs on models up to this
# many weight values and for at most GROUND_TRUTH_SECONDS. Its weights are held once more in
# float32 (each widened only while its node runs, activations dropped after their last reader):
# SelecSLS-42 (30M) peaks no higher than its verification alone, ViT-S (24M) 160 MB higher. At
# 224x224, ResNet-18 (11.7M) takes 1 s, DenseNet-121 (8M) 1.5 s, SelecSLS-42 under 1 s.
GROUND_TRUTH_MAX_PARAMS = 64_000_000
GROUND_TRUTH_SECONDS = 5.0
# Activations grow with the input; the time budget and the memory cap (half of what is free)
# bound them too. PicoDet at 3x800x608 (1.46M values) takes 2.8 s and 160 MB more, Xception at
# 3x299x299 1.8 s.
GROUND_TRUTH_MAX_INPUT_VALUES = 2_000_000
# onnx.reference runs each node in Python: ~0.2 ms a node before any arithmetic (48k nodes: 9 s).
GROUND_TRUTH_MAX_NODES = 5_000
# A float64 evaluation further than this from the float32 original (scale-relative), and
# further than 4x the original's own measured noise, is not trusted as the truth: the reference
# evaluator and ORT disagree on the model's semantics.
GROUND_TRUTH_MAX_DISAGREEMENT = 1e-3


def weight_values(model: onnx.ModelProto) -> tuple[int, int]:
    """(values stored in initializers and Constant nodes, values ConstantOfShape makes from
    a stored shape): what the float64 evaluator holds."""
    from bnfold.onnxio.files import iter_tensors

    stored = sum(math.prod(t.dims) for t in iter_tensors(model, schema_only=True))
    generated = 0
    shapes = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shapes:
            shape = shapes[node.input[0]]
            try:
                generated += math.prod(
                    max(int(d), 0) for d in onnx.numpy_helper.to_array(shape).reshape(-1))
            except (ValueError, TypeError):
                continue
    return stored, generated


def _values_phrase(stored: int, generated: int) -> str:
    if not generated:
        return f"{stored:,} parameters"
    return (f"{stored + generated:,} weight values: {stored:,} stored, {generated:,} made by "
            f"ConstantOfShape")


def float64_budget_problem(model, feed, wanted) -> str | None:
    """Why the float64 evaluation is not run (not wanted, or the model too large for
    onnx.reference without --ground-truth), or None."""
    if wanted is False:
        return "not requested"
    if wanted:
        return None
    stored, generated = weight_values(model)
    if stored + generated > GROUND_TRUTH_MAX_PARAMS:
        return (f"model too large for the float64 reference evaluator "
                f"({_values_phrase(stored, generated)}, "
                f"limit {GROUND_TRUTH_MAX_PARAMS:,}; --ground-truth forces it)")
    nodes = sum(len(graph.node) for graph in all_graphs(model.graph))
    if nodes > GROUND_TRUTH_MAX_NODES:
        return (f"graph too large for the float64 reference evaluator ({nodes:,} nodes, "
                f"limit {GROUND_TRUTH_MAX_NODES:,}; --ground-truth forces it)")
    input_values = sum(v.size for v in feed.values())
    if input_values > GROUND_TRUTH_MAX_INPUT_VALUES:
        return (f"inputs too large for the float64 reference evaluator ({input_values:,} "
                f"values, limit {GROUND_TRUTH_MAX_INPUT_VALUES:,}; --ground-truth forces it)")
    return None


def time_budget(wanted) -> float | None:
    """How long the float64 evaluation may run: unbounded when asked for (--ground-truth)."""
    return None if wanted else GROUND_TRUTH_SECONDS


def record_ground_truth(result, source, model, wanted, feed, ref_out, cand_out) -> None:
    skipped = float64_budget_problem(model, feed, wanted)
    if skipped is not None:
        result.ground_truth_skipped = skipped
        return
    from bnfold.verification.float64 import evaluate_float64

    try:
        full = full_model(source, model)
        truth = evaluate_float64(full, feed, seconds=time_budget(wanted))
    except BnfoldError as exc:
        result.ground_truth_skipped = str(exc)
        return
    errors = {}
    for name, exact in truth.items():
        measured = _distance(ref_out[name], exact)
        if measured is None:
            continue  # integer, bool or all non-finite: nothing to measure
        gap, scale = measured
        ref_err = gap / scale
        # Within the dtype's absolute tolerance, closer than any comparison can tell: no
        # disagreement, however small the scale.
        _, atol = default_tolerance(np.asarray(ref_out[name]).dtype)
        if ref_err > _disagreement_bound(result, name) and gap > atol:
            result.ground_truth_skipped = (
                f"the float64 evaluation of {name!r} is {ref_err:.2g} (scale-relative) from the "
                f"float32 original: onnx.reference and ONNX Runtime disagree on this model, so "
                f"it is no ground truth"
            )
            return
        candidate = _distance(cand_out[name], exact)
        errors[name] = {"reference_rel_error": ref_err,
                        "candidate_rel_error": None if candidate is None
                        else candidate[0] / candidate[1]}
        if ref_err > GROUND_TRUTH_MAX_DISAGREEMENT and gap <= atol and candidate:
            # The original is within the dtype's absolute tolerance of float64 on an output whose
            # values are all tiny (a sigmoid near 0 on random inputs): a scale-relative figure
            # of a few percent would read as an error where there is none. Absolute ones too,
            # with the scale they were divided by (the largest finite value, at least atol).
            errors[name].update(reference_abs_error=gap, candidate_abs_error=candidate[0],
                                scale=scale, atol=atol)
    if not errors:
        result.ground_truth_skipped = "no floating-point output to measure"
        return
    result.ground_truth = errors


def _disagreement_bound(result, name: str) -> float:
    """How far (scale-relative) float64 may be from the float32 original and still be its
    truth: GROUND_TRUTH_MAX_DISAGREEMENT, or FLOOR_MULTIPLE × the output's own float32 noise
    where that was measured and is larger (a network that amplifies rounding)."""
    from bnfold.verification.comparison import FLOOR_MULTIPLE

    metrics = next((m for m in result.outputs if m.name == name), None)
    if metrics is None or metrics.noise_floor is None or not metrics.scale:
        return GROUND_TRUTH_MAX_DISAGREEMENT
    return max(GROUND_TRUTH_MAX_DISAGREEMENT, FLOOR_MULTIPLE * metrics.noise_floor / metrics.scale)


def _distance(values: np.ndarray, exact: np.ndarray) -> tuple[float, float] | None:
    """(max|values − exact|, scale) over positions finite in both, the scale being max|exact|;
    None when not float or nothing is finite. A scale below the dtype's absolute tolerance
    counts as that tolerance: a sigmoid saturated at 1e-22 in float64 is 0 in ORT's float32,
    which is no disagreement."""
    values, exact = np.asarray(values), np.asarray(exact)
    if values.dtype.kind != "f" or exact.dtype.kind != "f" or values.shape != exact.shape:
        return None
    with np.errstate(all="ignore"):
        finite = np.isfinite(values) & np.isfinite(exact)
        if not finite.any():
            return None
        exact64 = exact[finite].astype(np.float64)
        _, atol = default_tolerance(values.dtype)
        scale = max(float(np.abs(exact64).max()), atol)
        return float(np.abs(values[finite].astype(np.float64) - exact64).max()), scale


def full_model(source, model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its weights: `model` itself unless it was loaded without them from a
    path."""
    if isinstance(source, (onnx.ModelProto, bytes)):
        return model
    from bnfold.onnxio.files import load_model

    return load_model(source)
