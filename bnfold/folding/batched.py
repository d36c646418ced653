"""Conv → BatchNormalization folds of a whole graph computed at once: the plain case, vectorised.

On a graph with thousands of small Conv→BN pairs, a fold made pair by pair spends most of its
time in numpy's per-call overhead on tiny arrays. Before the rules run, this pass collects every
pair that ConvBnRule matches and whose structure it accepts (the same match, chain, channel and
BatchNormalization checks) and whose weight has at most 16k values, then computes their folds
together, in chunks of about a million weight values: the parameters, weights and biases of
the pairs concatenated, one elementwise numpy call each for

    s = γ/√(σ²+ε),  t = β − μ·s,  W' = W·s (in float64, rounded once),  b' = b·s + t

and one reduction per check. That is the same float64 arithmetic element by element as the
rule's own, so the folded values are bit-identical. A pair is rewritten here only when every
check the rule makes passes (var+ε > 0, finite, headroom of the new and the replaced values);
anything else — a failed check, float16/bfloat16/float64 weights, a Conv with a BN folded into
its input side, a second pair on one Conv — is left as it was for the rules, which fold it
another way or report why not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.lookups import raw_float32
from bnfold.folding.names import node_label
from bnfold.folding.report import FOLDED, FoldEntry
from bnfold.folding.rules.common import (
    DEFAULT_EPSILON,
    batchnorm_epsilon,
    parameters_from_values,
)
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.into_producer import SOURCE_OPS
from bnfold.onnxio.nodes import DEFAULT_DOMAINS
from bnfold.precision import HEADROOM

_FLOAT = onnx.TensorProto.FLOAT
_FLOAT_ATTRIBUTE = onnx.AttributeProto.FLOAT
_FLOAT32_CEILING = float(np.finfo(np.float32).max) / HEADROOM  # precision.headroom_problem's
_MIN_PAIRS = 8  # below this the rules' own pair-by-pair path costs as little
# Larger weights cost their bytes, not the graph: the rules fold them one at a time, so a
# model's weights are never held (and concatenated) all at once.
_MAX_WEIGHT_VALUES = 16384
_CHUNK_VALUES = 1 << 18
# A Conv fed by one of these may take a fold on its input side (bn-conv) or sit behind a no-op
# the rules look through: it keeps the rules' node order.
_INPUT_SIDE_OPS = frozenset({*SOURCE_OPS, "Identity", "Dropout", "Cast"})


@dataclass(slots=True)  # one per pair: 16k of them on a 48k-node graph
class _Pair:
    bn: int  # node indices
    conv: int
    names: tuple[str, ...]  # the BN's scale, B, mean and var, unused once it is gone
    epsilon: float
    # γ, β, μ, σ² and the Conv's bias (None: it has none), each a vector of C values: the
    # little-endian float32 bytes of an initializer as stored (joined with the other pairs'
    # and read in one call) or, read the general way, an array of a float type.
    vectors: tuple[bytes | np.ndarray | None, ...]
    weight_name: str  # a float32 initializer of shape weight_shape, read chunk by chunk
    weight_shape: tuple[int, ...]
    weight: bytes | np.ndarray | None = None  # while its chunk is computed


def fold_plain_conv_bn(view: GraphView, rule: ConvBnRule
                       ) -> tuple[list[tuple[int, FoldEntry]], list[str]]:
    """Fold every plain Conv→BN pair of `view`; returns (BN node index, report entry) of each,
    in node order, and the names that may have become unused."""
    pairs = _collect(view, rule)
    if len(pairs) < _MIN_PAIRS:
        return [], []
    entries, dead = [], []
    for chunk in _chunks(pairs):
        # Only one chunk's original weights are in memory at a time (the folded ones wait in
        # view.pending for the writer, as the rules' do).
        for pair in chunk:
            pair.weight = _stored_bytes(view, pair.weight_name, math.prod(pair.weight_shape))
            if pair.weight is None:
                pair.weight = _value(view, pair.weight_name)[0]
        for pair, weight, bias in _compute(chunk):
            bn = view.nodes[pair.bn]
            into = node_label(view.nodes[pair.conv])
            dead.extend(_rewrite(view, pair, weight, bias))
            entries.append((pair.bn, FoldEntry(node_label(bn), bn.op_type, FOLDED, view.path,
                                               into, rule.name, output=bn.output[0])))
        for pair in chunk:
            pair.weight = None
    return entries, dead


def _rewrite(view: GraphView, pair: _Pair, weight: np.ndarray, bias: np.ndarray) -> list[str]:
    """IntoProducerRule.rewrite of a plain pair, without the rule's Match: the float32 weight
    and bias (rounded here, as apply_plan rounds) replace the Conv's, and the Conv takes over
    the BN's output. Returns the names that may have become unused."""
    conv = view.nodes[pair.conv]
    dead = list(conv.input[1:3])
    view.set_constant(pair.conv, 1, weight, _FLOAT, pair.weight_name)
    view.set_constant(pair.conv, 2, bias.astype(np.float32), _FLOAT, f"{pair.weight_name}_bias")
    view.bypass(pair.bn, pair.conv)
    return dead + list(pair.names)


