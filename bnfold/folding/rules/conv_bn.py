"""Conv → BatchNormalization (or per-channel Mul/Add) into the Conv.

Conv weight [Cout, Cin/g, k…], any dims (1-D/2-D/3-D), group, dilation, stride, with or without
bias:  W'[o] = W[o]·s[o],  b'[o] = b[o]·s[o] + t[o]  with s = γ/√(σ²+ε), t = β − μ·s.
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.rules.common import Match, compute_dtype, weight_and_bias_updates
from bnfold.folding.rules.into_producer import (
    IntoProducerRule,
    constant_or_reason,
    optional_constant,
)


class ConvBnRule(IntoProducerRule):
    name = "conv-bn"
    producer_ops = ("Conv",)

    def output_channels(self, view: GraphView, match: Match) -> tuple[int, int] | str:
        conv = view.nodes[match.target_index]
        if len(conv.input) < 2:
            return "Conv has no weight input"
        weight = constant_or_reason(view, conv.input[1], "Conv weight")
        if isinstance(weight, str):
            return weight
        if weight.ndim < 3:
            return f"Conv weight has rank {weight.ndim}, expected at least 3"
        match.extra["weight"] = weight
        return weight.shape[0], weight.ndim

    def plan(self, view: GraphView, match: Match) -> str | None:
        conv = view.nodes[match.target_index]
        weight = match.extra["weight"]
        bias = optional_constant(view, conv, 2, "Conv bias", shape=(weight.shape[0],))
        if isinstance(bias, str):
            return bias
        affine = match.affine
        elem = view.constant_dtype(conv.input[1])
        new_weight, new_bias = fold_math.conv_output_fold(
            weight, bias, affine.scale, affine.shift, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_weight, new_bias)
        return None
