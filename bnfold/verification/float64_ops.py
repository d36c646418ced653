"""Convolutions and pooling for the float64 evaluation, computed tap by tap.

onnx.reference is the ground truth's evaluator, but some of its kernels loop in Python over
every output position: on BN-Inception at 224x224 its AveragePool and MaxPool take 7.8 s of
8 s, and on a ViT-S decoder its ConvTranspose takes 16 s (ResNet-50's Convs take 1 s). Here
each op is a loop over the kernel's taps (9 for a 3x3 kernel) of whole-tensor numpy calls:

- Conv: out += W[:, :, tap] · X[window(tap)], group-batched;
- ConvTranspose: out[window(tap)] += W[:, :, tap]ᵀ · X, then the pads are cropped;
- MaxPool / AveragePool: max or sum of X[window(tap)] over the taps; the average divides by the
  number of positions the window covers (the input's alone, or with the explicit pads when
  count_include_pad=1), per axis, as ONNX Runtime does.

The output sizes follow ONNX Runtime's (ceil_mode drops a last window that would start past
the input and its head padding, as PyTorch does). Where an op's attributes leave the common
ground (a MaxPool's Indices output, auto_pad or output_shape on a ConvTranspose, a dilated
AveragePool), the functions return None and the evaluator runs onnx.reference's own kernel.
"""

from __future__ import annotations

import math

import numpy as np


