"""The view of one ONNX graph that a fold rule needs: producers, consumers, constants, names.

The view edits the GraphProto in place and keeps its maps current, so rules can be applied one
after another in a single pass. Node removal is deferred to `commit()` (one rebuild instead of
an O(n) delete per fold). Names used inside subgraphs count as uses by the node that owns the
subgraph, so a tensor read in an If branch is never treated as unused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.constants import ConstantSubgraphs, as_tensor
from bnfold.folding.tensors import (  # noqa: F401  (fill_tensor, PendingTensors: re-exported)
    PendingTensors,
    constant_node_tensor,
    fill_tensor,
    tensor_to_array,
)
from bnfold.folding.types import TypeTable  # noqa: F401  (re-exported)
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.tensors import names_read_by_subgraphs, subgraphs  # noqa: F401

def node_label(node: onnx.NodeProto) -> str:
    """A name for reports: the node's own, else op type and first output."""
    if node.name:
        return node.name
    return f"{node.op_type}({node.output[0] if node.output else '?'})"


class NameAllocator:
    """Fresh tensor names, unique across the whole model (subgraphs may not shadow)."""

    def __init__(self, model: onnx.ModelProto):
        self._used: set[str] = set()
        self._collect(model.graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        used = self._used
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.input)
        used.update(v.name for v in graph.output)
        used.update(v.name for v in graph.value_info)
        for node in graph.node:
            used.update(node.input)
            used.update(node.output)
            for _, sub in subgraphs(node):
                self._collect(sub)

    def fresh(self, base: str) -> str:
        candidate, index = base, 0
        while candidate in self._used:
            index += 1
            candidate = f"{base}_{index}"
        self._used.add(candidate)
        return candidate


@dataclass
class Constant:
    """A constant tensor visible in a graph: an initializer or a Constant node's value."""

    tensor: onnx.TensorProto
    owner: onnx.GraphProto  # the graph that holds it (an outer one for outer-scope names)
    is_initializer: bool
    deferred: DeferredData | None = None  # holds the bytes when the tensor was loaded without
    value: np.ndarray | None = None  # a value computed from other constants (folding.constants)

    def array(self) -> np.ndarray:
        if self.value is not None:
            return self.value
        if self.deferred is not None and self.deferred.holds(self.tensor):
            return tensor_to_array(self.tensor, self.deferred.read(self.tensor.name))
        return tensor_to_array(self.tensor)


