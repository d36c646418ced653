"""Concat of Convs along the channels → BatchNormalization into each Conv.

MixNet's MixConv (and Inception-style blocks) split the channels, run a Conv of another kernel
size on each part and concatenate the results along axis 1 before one BN. The BN acts on each
channel alone, so channel slice [o, o + Cᵢ) of it is Convᵢ's own conv-bn fold:
W'ᵢ[c] = Wᵢ[c]·s[o + c], b'ᵢ[c] = bᵢ[c]·s[o + c] + t[o + c]. The Concat stays and produces
the BN's output. Every Concat input must be a Conv's output read by the Concat alone, once.
"""

from __future__ import annotations

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    ChannelAffine,
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    is_batchnorm,
    plan_problem,
    produced_by,
    typed_attribute,
)
from bnfold.folding.rules.conv_bn import ConvBnRule

_CONV_RULE = ConvBnRule()


class ConcatBnRule:
    name = "concat-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        found = produced_by(view, node.input[0], "Concat")
        if found is None:
            return None
        convs = [produced_by(view, name, "Conv") for name in found[1].input]
        if not convs or None in convs:
            return None  # not a Concat of Convs: not this rule's pattern
        return Match(node_index=index, target_index=found[0],
                     extra={"convs": [p[0] for p in convs]})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        concat = view.nodes[match.target_index]
        problem = view.sole_consumer_problem(concat.output[0], match.node_index)
        if problem:
            return f"{node_label(concat)} output {problem}"
        if len(set(concat.input)) != len(concat.input):
            return f"{node_label(concat)} concatenates one Conv output twice"
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        axis = typed_attribute(concat, "axis", "int", None)
        parts, offset = [], 0
        for conv_index in match.extra["convs"]:
            conv = view.nodes[conv_index]
            problem = view.sole_consumer_problem(conv.output[0], match.target_index)
            if problem:
                return f"{node_label(conv)} output {problem}"
            part = Match(node_index=match.node_index, target_index=conv_index)
            shape = _CONV_RULE.output_channels(view, part)
            if isinstance(shape, str):
                return f"{node_label(conv)}: {shape}"
            channels, rank = shape
            if axis is None or axis % rank != 1:
                return f"{node_label(concat)} joins axis {axis}, not the channels (axis 1)"
            part.affine = ChannelAffine(affine.scale[offset:offset + channels],
                                        affine.shift[offset:offset + channels])
            offset += channels
            if part.affine.scale.shape[0] != channels:
                break  # the BN has fewer channels: said below
            problem = _CONV_RULE.plan(view, part) or plan_problem(part, view)
            if problem:
                return f"into {node_label(conv)}: {problem}"
            parts.append(part)
        if offset != affine.scale.shape[0]:
            return (f"{node_label(concat)} joins {offset} channels but the BN has "
                    f"{affine.scale.shape[0]}")
        match.affine = affine
        match.extra["parts"] = parts
        match.extra["into"] = ", ".join(node_label(view.nodes[p.target_index]) for p in parts)
        return None

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Apply each Conv's plan; the Concat produces the BN's output."""
        dead = []
        for part in match.extra["parts"]:
            dead += apply_plan(view, part)
            view.alter(view.nodes[part.target_index].output[0])
        view.bypass(match.node_index, match.target_index)
        return dead + list(match.affine.dead_inputs)