def same_pads(auto_pad: str, sizes, strides, reach) -> list[int]:
    """[heads..., tails...] for auto_pad SAME_UPPER / SAME_LOWER: output ceil(size/stride)."""
    head, tail = [], []
    for size, stride, span in zip(sizes, strides, reach):
        needed = max(0, (-(-size // stride) - 1) * stride + span - size)
        first = (needed + 1) // 2 if auto_pad == "SAME_LOWER" else needed // 2
        head.append(first)
        tail.append(needed - first)
    return head + tail


def conv_by_taps(X, W, B, auto_pad, dilations, group, pads, strides) -> np.ndarray:
    """ONNX Conv of X [N, C, *in] with W [M, C/group, *k] (and bias B [M])."""
    spatial = X.ndim - 2
    if spatial < 1 or W.ndim != X.ndim or X.shape[1] != W.shape[1] * group or W.shape[0] % group:
        raise ValueError(f"Conv of X {X.shape} with W {W.shape}, group {group}")
    kernel = W.shape[2:]
    dilations = list(dilations or [1] * spatial)
    strides = list(strides or [1] * spatial)
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad == "VALID":
        pads = [0] * 2 * spatial
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(auto_pad, X.shape[2:], strides, reach)
    pads = list(pads or [0] * 2 * spatial)
    padded = np.pad(X, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    out = [(padded.shape[2 + i] - reach[i]) // strides[i] + 1 for i in range(spatial)]
    if min(out) < 1:
        raise ValueError(f"Conv output of size {out}")
    batch, channels, maps = X.shape[0], X.shape[1] // group, W.shape[0] // group
    positions = math.prod(out)
    result = np.zeros((batch, group, maps, positions), np.result_type(X, W))
    for tap in np.ndindex(*kernel):
        taken = padded[(slice(None), slice(None), *_window(tap, dilations, out, strides))]
        weights = W[(slice(None), slice(None), *tap)].reshape(group, maps, channels)
        result += np.matmul(weights, taken.reshape(batch, group, channels, positions))
    result = result.reshape(batch, group * maps, *out)
    if B is not None:
        result += B.reshape((1, -1) + (1,) * spatial)
    return result


def conv_transpose_by_taps(X, W, B, auto_pad, dilations, group, output_padding, output_shape,
                           pads, strides) -> np.ndarray | None:
    """ONNX ConvTranspose of X [N, C, *in] with W [C, M/group, *k] (and bias B [M]); None
    where auto_pad or output_shape sets the pads (onnx.reference's kernel then runs)."""
    spatial = X.ndim - 2
    if (auto_pad not in (None, "NOTSET", "VALID") or output_shape or spatial < 1
            or W.ndim != X.ndim or X.shape[1] != W.shape[0] or X.shape[1] % group):
        return None
    kernel, sizes = W.shape[2:], X.shape[2:]
    dilations = list(dilations or [1] * spatial)
    strides = list(strides or [1] * spatial)
    extra = list(output_padding or [0] * spatial)
    pads = [0] * 2 * spatial if auto_pad == "VALID" else list(pads or [0] * 2 * spatial)
    full = [s * (n - 1) + (k - 1) * d + 1 + e
            for n, k, d, s, e in zip(sizes, kernel, dilations, strides, extra)]
    out = [f - pads[i] - pads[i + spatial] for i, f in enumerate(full)]
    if min(out) < 1:
        return None
    batch, channels, maps = X.shape[0], X.shape[1] // group, W.shape[1]
    grouped = X.reshape(batch, group, channels, math.prod(sizes))
    result = np.zeros((batch, group, maps, *full), np.result_type(X, W))
    for tap in np.ndindex(*kernel):
        weights = W[(slice(None), slice(None), *tap)].reshape(group, channels, maps)
        spread = np.matmul(weights.transpose(0, 2, 1), grouped)
        result[(slice(None), slice(None), slice(None), *_window(tap, dilations, sizes, strides))
               ] += spread.reshape(batch, group, maps, *sizes)
    kept = tuple(slice(pads[i], pads[i] + out[i]) for i in range(spatial))
    result = result.reshape(batch, group * maps, *full)[(slice(None), slice(None), *kept)]
    if B is not None:
        result = result + B.reshape((1, -1) + (1,) * spatial)
    return result


def pool_by_taps(X, kind: str, kernel, auto_pad, ceil_mode, count_include_pad, dilations, pads,
                 strides) -> np.ndarray | None:
    """ONNX MaxPool (`kind` "max") or AveragePool ("average") of X [N, C, *in]; None for a
    dilated AveragePool (onnx.reference's kernel then runs)."""
    spatial = X.ndim - 2
    kernel = list(kernel)
    dilations = list(dilations or [1] * spatial)
    if spatial < 1 or len(kernel) != spatial or (kind == "average" and set(dilations) != {1}):
        return None
    strides = list(strides or [1] * spatial)
    sizes = X.shape[2:]
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad == "VALID":
        pads = [0] * 2 * spatial
        out = [-(-(n - r + 1) // s) for n, r, s in zip(sizes, reach, strides)]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(auto_pad, sizes, strides, reach)
        out = [-(-n // s) for n, s in zip(sizes, strides)]
    else:
        pads = list(pads or [0] * 2 * spatial)
        out = []
        for i, (n, r, s) in enumerate(zip(sizes, reach, strides)):
            span = n + pads[i] + pads[i + spatial] - r
            count = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (count - 1) * s >= n + pads[i]:
                count -= 1  # a window may not start in the tail padding
            out.append(count)
    if min(out) < 1:
        return None
    # Room for every window: a ceil_mode window may run past the explicit tail padding.
    tails = [max(pads[i + spatial], (o - 1) * s + r - n - pads[i])
             for i, (o, s, r, n) in enumerate(zip(out, strides, reach, sizes))]
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(X, [(0, 0), (0, 0)] + list(zip(pads[:spatial], tails)),
                    constant_values=fill)
    # One running max or sum over the taps (a stack of every tap's window would hold k² copies
    # of the output).
    taps = (padded[(slice(None), slice(None), *_window(tap, dilations, out, strides))]
            for tap in np.ndindex(*kernel))
    combine = np.maximum if kind == "max" else np.add
    total = next(taps).copy()
    for window in taps:
        combine(total, window, out=total)
    if kind == "max":
        return total
    # The divisor, axis by axis: how many of a window's positions count.
    for i in range(spatial):
        counted = np.zeros(padded.shape[2 + i])
        head = pads[i]
        end = head + sizes[i] + (pads[i + spatial] if count_include_pad else 0)
        counted[0 if count_include_pad else head:end] = 1
        per_window = sum(counted[_window((t,), dilations[i:i + 1], out[i:i + 1],
                                         strides[i:i + 1])] for t in range(kernel[i]))
        total /= per_window.reshape((-1,) + (1,) * (spatial - 1 - i))
    return total


def _window(tap, dilations, counts, strides) -> tuple[slice, ...]:
    """Per spatial axis, the positions kernel tap `tap` meets over `counts` windows."""
    return tuple(slice(t * d, t * d + (n - 1) * s + 1, s)
                 for t, d, n, s in zip(tap, dilations, counts, strides))
