"""The nodes of one graph read once into plain Python lists: op types, inputs, outputs, and the
outer names each node's subgraphs read.

Reading a field of a protobuf node from Python costs about a microsecond, more than protobuf's
own parser spends on the whole node: a 48k-node graph walked field by field by each analysis in
turn (topological order, names in use, producers and consumers) costs several times its load.
Every such analysis reads this table instead, built in one pass.
"""

from __future__ import annotations

from itertools import chain

import onnx

from bnfold.errors import BnfoldError
from bnfold.onnxio.tensors import GRAPH_OPS, names_read_by_subgraphs

DEFAULT_DOMAINS = ("", "ai.onnx")
# The standard ops that hold subgraphs: only these (and ops of other domains) have their
# attributes read (see bnfold.onnxio.tensors.all_graphs).
SUBGRAPH_OPS = GRAPH_OPS


class NodeTable:
    """`graph`'s nodes as parallel lists, index for index."""

    def __init__(self, graph: onnx.GraphProto):
        nodes = list(graph.node)
        self.nodes: list[onnx.NodeProto] = nodes
        self.op_types: list[str] = [n.op_type for n in nodes]
        self.domains: list[str] = [n.domain for n in nodes]
        self.inputs: list[tuple[str, ...]] = [tuple(n.input) for n in nodes]
        self.outputs: list[tuple[str, ...]] = [tuple(n.output) for n in nodes]
        # protobuf hands a name that is not valid UTF-8 back as bytes: refuse it here, once
        # (loading leaves the nodes' names to this table, see load_model_deferred).
        labels = [n.name for n in nodes]
        bad = next((name for name in chain(self.op_types, self.domains, labels,
                                           chain.from_iterable(self.inputs),
                                           chain.from_iterable(self.outputs))
                    if type(name) is not str), None)
        if bad is not None:
            raise BnfoldError(
                f"the model holds a name that is not valid UTF-8 ({bad[:40]!r}): re-export it")
        # node index -> outer-scope names its subgraphs read (only nodes that have subgraphs)
        self.implicit: dict[int, set[str]] = {}
        for index, (op_type, domain) in enumerate(zip(self.op_types, self.domains)):
            if op_type in SUBGRAPH_OPS or domain not in DEFAULT_DOMAINS:
                node = nodes[index]
                if any(a.type in _GRAPH_TYPES for a in node.attribute):
                    self.implicit[index] = names_read_by_subgraphs(node)

    def __len__(self) -> int:
        return len(self.nodes)

    def reads(self, index: int) -> set[str]:
        """Every name node `index` reads: its inputs and what its subgraphs read."""
        names = {n for n in self.inputs[index] if n}
        return names | self.implicit[index] if index in self.implicit else names


_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def node_names(node: onnx.NodeProto) -> tuple:
    """Every name a node holds: op type, domain, its own name, inputs and outputs."""
    return (node.op_type, node.domain, node.name, *node.input, *node.output)
