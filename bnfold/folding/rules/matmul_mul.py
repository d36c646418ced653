"""MatMul → Mul(per-column constant) into the MatMul's B: X·B·diag(s) = X·(B·diag(s)).

tf2onnx exports a Keras Dense → BatchNormalization as MatMul → Mul → Add: TensorFlow's
optimiser folds the Dense bias into the BN's shift, leaving s = γ/√(σ²+ε) as the Mul and the
shift as the Add. B [K, N] is a constant matrix; s scales its columns, the MatMul's last output
axis, so the fold holds at any rank of X (a batch of sequences included), unlike a BN's axis 1
(matmul-bn, 2-D only). The Add stays: MatMul + Add is the bias add every runtime fuses, and a
MatMul has no bias input to take it.

A Dense on a sequence ([batch, time, features]) comes out of tf2onnx as Reshape → MatMul →
Reshape → Mul. A Reshape keeps the row-major order, so when its output's last dimension is
still N, every value keeps its column and the Mul folds through it; the Reshape stays. Its
shape is computed at run time (Concat of the input's leading dims and a constant [N]), so the
last entry is read through Cast and Concat down to that constant.
"""

from __future__ import annotations

import onnx

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import ConstantUpdate, Match, compute_dtype, typed_attribute
from bnfold.folding.rules.into_producer import IntoProducerRule, matmul_weight


class MatMulMulRule(IntoProducerRule):
    name = "matmul-mul"
    producer_ops = ("MatMul",)
    channel_axis = -1
    reshaping_op = "Reshape"

    def match(self, view: GraphView, index: int) -> Match | None:
        # A BN after a MatMul is matmul-bn's; an Add has no MatMul input to go into.
        if view.nodes[index].op_type != "Mul":
            return None
        return super().match(view, index)

    def output_channels(self, view: GraphView, match: Match) -> tuple[int, int] | str:
        matmul = view.nodes[match.target_index]
        b = matmul_weight(view, matmul)
        if isinstance(b, str):
            return b
        match.extra["b"] = b
        known = view.types.lookup(matmul.input[0])
        if known is not None and known[1] is not None:
            return b.shape[1], max(known[1], 1)  # X [..., M, K] → [..., M, N]; X [K] → [N]
        # Whatever the rank, the output has at least the last axis: a constant of at most one
        # axis cannot grow it. A longer one might.
        if _scale_ndim(view, match) > 1:
            return "rank of the MatMul input is unknown (add shapes or run shape inference)"
        return b.shape[1], 1

    def reshaped_rank(self, view: GraphView, match: Match, rank: int, channels: int) -> int | str:
        reshape = view.nodes[match.extra["reshape"]]
        label = node_label(reshape)
        if view.opset < 5 or len(reshape.input) < 2:
            return f"{label} has no shape input"
        last = _last_entry(view, reshape.input[1])
        if last != channels:
            return (f"{label} may move the MatMul's {channels} columns (the last entry of its "
                    f"shape is {'not a constant' if last is None else last})")
        if _scale_ndim(view, match) > 1:
            return f"{label} output rank is unknown: only a vector Mul constant folds through it"
        return 1  # at least the last axis, which is all a vector constant needs

    def plan(self, view: GraphView, match: Match) -> str | None:
        weight_name = view.nodes[match.target_index].input[1]
        elem = view.constant_dtype(weight_name)
        new_b = fold_math.folded_weight(match.extra["b"], match.affine.scale[None, :],
                                        compute_dtype(elem))
        match.updates = [ConstantUpdate(match.target_index, 1, new_b, elem, weight_name)]
        return None


def _scale_ndim(view: GraphView, match: Match) -> int:
    mul = view.nodes[match.node_index]
    scale = view.constant_array(mul.input[1 - match.extra["data_slot"]])
    return 0 if scale is None else scale.ndim


_SHAPE_CASTS = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)


def _last_entry(view: GraphView, name: str, depth: int = 0) -> int | None:
    """The last entry of 1-D integer tensor `name` when it is known without running the model: a
    constant's, else through Cast (to int32/int64) and 1-D Concat, the last input's. Only a
    non-empty constant ends the search, so the entry found is the tensor's last."""
    value = view.constant_array(name)
    if value is not None:
        if value.dtype.kind not in "iu" or value.ndim != 1 or not value.size:
            return None
        last = int(value[-1])
        return last if -2**31 <= last < 2**31 else None  # survives any cast on the way
    found = view.producer_of(name)
    if found is None or depth >= 8 or found[1].domain not in ("", "ai.onnx") or not found[1].input:
        return None
    node = found[1]
    if node.op_type == "Cast":
        if typed_attribute(node, "to", "int", None) not in _SHAPE_CASTS:
            return None
        return _last_entry(view, node.input[0], depth + 1)
    if node.op_type == "Concat" and typed_attribute(node, "axis", "int", None) in (0, -1):
        return _last_entry(view, node.input[-1], depth + 1)
    return None
