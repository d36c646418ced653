"""Per-channel scale-and-shift pairs no rule matched: frozen BatchNormalizations as written out.

tf2onnx writes an inference BatchNormalization as a Mul by C values then an Add of C values, and
a Keras Normalization layer as an Add (−μ) then a Mul (1/σ). Beside a Conv, Gemm or MatMul the
rules fold them (conv-mul, conv-add, matmul-mul). Elsewhere — a pre-activation BN between a
Concat and a Relu, as in every DenseNet block — no rule matches, and without this the report
would not mention a BN the model still computes: a tf2onnx DenseNet-121 folded 0 and listed
nothing, where the same network exported from torch lists its 59 kept BNs with reasons.

A pair is two nodes of the default domain, each with one constant operand of C > 1 values along
one axis (the same axis counted from the last, the same C), the first read by the second alone.
Not a pair: a Mul whose data is a Div or a product of two computed tensors (a LayerNorm or
GroupNorm written out: its own affine, not a frozen BN); an Add that is a Conv's, Gemm's or
MatMul's bias, then a Mul (a transformer's layer scale); scalar constants (a hard-sigmoid's
x + 3, an attention scale).
"""

from __future__ import annotations

import onnx

from bnfold.folding.graph import GraphView
from bnfold.folding.rules.common import is_normalised, produced_by_linear
from bnfold.onnxio.nodes import DEFAULT_DOMAINS


def standalone_pairs(view: GraphView, skip: set[int] | dict[int, object]
                     ) -> list[tuple[int, int]]:
    """(first, second) node indices of each per-channel Mul→Add or Add→Mul pair of `view`,
    in node order, leaving out any node in `skip` (those a rule matched report themselves)."""
    pairs, seconds = [], set()
    for index, node in view.live_nodes_of(("Mul", "Add")):
        # Mul→Add→Mul→Add is two pairs, not three: a pair's Add does not start another
        if index in skip or index in seconds or node.domain not in DEFAULT_DOMAINS:
            continue
        consumers = view.live_consumers(node.output[0])
        if len(consumers) != 1 or node.output[0] in view.graph_outputs:
            continue
        second_index = consumers[0]
        second = view.nodes[second_index]
        if (second_index in skip or second.domain not in DEFAULT_DOMAINS
                or {node.op_type, second.op_type} != {"Mul", "Add"}):
            continue
        first = _channel_operand(view, node)
        if first is None:
            continue
        data, axis, count = first
        following = _channel_operand(view, second)
        if following is None or following[0] != node.output[0] or following[1:] != (axis, count):
            continue
        if node.op_type == "Mul" and is_normalised(view, data):
            continue
        if node.op_type == "Add" and produced_by_linear(view, data):
            continue
        pairs.append((index, second_index))
        seconds.add(second_index)
    return pairs


def _channel_operand(view: GraphView, node: onnx.NodeProto) -> tuple[str, int, int] | None:
    """(data input, axis counted from the last, C) when `node` has two inputs, one of them a
    constant of C > 1 values along one axis; None otherwise."""
    if len(node.input) != 2 or not all(node.input):
        return None
    for slot in (0, 1):
        values = view.constant_array(node.input[slot])
        if values is None:
            continue
        if view.constant_array(node.input[1 - slot]) is not None:
            return None  # two constants: a constant subgraph, not an affine of a tensor
        wide = [axis for axis, size in enumerate(values.shape) if size > 1]
        if len(wide) != 1:
            return None
        return node.input[1 - slot], values.ndim - wide[0], values.shape[wide[0]]
    return None
