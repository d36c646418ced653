"""ConvTranspose → BatchNormalization (or per-channel Mul/Add) into the ConvTranspose.

Weight [Cin, Cout/g, k…]: output channel gi·(Cout/g) + j is W[gi·(Cin/g):(gi+1)·(Cin/g), j], so
the scale applies along axis 1 *within each group* (grouped and depthwise included):
W'[gi, :, j] = W[gi, :, j]·s[gi·(Cout/g) + j],  b' = b·s + t.
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.rules.common import (
    Match,
    attribute_reason,
    typed_attribute,
    compute_dtype,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import (
    IntoProducerRule,
    constant_or_reason,
    optional_constant,
)


class ConvTransposeBnRule(IntoProducerRule):
    name = "convtranspose-bn"
    producer_ops = ("ConvTranspose",)

    def output_channels(self, view: GraphView, match: Match) -> tuple[int, int] | str:
        node = view.nodes[match.target_index]
        if len(node.input) < 2:
            return "ConvTranspose has no weight input"
        weight = constant_or_reason(view, node.input[1], "ConvTranspose weight")
        if isinstance(weight, str):
            return weight
        group = typed_attribute(node, "group", "int", 1, minimum=1)
        if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
            return f"ConvTranspose weight {list(weight.shape)} does not fit group={group}"
        match.extra.update(weight=weight, group=group)
        return group * weight.shape[1], weight.ndim

    def plan(self, view: GraphView, match: Match) -> str | None:
        node = view.nodes[match.target_index]
        weight, group = match.extra["weight"], match.extra["group"]
        channels = group * weight.shape[1]
        bias = optional_constant(view, node, 2, "ConvTranspose bias", shape=(channels,))
        if isinstance(bias, str):
            return bias
        affine = match.affine
        elem = view.constant_dtype(node.input[1])
        new_weight, new_bias = fold_math.conv_transpose_output_fold(
            weight, bias, affine.scale, affine.shift, group, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_weight, new_bias)
        return None
