"""Reduced-precision range checks and conversions (float16, bfloat16), numpy only.

A fold computes in float64 and rounds once into the weight's own dtype. In float16/bfloat16 the
folded value can overflow to inf or flush to zero where the original did not, so every fold into a
reduced-precision weight is checked here before anything is written.
"""

from __future__ import annotations

import numpy as np
import onnx

FLOAT16 = "float16"
BFLOAT16 = "bfloat16"

# Largest finite value and smallest positive (subnormal) value of each format.
_LIMITS = {
    FLOAT16: (65504.0, 2.0**-24),
    BFLOAT16: (3.3895313892515355e38, 2.0**-133),
}

# The floating-point element types: what carries data, not shapes or indices.
FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
})

ONNX_DTYPE_NAME = {
    onnx.TensorProto.FLOAT16: FLOAT16,
    onnx.TensorProto.BFLOAT16: BFLOAT16,
}


def range_problem(values: np.ndarray, dtype: str, what: str = "folded weight") -> str | None:
    """Why `values` (float64) cannot be stored in `dtype`, or None when they fit.

    Refuses overflow (|v| above the largest finite value) and flush to zero (a non-zero value
    smaller than half the smallest subnormal, which rounds to 0).
    """
    if dtype not in _LIMITS:
        return None
    largest, smallest = _LIMITS[dtype]
    magnitude = np.abs(values)
    finite = np.isfinite(values)
    if not finite.all():
        return f"{what} is not finite"
    peak = float(magnitude.max(initial=0.0))
    # Values within half an ulp above `largest` still round to it; beyond that they become inf.
    if peak > largest * (1 + 2.0**-12):
        return f"{what} would overflow {dtype} (|w| up to {peak:.3g} > {largest:.6g})"
    nonzero = magnitude[magnitude > 0]
    if nonzero.size and float(nonzero.min()) < smallest / 2:
        return (
            f"{what} would flush to zero in {dtype} "
            f"(|w| down to {float(nonzero.min()):.3g} < {smallest / 2:.3g})"
        )
    return None


# float32/float64 weights are stored as computed, but a weight near the top of the range makes
# the model overflow to ±inf at run time, and folding moves where that happens (the original
# gives -inf, the folded model -3.4e37 or the other way round). A fold is refused when a folded
# value, or a weight it replaces, comes within this factor of the dtype's largest finite value.
HEADROOM = 2.0**10
_WIDE_LARGEST = {
    onnx.TensorProto.FLOAT: float(np.finfo(np.float32).max),
    onnx.TensorProto.DOUBLE: float(np.finfo(np.float64).max),
}


def headroom_problem(values: np.ndarray, elem_type: int, what: str) -> str | None:
    """Why `values` of a float32/float64 weight come within HEADROOM (2**10) of the dtype's
    largest finite value (float32: above 3.3e35), or None. Other dtypes: None."""
    largest = _WIDE_LARGEST.get(elem_type)
    if largest is None or values.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        peak = max(abs(float(values.min())), abs(float(values.max())))
    if not np.isfinite(peak):
        return f"{what} is not finite"
    if peak > largest / HEADROOM:
        return (
            f"{what} reaches {peak:.3g}, within 2**10 of the {values.dtype} range "
            f"({largest:.3g}): run-time overflow to ±inf would move"
        )
    return None


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)
