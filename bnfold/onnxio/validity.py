"""What bnfold writes must pass onnx.checker: one safe repair, otherwise a one-line refusal.

ONNX Runtime runs some models onnx.checker rejects (nodes out of topological order, duplicated
outputs, IR version 1/2, a Constant with an input). bnfold never writes such a model silently:
node order is repaired (a stable topological sort, which changes no result) and reported; anything
else the checker finds is refused with its message, before a byte is written.
"""

from __future__ import annotations

import heapq
import re

import onnx

from bnfold.errors import BnfoldError
from bnfold.onnxio.deferred import DEFER_MIN_BYTES
from bnfold.onnxio.external import tensor_nbytes
from bnfold.onnxio.nodes import NodeTable
from bnfold.onnxio.tensors import all_graphs


def sort_nodes_topologically(model: onnx.ModelProto, main: NodeTable | None = None) -> int:
    """Reorder each graph's nodes (subgraphs included) so every node follows its producers,
    keeping the original order otherwise. Returns how many graphs were reordered; a graph with
    a cycle or a name produced twice is left as it is (the checker refuses it later). `main`
    is the main graph's node table when the caller has one (it is stale after a reorder)."""
    reordered = 0
    for graph in all_graphs(model.graph):
        table = main if main is not None and graph is model.graph else NodeTable(graph)
        order = topological_order(table)
        if order is None:
            continue
        nodes = [table.nodes[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
        reordered += 1
    return reordered


def topological_order(table: NodeTable) -> list[int] | None:
    """A stable topological order of the table's nodes; None when they are in one already, or
    when there is none (a cycle, a name produced twice)."""
    producer: dict[str, int] = {}
    for index, outputs in enumerate(table.outputs):
        for name in outputs:
            if name:
                if name in producer:
                    return None
                producer[name] = index
    get = producer.get
    if all(get(name, -1) < index for index, inputs in enumerate(table.inputs) for name in inputs
           ) and all(get(name, -1) < index for index, names in table.implicit.items()
                     for name in names):
        return None  # the usual case, checked without building the wait lists
    waits_on: list[set[int]] = []
    for index in range(len(table)):
        waits_on.append({producer[n] for n in table.reads(index) if n in producer} - {index})
    readers: dict[int, list[int]] = {}
    for index, before in enumerate(waits_on):
        for other in before:
            readers.setdefault(other, []).append(index)
    missing = [len(before) for before in waits_on]
    # Stable: always take the earliest ready node, so an ordered graph keeps its order.
    ready = [i for i, count in enumerate(missing) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, ()):
            missing[reader] -= 1
            if missing[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(table) or order == list(range(len(table))):
        return None
    return order


def check_before_write(model: onnx.ModelProto, overrides=None, deferred=None) -> None:
    """Raise a one-line BnfoldError when the model to be written (with `overrides`' new values
    and `deferred`'s bytes, see bnfold.onnxio.files.save_model) fails onnx.checker.

    The check runs on a skeleton whose large initializers are one-element stand-ins (their
    sizes are checked here instead), so it costs the graph, not the weights."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    # Stand-ins for the tensors whose bytes are elsewhere (deferred) or replaced (overrides:
    # the writer writes raw data only, so an original holding typed data too must not count).
    held = deferred.names() if deferred is not None else set()
    replaced = overrides.names() if overrides else set()
    initializers = skeleton.graph.initializer
    swapped = held | replaced
    positions = [i for i, t in enumerate(initializers) if t.name in swapped] if swapped else []
    for index in positions:
        tensor = initializers[index]
        override = overrides.get(tensor.name) if tensor.name in replaced else None
        if override is not None:
            tensor.data_type = override[1]
        elif deferred is not None and deferred.holds(tensor):
            _check_data_size(tensor, deferred.nbytes(tensor.name))
        else:
            continue
        _make_stand_in(tensor)
    _run_checker(skeleton)


def check_serialized(model: onnx.ModelProto, data: bytes, overrides=None) -> None:
    """check_before_write for `model` already serialised whole (serialize_whole) into `data`.

    onnx.checker does not always compare raw_data with the dims (1.18's does not);
    check_before_write does for every tensor a large model's loader defers (DEFER_MIN_BYTES
    and up): so here too."""
    replaced = overrides.names() if overrides else set()
    for tensor in model.graph.initializer:
        if tensor.ByteSize() >= DEFER_MIN_BYTES and tensor.name not in replaced and (
                tensor.HasField("raw_data")):
            _check_data_size(tensor, len(tensor.raw_data))
    _run_checker(data)


def _check_data_size(tensor: onnx.TensorProto, held: int) -> None:
    """Refuse a tensor whose `held` bytes of data are fewer than its dims and type need."""
    needed = tensor_nbytes(tensor)
    if needed is not None and held < needed:
        _refuse(f"initializer {tensor.name!r} holds {held} bytes but its dims "
                f"{list(tensor.dims)} need {needed}")


def _run_checker(model: onnx.ModelProto | bytes) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        _refuse(str(exc))


def _make_stand_in(tensor: onnx.TensorProto) -> None:
    name, data_type = tensor.name, tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.raw_data = b"\0" * (tensor_nbytes(tensor) or 1)


def _refuse(message: str) -> None:
    text = re.sub(r"\s+", " ", message).strip()
    if len(text) > 300:
        text = text[:297] + "..."
    raise BnfoldError(
        f"the model to be written fails onnx.checker ({text}); nothing was written: fix the "
        f"input model (onnx.checker.check_model shows the problem) or re-export it"
    )
