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
from bnfold.folding.names import node_label
from bnfold.folding.report import FOLDED, FoldEntry
from bnfold.folding.rules.common import BnParameters, batchnorm_epsilon, parameters_from_values
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.into_producer import SOURCE_OPS
from bnfold.onnxio.nodes import DEFAULT_DOMAINS
from bnfold.precision import HEADROOM

_FLOAT = onnx.TensorProto.FLOAT
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
    parameters: BnParameters
    weight_name: str  # a float32 initializer of shape weight_shape, read chunk by chunk
    weight_shape: tuple[int, ...]
    bias: np.ndarray | None  # [C]
    weight: np.ndarray | None = None  # while its chunk is computed


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
    return dead + list(pair.parameters.names)


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
    epsilon = batchnorm_epsilon(view, index)
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
    return _Pair(index, conv, parameters, name, shape, bias)


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

    def joined(arrays) -> np.ndarray:  # vectors of C values (_plain_pair checked the shapes)
        return np.concatenate(list(arrays), dtype=np.float64)

    gamma = joined(p.parameters.gamma for p in pairs)
    beta = joined(p.parameters.beta for p in pairs)
    mean = joined(p.parameters.mean for p in pairs)
    var = joined(p.parameters.var for p in pairs)
    epsilon = np.repeat(np.array([p.parameters.epsilon for p in pairs], np.float64), channels)
    # BnParameters.affine, element by element: var+ε > 0, then s and t finite.
    positive = np.minimum.reduceat(var + epsilon > 0, starts)
    scale, shift = fold_math.bn_scale_shift(gamma, beta, mean, var, epsilon)
    finite = np.minimum.reduceat(np.isfinite(scale) & np.isfinite(shift), starts)

    sizes = np.array([p.weight.size for p in pairs])
    weight_starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    weights = np.concatenate([p.weight.reshape(-1) for p in pairs])
    # conv_output_fold: W·s in float64, rounded once into float32.
    folded = fold_math.scaled(weights, np.repeat(scale, np.repeat(sizes // channels, channels)),
                              np.float32)
    biases = joined(np.zeros(len(p.weight)) if p.bias is None else p.bias for p in pairs)
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
        weight = folded[weight_at:weight_at + sizes[number]].reshape(pair.weight.shape)
        accepted.append((pair, weight, folded_bias[at:at + count]))
    return accepted
