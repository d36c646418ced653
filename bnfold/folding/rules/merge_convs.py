"""Add of two Convs of the same input → one Conv (structural reparameterisation).

RepVGG, MobileOne, FastViT and RepViT train with parallel branches, a k×k Conv, a 1×1 Conv and
the identity, summed; once their BNs fold, what is left is Add(conv_a(x), conv_b(x)). A
convolution is linear in its kernel, so conv_a(x) + conv_b(x) = conv(x) with the kernels
summed where their taps read the same input positions, and b = b_a + b_b. timm's
`reparameterize_model` does this in PyTorch; exported without it, MobileOne-S0 keeps 5 Convs
per block and runs ~4× slower in ONNX Runtime.

The two must read the same input with the same stride and group, and have the same output
size. One of them (the target) must hold the other's taps: on each axis, with equal dilation
d (or the other's kernel 1 wide), the other's window starts o = (p_target − p_other)/d taps
into the target's, a whole number, and ends inside it. The target keeps its shape and pads;
the other's kernel is added at offset o, the other Conv and the Add go.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.report import MERGE_RULE
from bnfold.folding.rules.common import (
    FLOAT_TYPES,
    Match,
    apply_plan,
    attribute_reason,
    compute_dtype,
    plan_problem,
    produced_by,
    typed_attribute,
    weight_and_bias_updates,
)
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.into_producer import optional_constant

_CONV_RULE = ConvBnRule()


class MergeConvsRule:
    name = MERGE_RULE

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        convs = [produced_by(view, name, "Conv") for name in node.input]
        if None in convs or node.input[0] == node.input[1]:
            return None
        first, second = (found[1] for found in convs)
        if not first.input or not second.input or first.input[0] != second.input[0]:
            return None  # not two Convs of one input: not this rule's pattern
        return Match(node_index=index, target_index=convs[0][0],
                     extra={"convs": [found[0] for found in convs]})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        add = view.nodes[match.node_index]
        geometry = []
        for conv_index in match.extra["convs"]:
            conv = view.nodes[conv_index]
            problem = view.sole_consumer_problem(conv.output[0], match.node_index)
            if problem:
                return f"{node_label(conv)} output {problem}"
            found = _geometry(view, conv_index)
            if isinstance(found, str):
                return f"{node_label(conv)}: {found}"
            geometry.append(found)
        (a, b), (ga, gb) = match.extra["convs"], geometry
        placed = _offsets(ga, gb)
        if isinstance(placed, str):
            swapped = _offsets(gb, ga)
            if isinstance(swapped, str):
                return f"the two Convs under {node_label(add)} cannot merge: {placed}"
            (a, b), (ga, gb), placed = (b, a), (gb, ga), swapped
        target, other = view.nodes[a], view.nodes[b]
        elem = view.constant_dtype(target.input[1])
        if elem not in FLOAT_TYPES or view.constant_dtype(other.input[1]) != elem:
            return "their weights are not of one floating-point type"
        weight = ga["weight"].astype(np.float64)
        window = tuple(slice(o, o + k) for o, k in zip(placed, gb["weight"].shape[2:]))
        weight[(slice(None), slice(None), *window)] += gb["weight"]
        biases = [g["bias"] for g in (ga, gb) if g["bias"] is not None]
        match.target_index = a
        dtype = compute_dtype(elem)
        channels = weight.shape[0]
        bias = sum(b_.astype(np.float64) for b_ in biases) if biases else np.zeros(channels)
        match.updates = weight_and_bias_updates(view, match, weight.astype(dtype),
                                                bias.astype(dtype))
        if not biases:
            match.updates = match.updates[:1]
        match.extra["other"] = b
        match.extra["into"] = node_label(target)
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Store the summed kernel; the target produces the Add's output; the other Conv goes."""
        dead = apply_plan(view, match)
        other = view.nodes[match.extra["other"]]
        view.bypass(match.node_index, match.target_index)
        view.remove_node(match.extra["other"])
        view.drop_value_info(other.output[0])
        return dead + list(other.input[1:])


def _geometry(view: GraphView, index: int) -> dict | str:
    """A Conv's weight, bias, group, strides, dilations and pads, or why it has none to merge."""
    conv = view.nodes[index]
    part = Match(node_index=index, target_index=index)
    shape = _CONV_RULE.output_channels(view, part)  # the weight, a constant of rank ≥ 3
    if isinstance(shape, str):
        return shape
    weight = part.extra["weight"]
    bias = optional_constant(view, conv, 2, "Conv bias", shape=(weight.shape[0],))
    if isinstance(bias, str):
        return bias
    spatial = weight.ndim - 2
    auto_pad = typed_attribute(conv, "auto_pad", "string", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad {auto_pad!r}"
    pads = [0] * 2 * spatial if auto_pad == "VALID" else typed_attribute(
        conv, "pads", "ints", [0] * 2 * spatial)
    found = {
        "weight": weight, "bias": bias, "pads": pads,
        "group": typed_attribute(conv, "group", "int", 1, minimum=1),
        "strides": typed_attribute(conv, "strides", "ints", [1] * spatial),
        "dilations": typed_attribute(conv, "dilations", "ints", [1] * spatial, minimum=1),
    }
    if any(len(found[key]) != n for key, n in (("strides", spatial), ("dilations", spatial),
                                                ("pads", 2 * spatial))):
        return "its strides, dilations or pads do not match its kernel's rank"
    return found


def _offsets(target: dict, other: dict) -> tuple[int, ...] | str:
    """Where `other`'s kernel starts within `target`'s, per spatial axis, when every tap of
    `other` reads what one of `target`'s reads; else why not."""
    wt, wo = target["weight"], other["weight"]
    if wt.shape[:2] != wo.shape[:2] or wt.ndim != wo.ndim:
        return f"weights of shapes {list(wt.shape)} and {list(wo.shape)}"
    for key in ("group", "strides"):
        if target[key] != other[key]:
            return f"{key} {target[key]} and {other[key]}"
    spatial = wt.ndim - 2
    offsets = []
    for axis in range(spatial):
        kt, ko = wt.shape[2 + axis], wo.shape[2 + axis]
        dt, do = target["dilations"][axis], other["dilations"][axis]
        bt, bo = target["pads"][axis], other["pads"][axis]
        et, eo = target["pads"][axis + spatial], other["pads"][axis + spatial]
        if bt + et - dt * (kt - 1) != bo + eo - do * (ko - 1):
            return f"their outputs differ in size on axis {axis + 2}"
        if ko > 1 and dt != do:
            return f"dilations {dt} and {do} on axis {axis + 2}"
        if (bt - bo) % dt or not 0 <= (bt - bo) // dt <= kt - ko:
            return (f"the {ko}-tap kernel (pad {bo}) does not lie within the {kt}-tap one "
                    f"(pad {bt}) on axis {axis + 2}")
        offsets.append((bt - bo) // dt)
    return tuple(offsets)
