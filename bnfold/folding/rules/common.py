"""What every rule shares: reading a BatchNormalization as an affine map, matches and plans.

A rule is match → check → rewrite:
- `match(view, index)` finds the pattern around node `index` or returns None (not my pattern);
- `check(view, match)` returns a refusal reason or None, never edits the graph, and leaves the
  computed constants in `match.plan` so rewrite does not recompute them;
- `rewrite(view, match)` applies the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.folding import math as fold_math
from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.product import WeightProduct
from bnfold.precision import (
    FLOAT_TYPES,
    ONNX_DTYPE_NAME,
    float32_to_bfloat16_bits,
    headroom_problem,
    range_problem,
)

DEFAULT_EPSILON = 1e-5


@dataclass
class ChannelAffine:
    """y = scale·x + shift along axis 1, from a BatchNormalization or a Mul/Add constant."""

    scale: np.ndarray  # float64 [C]
    shift: np.ndarray  # float64 [C]
    dead_inputs: tuple[str, ...] = ()  # constants the source reads, possibly unused afterwards


@dataclass
class ConstantUpdate:
    """New float64 values for one input of a node, to be rounded into `elem_type`."""

    node_index: int
    slot: int
    values: np.ndarray
    elem_type: int
    hint: str


@dataclass
class Match:
    node_index: int  # the node that disappears (BatchNormalization, Mul or Add)
    target_index: int  # the node it folds into
    affine: ChannelAffine | None = None
    updates: list[ConstantUpdate] = field(default_factory=list)
    attributes: dict[str, float] = field(default_factory=dict)  # target attribute changes
    extra: dict = field(default_factory=dict)  # rule-specific facts found by match


def weight_and_bias_updates(
    view: GraphView, match: Match, weight: np.ndarray, bias: np.ndarray
) -> list[ConstantUpdate]:
    """New values for the target's inputs 1 (weight) and 2 (bias/C), in the weight's dtype."""
    weight_name = view.nodes[match.target_index].input[1]
    elem = view.constant_dtype(weight_name)
    return [
        ConstantUpdate(match.target_index, 1, weight, elem, weight_name),
        ConstantUpdate(match.target_index, 2, bias, elem, f"{weight_name}_bias"),
    ]


class AttributeProblem(Exception):
    """An attribute a rule reads has the wrong type or value; the message is the refusal."""


_ATTRIBUTE_KINDS = {
    "int": (onnx.AttributeProto.INT, "i"),
    "float": (onnx.AttributeProto.FLOAT, "f"),
    "string": (onnx.AttributeProto.STRING, "s"),
    "ints": (onnx.AttributeProto.INTS, "ints"),
    "floats": (onnx.AttributeProto.FLOATS, "floats"),
}


def attributes_by_name(node: onnx.NodeProto) -> dict[str, list[onnx.AttributeProto]]:
    """`node`'s attributes by name (a list: a malformed node may repeat one), read once."""
    found: dict[str, list[onnx.AttributeProto]] = {}
    for attr in node.attribute:
        found.setdefault(attr.name, []).append(attr)
    return found


