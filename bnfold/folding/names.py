"""Names: a node's label for reports, and fresh tensor names unique across a model."""

from __future__ import annotations

from itertools import chain

import onnx

from bnfold.onnxio.nodes import NodeTable
from bnfold.onnxio.tensors import subgraphs


def node_label(node: onnx.NodeProto) -> str:
    """A name for reports: the node's own, else op type and first output."""
    if node.name:
        return node.name
    return f"{node.op_type}({node.output[0] if node.output else '?'})"


class NameAllocator:
    """Fresh tensor names, unique across the whole model (subgraphs may not shadow)."""

    def __init__(self, model: onnx.ModelProto, main: NodeTable | None = None):
        self._used: set[str] = set()
        self._collect(model.graph, main)

    def _collect(self, graph: onnx.GraphProto, table: NodeTable | None = None) -> None:
        table = table if table is not None else NodeTable(graph)
        used = self._used
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.input)
        used.update(v.name for v in graph.output)
        used.update(v.name for v in graph.value_info)
        used.update(s.values.name for s in graph.sparse_initializer)
        used.update(chain.from_iterable(table.inputs))
        used.update(chain.from_iterable(table.outputs))
        for index in table.implicit:
            for _, sub in subgraphs(table.nodes[index]):
                self._collect(sub)

    def fresh(self, base: str) -> str:
        candidate, index = base, 0
        while candidate in self._used:
            index += 1
            candidate = f"{base}_{index}"
        self._used.add(candidate)
        return candidate
