"""BatchNormalization → Conv (BN first) into the Conv, where exact.

x' = s·x + t over the Conv's input channels; an unpadded Conv sums every output over a full
window of x', so Conv(W, x') = Conv(W', x) + Σ W·t with W'[o, j] = W[o, j]·s[gi·(Cin/g) + j].
A zero-padded Conv is not exact: the padding zeros would skip the shift t.
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    typed_attribute,
    compute_dtype,
    plan_problem,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import constant_or_reason, optional_constant


def consumer_match(view: GraphView, index: int, op_type: str) -> Match | None:
    """BN `index` whose output is read by exactly one node, an `op_type`, as its input 0."""
    node = view.nodes[index]
    if node.op_type != "BatchNormalization":
        return None
    readers = view.live_consumers(node.output[0])
    if len(readers) != 1 or node.output[0] in view.graph_outputs:
        return None
    reader = view.nodes[readers[0]]
    if reader.op_type != op_type or not reader.input or reader.input[0] != node.output[0]:
        return None
    return Match(node_index=index, target_index=readers[0])


class BnConvRule:
    name = "bn-conv"

    def match(self, view: GraphView, index: int) -> Match | None:
        return consumer_match(view, index, "Conv")

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        conv = view.nodes[match.target_index]
        label = node_label(conv)
        if list(conv.input).count(conv.input[0]) > 1:
            return f"{label} reads the BN output twice"
        auto_pad = typed_attribute(conv, "auto_pad", "string", "NOTSET")
        pads = typed_attribute(conv, "pads", "ints", [])
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(p != 0 for p in pads):
            return f"{label} zero-pads its input, so the BN shift would not reach the border"
        weight = constant_or_reason(view, conv.input[1], "Conv weight")
        if isinstance(weight, str):
            return weight
        group = typed_attribute(conv, "group", "int", 1, minimum=1)
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        if weight.ndim < 3 or weight.shape[0] % group:
            return f"{label} weight {list(weight.shape)} does not fit group={group}"
        if weight.shape[1] * group != affine.scale.shape[0]:
            return (
                f"{label} takes {weight.shape[1] * group} input channels but the BN has "
                f"{affine.scale.shape[0]}"
            )
        bias = optional_constant(view, conv, 2, "Conv bias", shape=(weight.shape[0],))
        if isinstance(bias, str):
            return bias
        match.affine = affine
        elem = view.constant_dtype(conv.input[1])
        new_weight, new_bias = fold_math.conv_input_fold(
            weight, bias, affine.scale, affine.shift, group, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_weight, new_bias)
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        return rewrite_bn_into_consumer(view, match)


def rewrite_bn_into_consumer(view: GraphView, match: Match) -> list[str]:
    """Apply the plan, feed the consumer the BN's input directly, drop the BN."""
    dead = apply_plan(view, match)
    bn = view.nodes[match.node_index]
    view.set_input(match.target_index, 0, bn.input[0])
    view.remove_node(match.node_index)
    view.drop_value_info(bn.output[0])
    return dead + list(match.affine.dead_inputs)