def _collect(view: GraphView, rule: ConvBnRule) -> list[_Pair]:
    """The pairs ConvBnRule would fold, found from the view's table (it runs before any edit):
    BatchNormalization reading a Conv's only output directly, its Conv fed by no BN, Mul, Add
    or no-op, with float32 weights; each check as the rule makes it."""
    table = view.table
    op_types, domains, inputs, outputs = table.op_types, table.domains, table.inputs, table.outputs
    producer, consumers = view.producer, view.consumers
    pairs: list[_Pair] = []
    targets: set[int] = set()
    for index, op_type in enumerate(op_types):
        if op_type != "BatchNormalization" or domains[index] not in DEFAULT_DOMAINS:
            continue
        data = inputs[index][0] if inputs[index] else ""
        conv = producer.get(data)
        if (conv is None or op_types[conv] != "Conv" or domains[conv] not in DEFAULT_DOMAINS
                or conv in targets):
            continue
        # view.chain_problem: the Conv's output feeds this BN alone
        if outputs[conv][:1] != (data,) or consumers.get(data) != [index]:
            continue
        if data in view.graph_outputs or len(inputs[conv]) < 2:
            continue
        feeder = producer.get(inputs[conv][0])
        if feeder is not None and op_types[feeder] in _INPUT_SIDE_OPS:
            continue
        pair = _plain_pair(view, index, conv)
        if pair is not None:
            pairs.append(pair)
            targets.add(conv)
    return pairs


def _plain_pair(view: GraphView, index: int, conv: int) -> _Pair | None:
    """The pair's constants, checked as ConvBnRule checks them, or None (the rule decides)."""
    epsilon = _plain_epsilon(view, index)
    if isinstance(epsilon, str):
        return None
    conv_inputs = view.table.inputs[conv]
    # ConvBnRule.output_channels, from the weight's header: the values are read by chunk.
    name = conv_inputs[1]
    stored = view.float32_initializer(name)
    if stored is None:
        return None
    shape = tuple(stored.dims)
    if len(shape) < 3 or min(shape) <= 0 or math.prod(shape) > _MAX_WEIGHT_VALUES:
        return None  # empty, corrupt (the rules say so) or large (its bytes cost, not the graph)
    channels = shape[0]
    names = view.table.inputs[index][1:5]
    bias_name = conv_inputs[2] if len(conv_inputs) > 2 else ""
    vectors = [_stored_vector(view, name, channels) for name in names]
    # No bias reads as C float32 zeros, so that the usual pairs' biases join in one read too.
    vectors.append(_stored_vector(view, bias_name, channels) if bias_name
                   else bytes(4 * channels))
    if all(vectors):
        return _Pair(index, conv, names, epsilon, tuple(vectors), name, shape)
    return _general_pair(view, index, conv, epsilon, name, shape)


def _general_pair(view: GraphView, index: int, conv: int, epsilon: float, name: str,
                  shape: tuple[int, ...]) -> _Pair | None:
    """_plain_pair for constants that are not all plain float32 vectors in the proto: read and
    checked the general way."""
    conv_inputs = view.table.inputs[conv]
    channels = shape[0]
    bias = None
    if len(conv_inputs) > 2 and conv_inputs[2]:
        bias = _value(view, conv_inputs[2])
        if isinstance(bias, str) or bias[0].shape != (channels,):
            return None
        bias = bias[0]
    names = view.table.inputs[index][1:5]
    found = [_value(view, name) for name in names]
    if any(isinstance(value, str) for value in found):
        return None
    parameters = parameters_from_values(names, found, epsilon)
    if isinstance(parameters, str) or parameters.gamma.shape != (channels,):
        return None
    p = parameters
    return _Pair(index, conv, names, epsilon, (p.gamma, p.beta, p.mean, p.var, bias), name,
                 shape)


