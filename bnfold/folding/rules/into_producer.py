"""Shared machinery for folding a per-channel affine map into the node that produces its input.

The map comes from a BatchNormalization, or from a Mul/Add with a per-channel constant (a frozen
BN exported as Mul→Add). Subclasses say which producer they handle and how its constants change.
No-ops between the producer and the map are looked through and removed with the fold; one
node that only reshapes (a Squeeze; for a MatMul, a Reshape) may stand between them too when it
keeps the channels on their axis: it stays, and produces the map's output instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    ChannelAffine,
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    plan_problem,
    typed_attribute,
)

SOURCE_OPS = ("BatchNormalization", "Mul", "Add")


class IntoProducerRule(ABC):
    """match: BN/Mul/Add fed by `producer_ops`; check: affine + plan; rewrite: edit, bypass."""

    name = "into-producer"
    producer_ops: tuple[str, ...] = ()
    channel_axis = 1  # the producer's output axis its channels lie on (MatMul: the last, -1)
    # A node of this type may stand between the producer and the BN/Mul/Add when it keeps the
    # channels where they are (reshaped_rank says whether it does); it stays, and takes over
    # the folded node's output.
    reshaping_op = "Squeeze"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if node.op_type not in SOURCE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        slots = (0,) if node.op_type == "BatchNormalization" else (0, 1)
        for slot in slots:
            if slot >= len(node.input):
                continue
            source, passed = view.skip_noops(node.input[slot])
            found = view.producer_of(source)
            reshape, before = None, []
            if (found is not None and found[1].op_type == self.reshaping_op
                    and found[1].domain in ("", "ai.onnx") and found[1].input):
                reshape = found[0]
                source, before = view.skip_noops(found[1].input[0])
                found = view.producer_of(source)
            if found is None or found[1].op_type not in self.producer_ops:
                continue
            if found[1].domain not in ("", "ai.onnx"):
                continue
            if node.op_type != "BatchNormalization" and not view.is_constant(node.input[1 - slot]):
                return None  # Mul/Add of two run-time tensors: not an affine map
            extra = {"data_slot": slot, "passed": passed, "reshape": reshape, "before": before}
            return Match(node_index=index, target_index=found[0], extra=extra)
        return None

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        reshape = match.extra["reshape"]
        between = match.extra["passed"] + ([reshape, *match.extra["before"]]
                                           if reshape is not None else [])
        problem = view.chain_problem(match.target_index, between, match.node_index)
        if problem:
            return problem
        shape = self.output_channels(view, match)
        if isinstance(shape, str):
            return shape
        channels, rank = shape
        if reshape is not None:
            rank = self.reshaped_rank(view, match, rank, channels)
            if isinstance(rank, str):
                return rank
        affine = source_affine(view, match, channels, rank, self.channel_axis)
        if isinstance(affine, str):
            return affine
        if affine.scale.shape[0] != channels:
            target = view.nodes[match.target_index].op_type
            return f"{target} has {channels} output channels but the BN has {affine.scale.shape[0]}"
        match.affine = affine
        problem = self.plan(view, match)
        return problem or plan_problem(match, view)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Apply the plan; returns names that may have become unused."""
        dead = apply_plan(view, match)
        # A Squeeze/Reshape in between stays (with what leads to it) and takes over the output.
        reshape = match.extra["reshape"]
        view.bypass(match.node_index, match.target_index if reshape is None else reshape)
        for index in match.extra["passed"]:  # the no-ops in between go with it
            view.remove_node(index)
            view.drop_value_info(view.nodes[index].output[0])
        return dead + list(match.affine.dead_inputs)

    # ---- per producer ----------------------------------------------------------------------
    @abstractmethod
    def output_channels(self, view: GraphView, match: Match) -> tuple[int, int] | str:
        """(channel count C on axis 1, rank of the producer's output), or a refusal."""

    @abstractmethod
    def plan(self, view: GraphView, match: Match) -> str | None:
        """Fill match.updates/attributes from match.affine, or return a refusal."""

    def reshaped_rank(self, view: GraphView, match: Match, rank: int, channels: int) -> int | str:
        """The rank after the reshaping node between producer and BN/Mul/Add, or why the
        channels do not stay on channel_axis through it. Here: a Squeeze (Conv1D as tf2onnx
        writes it: a 2-D Conv → Squeeze → the BN's Mul/Add)."""
        return squeezed_rank(view, match.extra["reshape"], rank)


