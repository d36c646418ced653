"""The constants one graph's rules read: initializers, Constant nodes, values computed from
constants by small subgraphs, and those of enclosing graphs (a subgraph sees its outer scope).

GraphView takes these queries from ConstantLookups; they read the view's own maps, which the
view keeps current while rules edit the graph:

    graph, initializers (name -> TensorProto), graph_inputs (the overridable ones), constants
    (found so far), computed (ConstantSubgraphs or None), producer, pending, deferred, outer
    (the enclosing graph's view or None), _recent_reads (the last few weights read from file).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from bnfold.folding.constants import as_tensor
from bnfold.folding.tensors import Constant, tensor_to_array
from bnfold.onnxio.deferred import MAP_MIN_BYTES


class ConstantLookups:
    """Queries of a GraphView about constants (see the module docstring for what they read)."""

    def visible_constant(self, name: str) -> Constant | None:
        """The constant `name` in scope here, without evaluating anything: this graph's own
        (from IR 4 on, an initializer also listed as a graph input is overridable, so it is
        not one), else an enclosing graph's."""
        found = self.constants.get(name)
        if found is not None:
            return found
        if name in self.graph_inputs:
            return None
        tensor = self.initializers.get(name)
        if tensor is not None:
            found = self.constants[name] = Constant(tensor, self.graph, True, self.deferred)
            return found
        return self.outer.visible_constant(name) if self.outer is not None else None

    def constant(self, name: str, depth: int = 0) -> Constant | str:
        """The constant called `name` (an initializer, a Constant node, or a value computed
        from constants by a small subgraph), or why it is not one."""
        found = self.visible_constant(name)
        if found is not None:
            return found
        if name in self.graph_inputs:
            if name in self.initializers:
                return (f"is a graph input with a default value (can be overridden at run time; "
                        f"--freeze-input {name} makes it a constant)")
            return "is a graph input (can change at run time)"
        if self.computed is None or name not in self.producer:
            return "is computed at run time, not a constant"
        outcome = self.computed.evaluate(name, self, depth)
        if isinstance(outcome, str):
            return f"is {outcome}"
        constant = Constant(as_tensor(name, outcome), self.graph, False, value=outcome.value)
        self.constants[name] = constant
        return constant

    def constant_or_reason(self, name: str, depth: int = 0) -> np.ndarray | str:
        """Used by ConstantSubgraphs: the value of `name`, or why it has none."""
        found = self.constant(name, depth)
        return found if isinstance(found, str) else self._value(name, found)

    def is_constant(self, name: str) -> bool:
        return not isinstance(self.constant(name), str)

    def _value(self, name: str, constant: Constant) -> np.ndarray:
        if constant.value is not None:
            return constant.value
        pending = self.pending
        if pending is not None and name in pending and name in self.initializers:
            return pending.values(name)
        deferred = constant.deferred
        if deferred is None or not deferred.holds(constant.tensor):
            return tensor_to_array(constant.tensor)
        # A rule reads a weight, its bias and four BN parameters, then its checks read the weight
        # again (range headroom): keep the last six read from the file rather than pread twice;
        # six (one fold's worth), so memory stays bounded by the fold at hand.
        # Large ones are views of the file's pages: no copy, and a folded weight computed from
        # one (bnfold.folding.product) never needs the whole weight in fresh memory.
        recent = self._recent_reads
        if name not in recent:
            if len(recent) >= 6:
                recent.pop(next(iter(recent)))
            large = deferred.nbytes(name) >= MAP_MIN_BYTES
            raw = deferred.view(name) if large else deferred.read(name)
            recent[name] = tensor_to_array(constant.tensor, raw)
        return recent[name]

    def constant_value(self, name: str) -> tuple[np.ndarray, int] | str:
        """(value, ONNX element type) of constant `name`, or why it is not a constant."""
        found = self.constant(name)
        if isinstance(found, str):
            return found
        return self._value(name, found), found.tensor.data_type

    def float32_initializer(self, name: str) -> onnx.TensorProto | None:
        """The tensor of `name` when it is a constant float32 initializer of this graph (not
        an overridable input) with no new value pending, else None."""
        tensor = self.initializers.get(name)
        if (tensor is None or name in self.graph_inputs
                or (self.pending is not None and name in self.pending)
                or tensor.data_type != onnx.TensorProto.FLOAT):
            return None
        return tensor

    def stored_float32(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is a float32_initializer whose raw bytes are in the
        proto: what constant_value reads, read with a quarter of its steps, for the batched
        pass. None: use constant_value."""
        tensor = self.float32_initializer(name)
        if tensor is None:
            return None
        dims = tensor.dims[:]  # a list, at a third of tuple()'s cost on a repeated field
        raw = None if dims and min(dims) < 0 else raw_float32(tensor, math.prod(dims))
        if raw is None:
            return None  # constant_value says what is wrong
        values = np.frombuffer(raw, dtype="<f4")
        return values if len(dims) == 1 else values.reshape(dims)

    def constant_array(self, name: str) -> np.ndarray | None:
        found = self.constant(name)
        return None if isinstance(found, str) else self._value(name, found)

    def constant_dtype(self, name: str) -> int | None:
        found = self.constant(name)
        return None if isinstance(found, str) else found.tensor.data_type

    def non_constant_reason(self, name: str, role: str) -> str | None:
        found = self.constant(name)
        return f"{role} {name!r} {found}" if isinstance(found, str) else None


def raw_float32(tensor: onnx.TensorProto, count: int) -> bytes | None:
    """The raw bytes of float32 `tensor` when they are in the proto and hold `count` values,
    else None (external, typed float_data, or a length that does not fit)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return None
    raw = tensor.raw_data
    return raw if len(raw) == 4 * count else None
