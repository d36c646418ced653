"""Fold formulas, pure numpy, computed in float64 (callers round once into the weight dtype).

Inference BatchNormalization is one affine map per channel c (axis 1 of its input):

    y = s·x + t,   s = γ / √(σ² + ε),   t = β − μ·s

Folding it *after* a linear producer with weight W and bias b (output channel o):

    W'[o] = W[o]·s[o],   b'[o] = b[o]·s[o] + t[o]      (= (b − μ)·s + β)

Folding it *before* a linear consumer (input channel i), exact only when every output element
sums over a full window of BN-ed inputs (no zero padding):

    W'[…, i, …] = W[…, i, …]·s[i],   b' = b + Σ_i W[…, i, …]·t[i]

Weights come back in `dtype` (float64 by default): the product is computed in float64 and
rounded once into `dtype` chunk by chunk, without a float64 copy of the whole weight. A float32
weight of LAZY_MIN_BYTES or more comes back as a WeightProduct (bnfold.folding.product): the
same values, computed when they are written.

Axis conventions (ONNX):
- Conv weight      [Cout, Cin/g, k…]: output channel axis 0; input channel j of group gi is
                   gi·(Cin/g) + j, and output o belongs to group o // (Cout/g).
- ConvTranspose    [Cin, Cout/g, k…]: output channel axis is 1 *within each group*:
                   channel gi·(Cout/g) + j lives at W[gi·(Cin/g):(gi+1)·(Cin/g), j].
- Gemm B           [K, N] (transB=0) or [N, K] (transB=1): output column n.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.product import LAZY_MIN_BYTES, WeightProduct


def scaled(weight: np.ndarray, factors: np.ndarray, dtype=np.float64) -> np.ndarray:
    """weight·factors (broadcast) computed in float64, rounded once into `dtype`."""
    out = np.empty(np.broadcast_shapes(weight.shape, factors.shape), dtype)
    np.multiply(weight, factors, out=out, dtype=np.float64, casting="unsafe")
    return out


def folded_weight(weight: np.ndarray, factors: np.ndarray, dtype=np.float64):
    """scaled(weight, factors, dtype), left as a WeightProduct when it is a large float32 one."""
    if (np.dtype(dtype) == WeightProduct.dtype and factors.ndim == weight.ndim
            and weight.size * 4 >= LAZY_MIN_BYTES
            and np.broadcast_shapes(weight.shape, factors.shape) == weight.shape):
        return WeightProduct(weight, factors)
    return scaled(weight, factors, dtype)


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of the per-channel affine map of an inference BatchNormalization.

    >>> bn_scale_shift(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([3.0]), 1.0)
    (array([1.]), array([-2.]))
    """
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.float64(epsilon))
    return scale, beta - mean * scale


def conv_output_fold(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Conv (weight [Cout, Cin/g, k…]) followed by y = s·x + t over Cout."""
    s = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    b = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return folded_weight(weight, s, dtype), b * scale + shift


def conv_transpose_output_fold(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, group: int,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose (weight [Cin, Cout/g, k…]) followed by y = s·x + t over Cout = g·(Cout/g)."""
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    grouped = weight.reshape((group, c_in // group, c_out_per_group) + kernel)
    s = scale.reshape((group, 1, c_out_per_group) + (1,) * len(kernel))
    folded = folded_weight(grouped, s, dtype).reshape(weight.shape)
    b = np.zeros(group * c_out_per_group) if bias is None else np.asarray(bias, np.float64)
    return folded, b * scale + shift


def gemm_output_fold(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    trans_b: bool,
    beta: float,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gemm  Y = α·A·op(B) + β·C  followed by y = s·x + t over the N output columns.

    Returns (B', C', β'). When β is 0 (C ignored) or C is absent, C' = t and β' = 1.
    """
    folded_b = folded_weight(b_matrix, scale[:, None] if trans_b else scale[None, :], dtype)
    if c is None or beta == 0.0:
        return folded_b, shift.copy(), 1.0
    c64 = np.asarray(c, dtype=np.float64)
    return folded_b, c64 * scale + shift / beta, beta


def matmul_output_fold(
    b_matrix: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """X·B (+ bias) followed by y = s·x + t over B's columns (the MatMul's last axis)."""
    folded_b = folded_weight(b_matrix, scale[None, :], dtype)
    bias64 = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return folded_b, bias64 * scale + shift


def conv_input_fold(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, group: int,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """y = s·x + t over Cin followed by an unpadded Conv (weight [Cout, Cin/g, k…])."""
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    out_group = np.arange(c_out) // (c_out // group)
    input_channel = out_group[:, None] * c_in_per_group + np.arange(c_in_per_group)[None, :]
    s = scale[input_channel].reshape((c_out, c_in_per_group) + (1,) * (weight.ndim - 2))
    b = np.zeros(c_out) if bias is None else np.asarray(bias, dtype=np.float64)
    # Σ_{j,k} W[o, j, k]·t[i(o, j)]: sum the kernel taps first (in float64), then weight by t.
    taps = weight.reshape(c_out, c_in_per_group, -1).sum(axis=2, dtype=np.float64)
    extra = (taps * shift[input_channel]).sum(axis=1)
    return folded_weight(weight, s, dtype), b + extra


def gemm_input_fold(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    trans_b: bool,
    alpha: float,
    beta: float,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray, float]:
    """y = s·x + t over A's K columns followed by Gemm (transA=0). Returns (B', C', β')."""
    b = np.asarray(b_matrix, dtype=np.float64)
    folded_b = folded_weight(b_matrix, scale[None, :] if trans_b else scale[:, None], dtype)
    extra = alpha * (shift @ (b.T if trans_b else b))
    if c is None or beta == 0.0:
        return folded_b, extra, 1.0
    return folded_b, np.asarray(c, dtype=np.float64) + extra / beta, beta