def squeezed_rank(view: GraphView, index: int, rank: int) -> int | str:
    """The rank after Squeeze node `index` of a rank-`rank` producer output, or why the channels
    would not stay on axis 1 (the batch or channel axis squeezed, axes not constant)."""
    node = view.nodes[index]
    label = node_label(node)
    if view.opset >= 13:
        if len(node.input) < 2 or not node.input[1]:
            return f"{label} has no axes (it would squeeze a batch of 1 too)"
        axes = constant_or_reason(view, node.input[1], f"{label} axes")
        if isinstance(axes, str):
            return axes
        if axes.dtype.kind not in "iu" or axes.ndim != 1:
            return f"{label} axes are not a 1-D integer tensor"
        axes = axes.tolist()
    else:
        axes = typed_attribute(node, "axes", "ints", None)
        if not axes:
            return f"{label} has no axes (it would squeeze a batch of 1 too)"
    normalised = {a + rank if a < 0 else a for a in axes}
    if any(not 0 <= a < rank for a in normalised) or len(normalised) != len(axes):
        return f"{label} axes {axes} are not distinct axes of a rank-{rank} output"
    if min(normalised) < 2:
        return f"{label} removes axis {min(normalised)}, so the channels move"
    return rank - len(normalised)


def source_affine(
    view: GraphView, match: Match, channels: int, rank: int, axis: int = 1
) -> ChannelAffine | str:
    node = view.nodes[match.node_index]
    if node.op_type == "BatchNormalization":
        return batchnorm_affine(view, match.node_index)
    const_name = node.input[1 - match.extra["data_slot"]]
    values = view.constant_array(const_name)
    if values.dtype.kind != "f":
        return f"{node.op_type} constant {const_name!r} is not floating point"
    per_channel = per_channel_vector(values, channels, rank, axis)
    if per_channel is None:
        where = "the last axis" if axis == -1 else f"axis {axis}"
        return (
            f"{node.op_type} constant {const_name!r} of shape {list(values.shape)} is not "
            f"per-channel along {where} of a rank-{rank} output"
        )
    if node.op_type == "Mul":
        return ChannelAffine(per_channel, np.zeros(channels), (const_name,))
    return ChannelAffine(np.ones(channels), per_channel, (const_name,))


def per_channel_vector(
    values: np.ndarray, channels: int, rank: int, channel_axis: int = 1
) -> np.ndarray | None:
    """`values` as a float64 [C] vector if it broadcasts along `channel_axis` (of a rank-`rank`
    output; -1: the last) only, without growing the output (rank ≤ output rank); None
    otherwise."""
    if values.ndim > rank:
        return None
    channel_axis %= rank
    for position, size in enumerate(values.shape):
        axis = rank - values.ndim + position
        if axis == channel_axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(values.astype(np.float64).reshape(-1), (channels,)).copy()


def constant_or_reason(view: GraphView, name: str, role: str) -> np.ndarray | str:
    reason = view.non_constant_reason(name, role)
    return reason if reason else view.constant_array(name)


def matmul_weight(view: GraphView, matmul) -> np.ndarray | str:
    """B of a MatMul when it is a constant matrix, or why it is not."""
    b = constant_or_reason(view, matmul.input[1], "MatMul B")
    if isinstance(b, str):
        return b
    if b.ndim != 2:
        return f"MatMul B has rank {b.ndim}; only a 2-D B folds"
    return b


def gemm_weight(view: GraphView, gemm, label: str) -> tuple[np.ndarray, bool] | str:
    """(B, transB) of a Gemm whose B is a constant matrix, or why it is not."""
    b = constant_or_reason(view, gemm.input[1], "Gemm B")
    if isinstance(b, str):
        return b
    if b.ndim != 2:
        return f"{label} B has rank {b.ndim}, expected 2"
    return b, bool(typed_attribute(gemm, "transB", "int", 0))


def gemm_c_problem(c: np.ndarray | None, columns: int, label: str) -> str | None:
    """Gemm's C must broadcast to [M, N] with N = `columns`: its last axis 1 or N."""
    if c is not None and c.ndim and c.shape[-1] not in (1, columns):
        return f"{label} C has shape {list(c.shape)}, which does not broadcast to {columns} columns"
    return None


def matmul_columns_affine(view: GraphView, bn_index: int, b: np.ndarray
                          ) -> ChannelAffine | str:
    """The affine map of BN `bn_index` when it has one value per column of MatMul B `b` (the
    MatMul's last axis), or why not."""
    affine = batchnorm_affine(view, bn_index)
    if isinstance(affine, str):
        return affine
    if affine.scale.shape[0] != b.shape[1]:
        return f"MatMul has {b.shape[1]} output columns but the BN has {affine.scale.shape[0]}"
    return affine


def optional_constant(
    view: GraphView,
    node,
    slot: int,
    role: str,
    shape: tuple[int, ...] | None = None,
    max_rank: int | None = None,
) -> np.ndarray | str | None:
    """Optional input `slot` (a bias, Gemm's C): None when absent, else its constant value,
    or why it cannot be used (computed at run time, wrong shape or rank)."""
    if len(node.input) <= slot or not node.input[slot]:
        return None
    value = constant_or_reason(view, node.input[slot], role)
    if isinstance(value, str):
        return value
    if shape is not None and value.shape != shape:
        return f"{role} has shape {list(value.shape)}, expected {list(shape)}"
    if max_rank is not None and value.ndim > max_rank:
        return f"{role} has rank {value.ndim}"
    return value
