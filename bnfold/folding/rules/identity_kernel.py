"""The identity map as a Conv kernel, for folds that absorb a BN's identity path into a Conv.

A Conv with a[o] at the centre tap joining input channel o to output channel o and zeros
elsewhere computes a[o]·x[o]. That needs stride 1, pads that put the centre tap
c = pad_begin / dilation over the output position on every axis (pad_begin + pad_end =
dilation·(k − 1), so the output keeps the input's size), and as many output channels as inputs
(input channel o of output channel o is o mod Cin/group within its group).
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.graph import GraphView
from bnfold.folding.rules.common import (
    Match,
    compute_dtype,
    plan_problem,
    typed_attribute,
    weight_and_bias_updates,
)
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.into_producer import optional_constant

_CONV_RULE = ConvBnRule()


def plan_with_identity(view: GraphView, match: Match, weight_scale: np.ndarray,
                       identity_scale: np.ndarray, shift: np.ndarray) -> str | None:
    """Plan W'[o] = W[o]·weight_scale[o] plus identity_scale[o] at the centre taps and
    b' = b·weight_scale + shift for the Conv `match.target_index`, or why it cannot take them."""
    conv = view.nodes[match.target_index]
    shape = _CONV_RULE.output_channels(view, match)
    if isinstance(shape, str):
        return shape
    weight = match.extra["weight"]
    channels = identity_scale.shape[0]
    group = typed_attribute(conv, "group", "int", 1, minimum=1)
    if weight.shape[0] != channels or weight.shape[1] * group != channels:
        return (f"it maps {weight.shape[1] * group} channels to {weight.shape[0]}, the BN has "
                f"{channels}: no identity kernel")
    centre = centre_tap(conv, weight.shape[2:])
    if isinstance(centre, str):
        return centre
    bias = optional_constant(view, conv, 2, "Conv bias", shape=(channels,))
    if isinstance(bias, str):
        return bias
    per_output = (-1,) + (1,) * (weight.ndim - 1)
    new_weight = weight.astype(np.float64) * weight_scale.reshape(per_output)
    outputs = np.arange(channels)
    new_weight[(outputs, outputs % weight.shape[1], *centre)] += identity_scale
    new_bias = (0.0 if bias is None else bias.astype(np.float64) * weight_scale) + shift
    dtype = compute_dtype(view.constant_dtype(conv.input[1]))
    match.updates = weight_and_bias_updates(view, match, new_weight.astype(dtype),
                                            np.broadcast_to(new_bias, (channels,)).astype(dtype))
    return plan_problem(match, view)


def centre_tap(conv, kernel: tuple[int, ...]) -> tuple[int, ...] | str:
    """The kernel tap each output position reads its own input position through, or why
    there is none (a stride, or pads that shift or resize the output)."""
    spatial = len(kernel)
    strides = typed_attribute(conv, "strides", "ints", [1] * spatial)
    dilations = typed_attribute(conv, "dilations", "ints", [1] * spatial)
    pads = typed_attribute(conv, "pads", "ints", [0] * 2 * spatial)
    auto_pad = typed_attribute(conv, "auto_pad", "string", "NOTSET")
    if len(strides) != spatial or len(dilations) != spatial or len(pads) != 2 * spatial:
        return "its strides, dilations or pads do not match its kernel's rank"
    if any(s != 1 for s in strides):
        return f"it has strides {strides}: the output is not the input's size"
    centre = []
    for axis, (k, d) in enumerate(zip(kernel, dilations)):
        total = d * (k - 1)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            end = total - begin
        elif auto_pad in ("NOTSET", "VALID"):
            begin, end = (pads[axis], pads[axis + spatial]) if auto_pad == "NOTSET" else (0, 0)
        else:
            return f"auto_pad {auto_pad!r}"
        if d < 1 or begin + end != total or begin % d or not 0 <= begin // d < k:
            return (f"its padding on axis {axis + 2} does not keep each position over itself "
                    f"(kernel {k}, dilation {d}, pads {begin}+{end})")
        centre.append(begin // d)
    return tuple(centre)
