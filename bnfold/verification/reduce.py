"""The smallest piece of a model that still differs: a reproduction for a bug report.

Once `locate` has named the tensor where the candidate leaves the reference, `--repro DIR` cuts
out of the candidate the node that makes that tensor and feeds the cut with the reference's
own values of the tensors at its edge, so the piece sees exactly what it saw inside the whole
model. It is run where verify ran the candidate. If it agrees there (an engine's fusion needs
the nodes before), the cut moves back one node along every data edge, up to MAX_LEVELS times,
until the piece differs. Polygraphy's `debug reduce` bisects the whole graph against a check
command; here the located tensor says where to start, so a few runs of small models suffice.

The piece's data edges (float tensors) are graph inputs with the static shapes of their values;
its other edges (shapes, indices) are frozen to their values as initializers, with the weights
it reads; its one output is the located tensor. DIR gets `model.onnx`, `inputs.npz` (for
`bnfold verify --inputs`), `test_data_set_0/` in the ONNX backend-test layout (input_N.pb and
output_0.pb, the reference's value: what onnx_test_runner and the engines' own tools read) and
`repro.json` (what differs, by how much, on which engine and versions). The folder is written
whole or not at all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.tensors import names_read_by_subgraphs
from bnfold.verification.comparison import OutputMetrics

MAX_LEVELS = 8  # steps back from the located node: a fusion spans a few nodes, not a network
MAX_TRIM_RUNS = 32  # runs spent cutting nodes off the grown piece's inputs' end


@dataclass
class Piece:
    """Nodes of the candidate (indices, in graph order) and their edges: data fed as inputs,
    other tensors frozen as constants, initializers copied as weights."""

    nodes: list[int]
    inputs: list[str]
    constants: list[str]
    weights: list[str]


def check_repro_folder(folder: str | os.PathLike) -> str:
    """`folder` as given to --repro, refused before any work when it would be overwritten."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise BnfoldError(f"--repro {folder!r} exists and is not an empty folder: name a new one")
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise BnfoldError(f"--repro: folder {parent!r} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise BnfoldError(f"--repro: cannot write to {parent!r}: choose another folder")
    return folder


def reduce_to_piece(model: onnx.ModelProto, tensor: str, values: dict[str, np.ndarray],
                    is_data: Callable[[str], bool],
                    differs: Callable[[bytes, dict], OutputMetrics | None],
                    deferred: DeferredData | None = None
                    ) -> tuple[Piece, bytes, OutputMetrics, int] | tuple[None, None, None, int]:
    """The smallest cut of `model` ending at `tensor` whose run (`differs(piece, feed)`, the
    metrics when it differs, else None) still differs, grown back from the node making it;
    with the runs it took. `values` holds the reference's value of every tensor a cut may be
    fed (graph inputs included); `deferred` the bytes of weights `model` was loaded without
    (a piece reads only its own)."""
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    if tensor not in producers:
        return None, None, None, 0
    weights = {t.name for t in graph.initializer}
    region, runs, last = {producers[tensor]}, 0, None
    for _ in range(MAX_LEVELS + 1):
        piece = _close(graph, region, producers, values, weights, is_data)
        if piece is None or piece.nodes == last:
            break
        last = piece.nodes
        _require(values, [*piece.inputs, *piece.constants, tensor])
        payload = build_piece(model, piece, tensor, values, deferred).SerializeToString()
        runs += 1
        metrics = differs(payload, {name: values[name] for name in piece.inputs})
        if metrics is not None:
            found = piece, payload, metrics, runs
            return _trim(model, tensor, found, producers, weights, values, is_data, differs,
                         deferred)
        grown = {producers[name] for name in piece.inputs if name in producers}
        if grown <= region:
            break
        region |= grown
    return None, None, None, runs


def _require(values, names: list[str]) -> None:
    """Values a piece is about to read, fetched together where they are computed on demand
    (bnfold.verification.marked_values.LazyValues): one reference run, not one each."""
    if hasattr(values, "require"):
        values.require(names)


def _trim(model, tensor, found, producers, weights, values, is_data, differs, deferred):
    """The piece `found` (with its payload, metrics and runs so far) with nodes at its inputs'
    end cut off one at a time (their outputs fed instead) while it still differs: growing back
    by whole levels takes in parallel nodes the difference does not need. At most
    MAX_TRIM_RUNS more runs."""
    graph = model.graph
    piece, payload, metrics, runs = found
    tried: set[int] = set()
    budget = runs + MAX_TRIM_RUNS
    while runs < budget:
        fed = set(piece.inputs) | set(piece.constants) | set(piece.weights)
        front = [i for i in piece.nodes if i not in tried and i != producers[tensor]
                 and all(out in values for out in graph.node[i].output if out)
                 and all(name in fed or not name for name in _reads(graph.node[i]))]
        if not front:
            break
        index = front[0]
        tried.add(index)
        smaller = _close(graph, _live(graph, set(piece.nodes) - {index}, tensor, producers),
                         producers, values, weights, is_data)
        if smaller is None:
            continue
        _require(values, [*smaller.inputs, *smaller.constants])
        trial = build_piece(model, smaller, tensor, values, deferred).SerializeToString()
        runs += 1
        found = differs(trial, {name: values[name] for name in smaller.inputs})
        if found is not None:
            piece, payload, metrics = smaller, trial, found
    return piece, payload, metrics, runs


def _live(graph, region: set[int], tensor: str, producers) -> set[int]:
    """The nodes of `region` that `tensor` is computed from."""
    live, stack = set(), [producers[tensor]]
    while stack:
        index = stack.pop()
        if index in live or index not in region:
            continue
        live.add(index)
        stack.extend(producers[name] for name in _reads(graph.node[index]) if name in producers)
    return live


def _close(graph, region: set[int], producers, values, weights, is_data) -> Piece | None:
    """`region` grown through every edge with no known value, and its edges sorted."""
    while True:
        produced = {out for i in region for out in graph.node[i].output if out}
        edges = list(dict.fromkeys(name for i in sorted(region) for name in _reads(graph.node[i])
                                   if name and name not in produced))
        unknown = [name for name in edges if name not in values and name not in weights]
        if not unknown:
            break
        if any(name not in producers for name in unknown):
            return None  # an edge nothing computes and no value: the cut cannot be fed
        region |= {producers[name] for name in unknown}
    fed = [name for name in edges if name in values]
    return Piece(nodes=sorted(region),
                 inputs=[name for name in fed if is_data(name)],
                 constants=[name for name in fed if not is_data(name)],
                 weights=[name for name in edges if name not in values])


def _reads(node: onnx.NodeProto) -> list[str]:
    return [*node.input, *sorted(names_read_by_subgraphs(node))]


def build_piece(model: onnx.ModelProto, piece: Piece, tensor: str,
                values: dict[str, np.ndarray],
                deferred: DeferredData | None = None) -> onnx.ModelProto:
    """`piece` as a model of its own: static-shaped inputs, frozen constants, `tensor` out;
    its weights read from `deferred` where the model was loaded without them."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer if t.name in piece.weights}
    if deferred is not None:
        for name, weight in initializers.items():
            if deferred.holds(weight):
                initializers[name] = whole = onnx.TensorProto()
                whole.CopyFrom(weight)
                whole.raw_data = deferred.read(name)
    inputs = [_value_info(name, values[name]) for name in piece.inputs]
    constants = [numpy_helper.from_array(values[name], name) for name in piece.constants]
    output = _value_info(tensor, values[tensor]) if tensor in values else \
        onnx.helper.make_empty_tensor_value_info(tensor)
    cut = onnx.helper.make_graph([graph.node[i] for i in piece.nodes], f"{graph.name}_piece",
                                 inputs, [output],
                                 [*(initializers[n] for n in piece.weights), *constants])
    out = onnx.helper.make_model(cut, opset_imports=model.opset_import,
                                 producer_name="bnfold --repro")
    out.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs from IR 4
    used = {node.op_type for node in cut.node}
    out.functions.extend(f for f in model.functions if f.name in used)
    return out


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))


def write_repro(folder: str, payload: bytes, feed: dict[str, np.ndarray], tensor: str,
                expected: np.ndarray, record: dict) -> None:
    """The repro folder, staged beside it and moved into place whole."""
    parent = os.path.dirname(folder)
    staged = tempfile.mkdtemp(prefix=".bnfold-repro-", dir=parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staged, 0o777 & ~mask)  # a folder like any the user makes, not mkdtemp's 0700
        with open(os.path.join(staged, "model.onnx"), "wb") as stream:
            stream.write(payload)
        np.savez(os.path.join(staged, "inputs.npz"), **feed)
        cases = os.path.join(staged, "test_data_set_0")
        os.mkdir(cases)
        for index, (name, value) in enumerate(feed.items()):
            _write_tensor(os.path.join(cases, f"input_{index}.pb"), value, name)
        _write_tensor(os.path.join(cases, "output_0.pb"), expected, tensor)
        with open(os.path.join(staged, "repro.json"), "w", encoding="utf-8") as stream:
            json.dump(record, stream, indent=2, default=str)
            stream.write("\n")
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty: check_repro_folder refused any other
        os.rename(staged, folder)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise BnfoldError(f"cannot write --repro {folder!r}: {exc.strerror or exc}") from None


def _write_tensor(path: str, value: np.ndarray, name: str) -> None:
    with open(path, "wb") as stream:
        stream.write(numpy_helper.from_array(value, name).SerializeToString())


def repro_into(record: dict, probe, candidate, ref_graph: onnx.GraphProto, folder: str,
               where: str) -> None:
    """Cut the piece around `record`'s located tensor, write it to `folder` when it still
    differs where the candidate ran, and say so in `record["repro"]` and its note."""
    from bnfold.verification.locate import data_test
    from bnfold.verification.model_sources import is_path, load_source

    first = record.get("first")
    if not first:
        record["repro"] = {"written": False, "why": "no tensor was located"}
        record["note"] += "; --repro: no tensor was located, so nothing was written"
        return
    tensor, index = first["tensor"], record["input_set"] - 1
    values = probe.values(index)
    want = values[tensor]

    def differs(payload: bytes, feed: dict) -> OutputMetrics | None:
        metrics = probe.differs(tensor, want, payload, feed)
        return None if metrics.ok else metrics

    deferred = None
    if is_path(candidate):  # weights left in the file: a piece reads a few of them
        from bnfold.onnxio.files import load_model_deferred

        model, deferred, _ = load_model_deferred(candidate)
    else:
        model = load_source(candidate)[0]
    try:
        piece, payload, metrics, runs = reduce_to_piece(
            model, tensor, values, data_test(ref_graph, probe.types), differs, deferred)
    except BnfoldError as exc:
        record["repro"] = {"written": False, "why": str(exc)}
        record["note"] += f"; --repro: a piece could not be run on {where} ({exc})"
        return
    finally:
        if deferred is not None:
            deferred.close()
    if piece is None:
        why = (f"no piece of up to {MAX_LEVELS} steps back from {tensor!r} differs on "
               f"{where} ({runs} runs): the difference needs more of the model")
        record["repro"] = {"written": False, "why": why, "runs": runs}
        record["note"] += f"; --repro: {why}, so nothing was written"
        return
    feed = {name: values[name] for name in piece.inputs}
    ops = [model.graph.node[i].op_type for i in piece.nodes]
    info = {
        "written": True, "folder": folder, "tensor": tensor, "nodes": len(ops),
        "op_types": ops, "inputs": {n: list(v.shape) for n, v in feed.items()},
        "on": where, "metrics": asdict(metrics), "runs": runs,
    }
    if probe.on_engine:
        info["onnxruntime"] = asdict(probe.differs(tensor, want, payload, feed, on_engine=False))
        info["environment"] = _environment(probe)
    # The folder is a test case: verify judges the piece against the stored reference value,
    # with the very bound it failed here (atol + rtol·max|reference|, as one number).
    info["command"] = (f"bnfold verify {shlex.quote(os.path.relpath(folder))}"
                       + (f" --engine {where}" if probe.on_engine else "")
                       + f" --atol {metrics.tolerance!r} --rtol 0")
    write_repro(folder, payload, feed, tensor, want, info)
    record["repro"] = info
    shown = ", ".join(ops[:6]) + (" …" if len(ops) > 6 else "")
    in_ort = (f"; in ONNX Runtime {_how_far(info['onnxruntime'])}" if "onnxruntime" in info
              else "")
    record["note"] += (f"; --repro: {len(ops)} node(s) ({shown}) ending at {tensor!r} still "
                       f"differ on {where} ({_how_far(info['metrics'])}{in_ort}), written to "
                       f"{folder}; rerun: {info['command']}")


def _how_far(metrics: dict) -> str:
    if metrics["ok"]:
        return f"agrees, {metrics['max_rel_error']:.3g} scale-relative"
    from bnfold.verification.locate import how_far

    return how_far(metrics)


def _environment(probe) -> dict:
    try:
        return probe.environment()
    except Exception as exc:  # an engine that cannot describe itself still has a repro
        return {"error": str(exc)}
