"""Gemm → BatchNormalization (or per-channel Mul/Add) into the Gemm.

Y = α·op(A)·op(B) + β·C, any α, β, transA, transB, with or without C. Output column n:
B' = B·s over its N axis (columns when transB=0, rows when transB=1), C' = C·s + t/β
(C' = t with β' = 1 when C is absent or β = 0).
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.rules.common import (
    Match,
    typed_attribute,
    compute_dtype,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import (
    IntoProducerRule,
    gemm_c_problem,
    gemm_weight,
    optional_constant,
)


class GemmBnRule(IntoProducerRule):
    name = "gemm-bn"
    producer_ops = ("Gemm",)

    def output_channels(self, view: GraphView, match: Match) -> tuple[int, int] | str:
        gemm = view.nodes[match.target_index]
        found = gemm_weight(view, gemm, "Gemm")
        if isinstance(found, str):
            return found
        b, trans_b = found
        match.extra.update(b=b, trans_b=trans_b)
        return (b.shape[0] if trans_b else b.shape[1]), 2

    def plan(self, view: GraphView, match: Match) -> str | None:
        gemm = view.nodes[match.target_index]
        b, trans_b = match.extra["b"], match.extra["trans_b"]
        c = optional_constant(view, gemm, 2, "Gemm C", max_rank=2)
        if isinstance(c, str):
            return c
        problem = gemm_c_problem(c, b.shape[0] if trans_b else b.shape[1], "Gemm")
        if problem:
            return problem
        beta = typed_attribute(gemm, "beta", "float", 1.0)
        affine = match.affine
        elem = view.constant_dtype(gemm.input[1])
        new_b, new_c, new_beta = fold_math.gemm_output_fold(
            b, c, affine.scale, affine.shift, trans_b, beta, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_b, new_c)
        if new_beta != beta:
            match.attributes["beta"] = new_beta
        return None
