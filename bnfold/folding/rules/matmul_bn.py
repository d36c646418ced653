"""MatMul → BatchNormalization and MatMul → Add(const) → BatchNormalization into one Gemm.

BN normalises axis 1; MatMul X·B produces B's columns on its last axis. The two coincide only
when the output is 2-D, which must be proven from declared or inferred shapes (rank of X = 2).
Then X·B (+ c) → BN becomes Gemm(X, B', c') with B' = B·s (columns) and c' = c·s + t.
"""

from __future__ import annotations

import onnx

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    Match,
    apply_plan,
    compute_dtype,
    plan_problem,
    weight_and_bias_updates,
)
from bnfold.folding.rules.into_producer import (
    matmul_columns_affine,
    matmul_weight,
    per_channel_vector,
)


class MatMulBnRule:
    name = "matmul-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if node.op_type != "BatchNormalization":
            return None
        # Identity/Dropout no-ops may stand anywhere in between (paddle2onnx: Add → Identity).
        source, passed = view.skip_noops(node.input[0])
        found = _default_domain(view.producer_of(source))
        add_index, before_add, add_data = None, [], ""
        if found is not None and found[1].op_type == "Add":
            add_index = found[0]
            operands = [(name, *view.skip_noops(name)) for name in found[1].input]
            matmuls = [(name, noops, found_at) for name, start, noops in operands
                       if (found_at := _default_domain(view.producer_of(start))) is not None
                       and found_at[1].op_type == "MatMul"]
            if len(matmuls) != 1:
                return None
            add_data, before_add, found = matmuls[0]
        if found is None or found[1].op_type != "MatMul":
            return None
        extra = {"add": add_index, "add_data": add_data, "passed": passed,
                 "before_add": before_add}
        return Match(node_index=index, target_index=found[0], extra=extra)

    def check(self, view: GraphView, match: Match) -> str | None:
        matmul = view.nodes[match.target_index]
        add_index = match.extra["add"]
        if add_index is None:
            problem = view.chain_problem(match.target_index, match.extra["passed"], match.node_index)
        else:
            problem = (view.chain_problem(match.target_index, match.extra["before_add"], add_index)
                       or view.chain_problem(add_index, match.extra["passed"], match.node_index))
        if problem:
            return problem
        b = matmul_weight(view, matmul)
        if isinstance(b, str):
            return b
        known = view.types.lookup(matmul.input[0])
        if known is None or known[1] is None:
            return "rank of the MatMul input is unknown (add shapes or run shape inference)"
        if known[1] != 2:
            return (
                f"MatMul output has rank {known[1]}: BN's channel axis 1 is not the MatMul's "
                f"last axis"
            )
        affine = matmul_columns_affine(view, match.node_index, b)
        if isinstance(affine, str):
            return affine
        channels = b.shape[1]
        bias = None
        if add_index is not None:
            add = view.nodes[add_index]
            const_name = next((n for n in add.input if n != match.extra["add_data"]), "")
            values = view.constant_array(const_name)
            bias = None if values is None else per_channel_vector(values, channels, 2)
            if bias is None:
                return f"{node_label(add)} does not add a per-column constant"
            affine.dead_inputs += (const_name,)
        match.affine = affine
        elem = view.constant_dtype(matmul.input[1])
        new_b, new_c = fold_math.matmul_output_fold(
            b, bias, affine.scale, affine.shift, compute_dtype(elem)
        )
        match.updates = weight_and_bias_updates(view, match, new_b, new_c)
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        matmul = view.nodes[match.target_index]
        dead = [matmul.input[1], *match.affine.dead_inputs]
        apply_plan(view, match)
        become_gemm(view, match.target_index)
        if match.extra["add"] is not None:
            view.bypass(match.extra["add"], match.target_index)
        view.bypass(match.node_index, match.target_index)
        for index in match.extra["passed"] + match.extra["before_add"]:  # no-ops go with it
            view.remove_node(index)
            view.drop_value_info(view.nodes[index].output[0])
        return dead


def become_gemm(view: GraphView, index: int) -> None:
    """MatMul `index`, given its B' and a C by apply_plan, as Gemm(X, B', C): α = β = 1, no
    transposes (the caller proved X is 2-D)."""
    view.set_op_type(index, "Gemm")
    if view.opset < 7:  # Gemm-6 broadcasts C only when asked to
        view.nodes[index].attribute.append(onnx.helper.make_attribute("broadcast", 1))


def _default_domain(found):
    return None if found is None or found[1].domain not in ("", "ai.onnx") else found