def typed_attribute(node: onnx.NodeProto, name: str, kind: str, default, *, minimum=None,
                    attributes: dict[str, list[onnx.AttributeProto]] | None = None):
    """Attribute `name` of `node` as `kind` ("int", "float", "string", "ints", "floats"), or
    `default` when absent. A wrong type (group as STRING, epsilon as INTS or UNDEFINED), a
    non-finite float or a value below `minimum` raises AttributeProblem, whose text is a refusal
    reason: model files are untrusted, so no attribute reaches int()/float() unchecked. For example
    `typed_attribute(conv, "group", "int", 1, minimum=1)` refuses group=0 and group="2".
    `attributes` (from attributes_by_name) saves reading the node's attributes again.
    """
    expected, field = _ATTRIBUTE_KINDS[kind]
    if attributes is not None:
        found = attributes.get(name, ())
    else:
        found = [attr for attr in node.attribute if attr.name == name]
    if not found:
        return default
    attr = found[-1]
    label = node_label(node)
    if len(found) > 1:
        raise AttributeProblem(f"{label} has attribute {name} {len(found)} times")
    if attr.type != expected:
        type_name = onnx.AttributeProto.AttributeType.Name(attr.type) if attr.type in (
            onnx.AttributeProto.AttributeType.values()) else str(attr.type)
        raise AttributeProblem(
            f"{label} attribute {name} is {type_name}, expected {kind.upper()}"
        )
    value = getattr(attr, field)
    if kind == "string":
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise AttributeProblem(f"{label} attribute {name} is not valid text") from None
    if kind in ("ints", "floats"):
        value = list(value)
        values = value
    else:
        values = [value]
    if kind in ("float", "floats") and not all(np.isfinite(v) for v in values):
        raise AttributeProblem(f"{label} attribute {name}={value} is not finite")
    if minimum is not None and any(v < minimum for v in values):
        raise AttributeProblem(f"{label} attribute {name}={value} is below {minimum}")
    return value


def attribute_reason(check):
    """Decorator for a rule's `check`: an AttributeProblem becomes its refusal reason."""

    def checked(self, view, match):
        try:
            return check(self, view, match)
        except AttributeProblem as problem:
            return str(problem)

    checked.__name__, checked.__doc__ = check.__name__, check.__doc__
    return checked


def set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, float(value)))


@dataclass(slots=True)
class BnParameters:
    """The constants of an inference BatchNormalization, read but not yet combined."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    names: tuple[str, ...]  # the four inputs, which may be unused once the BN is gone

    def affine(self) -> ChannelAffine | str:
        """s = γ/√(σ²+ε), t = β − μ·s, or why they cannot be computed."""
        denominator = self.var.astype(np.float64) + self.epsilon
        if not np.all(denominator > 0):
            bad = int(np.argmin(denominator))
            return f"var+epsilon is not positive (channel {bad}: {denominator[bad]:.3g})"
        scale, shift = fold_math.bn_scale_shift(
            self.gamma, self.beta, self.mean, self.var, self.epsilon)
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            return "its parameters are not finite"
        return ChannelAffine(scale, shift, self.names)


def batchnorm_affine(view: GraphView, index: int) -> ChannelAffine | str:
    """The affine map of inference BatchNormalization node `index`, or why it has none."""
    parameters = batchnorm_parameters(view, index)
    return parameters if isinstance(parameters, str) else parameters.affine()


def batchnorm_parameters(view: GraphView, index: int) -> BnParameters | str:
    """The constants of inference BatchNormalization node `index` (attributes, outputs, shapes
    and dtypes checked), or why it is not one that folds."""
    epsilon = batchnorm_epsilon(view, index)
    if isinstance(epsilon, str):
        return epsilon
    names = tuple(view.nodes[index].input[1:5])
    found = []
    for role, name in zip(BN_ROLES, names):
        value = view.constant_value(name)
        if isinstance(value, str):
            return f"{role} {name!r} {value}"
        found.append(value)
    return parameters_from_values(names, found, epsilon)


BN_ROLES = ("scale", "B", "mean", "var")


def parameters_from_values(
    names: tuple[str, ...], found: list[tuple[np.ndarray, int]], epsilon: float
) -> BnParameters | str:
    """BnParameters from the (value, element type) of scale, B, mean and var, or why their
    shapes or types do not make one."""
    gamma, beta, mean, var = (value for value, _ in found)
    shape = gamma.shape
    if len(shape) != 1 or beta.shape != shape or mean.shape != shape or var.shape != shape:
        text = ", ".join(f"{r} {list(a.shape)}" for r, (a, _) in zip(BN_ROLES, found))
        return f"parameters are not all one vector of length C ({text})"
    if not all(elem_type in FLOAT_TYPES for _, elem_type in found):
        return "parameters are not floating point"
    return BnParameters(gamma, beta, mean, var, epsilon, names)


def batchnorm_epsilon(view: GraphView, index: int) -> float | str:
    """The epsilon of BatchNormalization node `index` once its inputs, attributes and outputs
    say it is an inference BN that may fold, or why it is not."""
    node = view.nodes[index]
    if len(node.input) < 5 or not all(node.input[:5]):
        return (
            f"has {len([n for n in node.input if n])} of its 5 inputs (X, scale, B, mean, var); "
            f"the model is malformed"
        )
    attributes = attributes_by_name(node)
    try:
        training = typed_attribute(node, "training_mode", "int", 0, attributes=attributes)
        is_test = typed_attribute(node, "is_test", "int", 0, attributes=attributes)
        spatial = typed_attribute(node, "spatial", "int", 1, attributes=attributes)
        epsilon = typed_attribute(node, "epsilon", "float", DEFAULT_EPSILON,
                                  attributes=attributes)
    except AttributeProblem as problem:
        return str(problem)
    if training:
        return "training_mode=1 (batch statistics are used, not the running averages)"
    if view.opset < 7 and not is_test:
        return "is_test=0 (opset-6 BatchNormalization in training mode)"
    if spatial == 0:
        return "spatial=0 (per-activation statistics, not per-channel)"
    used_extra = [
        name
        for name in node.output[1:]
        if name and (view.live_consumers(name) or name in view.graph_outputs)
    ]
    if used_extra:
        return f"its running-statistics outputs are used ({', '.join(used_extra)})"
    return epsilon


def compute_dtype(elem_type: int):
    """The dtype fold math should round into directly: the weight's own for float32/float64;
    float64 for float16/bfloat16, whose range is checked before rounding."""
    return np.float32 if elem_type == onnx.TensorProto.FLOAT else np.float64


def round_into(values: np.ndarray, elem_type: int) -> np.ndarray:
    """Values rounded once into the storage dtype of `elem_type` (bf16 as uint16 bits)."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        return float32_to_bfloat16_bits(values.astype(np.float32))
    return values.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type), copy=False)


