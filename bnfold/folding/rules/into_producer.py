"""Shared machinery for folding a per-channel affine map into the node that produces its input.

The map comes from a BatchNormalization, or from a Mul/Add with a per-channel constant (a frozen
BN exported as Mul→Add). Subclasses say which producer they handle and how its constants change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from bnfold.folding.graph import GraphView
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
            if found is None or found[1].op_type not in self.producer_ops:
                continue
            if found[1].domain not in ("", "ai.onnx"):
                continue
            if node.op_type != "BatchNormalization" and not view.is_constant(node.input[1 - slot]):
                return None  # Mul/Add of two run-time tensors: not an affine map
            extra = {"data_slot": slot, "passed": passed}
            return Match(node_index=index, target_index=found[0], extra=extra)
        return None

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        problem = view.chain_problem(match.target_index, match.extra["passed"], match.node_index)
        if problem:
            return problem
        shape = self.output_channels(view, match)
        if isinstance(shape, str):
            return shape
        channels, rank = shape
        affine = source_affine(view, match, channels, rank)
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
        node = view.nodes[match.target_index]
        dead = [node.input[u.slot] for u in match.updates if u.slot < len(node.input)]
        apply_plan(view, match)
        view.bypass(match.node_index, match.target_index)
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


def source_affine(
    view: GraphView, match: Match, channels: int, rank: int
) -> ChannelAffine | str:
    node = view.nodes[match.node_index]
    if node.op_type == "BatchNormalization":
        return batchnorm_affine(view, match.node_index)
    const_name = node.input[1 - match.extra["data_slot"]]
    values = view.constant_array(const_name)
    if values.dtype.kind != "f":
        return f"{node.op_type} constant {const_name!r} is not floating point"
    per_channel = per_channel_vector(values, channels, rank)
    if per_channel is None:
        return (
            f"{node.op_type} constant {const_name!r} of shape {list(values.shape)} is not "
            f"per-channel along axis 1 of a rank-{rank} output"
        )
    if node.op_type == "Mul":
        return ChannelAffine(per_channel, np.zeros(channels), (const_name,))
    return ChannelAffine(np.ones(channels), per_channel, (const_name,))


def per_channel_vector(values: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`values` as a float64 [C] vector if it broadcasts along axis 1 only, without growing the
    output (rank ≤ output rank); None otherwise."""
    if values.ndim > rank:
        return None
    for position, size in enumerate(values.shape):
        axis = rank - values.ndim + position
        if axis == 1:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(values.astype(np.float64).reshape(-1), (channels,)).copy()


def constant_or_reason(view: GraphView, name: str, role: str) -> np.ndarray | str:
    reason = view.non_constant_reason(name, role)
    return reason if reason else view.constant_array(name)


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
