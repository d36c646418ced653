"""Outputs and fold sites that the model's own float32 noise leaves undecided, judged against
the original evaluated in float64.

Some networks amplify rounding: a deep stack of thin bottlenecks, or BN statistics with
near-zero variances. There the original's own float32 noise (ORT optimised against
unoptimised, bnfold.verification.comparison) can exceed the cap that comparison puts on it,
1e-3 of the scale, and a correct fold fails. Measured on pytorchcv's SqueezeNext-23 with
calibrated statistics: from stage 3 on, the fold sites differ from the original by 2-5e-3 of
their scale, over the cap. Against float64, though, the folded sites are 0.7-1.6 times as far
from exact as the original's own.

When the model is small enough for onnx.reference, such an output or site is judged again
against the original run in float64:
- the float64 value is trusted when the original's float32 value is within FLOOR_MULTIPLE
  times its own noise of it. Then it is the same computation, rounded otherwise; a reference
  evaluator that read an op differently would be further off.
- the candidate passes when it is within FLOOR_MULTIPLE times the original's distance to
  float64 (plus the fixed tolerance): it is as exact as the original.
- nothing is judged where the original is more than CAP_RTOL of the scale from float64: there
  no wrong fold could be told from noise.
"""

from __future__ import annotations

import numpy as np

from bnfold.verification.comparison import FLOOR_MULTIPLE, OutputMetrics, default_tolerance

CAP_RTOL = 2e-2


def undecided(metrics: OutputMetrics) -> bool:
    """Failed against a noise allowance that the cap cut down (comparison.apply_noise_floor
    left a tolerance below FLOOR_MULTIPLE × the noise): float64 may decide it."""
    return (not metrics.ok and metrics.noise_floor is not None
            and metrics.tolerance < FLOOR_MULTIPLE * metrics.noise_floor)


def rejudge(metrics: OutputMetrics, original: list[np.ndarray], candidate: list[np.ndarray],
            exact: list[np.ndarray]) -> None:
    """Judge `metrics` again from the float32 values of both models and the float64 values of
    the original, one array per input set; sets ok and says why in note."""
    to_exact = from_exact = scale = 0.0
    for ref, cand, truth in zip(original, candidate, exact):
        truth = np.asarray(truth, dtype=np.float64)
        ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
        if ref.shape != truth.shape or cand.shape != truth.shape:
            return
        finite = np.isfinite(truth) & np.isfinite(ref) & np.isfinite(cand)
        if not finite.any():
            return
        to_exact = max(to_exact, float(np.abs(ref[finite] - truth[finite]).max()))
        from_exact = max(from_exact, float(np.abs(cand[finite] - truth[finite]).max()))
        scale = max(scale, float(np.abs(truth[finite]).max()))
    rtol, atol = default_tolerance(np.dtype(np.float32))
    fixed = atol + rtol * scale
    said = (f"; against float64 the original is {to_exact:.3g} off, the folded model "
            f"{from_exact:.3g}")
    if to_exact > FLOOR_MULTIPLE * metrics.noise_floor + fixed:
        metrics.note += said + " (float64 is no closer to the original than the noise: not used)"
    elif to_exact > CAP_RTOL * scale:
        metrics.note += said + f" (over {CAP_RTOL:g} of the scale: too noisy to judge)"
    elif from_exact <= FLOOR_MULTIPLE * to_exact + fixed:
        metrics.ok = True
        metrics.note += said + ": as exact as the original"
    else:
        metrics.note += said + f": more than {FLOOR_MULTIPLE:g}× the original's"