def plan_problem(match: Match, view: GraphView) -> str | None:
    """Why the planned constants cannot be stored in their dtypes, or None."""
    for update in match.updates:
        if update.elem_type not in FLOAT_TYPES:  # int4, float8, ...: no folded value to store
            name = onnx.TensorProto.DataType.Name(update.elem_type) if update.elem_type in (
                onnx.TensorProto.DataType.values()) else str(update.elem_type)
            return f"{update.hint} is {name}, not float16/bfloat16/float32/float64"
        # first the check that needs no values: the others reduce over the whole weight
        problem = _growth_problem(view, update)
        dtype = ONNX_DTYPE_NAME.get(update.elem_type)
        what = f"folded {update.hint}"
        if problem is None and dtype is not None:
            problem = range_problem(update.values, dtype, what)
        elif problem is None and not all_finite(update.values):
            problem = f"{what} is not finite"
        if problem is None:
            problem = headroom_problem(update.values, update.elem_type, what)
        if problem is None:
            problem = _replaced_headroom_problem(view, update)
        if problem:
            return problem
    return None


# A folded value stored in place of one the model generates (ConstantOfShape, Expand, Tile of a
# few stored values) stays generated when it would hold this many times the values it is
# generated from, unless it is smaller than GROWTH_MIN_BYTES.
GROWTH_RATIO = 16
GROWTH_MIN_BYTES = 4096


def _growth_problem(view: GraphView, update: ConstantUpdate) -> str | None:
    """Why storing `update` would blow the file up: the value it replaces is generated at run
    time from far fewer stored values (onnx's weight-free light_* models: every weight a
    ConstantOfShape, where folding every one would turn a 78 KB file into 94 MB)."""
    node = view.nodes[update.node_index]
    name = node.input[update.slot] if update.slot < len(node.input) else ""
    computed = view.computed.computed(name) if name and view.computed is not None else None
    if computed is None:
        return None
    count = math.prod(update.values.shape)
    # plan_problem let only float types this far: each has a numpy dtype
    nbytes = count * onnx.helper.tensor_dtype_to_np_dtype(update.elem_type).itemsize
    if nbytes < GROWTH_MIN_BYTES or count <= GROWTH_RATIO * computed.stored:
        return None
    role = {1: "weight", 2: "bias"}.get(update.slot, f"input {update.slot}")
    size = f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} KB"
    return (f"its {role} {name!r} is generated at run time by {computed.op_type} from "
            f"{computed.stored:,} stored value(s): folding would store its {size} in the file, "
            f"so it stays generated")


