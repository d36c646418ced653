"""BatchNormalization → MatMul (BN first, 2-D input) into one Gemm.

BN normalises axis 1; a MatMul contracts its input's last axis. The two coincide only when the
input is 2-D, which must be proven from declared or inferred shapes. Then
(x·s + t)·B (+ c) = x·(diag(s)·B) + (c + t·B): Gemm(x, B', c'), absorbing a bias Add of one
value per column that alone reads the MatMul (paddle2onnx writes Linear as MatMul → Add).
"""

from __future__ import annotations

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.bn_conv import consumer_match, rewrite_bn_into_consumer
from bnfold.folding.rules.common import (
    Match,
    batchnorm_affine,
    compute_dtype,
    plan_problem,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import matmul_weight, per_channel_vector
from bnfold.folding.rules.matmul_bn import become_gemm


class BnMatMulRule:
    name = "bn-matmul"

    def match(self, view: GraphView, index: int) -> Match | None:
        match = consumer_match(view, index, "MatMul")
        if match is None or view.nodes[match.target_index].domain not in ("", "ai.onnx"):
            return None
        return match

    def check(self, view: GraphView, match: Match) -> str | None:
        bn, matmul = view.nodes[match.node_index], view.nodes[match.target_index]
        label = node_label(matmul)
        b = matmul_weight(view, matmul)  # (a B that is the BN output too: no match, two readers)
        if isinstance(b, str):
            return b
        known = view.types.lookup(bn.input[0])
        if known is None or known[1] is None:
            return "rank of the BN input is unknown (add shapes or run shape inference)"
        if known[1] != 2:
            return (f"{label} reads a rank-{known[1]} tensor: BN's channel axis 1 is not the "
                    f"axis a MatMul sums over (its last)")
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        if b.shape[0] != affine.scale.shape[0]:
            return f"{label} takes {b.shape[0]} input features but the BN has {affine.scale.shape[0]}"
        bias, add_index, bias_name = _bias_add(view, match.target_index, b.shape[1])
        if add_index is not None:
            affine.dead_inputs += (bias_name,)
        match.extra["add"] = add_index
        match.affine = affine
        elem = view.constant_dtype(matmul.input[1])
        new_b, new_c, _ = fold_math.gemm_input_fold(
            b, bias, affine.scale, affine.shift, False, 1.0, 1.0, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_b, new_c)
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        dead = rewrite_bn_into_consumer(view, match)
        become_gemm(view, match.target_index)
        if match.extra["add"] is not None:
            view.bypass(match.extra["add"], match.target_index)
        return dead


def _bias_add(view: GraphView, matmul_index: int, columns: int):
    """(c, index, name of c) of the Add that alone reads the MatMul's output and adds one
    constant per column, or (None, None, "")."""
    none = None, None, ""
    output = view.nodes[matmul_index].output[0]
    readers = view.live_consumers(output)
    if len(readers) != 1 or view.sole_consumer_problem(output, readers[0]):
        return none
    add = view.nodes[readers[0]]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or list(add.input).count(output) != 1:
        return none
    other = next(name for name in add.input if name != output)
    values = view.constant_array(other)
    bias = None if values is None else per_channel_vector(values, columns, 2, channel_axis=-1)
    return none if bias is None else (bias, readers[0], other)
