"""How close a candidate output is to the reference, and what "close enough" means.

The default tolerance is scale-relative: |a − b| ≤ atol + rtol·max|a| per output, with rtol set
by the dtype (float32: 1e-5). Some outputs cannot meet it under any correct fold: a sigmoid over
strongly negative logits gives values near zero whose float32 rounding is larger than 1e-5 of
their own scale. For those, the model's own float32 noise is measured — the same original run
by ONNX Runtime with full optimisation against no optimisation, two legitimate float32
evaluations — and a deviation up to FLOOR_MULTIPLE times that noise is accepted, never more
than CAP_RTOL of the output's scale plus CAP_ATOL (float32: 1e-3 and 1e-6; the absolute part
covers probabilities near zero, where ORT's float32 sigmoid alone is ~1e-7 off). A fold equal to
what ORT's optimiser computes therefore passes unless the model's own noise exceeds that cap,
which the report then says. The noise is only measured when the fixed tolerance fails.

An engine that computes below float32 (TensorRT fp16, OpenVINO bf16, TF32 tensor cores) is
judged by the tolerance of the precision it computes in — `precision=` names it, as read from
the engine — whatever the dtype of its float32 outputs; the noise-floor cap follows it too.

Non-finite values compare by position: the same ±inf / NaN at the same places is equal; a
candidate that moves, adds or removes one is not equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (rtol, atol) per output dtype.
DEFAULT_TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-7),
    np.dtype(np.float64): (1e-12, 1e-15),
    np.dtype(np.float16): (1e-2, 1e-4),
}
FLOOR_MULTIPLE = 4.0
CAP_RTOL = {
    np.dtype(np.float32): 1e-3,
    np.dtype(np.float64): 1e-9,
    np.dtype(np.float16): 5e-2,
}
CAP_ATOL = {
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float16): 1e-3,
}
# Compute precision -> (rtol, atol), scale-relative, and the noise-floor cap's rtol: about 20x
# the precision's unit roundoff (tf32 and float16 2^-11, bfloat16 2^-8), room for a deep net's
# accumulated rounding. Measured on the zoo ResNet-18 (8x3x64x64, folded): OpenVINO bf16
# 2.8e-3, a bnfold.deploy.fp16 model in ORT 3.6e-4. The price: a wrong model is only caught when its
# error exceeds the tolerance; the sample with one weight perturbed and one bias channel dropped
# (1.3e-2) fails at float32 and float16 tolerances but passes bfloat16's. float32 is plain
# verify's.
PRECISION_TOLERANCES = {
    "float32": (1e-5, 1e-7),
    "tf32": (5e-3, 1e-5),
    "float16": (1e-2, 1e-4),
    "bfloat16": (8e-2, 1e-3),
}
PRECISION_CAP_RTOL = {"float32": 1e-3, "tf32": 2e-2, "float16": 5e-2, "bfloat16": 2e-1}
_CHUNK = 1 << 20  # values compared at once: float64 copies stay a few MB whatever the output


@dataclass
class OutputMetrics:
    name: str
    max_abs_error: float
    max_rel_error: float  # max|a − b| / max|a| (scale-relative), finite positions
    cosine: float
    tolerance: float  # the max_abs_error allowed
    ok: bool
    scale: float = 0.0  # max|a| over finite positions
    non_finite: int = 0  # positions where both hold the same inf/NaN
    noise_floor: float | None = None  # max|ORT optimised − unoptimised| of the reference
    note: str = ""
    # max − min of the reference over finite positions (inf with fewer than two): an output
    # that spreads no further than the tolerance cannot show a wrong fold (see blind_spot)
    spread: float = float("inf")


def coarser_precision(*names: str | None) -> str | None:
    """The precision among `names` with the loosest tolerance (None: no precision named)."""
    known = [n for n in names if n is not None]
    return max(known, key=lambda n: PRECISION_TOLERANCES[n][0]) if known else None


def default_tolerance(dtype: np.dtype, precision: str | None = None) -> tuple[float, float]:
    """(rtol, atol) for an output of `dtype` computed in `precision` (None: the dtype's own)."""
    rtol, atol = DEFAULT_TOLERANCES.get(np.dtype(dtype), (1e-5, 1e-7))
    if precision is not None and np.dtype(dtype).kind in "fc":
        p_rtol, p_atol = PRECISION_TOLERANCES[precision]
        rtol, atol = max(rtol, p_rtol), max(atol, p_atol)
    return rtol, atol


def compare(
    name: str, a: np.ndarray, b: np.ndarray, atol: float | None, rtol: float | None,
    precision: str | None = None,
) -> OutputMetrics:
    """Metrics of candidate `b` against reference `a`; `precision` is the candidate engine's
    compute precision (None: the output dtype's)."""
    a, b = np.asarray(a), np.asarray(b)
    default_rtol, default_atol = default_tolerance(a.dtype, precision)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if a.shape != b.shape:
        return OutputMetrics(name, float("inf"), float("inf"), 0.0, 0.0, False,
                             note=f"shape {list(b.shape)} instead of {list(a.shape)}")
    if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
        return _compare_exact(name, a, b)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    max_abs = scale = dot = norm_a = norm_b = 0.0
    low, high, counted = float("inf"), float("-inf"), 0
    non_finite = 0
    with np.errstate(all="ignore"):
        for start in range(0, flat_a.size, _CHUNK):
            ca = flat_a[start:start + _CHUNK].astype(np.float64)
            cb = flat_b[start:start + _CHUNK].astype(np.float64)
            finite_a, finite_b = np.isfinite(ca), np.isfinite(cb)
            if not (finite_a.all() and finite_b.all()):
                moved = _non_finite_problem(ca, cb, finite_a, finite_b)
                if moved:
                    return OutputMetrics(name, float("inf"), float("inf"), float("nan"), 0.0,
                                         False, note=moved)
                non_finite += int((~finite_a).sum())
                ca, cb = ca[finite_a], cb[finite_a]
            if ca.size == 0:
                continue
            max_abs = max(max_abs, float(np.abs(ca - cb).max()))
            scale = max(scale, float(np.abs(ca).max()))
            low, high, counted = min(low, float(ca.min())), max(high, float(ca.max())), (
                counted + ca.size)
            dot += float(ca @ cb)
            norm_a += float(ca @ ca)
            norm_b += float(cb @ cb)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = np.sqrt(norm_a) * np.sqrt(norm_b)
    cosine = dot / norms if norms > 0 else 1.0
    tolerance = atol + rtol * scale
    note = f"{non_finite} inf/NaN value(s), equal in both" if non_finite else ""
    spread = high - low if counted > 1 else float("inf")
    return OutputMetrics(name, max_abs, max_rel, cosine, tolerance, max_abs <= tolerance,
                         scale, non_finite, None, note, spread)


def blind_outputs(metrics: list[OutputMetrics]) -> list[str]:
    """Each output in `metrics` that blind_spot finds, as `'name' why`."""
    return [f"{m.name!r} {why}" for m in metrics if (why := blind_spot(m))]


def blind_note(blind: list[str]) -> str:
    """The note for outputs that cannot show a difference, when nothing else was compared."""
    return (f"output {'; '.join(blind)} on these inputs: it cannot show a difference between "
            f"the models; verify with real inputs (--inputs FILE.npz) to check it")


def blind_spot(metrics: OutputMetrics) -> str | None:
    """How a float output that passed shows no fold's effect, or None: every value within the
    tolerance of zero (a sigmoid saturated by random inputs), or one value everywhere (a
    softmax over constant logits). Anything near the reference passes such an output."""
    if not metrics.ok or metrics.note.startswith("compared exactly"):
        return None
    if metrics.scale <= metrics.tolerance:
        return f"is within its tolerance of zero (largest |value| {metrics.scale:.3g})"
    if metrics.spread <= metrics.tolerance:
        return f"holds one value everywhere (spread {metrics.spread:.3g})"
    return None


def _non_finite_problem(a, b, finite_a, finite_b) -> str | None:
    if not np.array_equal(finite_a, finite_b):
        return (f"inf/NaN at different positions ({int((~finite_a).sum())} in the reference, "
                f"{int((~finite_b).sum())} in the candidate)")
    bad_a, bad_b = a[~finite_a], b[~finite_b]
    same = (np.isnan(bad_a) & np.isnan(bad_b)) | (bad_a == bad_b)
    if not same.all():
        return "inf/NaN of different kinds at the same positions (e.g. +inf against -inf or NaN)"
    return None


def _compare_exact(name: str, a: np.ndarray, b: np.ndarray) -> OutputMetrics:
    """Integer, bool and string outputs must be identical."""
    equal = a.dtype == b.dtype and np.array_equal(a, b)
    if equal:
        return OutputMetrics(name, 0.0, 0.0, 1.0, 0.0, True, note="compared exactly")
    differing = int(np.sum(a != b)) if a.dtype == b.dtype else a.size
    return OutputMetrics(name, float("inf"), float("inf"), 0.0, 0.0, False,
                         note=f"{differing} of {a.size} values differ (compared exactly)")


def needs_noise_floor(metrics: OutputMetrics, explicit_tolerance: bool) -> bool:
    """A float output that failed the fixed tolerance on finite values alone."""
    return (not metrics.ok and not explicit_tolerance and not metrics.note.startswith(("inf", "shape"))
            and np.isfinite(metrics.max_abs_error))


def apply_noise_floor(metrics: OutputMetrics, floor: float, dtype: np.dtype,
                      precision: str | None = None) -> OutputMetrics:
    """Judge `metrics` again allowing FLOOR_MULTIPLE × the reference's own float32 noise,
    capped at CAP_RTOL of the output's scale (of the compute precision's, when lower)."""
    dtype = np.dtype(dtype)
    cap_rtol = CAP_RTOL.get(dtype, 1e-3)
    if precision is not None:
        cap_rtol = max(cap_rtol, PRECISION_CAP_RTOL[precision])
    cap = metrics.tolerance + cap_rtol * metrics.scale + CAP_ATOL.get(dtype, 1e-6)
    allowed = min(cap, max(metrics.tolerance, FLOOR_MULTIPLE * floor))
    metrics.noise_floor = floor
    metrics.tolerance = allowed
    metrics.ok = metrics.max_abs_error <= allowed
    capped = " (capped)" if allowed == cap and FLOOR_MULTIPLE * floor > cap else ""
    metrics.note = (f"fixed tolerance not met; allowed {FLOOR_MULTIPLE:g}× the original's own "
                    f"float32 noise {floor:.3g}{capped}")
    return metrics
