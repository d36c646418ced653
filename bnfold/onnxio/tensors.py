"""Walking a model: every graph (subgraphs included) and every tensor (everything that can
point at external data)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


# Standard ops whose schema has a graph attribute, or a tensor one (onnx.defs, every version).
GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_HOLDING_OPS = GRAPH_OPS | {"Constant", "ConstantOfShape"}


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph in it, depth first (standard ops without a graph attribute
    in their schema are not looked into: such an attribute fails onnx.checker)."""
    yield graph
    for node in graph.node:
        if node.op_type not in GRAPH_OPS and node.domain in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def iter_tensors(model: onnx.ModelProto, *, schema_only: bool = False
                 ) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers (sparse ones too), tensor attributes,
    subgraphs and functions included — everything that can point at external data.

    `schema_only` skips the attributes of standard-domain nodes whose op has no tensor or
    graph attribute in its schema (all but Constant, ConstantOfShape, If, Loop, Scan,
    SequenceMap): such an attribute fails onnx.checker, so counting and estimating sizes can
    skip reading every Conv's attributes. Anything security-related walks them all."""
    yield from model.graph.initializer
    yield from iter_other_tensors(model, schema_only=schema_only)


def iter_tensors_by_scope(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """iter_tensors as (tensor, True for a main-graph dense initializer): the only tensors
    whose bytes may be deferred or replaced by a fold."""
    for tensor in model.graph.initializer:
        yield tensor, True
    for tensor in iter_other_tensors(model):
        yield tensor, False


def iter_other_tensors(model: onnx.ModelProto, *, schema_only: bool = False
                       ) -> Iterator[onnx.TensorProto]:
    """iter_tensors without the main graph's dense initializers."""
    yield from _graph_tensors(model.graph, initializers=False, schema_only=schema_only)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, schema_only)





def _graph_tensors(graph: onnx.GraphProto, initializers: bool = True, schema_only: bool = False
                   ) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    nodes = graph.node
    if schema_only:  # one comprehension, not a generator step per node: 48k nodes cost 30 ms
        nodes = [node for node in nodes
                 if node.op_type in _HOLDING_OPS or node.domain not in ("", "ai.onnx")]
    for node in nodes:
        yield from _node_tensors(node, schema_only)


def _node_tensors(node: onnx.NodeProto, schema_only: bool = False
                  ) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g, schema_only=schema_only)
        for graph in attr.graphs:
            yield from _graph_tensors(graph, schema_only=schema_only)


SUBGRAPH_ATTRIBUTE_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for each subgraph of `node` (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for index, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{index}]", graph


def names_read_by_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that `node`'s subgraphs read (recursively), i.e. its implicit inputs."""
    used: set[str] = set()
    for _, graph in subgraphs(node):
        defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        for inner in graph.node:
            defined.update(inner.output)
        for inner in graph.node:
            used.update(name for name in inner.input if name)
            used.update(names_read_by_subgraphs(inner))
        used.update(v.name for v in graph.output)
        used -= defined
    return used


def delete_named(container, names: set[str]) -> None:
    """Delete the entries of a repeated field whose `name` is in `names`: one walk, then one
    slice deletion per run of neighbours (a BN's four parameters usually sit together), last
    run first. Deleting in place keeps the other entries' wrappers valid and copies nothing."""
    if not names:
        return
    doomed = [i for i, entry in enumerate(container) if entry.name in names]
    runs: list[list[int]] = []
    for index in doomed:
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    for start, end in reversed(runs):
        del container[start:end]