def _plain_epsilon(view: GraphView, index: int) -> float | str:
    """batchnorm_epsilon, read directly for the usual BN (one output, five inputs, at most
    epsilon and momentum set, opset 7 on): what torch, tf2onnx and paddle2onnx write."""
    node = view.nodes[index]
    if view.opset < 7 or len(node.output) != 1 or len(node.input) != 5:
        return batchnorm_epsilon(view, index)
    epsilon = DEFAULT_EPSILON
    seen = False
    for attribute in node.attribute:
        name = attribute.name
        if name == "epsilon" and not seen and attribute.type == _FLOAT_ATTRIBUTE:
            epsilon, seen = attribute.f, True
        elif name != "momentum":  # unused by inference, whatever its type
            return batchnorm_epsilon(view, index)  # it says what is wrong, or reads the rest
    return epsilon if math.isfinite(epsilon) and all(node.input) else batchnorm_epsilon(
        view, index)


def _stored_vector(view: GraphView, name: str, channels: int) -> bytes | None:
    """The raw bytes of float32 initializer `name` when it is a vector of `channels` values
    stored in the proto, else None."""
    tensor = view.float32_initializer(name)
    if tensor is None:
        return None
    dims = tensor.dims
    if len(dims) != 1 or dims[0] != channels:
        return None
    return raw_float32(tensor, channels)


def _stored_bytes(view: GraphView, name: str, count: int) -> bytes | None:
    """The raw bytes of float32 initializer `name` (known to hold `count` values) when they are
    in the proto, else None."""
    tensor = view.float32_initializer(name)
    return None if tensor is None else raw_float32(tensor, count)


def _chunks(pairs: list[_Pair]):
    """Consecutive runs of pairs holding about _CHUNK_VALUES weight values together, so the
    float64 temporaries of a chunk stay a few MB."""
    start, total = 0, 0
    for end, pair in enumerate(pairs, 1):
        total += math.prod(pair.weight_shape)
        if total >= _CHUNK_VALUES:
            yield pairs[start:end]
            start, total = end, 0
    if start < len(pairs):
        yield pairs[start:]


def _value(view: GraphView, name: str) -> tuple[np.ndarray, int] | str:
    """view.constant_value, through the short path for the usual small float32 initializer."""
    stored = view.stored_float32(name)
    return (stored, onnx.TensorProto.FLOAT) if stored is not None else view.constant_value(name)


def _compute(pairs: list[_Pair]) -> list[tuple[_Pair, np.ndarray, np.ndarray]]:
    """The folded weight and bias of every pair that passes the rule's checks."""
    channels = np.array([p.weight_shape[0] for p in pairs])
    starts = np.concatenate(([0], np.cumsum(channels)[:-1]))

    gamma, beta, mean, var, biases = (
        _joined([p.vectors[i] for p in pairs], channels) for i in range(5))
    epsilon = np.repeat(np.array([p.epsilon for p in pairs], np.float64), channels)
    # BnParameters.affine, element by element: var+ε > 0, then s and t finite.
    positive = np.minimum.reduceat(var + epsilon > 0, starts)
    scale, shift = fold_math.bn_scale_shift(gamma, beta, mean, var, epsilon)
    finite = np.minimum.reduceat(np.isfinite(scale) & np.isfinite(shift), starts)

    sizes = np.array([math.prod(p.weight_shape) for p in pairs])
    weight_starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    weights = _joined([p.weight for p in pairs], sizes, np.float32)
    # conv_output_fold: W·s in float64, rounded once into float32.
    folded = fold_math.scaled(weights, np.repeat(scale, np.repeat(sizes // channels, channels)),
                              np.float32)
    folded_bias = biases * scale + shift

    # plan_problem for float32: new and replaced values finite and within the headroom
    # (NaN fails every comparison, so it is refused here as there).
    def within(values: np.ndarray, at: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(np.abs(values), at) <= _FLOAT32_CEILING

    fits = (within(folded, weight_starts) & within(folded_bias, starts)
            & within(weights, weight_starts) & within(biases, starts))
    accepted = []
    for number, pair in enumerate(pairs):
        if not (positive[number] and finite[number] and fits[number]):
            continue
        at, count = starts[number], channels[number]
        weight_at = weight_starts[number]
        weight = folded[weight_at:weight_at + sizes[number]].reshape(pair.weight_shape)
        accepted.append((pair, weight, folded_bias[at:at + count]))
    return accepted


def _joined(items: list, counts, dtype=np.float64) -> np.ndarray:
    """The pairs' vectors (raw float32 bytes, arrays, or None for zeros; item i of counts[i]
    values) end to end as one `dtype` array. Bytes alone, the usual case, take one read."""
    if all(type(item) is bytes for item in items):
        return np.frombuffer(b"".join(items), "<f4").astype(dtype)
    return np.concatenate([
        np.frombuffer(item, "<f4") if type(item) is bytes
        else np.zeros(count) if item is None else item.reshape(-1)
        for item, count in zip(items, counts)], dtype=dtype)
