"""Conv → Split along the channels → BatchNormalization on one part, into that part's rows.

IBN-Net (instance-batch normalisation, common in person re-identification) splits a Conv's
channels in two, normalises one part with a BN and the other with InstanceNorm, and
concatenates them. The BN acts on each channel alone, so it is a conv-bn fold restricted to the
Conv's output rows [o, o + C): those rows of W and b are scaled and shifted, the others are left
as they are (their factor is exactly 1, their shift 0). The Split stays and produces the BN's
output. The Conv's output must feed the Split alone, and the part the BN's alone.
"""

from __future__ import annotations

import numpy as np

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
from bnfold.folding.rules.into_producer import constant_or_reason

_CONV_RULE = ConvBnRule()


class SplitBnRule:
    name = "split-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        split = produced_by(view, node.input[0], "Split")
        conv = produced_by(view, split[1].input[0], "Conv") if split and split[1].input else None
        if conv is None:
            return None
        part = list(split[1].output).index(node.input[0])
        return Match(node_index=index, target_index=conv[0],
                     extra={"split": split[0], "part": part})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        split, part = view.nodes[match.extra["split"]], match.extra["part"]
        conv = view.nodes[match.target_index]
        problem = view.sole_consumer_problem(conv.output[0], match.extra["split"])
        if problem:
            return f"{node_label(conv)} output {problem}"
        problem = view.sole_consumer_problem(split.output[part], match.node_index)
        if problem:
            return f"{node_label(split)} output {problem}"
        if list(split.output).count(split.output[part]) > 1:
            return f"{node_label(split)} names output {split.output[part]!r} twice"
        shape = _CONV_RULE.output_channels(view, match)
        if isinstance(shape, str):
            return shape
        channels, rank = shape
        axis = typed_attribute(split, "axis", "int", 0)
        if axis % rank != 1:
            return f"{node_label(split)} splits axis {axis}, not the channels (axis 1)"
        sizes = _split_sizes(view, split, channels)
        if isinstance(sizes, str):
            return sizes
        start, count = sum(sizes[:part]), sizes[part]
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        if affine.scale.shape[0] != count:
            return (f"{node_label(split)} part {part} has {count} channels but the BN has "
                    f"{affine.scale.shape[0]}")
        scale, shift = np.ones(channels), np.zeros(channels)
        scale[start:start + count], shift[start:start + count] = affine.scale, affine.shift
        match.affine = ChannelAffine(scale, shift, affine.dead_inputs)
        return _CONV_RULE.plan(view, match) or plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Apply the Conv's plan; the Split's part produces the BN's output."""
        dead = apply_plan(view, match)
        view.alter(view.nodes[match.target_index].output[0])
        view.bypass(match.node_index, match.extra["split"], keep_output_slot=match.extra["part"])
        return dead + list(match.affine.dead_inputs)


def _split_sizes(view: GraphView, split, channels: int) -> list[int] | str:
    """The channel count of each output of `split` over `channels`, or why it is not known."""
    label, outputs = node_label(split), len(split.output)
    if view.opset >= 13 and len(split.input) > 1 and split.input[1]:
        sizes = constant_or_reason(view, split.input[1], f"{label} split sizes")
        if isinstance(sizes, str):
            return sizes
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    elif view.opset < 13:
        sizes = typed_attribute(split, "split", "ints", None)
    else:
        sizes = None
    if sizes is None:  # equal parts (opset 18: the last may be smaller)
        step = -(-channels // outputs)
        sizes = [min(step, channels - i * step) for i in range(outputs)]
    if len(sizes) != outputs or sum(sizes) != channels or min(sizes) < 0:
        return f"{label} splits {channels} channels into {sizes}, not its {outputs} outputs"
    return list(sizes)
