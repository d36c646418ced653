"""MatMul → Flatten/Reshape to 2-D → BatchNormalization: B's columns scaled, the shift a bias.

LeViT (timm's `LinearNorm`) runs a bias-free Linear over [B, L, C] tokens and normalises with
a BatchNorm1d over the flattened tokens, `bn(linear(x).flatten(0, 1)).reshape_as(x)`: MatMul →
Flatten(axis 2) (dynamo: Reshape to [B·L, C]) → BN → Reshape. Row-major flattening to 2-D keeps
the MatMul's last axis last, and the BN needs axis 1 to hold its C = N values at run time, so
column j of the 2-D tensor is column j of X·B. The BN is then y = x·s + t over B's columns:
B' = B·s. Its shift joins the per-column bias the MatMul may already add (MatMul → Add(c) → …):
c' = c·s + t, and the BN goes; without one it stays as an Add of t where the BN was, making a
Linear with bias. The Flatten/Reshape stays. Nodes that read only the shape of the MatMul's
output (`reshape_as` exports a Shape) do not stop the fold: the shape does not change.
"""

from __future__ import annotations

import onnx

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView, fill_tensor
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    ConstantUpdate,
    Match,
    apply_plan,
    attribute_reason,
    compute_dtype,
    is_batchnorm,
    plan_problem,
    produced_by,
    round_into,
)
from bnfold.folding.rules.into_producer import (
    constant_or_reason,
    matmul_columns_affine,
    matmul_weight,
    per_channel_vector,
)

_TO_2D = ("Flatten", "Reshape")


class MatMulReshapeBnRule:
    name = "matmul-reshape-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        found = view.producer_of(node.input[0])
        if (found is None or found[1].op_type not in _TO_2D
                or found[1].domain not in ("", "ai.onnx") or not found[1].input):
            return None
        reshape = found[0]
        add = produced_by(view, found[1].input[0], "Add")
        source = found[1].input[0]
        if add is not None:
            matmuls = [produced_by(view, name, "MatMul") for name in add[1].input]
            if sum(m is not None for m in matmuls) != 1:
                return None
            matmul = next(m for m in matmuls if m is not None)
        else:
            matmul = produced_by(view, source, "MatMul")
        if matmul is None:
            return None
        return Match(node_index=index, target_index=matmul[0],
                     extra={"reshape": reshape, "add": None if add is None else add[0]})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        matmul = view.nodes[match.target_index]
        reshape = view.nodes[match.extra["reshape"]]
        add_index = match.extra["add"]
        chain = [match.target_index, *([add_index] if add_index is not None else []),
                 match.extra["reshape"], match.node_index]
        for current, following in zip(chain, chain[1:]):
            node = view.nodes[current]
            problem = view.sole_consumer_problem(node.output[0], following,
                                                 shape_readers=following != match.node_index)
            if problem:
                return f"{node_label(node)} output {problem}"
        b = matmul_weight(view, matmul)
        if isinstance(b, str):
            return b
        if reshape.op_type == "Reshape":
            rank = _reshaped_rank(view, reshape)
            if isinstance(rank, str):
                return rank
            if rank != 2:
                return (f"{node_label(reshape)} makes a rank-{rank} tensor: the BN's channel "
                        f"axis 1 is not the MatMul's last axis")
        affine = matmul_columns_affine(view, match.node_index, b)
        if isinstance(affine, str):
            return affine
        channels = b.shape[1]
        elem = view.constant_dtype(matmul.input[1])
        bias, bias_update = None, None
        if add_index is not None:
            add = view.nodes[add_index]
            slot = 1 if add.input[0] == matmul.output[0] else 0
            values = constant_or_reason(view, add.input[slot], f"{node_label(add)} constant")
            if isinstance(values, str):
                return values
            bias = (per_channel_vector(values, channels, values.ndim, -1)
                    if values.dtype.kind == "f" and values.ndim else None)
            if bias is None:
                return f"{node_label(add)} does not add a per-column constant"
            bias_update = (add_index, slot, values.shape[:-1] + (channels,),
                           view.constant_dtype(add.input[slot]))
        new_b, new_c = fold_math.matmul_output_fold(b, bias, affine.scale, affine.shift,
                                                    compute_dtype(elem))
        match.affine = affine
        match.updates = [ConstantUpdate(match.target_index, 1, new_b, elem, matmul.input[1])]
        if bias_update is not None:
            node_index, slot, shape, bias_elem = bias_update
            match.updates.append(ConstantUpdate(node_index, slot, new_c.reshape(shape), bias_elem,
                                                f"{matmul.input[1]}_bias"))
        else:
            # The new Add's constant: checked like the others (the slot past the BN's inputs
            # says there is no replaced value to check).
            bn = view.nodes[match.node_index]
            match.extra["shift"] = ConstantUpdate(match.node_index, len(bn.input), new_c, elem,
                                                  f"{matmul.input[1]}_bias")
            match.updates.append(match.extra["shift"])
        problem = plan_problem(match, view)
        if problem:
            return problem
        if "shift" in match.extra:
            match.updates.pop()  # stored by rewrite, in a node of its own
            match.extra["into"] = f"{node_label(matmul)} + a bias Add"
        return None

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Scale B (and the bias); the reshape produces the BN's output, or an Add of the
        shift takes the BN's place."""
        dead = apply_plan(view, match)
        shift = match.extra.get("shift")
        if shift is None:
            view.bypass(match.node_index, match.extra["reshape"])
            return dead + list(match.affine.dead_inputs)
        bn = view.nodes[match.node_index]
        tensor = onnx.TensorProto(name=view.names.fresh(shift.hint))
        fill_tensor(tensor, round_into(shift.values, shift.elem_type), shift.elem_type)
        name = view.add_initializer(tensor, before=match.node_index)
        add = onnx.helper.make_node("Add", [bn.input[0], name], [bn.output[0]],
                                    name=view.names.fresh(f"{bn.name or bn.output[0]}_shift"))
        view.insert_node_before(match.node_index, add)
        view.remove_node(match.node_index)
        return dead + list(match.affine.dead_inputs)


def _reshaped_rank(view: GraphView, reshape: onnx.NodeProto) -> int | str:
    """The rank a Reshape produces: its shape's length when that is a constant, else the
    declared or inferred rank of its output."""
    if len(reshape.input) > 1 and reshape.input[1]:
        shape = view.constant_array(reshape.input[1])
        if shape is not None and shape.ndim == 1:
            return int(shape.shape[0])
    known = view.types.lookup(reshape.output[0])
    if known is None or known[1] is None:
        return (f"the rank {node_label(reshape)} makes is unknown (add shapes or run shape "
                f"inference)")
    return known[1]
