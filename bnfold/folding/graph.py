"""The view of one ONNX graph that a fold rule needs: producers, consumers, constants, names
(the constant queries are in bnfold.folding.lookups, which GraphView takes them from).

The view edits the GraphProto in place and keeps its maps current, so rules can be applied one
after another in a single pass. Node removal is deferred to `commit()` (one rebuild instead of
an O(n) delete per fold). Names used inside subgraphs count as uses by the node that owns the
subgraph, so a tensor read in an If branch is never treated as unused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from bnfold.folding.constants import EVALUATED_OPS, ConstantSubgraphs
from bnfold.folding.lookups import ConstantLookups
from bnfold.folding.names import NameAllocator, node_label  # noqa: F401  (re-exported)
from bnfold.folding.tensors import (  # noqa: F401  (fill_tensor, PendingTensors: re-exported)
    Constant,
    PendingTensors,
    constant_node_tensor,
    fill_tensor,
)
from bnfold.folding.types import TypeTable  # noqa: F401  (re-exported)
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.nodes import NodeTable
from bnfold.onnxio.tensors import delete_named, names_read_by_subgraphs, subgraphs  # noqa: F401

_SHAPE_OPS = ("Shape", "Size")  # read a tensor's shape, not its values


class GraphView(ConstantLookups):
    """Producers, consumers and constants of one graph, kept current while rules edit it."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        names: NameAllocator,
        types: TypeTable,
        outer: GraphView | None = None,
        path: str = "main",
        pending: PendingTensors | None = None,
        opset: int = 17,
        deferred: DeferredData | None = None,
        computed: ConstantSubgraphs | None = None,
        initializers_are_inputs: bool = False,
        constants_as_nodes: bool = False,
        table: NodeTable | None = None,
    ):
        self.graph = graph
        self.opset = opset  # the model's default-domain opset: op semantics differ by version
        self.names = names
        self.types = types
        # New values of this graph's own initializers, written by save_model without copying
        # them into the protobuf first (None: edit the tensors right away).
        self.pending = pending
        self.path = path
        table = table if table is not None else NodeTable(graph)
        # The nodes as they were when the view was built, for what runs before any edit (the
        # arity check, the batched pass); the engine drops it afterwards.
        self.table: NodeTable | None = table
        self.nodes: list[onnx.NodeProto] = list(table.nodes)
        self.op_types: list[str] = list(table.op_types)  # kept in step with self.nodes
        self.subgraph_nodes: list[int] = list(table.implicit)  # nodes that hold subgraphs
        self.removed: set[int] = set()
        self._placement: dict[int, list[int]] = {}  # node index -> nodes inserted before it
        self.producer: dict[str, int] = {}
        # name -> the nodes reading it, once per input slot (and once for a node whose
        # subgraphs read it). Removed nodes stay listed (removing one is O(1), even from a
        # tensor shared by 16k BNs); live_consumers skips them.
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
        self._dropped_value_info: set[str] = set()
        self.altered: set[str] = set()  # see alter()
        self._dropped_initializers: set[str] = set()
        # The enclosing graph's view (for a subgraph): its constants are visible here unless a
        # local input of the same name shadows them.
        self.outer = outer
        self.deferred = deferred
        # Constants found so far: Constant nodes, computed values, and initializers once asked
        # for (a graph of 80k initializers need not wrap each one up front).
        self.constants: dict[str, Constant] = {}
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        consumers, producer, implicit = self.consumers, self.producer, table.implicit
        for index, (inputs, outputs) in enumerate(zip(table.inputs, table.outputs)):
            for name in inputs:
                if name:
                    consumers[name].append(index)
            if index in implicit:
                for name in implicit[index]:
                    consumers[name].append(index)
            for name in outputs:
                if name:
                    producer[name] = index
        for index, op_type in enumerate(table.op_types):
            if op_type == "Constant":
                self._index_constant_node(index, self.nodes[index])

    def _index_node(self, index: int, node: onnx.NodeProto) -> None:
        """Index a node added after the view was built."""
        self.op_types.append(node.op_type)
        for name in node.input:
            if name:
                self._add_reader(name, index)
        implicit = names_read_by_subgraphs(node)
        if implicit:
            self.subgraph_nodes.append(index)
        for name in implicit:
            self._add_reader(name, index)
        for name in node.output:
            if name:
                self.producer[name] = index
        if node.op_type == "Constant":
            self._index_constant_node(index, node)

    def _index_constant_node(self, index: int, node: onnx.NodeProto) -> None:
        if node.domain in ("", "ai.onnx") and node.output:
            tensor = constant_node_tensor(node)
            if tensor is not None:
                self.constants[node.output[0]] = Constant(tensor, self.graph, False)

    # ---- queries -------------------------------------------------------------------------
    def live_nodes(self, op_type: str | None = None) -> Iterator[tuple[int, onnx.NodeProto]]:
        if op_type is None:
            yield from self.live_nodes_of(None)
        else:
            yield from self.live_nodes_of((op_type,))

    def live_nodes_of(
        self, op_types: tuple[str, ...] | None
    ) -> Iterator[tuple[int, onnx.NodeProto]]:
        """(index, node) of the nodes not removed, of `op_types` (None: all), in order."""
        removed, nodes = self.removed, self.nodes
        for index, op_type in enumerate(self.op_types):
            if index not in removed and (op_types is None or op_type in op_types):
                yield index, nodes[index]

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
        """The nodes reading `name` that are not removed, once per slot."""
        removed = self.removed
        return [i for i in self.consumers.get(name, ()) if i not in removed]

    def sole_consumer_problem(self, name: str, expected: int, shape_readers: bool = False
                              ) -> str | None:
        """Why `name` is not read by node `expected` alone, or None. With `shape_readers`,
        Shape and Size nodes may read it too (a fold that keeps its shape leaves them as they
        are)."""
        if name in self.graph_outputs:
            return f"{name!r} is also a graph output"
        others = [i for i in self.live_consumers(name) if i != expected and not (
            shape_readers and self.op_types[i] in _SHAPE_OPS
            and self.nodes[i].domain in ("", "ai.onnx"))]
        if others:
            labels = ", ".join(node_label(self.nodes[i]) for i in others[:3])
            return f"{name!r} also feeds {labels}"
        return None

    def owns_exclusively(self, name: str, node_index: int) -> bool:
        """True when initializer `name` lives in this graph and only `node_index` reads it, once."""
        if name not in self.initializers or name in self.graph_inputs:
            return False
        if name in self.graph_outputs:
            return False
        # consumers lists a node once per input slot: one live entry means "read once". The
        # scan runs from the newest entries (folds remove readers in node order, from the
        # front) and stops at a second live reader: a tensor shared by thousands costs O(1).
        found = 0
        removed = self.removed
        for reader in reversed(self.consumers.get(name, ())):
            if reader not in removed:
                if reader != node_index or found:
                    return False
                found = 1
        return found == 1

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
        fields = dict(name=self.names.fresh(f"{hint}_bnfold"), dims=values.shape,
                      data_type=elem_type,  # as fill_tensor, on a new tensor
                      raw_data=np.ascontiguousarray(values).tobytes())
        if self.constants_as_nodes:
            name = self.add_initializer(onnx.TensorProto(**fields), before=node_index)
        else:  # add_initializer, building the tensor in place rather than copying one in
            stored = self.graph.initializer.add(**fields)
            name = stored.name
            self.initializers[name] = stored
            self.declare_input(name, values.shape, elem_type)
        while len(node.input) <= input_slot:
            node.input.append("")
        if old:
            self._forget_reader(old, node_index)
        node.input[input_slot] = name
        self._add_reader(name, node_index)
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
        self.initializers[stored.name] = stored  # visible_constant wraps it when asked
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

    def set_op_type(self, node_index: int, op_type: str) -> None:
        self.nodes[node_index].op_type = op_type
        self.op_types[node_index] = op_type

    def set_input(self, node_index: int, input_slot: int, name: str) -> None:
        node = self.nodes[node_index]
        old = node.input[input_slot]
        self._forget_reader(old, node_index)
        node.input[input_slot] = name
        self._add_reader(name, node_index)

    def _add_reader(self, name: str, node_index: int) -> None:
        self.consumers[name].append(node_index)

    def _forget_reader(self, name: str, node_index: int) -> None:
        """One input slot of `node_index` stops reading `name`; a node that reads `name` in
        another slot too (MatMul(W, W)) still counts as a reader."""
        readers = self.consumers.get(name)
        if readers and node_index in readers:
            readers.remove(node_index)

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
        self.removed.add(index)  # its reader entries stay; live_consumers skips them

    def insert_node_before(self, before_index: int, node: onnx.NodeProto) -> int:
        """Add `node`; commit() places it just before `before_index` (topological order)."""
        self.nodes.append(node)
        index = len(self.nodes) - 1
        self._index_node(index, node)
        self._placement.setdefault(before_index, []).append(index)
        return index

    def alter(self, name: str) -> None:
        """Record that tensor `name` keeps its name but, by design, not its value (a Conv that
        took a BN's scale as one input of a sum): it is no longer a fold site to compare."""
        self.altered.add(name)

    def drop_value_info(self, name: str) -> None:
        """Forget the declared type of `name` (gone from the graph) at commit: one walk of the
        value infos for all folds, not one per fold."""
        self._dropped_value_info.add(name)

    def drop_unused(self, names: Iterable[str]) -> list[str]:
        """Remove this graph's initializers, Constant nodes and constant-subgraph nodes among
        `names` that nothing reads any more, and transitively what those nodes read. Returns the
        names that belong to an enclosing graph, for its view to judge.

        A graph input is never removed; below IR 4 a main-graph initializer is only declared as
        one, and its declaration goes with it."""
        outer: list[str] = []
        # Each name once (a shared BN parameter is named by every BN that read it); a name comes
        # back when a node that read it goes: it may be free now.
        work = list(dict.fromkeys(names))
        while work:
            name = work.pop()
            if not name:
                continue
            if self.live_consumers(name) or name in self.graph_outputs:
                continue
            if name in self.initializers:
                if name not in self.graph_inputs:
                    self._dropped_initializers.add(name)
                continue
            index = self.producer.get(name)
            if index is None:
                if name not in self.graph_inputs:
                    outer.append(name)
                continue
            if index in self.removed or not self._is_constant_op(index):
                continue
            outputs = [n for n in self.nodes[index].output if n]
            if any(self.live_consumers(n) or n in self.graph_outputs for n in outputs):
                continue
            self.remove_node(index)
            work.extend(self.nodes[index].input)
        return list(dict.fromkeys(outer))

    def _is_constant_op(self, index: int) -> bool:
        node = self.nodes[index]
        if node.domain not in ("", "ai.onnx") or index in self.subgraph_nodes:
            return False
        return node.op_type == "Constant" or node.op_type in EVALUATED_OPS

    def commit(self) -> None:
        """Write the node list back, and drop what drop_value_info / drop_unused marked. The
        view is spent afterwards: build a new one to go on."""
        delete_named(self.graph.value_info, self._dropped_value_info)
        delete_named(self.graph.initializer, self._dropped_initializers)
        if self.initializers_are_inputs:
            delete_named(self.graph.input, self._dropped_initializers)
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
