"""A per-feature Mul or Add in front of MatMuls with constant B, into every one of them.

tf2onnx writes a Keras BatchNormalization as x·s + t, a Mul then an Add of K values along the
last axis, and a Keras Dense as MatMul(·, B [K, N]) then an Add of its bias b [N]. Where the BN
feeds Dense layers (a captcha model's five digit heads after one BN), its scale goes into the
rows of each B and its shift into each bias:

    (x·s)·B = x·(diag(s)·B)          mul-matmul:  B' = diag(s)·B
    (x + t)·B + b = x·B + (t·B + b)  add-matmul:  b' = b + t·B

The Add is folded first (it reads the Mul, which reads no MatMul yet); the next pass finds the
Mul in front of the MatMuls. Every reader of the Mul/Add must be such a MatMul, reading it as A,
or nothing is removed. The constant runs along the last axis of x, the MatMul's contraction
axis K, at any rank of x; a constant with leading axes of 1 needs x's rank known to be at least
its own, or the broadcast would add axes. add-matmul needs each MatMul's output read by one Add
of a constant bias broadcast along the last axis (tf2onnx's Dense), the only place t·B can go.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    ConstantUpdate,
    Match,
    apply_plan,
    attribute_reason,
    compute_dtype,
    is_normalised,
    plan_problem,
    produced_by_linear,
)
from bnfold.folding.rules.into_producer import constant_or_reason, matmul_weight
from bnfold.onnxio.nodes import DEFAULT_DOMAINS


class _AffineMatMulRule(ABC):
    """match: a Mul/Add of `op_type` read only by MatMuls as A; check: the constant, each B,
    plan_reader for each MatMul; rewrite: the MatMuls read the Mul/Add's input, it goes."""

    op_type = ""

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if (node.op_type != self.op_type or len(node.input) != 2
                or node.output[0] in view.graph_outputs):
            return None
        readers = view.live_consumers(node.output[0])  # the cheap test first: most Adds fail it
        if not readers or any(
                view.nodes[i].op_type != "MatMul" or view.nodes[i].domain not in DEFAULT_DOMAINS
                or list(view.nodes[i].input) != [node.output[0], view.nodes[i].input[1]]
                or view.nodes[i].input[1] == node.output[0] for i in readers):
            return None
        constant = [view.constant_array(name) is not None for name in node.input]
        if constant.count(True) != 1:
            return None
        data = node.input[constant.index(False)]
        if self.affine_of_another_op(view, data):
            return None
        readers = list(dict.fromkeys(readers))
        return Match(node_index=index, target_index=readers[0],
                     extra={"readers": readers, "data_slot": constant.index(False),
                            "into": ", ".join(node_label(view.nodes[i]) for i in readers)})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        node = view.nodes[match.node_index]
        data = node.input[match.extra["data_slot"]]
        name = node.input[1 - match.extra["data_slot"]]
        values = constant_or_reason(view, name, f"{self.op_type} constant")
        if isinstance(values, str):
            return values
        if values.ndim < 1 or values.size < 2 or values.size != values.shape[-1]:
            return (f"{self.op_type} constant {name!r} of shape {list(values.shape)} is not "
                    f"per-feature along the last axis")
        if values.ndim > 1:
            known = view.types.lookup(data)
            if known is None or known[1] is None or known[1] < values.ndim:
                return (f"{self.op_type} constant {name!r} has rank {values.ndim} and the rank "
                        f"of its input is unknown (add shapes or run shape inference)")
        vector = values.reshape(-1).astype(np.float64)
        for reader in match.extra["readers"]:
            matmul = view.nodes[reader]
            b = matmul_weight(view, matmul)
            if isinstance(b, str):
                return f"{node_label(matmul)}: {b}"
            if b.shape[0] != vector.size:
                return (f"{node_label(matmul)} takes {b.shape[0]} input features but the "
                        f"{self.op_type} constant has {vector.size}")
            problem = self.plan_reader(view, match, reader, b, vector)
            if problem:
                return problem
        return plan_problem(match, view)

    @abstractmethod
    def affine_of_another_op(self, view: GraphView, data: str) -> bool:
        """Whether the Mul/Add reading `data` belongs to another op written out (a LayerNorm,
        a Dense bias): not a frozen BN, left in place."""

    @abstractmethod
    def plan_reader(self, view: GraphView, match: Match, reader: int, b: np.ndarray,
                    vector: np.ndarray) -> str | None:
        """Add to match.updates what MatMul `reader` (constant B `b`) takes of the constant
        `vector` (float64, K values), or return a refusal."""

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        dead = apply_plan(view, match)
        node = view.nodes[match.node_index]
        data = node.input[match.extra["data_slot"]]
        for reader in match.extra["readers"]:
            view.set_input(reader, 0, data)
        view.remove_node(match.node_index)
        view.drop_value_info(node.output[0])
        return dead + [node.input[1 - match.extra["data_slot"]]]


class MulMatMulRule(_AffineMatMulRule):
    name = "mul-matmul"
    op_type = "Mul"

    def affine_of_another_op(self, view, data):
        # A LayerNorm's γ (its Mul reads a Div): ORT fuses the written-out LayerNorm only
        # with its Mul and Add in place.
        return is_normalised(view, data)

    def plan_reader(self, view, match, reader, b, vector):
        weight_name = view.nodes[reader].input[1]
        elem = view.constant_dtype(weight_name)
        new_b = fold_math.scaled(b, vector[:, None], compute_dtype(elem))
        match.updates.append(ConstantUpdate(reader, 1, new_b, elem, weight_name))
        return None


class AddMatMulRule(_AffineMatMulRule):
    name = "add-matmul"
    op_type = "Add"

    def affine_of_another_op(self, view, data):
        # A Dense's own bias (Add after a MatMul), or a LayerNorm's β (after its γ Mul).
        if produced_by_linear(view, data):
            return True
        found = view.producer_of(data)
        return (found is not None and found[1].op_type == "Mul" and any(
            is_normalised(view, name) for name in found[1].input))

    def plan_reader(self, view, match, reader, b, vector):
        matmul = view.nodes[reader]
        label = node_label(matmul)
        output = matmul.output[0]
        readers = view.live_consumers(output)
        if output in view.graph_outputs or len(readers) != 1:
            return f"{label} output is not read by one bias Add alone, where the shift would go"
        add_index = readers[0]
        add = view.nodes[add_index]
        if (add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.input) != 2
                or list(add.input).count(output) != 1):
            return f"{label} is followed by {node_label(add)}, not a bias Add the shift can go into"
        slot = 1 - list(add.input).index(output)
        bias = constant_or_reason(view, add.input[slot], f"{node_label(add)} bias")
        if isinstance(bias, str):
            return bias
        columns = b.shape[1]
        if bias.ndim < 1 or bias.shape[-1] not in (1, columns) or bias.size != bias.shape[-1]:
            return (f"{node_label(add)} bias of shape {list(bias.shape)} is not one value per "
                    f"column of {label}")
        if bias.ndim > 1:
            known = view.types.lookup(output)
            if known is None or known[1] is None or known[1] < bias.ndim:
                return f"{node_label(add)} bias has rank {bias.ndim}, more than known of its input"
        elem = view.constant_dtype(add.input[slot])
        shift = vector @ b.astype(np.float64)  # t·B, one value per column
        new_bias = (bias.astype(np.float64) + shift.reshape((1,) * (bias.ndim - 1) + (-1,)))
        match.updates.append(ConstantUpdate(add_index, slot, new_bias, elem,
                                            f"{add.input[slot]}_shifted"))
        return None
