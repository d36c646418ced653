"""Property tests of the fold formulas, against direct float64 evaluation of the unfused ops."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.folding import math as fold_math
from bnfold.precision import bfloat16_bits_to_float32, float32_to_bfloat16_bits, range_problem

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def bn_stats(draw, channels):
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (r.uniform(0.1, 3, channels), r.normal(0, 1, channels), r.normal(0, 1, channels),
            r.uniform(0.01, 4, channels), draw(st.sampled_from([0.0, 1e-5, 1e-3])))


def batchnorm(x, gamma, beta, mean, var, eps, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    g, b, m, v = (a.reshape(shape) for a in (gamma, beta, mean, var))
    return (x - m) / np.sqrt(v + eps) * g + b


def grouped_conv_window(w, window, group):
    """Conv output at one position: w [Cout, Cin/g, k…], window [Cin, k…] -> [Cout]."""
    c_out, c_in_g = w.shape[:2]
    out = np.empty(c_out)
    for o in range(c_out):
        gi = o // (c_out // group)
        out[o] = np.sum(w[o] * window[gi * c_in_g:(gi + 1) * c_in_g])
    return out


@st.composite
def conv_case(draw):
    group = draw(st.sampled_from([1, 2, 3]))
    c_in = group * draw(st.integers(1, 3))
    c_out = group * draw(st.integers(1, 3))
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return group, r.standard_normal((c_out, c_in // group) + k), r.standard_normal((c_in,) + k), r


@SETTINGS
@given(conv_case(), st.booleans(), st.data())
def test_conv_output_fold(case, has_bias, data):
    group, w, window, r = case
    c_out = w.shape[0]
    bias = r.standard_normal(c_out) if has_bias else None
    gamma, beta, mean, var, eps = data.draw(bn_stats(c_out))
    s, t = fold_math.bn_scale_shift(gamma, beta, mean, var, eps)
    w2, b2 = fold_math.conv_output_fold(w, bias, s, t)
    y = grouped_conv_window(w, window, group) + (0 if bias is None else bias)
    expected = batchnorm(y[None], gamma, beta, mean, var, eps, 1)[0]
    np.testing.assert_allclose(grouped_conv_window(w2, window, group) + b2, expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(conv_case(), st.booleans(), st.data())
def test_conv_input_fold(case, has_bias, data):
    group, w, window, r = case
    c_in, c_out = window.shape[0], w.shape[0]
    bias = r.standard_normal(c_out) if has_bias else None
    gamma, beta, mean, var, eps = data.draw(bn_stats(c_in))
    s, t = fold_math.bn_scale_shift(gamma, beta, mean, var, eps)
    w2, b2 = fold_math.conv_input_fold(w, bias, s, t, group)
    normalised = batchnorm(window[None], gamma, beta, mean, var, eps, 1)[0]
    expected = grouped_conv_window(w, normalised, group) + (0 if bias is None else bias)
    np.testing.assert_allclose(grouped_conv_window(w2, window, group) + b2, expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.data())
def test_conv_transpose_output_fold(group, cin_per_group, cout_per_group, has_bias, data):
    """A 1-pixel input through ConvTranspose: out[gi·Cout/g + j, k] = Σ_i x[i]·W[i, j, k] over group gi."""
    r = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    c_in, c_out = group * cin_per_group, group * cout_per_group
    w = r.standard_normal((c_in, cout_per_group, 2, 2))
    x = r.standard_normal(c_in)
    bias = r.standard_normal(c_out) if has_bias else None

    def deconv(weight, b):
        out = np.zeros((c_out, 2, 2))
        for gi in range(group):
            for j in range(cout_per_group):
                rows = slice(gi * cin_per_group, (gi + 1) * cin_per_group)
                out[gi * cout_per_group + j] = np.tensordot(x[rows], weight[rows, j], axes=1)
        return out + (0 if b is None else b[:, None, None])

    gamma, beta, mean, var, eps = data.draw(bn_stats(c_out))
    s, t = fold_math.bn_scale_shift(gamma, beta, mean, var, eps)
    w2, b2 = fold_math.conv_transpose_output_fold(w, bias, s, t, group)
    expected = batchnorm(deconv(w, bias)[None], gamma, beta, mean, var, eps, 1)[0]
    np.testing.assert_allclose(deconv(w2, b2), expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.booleans(), st.booleans(), st.floats(0.1, 3), st.sampled_from([0.0, 0.5, 2.0]), st.data())
def test_gemm_output_and_input_folds(trans_b, has_c, alpha, beta, data):
    r = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    m, k, n = 3, 4, 5
    a = r.standard_normal((m, k))
    b = r.standard_normal((n, k) if trans_b else (k, n))
    c = r.standard_normal(n) if has_c else None
    op_b = b.T if trans_b else b

    def gemm(a_, b_, c_, beta_):
        return alpha * a_ @ (b_.T if trans_b else b_) + (0 if c_ is None else beta_ * c_)

    gamma, bb, mean, var, eps = data.draw(bn_stats(n))
    s, t = fold_math.bn_scale_shift(gamma, bb, mean, var, eps)
    b2, c2, beta2 = fold_math.gemm_output_fold(b, c, s, t, trans_b, beta)
    expected = batchnorm(alpha * a @ op_b + (0 if c is None else beta * c), gamma, bb, mean, var, eps, 1)
    np.testing.assert_allclose(gemm(a, b2, c2, beta2), expected, rtol=1e-9, atol=1e-9)

    gamma, bb, mean, var, eps = data.draw(bn_stats(k))
    s, t = fold_math.bn_scale_shift(gamma, bb, mean, var, eps)
    b3, c3, beta3 = fold_math.gemm_input_fold(b, c, s, t, trans_b, alpha, beta)
    expected = gemm(batchnorm(a, gamma, bb, mean, var, eps, 1), b, c, beta)
    np.testing.assert_allclose(gemm(a, b3, c3, beta3), expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_float16_range_check_matches_numpy_rounding(values):
    array = np.array(values, dtype=np.float64)
    problem = range_problem(array, "float16")
    with np.errstate(over="ignore"):
        rounded = array.astype(np.float16)
    overflows = not np.isfinite(rounded).all()
    flushes = bool(np.any((rounded == 0) & (array != 0)))
    assert (problem is not None) == (overflows or flushes), (problem, values)


@SETTINGS
@given(st.lists(st.floats(-3.0000000054977558e38, 3.0000000054977558e38, allow_nan=False, width=32), min_size=1, max_size=20))
def test_bfloat16_round_trip_is_nearest(values):
    array = np.array(values, dtype=np.float32)
    back = bfloat16_bits_to_float32(float32_to_bfloat16_bits(array)).astype(np.float64)
    # bfloat16 keeps 8 significant bits: the nearest value is within half an ulp (2^-8
    # relative), or half the smallest subnormal (2^-134) in the subnormal range.
    error = np.abs(back - array.astype(np.float64))
    assert np.all(error <= np.abs(array.astype(np.float64)) * 2.0**-8 + 2.0**-134)
