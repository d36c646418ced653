"""BN on a residual's identity path, summed with a Conv of the same input: into that Conv.

RepVGG, MobileOne and their kin (timm's `repvgg_*`, `mobileone_*`), exported before
reparameterisation, sum a k×k Conv→BN branch, a 1×1 Conv→BN branch and a BN of the block's
input itself: y = conv_k(x) + conv_1(x) + BN(x). Once the branch BNs have folded, the identity
BN is s·x + t, and s·x is a Conv of x whose kernel has s[o] at the centre tap joining input
channel o to output channel o and zeros elsewhere. So it joins a Conv in the sum that reads
the same x: W'[o, o mod (Cin/g), centre] = W[…] + s[o], b' = b + t. The BN and the Add that
took its output go (the other summand produces the Add's output).

The Conv must map each position to itself through its centre tap: stride 1, and on every axis
pads that put tap c = pad_begin / dilation over the output position (pad_begin + pad_end =
dilation·(k − 1), so the output keeps the input's size). It must have as many output channels
as inputs (the BN's C), and reach the Add only through Adds that nothing else reads, so it is a
summand of it with weight 1.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    compute_dtype,
    is_batchnorm,
    plan_problem,
    produced_by,
    typed_attribute,
    weight_and_bias_updates,
)
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.into_producer import optional_constant

_CONV_RULE = ConvBnRule()
_MAX_DEPTH = 8  # Adds between the Conv and the identity's Add


class IdentityBnRule:
    name = "identity-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        readers = view.live_consumers(node.output[0])
        if len(readers) != 1:
            return None
        add = view.nodes[readers[0]]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            return None
        convs = _summed_convs(view, readers[0], node.output[0], node.input[0])
        if not convs:
            return None  # no Conv of the same input in the sum: not this rule's pattern
        return Match(node_index=index, target_index=convs[0][0],
                     extra={"add": readers[0], "convs": convs})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        bn = view.nodes[match.node_index]
        add = view.nodes[match.extra["add"]]
        if bn.output[0] in view.graph_outputs:
            return f"{bn.output[0]!r} is also a graph output"
        if add.input[0] == add.input[1]:
            return f"{node_label(add)} adds {add.input[0]!r} to itself"
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        problems = []
        for conv_index, path in match.extra["convs"]:
            part = Match(node_index=match.node_index, target_index=conv_index)
            problem = _absorb_plan(view, part, path, affine.scale, affine.shift)
            if problem is None:
                match.target_index = conv_index
                match.updates = part.updates
                match.affine = affine
                other = add.input[1] if add.input[0] == bn.output[0] else add.input[0]
                match.extra["summand"] = view.producer_of(other)[0]
                match.extra["path"] = path
                return None
            problems.append(f"{node_label(view.nodes[conv_index])}: {problem}")
        return "; ".join(problems)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Add the identity taps; the other summand produces the Add's output; the BN goes."""
        dead = apply_plan(view, match)
        for index in (match.target_index, *match.extra["path"]):  # they now carry s·x + t too
            view.alter(view.nodes[index].output[0])
        bn = view.nodes[match.node_index]
        view.bypass(match.extra["add"], match.extra["summand"])
        view.remove_node(match.node_index)
        view.drop_value_info(bn.output[0])
        return dead + list(match.affine.dead_inputs)


def _summed_convs(view: GraphView, add_index: int, bn_output: str, source: str
                  ) -> list[tuple[int, list[int]]]:
    """Convs reading `source` that reach Add `add_index` as summands (through Adds read by
    nothing else), nearest first, with the Adds on the way."""
    add = view.nodes[add_index]
    found: list[tuple[int, list[int]]] = []
    work = [(name, add_index, []) for name in add.input if name != bn_output]
    while work:
        name, reader, path = work.pop(0)
        if view.sole_consumer_problem(name, reader) or len(path) > _MAX_DEPTH:
            continue
        conv = produced_by(view, name, "Conv")
        if conv is not None:
            if conv[1].input and conv[1].input[0] == source:
                found.append((conv[0], path))
            continue
        inner = produced_by(view, name, "Add")
        if inner is not None and len(inner[1].input) == 2:
            work += [(n, inner[0], path + [inner[0]]) for n in inner[1].input]
    return found


def _absorb_plan(view: GraphView, match: Match, path: list[int], scale: np.ndarray,
                 shift: np.ndarray) -> str | None:
    """Plan W + s at the centre taps and b + t for the Conv of `match`, or why it cannot."""
    conv = view.nodes[match.target_index]
    shape = _CONV_RULE.output_channels(view, match)
    if isinstance(shape, str):
        return shape
    weight = match.extra["weight"]
    channels = scale.shape[0]
    group = typed_attribute(conv, "group", "int", 1, minimum=1)
    if weight.shape[0] != channels or weight.shape[1] * group != channels:
        return (f"it maps {weight.shape[1] * group} channels to {weight.shape[0]}, the BN has "
                f"{channels}: no identity kernel")
    centre = _centre_tap(conv, weight.shape[2:])
    if isinstance(centre, str):
        return centre
    bias = optional_constant(view, conv, 2, "Conv bias", shape=(channels,))
    if isinstance(bias, str):
        return bias
    elem = view.constant_dtype(conv.input[1])
    new_weight = weight.astype(np.float64)
    outputs = np.arange(channels)
    new_weight[(outputs, outputs % weight.shape[1], *centre)] += scale
    new_bias = (0.0 if bias is None else bias.astype(np.float64)) + shift
    dtype = compute_dtype(elem)
    match.updates = weight_and_bias_updates(view, match, new_weight.astype(dtype),
                                            new_bias.astype(dtype))
    return plan_problem(match, view)


def _centre_tap(conv, kernel: tuple[int, ...]) -> tuple[int, ...] | str:
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
