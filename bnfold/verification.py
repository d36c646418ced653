"""Numerical equivalence of two models: ONNX Runtime with graph optimisation off.

Optimisation is off for both sessions: with it on, ORT folds BatchNormalization in the
original itself and the comparison would prove nothing. Where affordable, both are also
compared with a float64 ground truth (the original evaluated in float64 by onnx.reference),
which shows whether the fold made the model less accurate or merely different.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.inputs import make_inputs

# Scale-relative tolerances per output dtype: |a − b| ≤ atol + rtol·max|a|.
DEFAULT_TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-7),
    np.dtype(np.float64): (1e-12, 1e-15),
    np.dtype(np.float16): (1e-2, 1e-4),
}
# onnx.reference is pure numpy: only run the float64 ground truth on models this small.
GROUND_TRUTH_MAX_PARAMS = 2_000_000
GROUND_TRUTH_MAX_INPUT_VALUES = 200_000

ModelSource = onnx.ModelProto | str | os.PathLike | bytes


@dataclass
class OutputMetrics:
    name: str
    max_abs_error: float
    max_rel_error: float  # max|a − b| / max|a| (scale-relative)
    cosine: float
    tolerance: float  # the max_abs_error allowed
    ok: bool


@dataclass
class VerifyResult:
    ok: bool
    outputs: list[OutputMetrics]
    runs: int
    seed: int
    # float64 ground truth: per output, scale-relative error of reference and candidate.
    ground_truth: dict[str, dict[str, float]] | None = None
    ground_truth_skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def verify(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    inputs: str | os.PathLike | dict[str, np.ndarray] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    ground_truth: bool | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output.

    `inputs` is a .npz path or a feed dict; otherwise `runs` seeded random feeds are drawn
    (seed, seed+1, …). `ground_truth=None` runs the float64 check when the model is small.
    """
    if runs < 1:
        raise BnfoldError("--runs must be at least 1")
    ref_model, ref_payload = _load(reference)
    _, cand_payload = _load(candidate)
    ref_session = _session(ref_payload, "reference")
    cand_session = _session(cand_payload, "candidate")
    _check_interfaces(ref_session, cand_session)
    feeds = _feeds(ref_model, inputs, seed, runs, shapes)
    worst: dict[str, OutputMetrics] = {}
    ref_outputs_first = None
    cand_outputs_first = None
    for feed in feeds:
        ref_out = _run(ref_session, feed, "reference")
        cand_out = _run(cand_session, feed, "candidate")
        if ref_outputs_first is None:
            ref_outputs_first, cand_outputs_first = ref_out, cand_out
        for name in ref_out:
            metrics = compare(name, ref_out[name], cand_out[name], atol, rtol)
            if name not in worst or _worse(metrics, worst[name]):
                worst[name] = metrics
    outputs = list(worst.values())
    result = VerifyResult(all(m.ok for m in outputs), outputs, len(feeds), seed)
    _ground_truth(result, ref_model, ground_truth, feeds[0], ref_outputs_first, cand_outputs_first)
    return result


def compare(
    name: str, a: np.ndarray, b: np.ndarray, atol: float | None, rtol: float | None
) -> OutputMetrics:
    """Metrics of candidate `b` against reference `a`."""
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(a.dtype, (1e-5, 1e-7))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if a.shape != b.shape:
        return OutputMetrics(name, float("inf"), float("inf"), 0.0, 0.0, False)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return OutputMetrics(name, float("nan"), float("nan"), float("nan"), 0.0, False)
    a64, b64 = np.where(nan_a, 0.0, a64), np.where(nan_b, 0.0, b64)
    diff = np.abs(a64 - b64)
    max_abs = float(diff.max(initial=0.0))
    scale = float(np.abs(a64).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = np.linalg.norm(a64) * np.linalg.norm(b64)
    cosine = float(np.dot(a64.ravel(), b64.ravel()) / norms) if norms > 0 else 1.0
    tolerance = atol + rtol * scale
    return OutputMetrics(name, max_abs, max_rel, cosine, tolerance, max_abs <= tolerance)


def _worse(new: OutputMetrics, old: OutputMetrics) -> bool:
    return (not new.ok and old.ok) or new.max_rel_error > old.max_rel_error


def _load(source: ModelSource) -> tuple[onnx.ModelProto, str | bytes]:
    """The model (loaded with bnfold's safety checks) and what to hand ONNX Runtime."""
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    if isinstance(source, bytes):
        return onnx.load_from_string(source), source
    from bnfold.io import load_model

    # ORT reads the file itself (external data included) once load_model has vetted it.
    return load_model(source), os.fspath(source)


def _session(payload: str | bytes, role: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure kind
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise BnfoldError(
            f"ONNX Runtime cannot load the {role} model: {first_line}; check it with "
            f"onnx.checker or re-export it"
        ) from None


def _check_interfaces(ref, cand) -> None:
    ref_in = sorted(i.name for i in ref.get_inputs())
    cand_in = sorted(i.name for i in cand.get_inputs())
    ref_out = sorted(o.name for o in ref.get_outputs())
    cand_out = sorted(o.name for o in cand.get_outputs())
    if ref_in != cand_in or ref_out != cand_out:
        raise BnfoldError(
            f"the models have different interfaces (inputs {ref_in} vs {cand_in}, outputs "
            f"{ref_out} vs {cand_out}): compare a model with its own folded version"
        )


def _feeds(model, inputs, seed, runs, shapes) -> list[dict[str, np.ndarray]]:
    if isinstance(inputs, dict):
        return [inputs]
    if inputs is not None:
        return [make_inputs(model, npz_path=inputs)]
    return [make_inputs(model, shapes, seed + i) for i in range(runs)]


def _run(session, feed: dict[str, np.ndarray], role: str) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feed)
    except Exception as exc:  # ORT's errors (bad shape, bad type) share no base class
        first_line = str(exc).strip().splitlines()[0][:300]
        raise BnfoldError(
            f"ONNX Runtime failed to run the {role} model: {first_line}; check the input "
            f"shapes (--shape name=DxD...) or pass real inputs with --inputs"
        ) from None
    return dict(zip(names, values))


def _ground_truth(result, model, wanted, feed, ref_out, cand_out) -> None:
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    input_values = sum(v.size for v in feed.values())
    if wanted is False:
        result.ground_truth_skipped = "not requested"
        return
    if wanted is None and (
        params > GROUND_TRUTH_MAX_PARAMS or input_values > GROUND_TRUTH_MAX_INPUT_VALUES
    ):
        result.ground_truth_skipped = (
            f"model too large for the float64 reference evaluator ({params:,} parameters)"
        )
        return
    from bnfold.float64 import evaluate_float64

    try:
        truth = evaluate_float64(model, feed)
    except BnfoldError as exc:
        result.ground_truth_skipped = str(exc)
        return
    result.ground_truth = {}
    for name, exact in truth.items():
        scale = float(np.abs(exact).max(initial=0.0)) or 1.0
        result.ground_truth[name] = {
            "reference_rel_error": float(np.abs(ref_out[name] - exact).max(initial=0.0)) / scale,
            "candidate_rel_error": float(np.abs(cand_out[name] - exact).max(initial=0.0)) / scale,
        }
