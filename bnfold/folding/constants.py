"""Constants computed by small subgraphs of constants, evaluated on demand for a fold.

Exporters compute weights and BN parameters instead of storing them: torch.onnx turns identical
initializers into `Identity` nodes, the IR-3 model zoo builds weights with `ConstantOfShape`,
paddle2onnx and tf2onnx `Reshape`/`Cast`/`Unsqueeze` them. A value that a fold rule reads is
evaluated here, once: the common shape/copy ops in plain numpy (bnfold.folding.constant_ops),
the others with onnx's reference implementation (its elementwise arithmetic rounds in the
tensor's own dtype, as ONNX Runtime does).

Only names a rule asks about are evaluated, never the whole graph: this is not a constant
folder. An op outside `EVALUATED_OPS`, a subgraph deeper than `MAX_DEPTH` or a result above
`MAX_VALUES` is refused with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import constant_ops

# Deterministic ops whose output depends on their inputs' values alone.
EVALUATED_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
    "Concat", "Slice", "Gather", "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt",
    "Reciprocal", "Abs", "Exp", "Log", "Pow", "Expand", "Tile", "Range",
})
# A weight these compute is quantized: folding into it would make it a float weight.
QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
MAX_VALUES = 1 << 27  # 128 M values: 512 MB of float32 for one computed tensor
MAX_DEPTH = 64


@dataclass
class ComputedValue:
    value: np.ndarray
    elem_type: int
    stored: int = 0  # values the model stores for it (initializers, Constant nodes) in all
    op_type: str = ""  # the op that computes it


class ConstantSubgraphs:
    """Values of names computed from constants, cached per model (names are model-unique)."""

    def __init__(self, opset: int):
        self.opset = opset
        self._cache: dict[str, ComputedValue | str] = {}

    def evaluate(self, name: str, view, depth: int = 0) -> ComputedValue | str:
        """The value of `name` in `view`, or why it is not a constant (a reason string)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        outcome = self._evaluate(name, view, depth)
        self._cache[name] = outcome
        return outcome

    def computed(self, name: str) -> ComputedValue | None:
        """The value computed for `name` so far, if any."""
        cached = self._cache.get(name)
        return cached if isinstance(cached, ComputedValue) else None

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def _evaluate(self, name: str, view, depth: int) -> ComputedValue | str:
        found = view.producer_of(name)
        if found is None:
            return "computed at run time, not a constant"
        _, node = found
        if node.op_type in QUANTIZATION_OPS:
            return (f"quantized ({node.op_type}): a fold would make it a float weight; fold "
                    f"BatchNormalization before quantizing (TensorRT fuses this one into the "
                    f"quantized layer itself)")
        if node.domain not in ("", "ai.onnx") or node.op_type not in EVALUATED_OPS:
            return f"computed at run time by {node.op_type}, not a constant"
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attr in node.attribute):
            return f"computed at run time by {node.op_type}, not a constant"
        if depth >= MAX_DEPTH:
            return f"computed by a chain of more than {MAX_DEPTH} constant ops; not evaluated"
        inputs: list[np.ndarray | None] = []
        for input_name in node.input:
            if not input_name:
                inputs.append(None)
                continue
            value = view.constant_or_reason(input_name, depth + 1)
            if isinstance(value, str):
                return f"computed at run time by {node.op_type} of {input_name!r}, not a constant"
            inputs.append(value)
        problem = _size_problem(node, inputs)
        if problem:
            return problem
        try:
            outputs = _run_node(node, inputs, self.opset)
        except Exception as exc:  # the reference ops raise whatever numpy raises
            detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            return (f"computed by {node.op_type}, which bnfold could not evaluate "
                    f"({type(exc).__name__}: {detail})")
        slot = list(node.output).index(name)
        value = np.asarray(outputs[slot])
        stored = 0
        for input_name, input_value in zip(node.input, inputs):
            if input_value is not None:
                cached = self._cache.get(input_name)
                stored += cached.stored if isinstance(cached, ComputedValue) else input_value.size
        if value.size > MAX_VALUES:
            return f"computed by {node.op_type} into {value.size:,} values (over {MAX_VALUES:,})"
        try:
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        except (KeyError, ValueError, TypeError):
            return f"computed by {node.op_type} into an unsupported dtype {value.dtype}"
        return ComputedValue(value, elem_type, stored, node.op_type)


def _size_problem(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> str | None:
    """Refuse ops whose declared output would be too large, before anything is allocated."""
    shape = None
    if node.op_type == "ConstantOfShape" and inputs and inputs[0] is not None:
        shape = [int(d) for d in np.asarray(inputs[0]).reshape(-1)]
    elif node.op_type == "Expand" and len(inputs) == 2 and all(i is not None for i in inputs):
        target = [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
        if any(d < 0 for d in target):
            return f"computed by Expand with a negative size {target}"
        shape = _broadcast(node, [inputs[0].shape, tuple(target)])
        if isinstance(shape, str):
            return shape
    elif node.op_type in _BROADCASTING and all(i is not None for i in inputs) and inputs:
        shape = _broadcast(node, [i.shape for i in inputs])
        if isinstance(shape, str):
            return shape
    elif node.op_type == "Tile" and len(inputs) == 2 and inputs[0] is not None:
        repeats = [int(r) for r in np.asarray(inputs[1]).reshape(-1)]
        shape = [int(inputs[0].size)] + repeats
    elif node.op_type == "Range" and all(i is not None for i in inputs[:3]) and len(inputs) >= 3:
        start, limit, delta = (float(np.asarray(i).reshape(-1)[0]) for i in inputs[:3])
        if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
            return "computed by Range with a zero or non-finite step"
        shape = [max(0, math.ceil((limit - start) / delta))]
    if shape is None:
        return None
    if any(d < 0 for d in shape):
        return f"computed by {node.op_type} with a negative size {shape}"
    total = math.prod(max(d, 1) for d in shape)
    if total > MAX_VALUES:
        return f"computed by {node.op_type} into {total:,} values (over {MAX_VALUES:,})"
    return None


_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _broadcast(node: onnx.NodeProto, shapes: list[tuple[int, ...]]) -> list[int] | str:
    try:
        return list(np.broadcast_shapes(*shapes))
    except ValueError:
        return f"computed by {node.op_type} of shapes that do not broadcast {shapes}"


def _run_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list:
    outputs = constant_ops.run(node, inputs, opset)
    return outputs if outputs is not None else reference_run(node, inputs, opset)


def reference_run(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list:
    """`node` run alone on `inputs` by onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if value is not None else "" for i, value in enumerate(inputs)]
    single = onnx.NodeProto()
    single.CopyFrom(node)
    del single.input[:]
    single.input.extend(names)
    del single.output[:]
    single.output.extend(f"out{i}" for i in range(len(node.output)))
    graph = onnx.helper.make_graph(
        [single], "constant",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                            v.shape)
         for n, v in zip(names, inputs) if v is not None],
        [onnx.helper.make_empty_tensor_value_info(o) for o in single.output],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feed = {n: v for n, v in zip(names, inputs) if v is not None}
    return ReferenceEvaluator(model).run(None, feed)


def as_tensor(name: str, computed: ComputedValue) -> onnx.TensorProto:
    """A header-only TensorProto (name, dims, dtype) standing for a computed value."""
    tensor = onnx.TensorProto(name=name, data_type=computed.elem_type)
    tensor.dims.extend(computed.value.shape)
    return tensor


__all__ = ["ConstantSubgraphs", "ComputedValue", "EVALUATED_OPS", "as_tensor"]
