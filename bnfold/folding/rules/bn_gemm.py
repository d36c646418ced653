"""BatchNormalization → Gemm (BN first) into the Gemm.

A' = x·s + t over A's K columns (transA=0):  α·A'·op(B) + β·C = α·x·op(B') + (β·C + α·t·op(B))
with op(B') = diag(s)·op(B). With transA=1 the BN channels are Gemm's output rows: refused.
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.bn_conv import consumer_match, rewrite_bn_into_consumer
from bnfold.folding.rules.common import (
    Match,
    attribute_reason,
    batchnorm_affine,
    compute_dtype,
    plan_problem,
    typed_attribute,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import gemm_c_problem, gemm_weight, optional_constant


class BnGemmRule:
    name = "bn-gemm"

    def match(self, view: GraphView, index: int) -> Match | None:
        return consumer_match(view, index, "Gemm")

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        gemm = view.nodes[match.target_index]
        label = node_label(gemm)
        if typed_attribute(gemm, "transA", "int", 0):
            return f"{label} has transA=1: the BN channels become its output rows"
        if gemm.input[1] == gemm.input[0] or (len(gemm.input) > 2 and gemm.input[2] == gemm.input[0]):
            return f"{label} reads the BN output twice"
        found = gemm_weight(view, gemm, label)
        if isinstance(found, str):
            return found
        b, trans_b = found
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        k = b.shape[1] if trans_b else b.shape[0]
        if k != affine.scale.shape[0]:
            return f"{label} takes {k} input features but the BN has {affine.scale.shape[0]}"
        c = optional_constant(view, gemm, 2, "Gemm C", max_rank=2)
        if isinstance(c, str):
            return c
        problem = gemm_c_problem(c, b.shape[0] if trans_b else b.shape[1], label)
        if problem:
            return problem
        alpha = typed_attribute(gemm, "alpha", "float", 1.0)
        beta = typed_attribute(gemm, "beta", "float", 1.0)
        match.affine = affine
        elem = view.constant_dtype(gemm.input[1])
        new_b, new_c, new_beta = fold_math.gemm_input_fold(
            b, c, affine.scale, affine.shift, trans_b, alpha, beta, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_b, new_c)
        if new_beta != beta:
            match.attributes["beta"] = new_beta
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        return rewrite_bn_into_consumer(view, match)
