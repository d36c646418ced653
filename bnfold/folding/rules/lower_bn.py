"""Lower a BatchNormalization that has nothing to fold into to Mul + Add (opt-in).

y = x·s + t with s and t precomputed, shaped [C, 1, …, 1] to broadcast over axis 1 of a rank-R
input. Needs the input's dtype and rank (declared, or inferred from shapes).
"""

from __future__ import annotations

import onnx

from bnfold.folding.graph import GraphView, fill_tensor
from bnfold.folding.rules.common import (
    ConstantUpdate,
    Match,
    batchnorm_affine,
    plan_problem,
    round_into,
)


class LowerBnRule:
    name = "lower-standalone"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if node.op_type != "BatchNormalization":
            return None
        return Match(node_index=index, target_index=index)

    def check(self, view: GraphView, match: Match) -> str | None:
        node = view.nodes[match.node_index]
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        known = view.types.lookup(node.input[0])
        if known is None or known[1] is None:
            return "its input's type and rank are unknown, so Mul/Add constants cannot be shaped"
        elem, rank = known
        if rank < 2:
            return f"its input has rank {rank}"
        shape = (affine.scale.shape[0],) + (1,) * (rank - 2)
        match.affine = affine
        match.updates = [
            ConstantUpdate(match.node_index, 0, affine.scale.reshape(shape), elem, "bn_scale"),
            ConstantUpdate(match.node_index, 1, affine.shift.reshape(shape), elem, "bn_shift"),
        ]
        return plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        node = view.nodes[match.node_index]
        scale, shift = match.updates
        names = []
        for update in (scale, shift):
            tensor = onnx.TensorProto(name=view.names.fresh(f"{node.output[0]}_{update.hint}"))
            fill_tensor(tensor, round_into(update.values, update.elem_type), update.elem_type)
            names.append(view.add_initializer(tensor, before=match.node_index))
        scaled = view.names.fresh(f"{node.output[0]}_scaled")
        mul = onnx.helper.make_node("Mul", [node.input[0], names[0]], [scaled], name=f"{node.name}_mul")
        view.insert_node_before(match.node_index, mul)
        add = onnx.helper.make_node("Add", [scaled, names[1]], [node.output[0]], name=f"{node.name}_add")
        view.insert_node_before(match.node_index, add)
        view.remove_node(match.node_index)
        return list(match.affine.dead_inputs)