def _replaced_headroom_problem(view: GraphView, update: ConstantUpdate) -> str | None:
    """The weight being replaced may itself sit near the range's top (its products overflow in
    the original model): refuse as for a folded value."""
    node = view.nodes[update.node_index]
    if update.slot >= len(node.input) or not node.input[update.slot]:
        return None
    original = view.constant_array(node.input[update.slot])
    if original is None or original.dtype.kind != "f":
        return None
    if isinstance(update.values, WeightProduct):  # its bounds pass read the original already
        bounds = update.values.source_bounds(original)
        original = original if bounds is None else bounds
    return headroom_problem(original, update.elem_type, f"{update.hint} before folding")


def all_finite(values: np.ndarray) -> bool:
    """No inf or NaN; two reductions instead of a boolean array the size of the weight."""
    if values.size == 0:
        return True
    return bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def apply_plan(view: GraphView, match: Match) -> list[str]:
    """Store the planned constants and attributes; returns the input names they replaced
    (which may now be unused)."""
    replaced = []
    for update in match.updates:
        node = view.nodes[update.node_index]
        if update.slot < len(node.input):
            replaced.append(node.input[update.slot])
        stored = round_into(update.values, update.elem_type)
        view.set_constant(update.node_index, update.slot, stored, update.elem_type, update.hint)
    for name, value in match.attributes.items():
        set_float_attribute(view.nodes[match.target_index], name, value)
    return replaced


def is_batchnorm(node: onnx.NodeProto) -> bool:
    """Whether `node` is a default-domain BatchNormalization (the node a BN rule matches)."""
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def produced_by(view: GraphView, name: str, op_type: str):
    """(index, node) of the default-domain `op_type` node producing `name`, or None."""
    found = view.producer_of(name)
    if found is None or found[1].op_type != op_type or found[1].domain not in ("", "ai.onnx"):
        return None
    return found


def producer_match(view: GraphView, index: int, op_types: tuple[str, ...]) -> Match | None:
    """Match node `index` whose data input (input 0) is produced by one of `op_types`."""
    node = view.nodes[index]
    if not node.input:
        return None
    found = view.producer_of(node.input[0])
    if found is None or found[1].op_type not in op_types or found[1].domain not in ("", "ai.onnx"):
        return None
    return Match(node_index=index, target_index=found[0])


def producer_output_problem(view: GraphView, match: Match) -> str | None:
    """The producer's output must feed only the node being folded."""
    producer = view.nodes[match.target_index]
    problem = view.sole_consumer_problem(producer.output[0], match.node_index)
    if problem:
        return f"{node_label(producer)} output {problem}"
    return None


def weight_rank_problem(weight: np.ndarray, channels: int, axis_size: int, what: str) -> str | None:
    if axis_size != channels:
        return f"{what} has {axis_size} output channels but the BN has {channels}"
    return None


LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_NORMALISED_BY = ("Div",)  # x / √(σ² + ε) as torch writes a LayerNorm before opset 17


def produced_by_linear(view: GraphView, name: str) -> bool:
    """Whether a default-domain Conv, ConvTranspose, Gemm or MatMul produces `name`."""
    return any(produced_by(view, name, op_type) for op_type in LINEAR_OPS)


def is_normalised(view: GraphView, data: str) -> bool:
    """Whether `data` is a normalisation's output: a Div, or a Mul of two computed tensors."""
    found = view.producer_of(data)
    if found is None:
        return False
    producer = found[1]
    if producer.op_type in _NORMALISED_BY:
        return True
    return producer.op_type == "Mul" and all(
        view.constant_array(name) is None for name in producer.input)