class GraphView:
    """Producers, consumers and constants of one graph, kept current while rules edit it."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        names: NameAllocator,
        types: TypeTable,
        outer_constants: dict[str, Constant] | None = None,
        path: str = "main",
        pending: PendingTensors | None = None,
        opset: int = 17,
        deferred: DeferredData | None = None,
        computed: ConstantSubgraphs | None = None,
        initializers_are_inputs: bool = False,
        constants_as_nodes: bool = False,
    ):
        self.graph = graph
        self.opset = opset  # the model's default-domain opset: op semantics differ by version
        self.names = names
        self.types = types
        # New values of this graph's own initializers, written by save_model without copying
        # them into the protobuf first (None: edit the tensors right away).
        self.pending = pending
        self.path = path
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.removed: set[int] = set()
        self._placement: dict[int, list[int]] = {}  # node index -> nodes inserted before it
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.graph_outputs = {v.name for v in graph.output}
        # Below IR 4 every initializer must also be listed as a graph input, and runtimes treat
        # it as a constant: such listings are declarations, not inputs (folding keeps them in
        # step, see add_initializer / declare_input).
        self.initializers_are_inputs = initializers_are_inputs
        self.constants_as_nodes = constants_as_nodes
        initializer_names = {t.name for t in graph.initializer} if initializers_are_inputs else set()
        self.graph_inputs = {v.name for v in graph.input} - initializer_names
        self.computed = computed
        self._recent_reads: dict[str, np.ndarray] = {}
        self.constants: dict[str, Constant] = dict(outer_constants or {})
        # An outer-scope constant is shadowed by a local input of the same name.
        for name in self.graph_inputs:
            self.constants.pop(name, None)
        self.initializers: dict[str, onnx.TensorProto] = {}
        for tensor in graph.initializer:
            self.initializers[tensor.name] = tensor
            # From IR 4 on, an initializer also listed as a graph input is overridable.
            if tensor.name not in self.graph_inputs:
                self.constants[tensor.name] = Constant(tensor, graph, True, deferred)
        for index, node in enumerate(self.nodes):
            self._index_node(index, node)

    def _index_node(self, index: int, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self.consumers[name].append(index)
        for name in names_read_by_subgraphs(node):
            self.consumers[name].append(index)
        for name in node.output:
            if name:
                self.producer[name] = index
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            tensor = constant_node_tensor(node)
            if tensor is not None:
                self.constants[node.output[0]] = Constant(tensor, self.graph, False)

    # ---- queries -------------------------------------------------------------------------
    def live_nodes(self, op_type: str | None = None) -> Iterator[tuple[int, onnx.NodeProto]]:
        for index, node in enumerate(self.nodes):
            if index not in self.removed and (op_type is None or node.op_type == op_type):
                yield index, node

    def producer_of(self, name: str) -> tuple[int, onnx.NodeProto] | None:
        index = self.producer.get(name)
        if index is None or index in self.removed:
            return None
        return index, self.nodes[index]

    def skip_noops(self, name: str) -> tuple[str, list[int]]:
        """Follow `name` back through nodes that pass it on unchanged (Identity, inference-mode
        Dropout, Cast to its own type): the name they start from and their indices, nearest
        first. Exporters put these between a Conv and its BN (paddle2onnx, tf2onnx)."""
        passed: list[int] = []
        while len(passed) < 64:
            found = self.producer_of(name)
            if found is None or not self._passes_through(found[1]):
                break
            passed.append(found[0])
            name = found[1].input[0]
        return name, passed

    def _passes_through(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            return False
        if node.op_type == "Identity":
            return True
        if node.op_type == "Dropout":
            mask_used = len(node.output) > 1 and node.output[1] and (
                self.live_consumers(node.output[1]) or node.output[1] in self.graph_outputs)
            if mask_used or (self.opset < 7 and not _int_attribute(node, "is_test", 0)):
                return False
            if len(node.input) > 2 and node.input[2]:  # training_mode (opset 12+)
                flag = self.constant_array(node.input[2])
                return flag is not None and flag.size == 1 and not bool(flag.reshape(-1)[0])
            return True
        if node.op_type == "Cast":
            known = self.types.lookup(node.input[0])
            return known is not None and known[0] == _int_attribute(node, "to", -1)
        return False

    def chain_problem(self, start: int, passed: list[int], end: int) -> str | None:
        """Why node `start`'s output does not reach node `end` alone through `passed` (nearest
        to `end` first), or None."""
        links = [start, *reversed(passed), end]
        for current, following in zip(links, links[1:]):
            output = self.nodes[current].output[0]
            problem = self.sole_consumer_problem(output, following)
            if problem:
                return f"{node_label(self.nodes[current])} output {problem}"
        return None

    def live_consumers(self, name: str) -> list[int]:
        return [i for i in self.consumers.get(name, ()) if i not in self.removed]

    def sole_consumer_problem(self, name: str, expected: int) -> str | None:
        """Why `name` is not read by node `expected` alone, or None."""
        if name in self.graph_outputs:
            return f"{name!r} is also a graph output"
        others = [i for i in self.live_consumers(name) if i != expected]
        if others:
            labels = ", ".join(node_label(self.nodes[i]) for i in others[:3])
            return f"{name!r} also feeds {labels}"
        return None

    def constant(self, name: str, depth: int = 0) -> Constant | str:
        """The constant called `name` (an initializer, a Constant node, or a value computed
        from constants by a small subgraph), or why it is not one."""
        found = self.constants.get(name)
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
        if self.pending is not None and name in self.pending and name in self.initializers:
            return self.pending.values(name)
        if constant.deferred is None or not constant.deferred.holds(constant.tensor):
            return constant.array()
        # A rule reads a weight, its bias and four BN parameters, then its checks read the weight
        # again (range headroom): keep the last six read from the file rather than pread twice;
        # six (one fold's worth), so memory stays bounded by the fold at hand.
        recent = self._recent_reads
        if name not in recent:
            if len(recent) >= 6:
                recent.pop(next(iter(recent)))
            recent[name] = constant.array()
        return recent[name]

    def constant_array(self, name: str) -> np.ndarray | None:
        found = self.constant(name)
        return None if isinstance(found, str) else self._value(name, found)

    def constant_dtype(self, name: str) -> int | None:
        found = self.constant(name)
        return None if isinstance(found, str) else found.tensor.data_type

    def non_constant_reason(self, name: str, role: str) -> str | None:
        found = self.constant(name)
        return f"{role} {name!r} {found}" if isinstance(found, str) else None

    def owns_exclusively(self, name: str, node_index: int) -> bool:
        """True when initializer `name` lives in this graph and only `node_index` reads it, once."""
        if name not in self.initializers or name in self.graph_inputs:
            return False
        if name in self.graph_outputs or name not in self.constants:
            return False
        readers = self.live_consumers(name)
        return readers == [node_index] and list(self.nodes[node_index].input).count(name) == 1

    # ---- edits ---------------------------------------------------------------------------
    def set_constant(
        self, node_index: int, input_slot: int, values: np.ndarray, elem_type: int, hint: str
    ) -> str:
        """Give input `input_slot` of a node the constant `values` (already in its final dtype).

        Edits the initializer in place when the node owns it alone; otherwise (shared,
        outer-scope, Constant node) adds a fresh initializer so other readers keep theirs.
        """
        node = self.nodes[node_index]
        old = node.input[input_slot] if input_slot < len(node.input) else ""
        if old and self.owns_exclusively(old, node_index):
            if self.pending is not None:
                self.pending.put(old, values, elem_type)
            else:
                fill_tensor(self.initializers[old], values, elem_type)
            self.declare_input(old, values.shape, elem_type)
            return old
        tensor = onnx.TensorProto(name=self.names.fresh(f"{hint}_bnfold"))
        fill_tensor(tensor, values, elem_type)
        name = self.add_initializer(tensor, before=node_index)
        while len(node.input) <= input_slot:
            node.input.append("")
        if old:
            self.consumers[old] = [i for i in self.consumers[old] if i != node_index]
        node.input[input_slot] = name
        self.consumers[name].append(node_index)
        return name

    def add_initializer(self, tensor: onnx.TensorProto, before: int = 0) -> str:
        """Append an initializer (its name must come from self.names) and return its name.

        Where initializers cannot be declared (a subgraph below IR 4: an If branch has no
        inputs to list them in), the value becomes a Constant node placed before node `before`.
        """
        if self.constants_as_nodes:
            node = onnx.helper.make_node("Constant", [], [tensor.name], value=tensor)
            self.insert_node_before(before, node)
            return tensor.name
        self.graph.initializer.append(tensor)
        stored = self.graph.initializer[-1]
        self.initializers[stored.name] = stored
        self.constants[stored.name] = Constant(stored, self.graph, True)
        self.declare_input(stored.name, tuple(stored.dims), stored.data_type)
        return stored.name

    def declare_input(self, name: str, shape: tuple[int, ...], elem_type: int) -> None:
        """Below IR 4, list initializer `name` as a graph input with its current type/shape."""
        if not self.initializers_are_inputs:
            return
        declared = onnx.helper.make_tensor_value_info(name, elem_type, list(shape))
        for value in self.graph.input:
            if value.name == name:
                value.CopyFrom(declared)
                return
        self.graph.input.append(declared)

    def set_input(self, node_index: int, input_slot: int, name: str) -> None:
        node = self.nodes[node_index]
        old = node.input[input_slot]
        self.consumers[old] = [i for i in self.consumers[old] if i != node_index]
        node.input[input_slot] = name
        self.consumers[name].append(node_index)

    def bypass(self, remove_index: int, keep_index: int, keep_output_slot: int = 0) -> None:
        """Remove node `remove_index`, letting `keep_index` produce its first output instead.

        `keep_index`'s old output (read by nobody else, checked by the rule) disappears.
        """
        removed = self.nodes[remove_index]
        keeper = self.nodes[keep_index]
        old_name = keeper.output[keep_output_slot]
        new_name = removed.output[0]
        keeper.output[keep_output_slot] = new_name
        self.producer.pop(old_name, None)
        self.producer[new_name] = keep_index
        self.remove_node(remove_index)
        self.drop_value_info(old_name)

    def remove_node(self, index: int) -> None:
        self.removed.add(index)
        for name in self.nodes[index].input:
            if name:
                self.consumers[name] = [i for i in self.consumers[name] if i != index]

    def insert_node_before(self, before_index: int, node: onnx.NodeProto) -> int:
        """Add `node`; commit() places it just before `before_index` (topological order)."""
        self.nodes.append(node)
        index = len(self.nodes) - 1
        self._index_node(index, node)
        self._placement.setdefault(before_index, []).append(index)
        return index

    def drop_value_info(self, name: str) -> None:
        for index, value in enumerate(self.graph.value_info):
            if value.name == name:
                del self.graph.value_info[index]
                return

    def commit(self) -> None:
        """Write the node list back. The view is spent afterwards: build a new one to go on."""
        if self._placement:
            inserted = {i for group in self._placement.values() for i in group}
            order: list[int] = []
            for index in range(len(self.nodes)):
                if index not in inserted:
                    order.extend(self._placement.get(index, ()))
                    order.append(index)
            kept = [self.nodes[i] for i in order if i not in self.removed]
            del self.graph.node[:]
            self.graph.node.extend(kept)  # copies; only lowering inserts nodes
        else:
            # Deleting by index keeps the remaining wrappers valid and copies nothing.
            for index in sorted(self.removed, reverse=True):
                del self.graph.node[index]


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i if attr.type == onnx.AttributeProto.INT else default
    return default
