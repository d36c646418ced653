"""Where two models part: the first tensor, in the reference's node order, that differs.

A failed verification says that an output differs, not where the difference starts. `locate`
marks tensors that both main graphs produce as extra outputs (a fold keeps the name of the
tensor it replaces, so the tensors around a fold keep theirs), runs both models on the same
input set (the reference in ONNX Runtime with optimisation off, the candidate where verify ran
it) and compares each marked tensor with the outputs' own tolerance.

1. Every shared tensor marked at once: the first one over its tolerance names the node where
   the difference begins (Polygraphy's `--onnx-outputs mark all`, by hand). ORT with
   optimisation off fuses nothing, so without an engine this always answers.
2. On an engine, marking a tensor stops fusion across it, and a difference that comes from a
   fusion vanishes once everything is marked. Then one tensor at a time is marked: a bisection
   of the tensors every value of the failing output flows through (its dominators,
   bnfold.verification.data_path), then a walk back from the first that differs through the
   inputs that differ, to a node whose inputs agree. That node is run again with its inputs
   marked too: if it still differs, the engine computes that node differently; if it then
   agrees, a fusion that ends there does.

Inner tensors are judged by the fixed tolerance alone (ORT's optimised run has no inner tensors
to measure the model's own noise against), so the record lists each differing tensor's relative
error: the jump from rounding size to the error's size shows where the cause is. Tensors are
marked a group at a time when all of them would not fit in GROUP_BYTES
(bnfold.verification.marked_values); on an engine a group leaves the rest free to fuse, so step
1 may then name a tensor that fusion across the group's edge made differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.precision import FLOAT_TYPES
from bnfold.verification import marked_values
from bnfold.verification.comparison import OutputMetrics, compare
from bnfold.verification.data_path import data_inputs, dominator_chain
from bnfold.verification.marked_values import LazyValues, ReferenceValues, plan_groups
from bnfold.verification.model_sources import (
    load_source,
    scratch_beside,
    scratch_folder,
    with_outputs,
)

LISTED = 20  # differing tensors the record lists after the first, in node order
MAX_PROBES = 64  # engine compilations the bisection may take (log2 of the ancestors, +3)


def locate_divergence(reference, candidate, feeds: list[dict], runner, atol, rtol,
                      precision: str | None, backend=None, failing: list[str] = (),
                      repro: str | None = None) -> dict:
    """Where `candidate` (run in ORT with optimisation off, or opened by engine `backend`)
    leaves `reference`, as a JSON-able record with a one-line `note`. `failing` names the
    outputs that failed verification (bisected from, when marking everything hides the
    difference). `repro` is a folder for the smallest piece of the candidate that still
    differs there (bnfold.verification.reduce), when a tensor is located."""
    ref_model = load_source(reference)[0]
    ref_graph = ref_model.graph
    cand_graph = (candidate if isinstance(candidate, onnx.ModelProto)
                  else load_source(candidate)[0]).graph
    names = shared_tensors(ref_graph, cand_graph)
    where = backend.name if backend is not None else "ONNX Runtime"
    if not names:
        return _record("", f"the models share no tensor name: nothing to compare inside them "
                           f"on {where}")
    try:
        with _Prober(reference, candidate, feeds, runner, backend, names,
                     (atol, rtol, precision), ref_model) as probe:
            record = _locate(probe, ref_graph, cand_graph, failing, where)
            if repro is not None:
                from bnfold.verification.reduce import repro_into

                repro_into(record, probe, candidate, ref_graph, repro, where)
            return record
    except BnfoldError as exc:
        return _record("", f"could not mark the models' tensors as outputs on {where}: {exc}",
                       error=str(exc))


def shared_tensors(ref_graph: onnx.GraphProto, cand_graph: onnx.GraphProto) -> list[str]:
    """Tensors that nodes of both main graphs produce, in the reference's node order."""
    produced = {out for node in cand_graph.node for out in node.output if out}
    inputs = {value.name for value in ref_graph.input}
    names = [out for node in ref_graph.node for out in node.output
             if out and out in produced and out not in inputs]
    return list(dict.fromkeys(names))


class _Prober:
    """The reference's values of the shared tensors (bnfold.verification.marked_values: a
    group of them per ORT run, kept while they fit), and the candidate run with chosen tensors
    marked, compared with them."""

    def __init__(self, reference, candidate, feeds, runner, backend, names, tolerance,
                 ref_model: onnx.ModelProto):
        self._reference, self._candidate, self._ref_model = reference, candidate, ref_model
        self._feeds, self._runner, self._backend = feeds, runner, backend
        self.names, self._tolerance = names, tolerance
        self.probes = 0  # candidate runs (each an engine compilation)
        self.on_engine = backend is not None
        self.types: dict[str, int] = {}  # element types of the tensors seen so far

    def __enter__(self) -> _Prober:
        self._folder = scratch_folder(".bnfold-locate-", scratch_beside(self._candidate))
        try:
            self.reference = ReferenceValues(self._reference, self._feeds, self._runner,
                                             self._folder.name)
            biggest = max(self._feeds, key=lambda feed: sum(v.nbytes for v in feed.values()))
            self.groups = plan_groups(self._ref_model, biggest, self.names)
        except BaseException:
            self._folder.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._folder.cleanup()

    @property
    def input_sets(self) -> int:
        return len(self._feeds)

    def expected(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        """The reference's values of `names` (those that are tensors) on input set `index`."""
        values = self.reference.get(index, names)
        self.types.update((n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
                          for n, v in values.items() if n not in self.types)
        return values

    def keep_tensors(self) -> None:
        """Drop the names whose values are not tensors (sequences), once all were seen."""
        self.names = [n for n in self.names if n in self.types]

    def __call__(self, names: list[str], index: int) -> dict[str, OutputMetrics]:
        """The candidate with `names` marked, run on feed `index`, each compared."""
        want = self.expected(index, names)
        self.probes += 1
        marked = with_outputs(self._candidate, names,
                               os.path.join(self._folder.name, f"candidate{self.probes}.onnx"),
                               self.types)
        worst: dict[str, OutputMetrics] = {}
        try:
            for got in self._run(marked, self._feeds[index]):
                for name in names:
                    if name in got and name in want:
                        _keep_worse(worst, compare(name, want[name], got[name],
                                                   *self._tolerance))
                del got  # one run's tensors at a time
        finally:
            if isinstance(marked, str):
                os.unlink(marked)
        return worst

    def environment(self) -> dict:
        return self._backend.environment() if self._backend is not None else {}

    def values(self, index: int) -> LazyValues:
        """Input set `index` and the reference's value of every shared tensor on it, each
        computed when read."""
        return LazyValues(self._feeds[index], self.names, self.reference, index)

    def differs(self, name: str, want: np.ndarray, model: bytes, feed: dict,
                on_engine: bool = True) -> OutputMetrics:
        """How `model`'s output `name` compares with `want` (the worse of the engine's two
        runs), run where the candidate runs or, with `on_engine` False, in ORT."""
        runs = (self._run(model, feed, "the piece") if on_engine else
                [_tensors(self._runner.run(self._runner.session(model, "the piece"), feed,
                                           "the piece"))])
        worst: dict[str, OutputMetrics] = {}
        for got in runs:
            _keep_worse(worst, compare(name, want, got[name], *self._tolerance))
        return worst[name]

    def _run(self, marked, feed: dict, label: str = "the candidate (tensors marked)"
             ) -> Iterator[dict[str, np.ndarray]]:
        """The candidate's tensors: one ORT run, or two engine runs (an engine that is not
        repeatable may get a fused kernel right once; either run differing counts), one at a
        time."""
        if self._backend is None:
            session = self._runner.session(marked, label)
            yield _tensors(self._runner.run(session, feed, label))
            return
        opened = self._backend.open(label, marked, feed)
        try:
            for _ in range(2):
                yield _tensors(opened.outputs(feed))
        finally:
            opened.close()


def _keep_worse(worst: dict[str, OutputMetrics], metrics: OutputMetrics) -> None:
    held = worst.get(metrics.name)
    if held is None or (held.ok, -held.max_rel_error) > (metrics.ok, -metrics.max_rel_error):
        worst[metrics.name] = metrics


def _locate(probe: _Prober, ref_graph, cand_graph, failing, where: str) -> dict:
    outputs = {value.name for value in ref_graph.output}
    method = "every shared tensor marked"
    if len(probe.groups) > 1:
        method += (f", in {len(probe.groups)} runs of up to "
                   f"{marked_values.GROUP_BYTES / 2**20:.3g} MiB of tensors each")
    for index in range(probe.input_sets):
        compared = [m for group in probe.groups for m in probe(group, index).values()]
        probe.keep_tensors()
        differing = [m for m in compared if not m.ok]
        if any(m.name in outputs for m in differing) or (differing and not probe.on_engine):
            record = _record(method, "", differing, index)
            record["compared"] = len(compared)
            by_name = {m.name: m for m in compared}
            # the first that feeds a failing output (an unused Dropout mask may differ first)
            feeding = _ancestors(failing, _producers(ref_graph))
            first = next((m for m in differing if m.name in feeding), differing[0])
            record["first"] = _describe(first, ref_graph, cand_graph, by_name)
            after = differing[differing.index(first):]
            record["listed"] = [asdict(m) for m in after[:LISTED + 1]]
            record["note"] = _first_note(record["first"], len(differing), len(compared),
                                         index, where)
            return record
    if not probe.on_engine:
        return _record(method,
                       f"with every shared tensor marked as an output, all agree on {where}: "
                       f"the difference is in no tensor both models compute")
    return _bisect(probe, ref_graph, cand_graph, failing, where)


def _bisect(probe: _Prober, ref_graph, cand_graph, failing, where: str) -> dict:
    """One tensor marked at a time: bisect the failing output's dominators, then walk back
    from the first that differs through the inputs that differ (bnfold.verification.data_path);
    the node reached is rerun with its inputs marked, to tell a node from a fusion."""
    method = "one tensor marked at a time"
    hidden = (f"with every shared tensor marked as an output the outputs agree on {where} "
              f"(marking stops fusion)")
    start = _failing_output(probe, failing)
    if start is None:
        return _record(method, f"{hidden}, and with nothing marked no failing output differs "
                               f"again: the difference did not repeat")
    output, index, metrics = start
    producers = _producers(ref_graph)
    is_data = data_test(ref_graph, probe.types)
    shared = set(probe.names)
    chain = [n for n in dominator_chain(ref_graph, output, is_data) if n in shared] or [output]
    seen = {output: metrics}
    low, high = -1, len(chain) - 1  # chain[high] differs; chain[low] agrees (-1: the inputs)
    while high - low > 1 and probe.probes < MAX_PROBES:
        middle = (low + high) // 2
        seen.update(probe([chain[middle]], index))
        if seen[chain[middle]].ok:
            low = middle
        else:
            high = middle
    tensor, agreed = chain[high], {chain[low]} if low >= 0 else set()
    # back from the first dominator that differs, to a node whose inputs all agree
    settled = high - low <= 1
    while settled and probe.probes < MAX_PROBES:
        differing = None
        for name in data_inputs(ref_graph, tensor, is_data, shared):
            if name in agreed:
                continue
            if name not in seen:
                seen.update(probe([name], index))
            if seen[name].ok:
                agreed.add(name)
            else:
                differing = name
                break
        if differing is None:
            break
        tensor = differing
    else:
        settled = False  # the budget ran out, or the bisection did
    if not settled:
        return _record(method, f"{hidden}; the search stopped after {probe.probes} engine runs "
                               f"at {tensor!r}")
    alone = seen.get(tensor) or probe([tensor], index)[tensor]
    # the candidate's node: it is what the engine compiles (a fold renames nothing it keeps)
    node = _producers(cand_graph).get(tensor) or producers[tensor]
    shared = set(probe.names)
    inputs = [i for i in dict.fromkeys(node.input) if i in shared and is_data(i)]
    together = probe([*inputs, tensor], index) if inputs else {}
    record = _record(method, "", [alone], index)
    record["compared"] = len(chain)
    record["first"] = _describe(alone, ref_graph, cand_graph, together)
    label = _node_label(_node_record(node))
    with_inputs = together.get(tensor)
    named = _its_inputs(inputs)
    are = "are" if len(inputs) > 1 else "is"
    figure = f"{alone.max_rel_error:.3g} scale-relative"
    if with_inputs is not None and with_inputs.ok:
        verdict = "fusion"
        why = (f"marked alone, {tensor!r} ({label}) is the first to differ ({figure}), and "
               f"it agrees once {named} {are} marked too: a fusion {where} makes "
               f"from {label} back into the nodes before it computes it differently")
    elif any(not m.ok for name, m in together.items() if name != tensor):
        verdict = "unconfirmed"
        bad = next(name for name, m in together.items() if name != tensor and not m.ok)
        why = (f"bisection stopped at {tensor!r} ({label}, {figure}), but with its inputs "
               f"marked, input {bad!r} differs too: the difference moves with what is "
               f"marked, and no single node can be named")
    else:
        verdict = "node"
        agree = f" with {named} marked and agreeing" if inputs else ""
        why = (f"{tensor!r} ({label}) is the first to differ ({figure}), and it still "
               f"differs{agree}: {where} computes this node differently")
    record["verdict"] = verdict
    record["engine_runs"] = probe.probes
    record["note"] = f"{hidden}; {why} ({probe.probes} engine runs, input set {index + 1})"
    return record


def data_test(graph: onnx.GraphProto, types: dict[str, int]):
    """Whether a tensor carries data (float values) rather than a shape or an index: from the
    element type its value had where both models compute it, its declared type for a graph
    input; a tensor only the reference computes is a folded-away activation."""
    declared = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    constants = {t.name for t in graph.initializer}

    def is_data(name: str) -> bool:
        if name in types:
            return types[name] in FLOAT_TYPES
        if name in constants:
            return False
        if name in declared:
            return declared[name] in FLOAT_TYPES
        return True

    return is_data


def _failing_output(probe: _Prober, failing) -> tuple[str, int, OutputMetrics] | None:
    """The first failing output that differs again with no tensor marked, its feed and its
    metrics."""
    shared = set(probe.names)
    candidates = [n for n in failing if n in shared]
    for index in range(probe.input_sets if candidates else 0):
        for name, metrics in probe(candidates, index).items():
            if not metrics.ok:
                return name, index, metrics
    return None


def _ancestors(tensors, producers: dict[str, onnx.NodeProto]) -> set[str]:
    """`tensors` and every tensor they are computed from."""
    seen, stack = set(), list(tensors)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producers:
            stack.extend(i for i in producers[name].input if i)
    return seen


def _tensors(values: dict) -> dict[str, np.ndarray]:
    """The tensor-valued outputs (sequences and optionals have no one array to compare)."""
    return {n: v for n, v in values.items() if isinstance(v, np.ndarray) and v.dtype.kind != "O"}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _describe(first: OutputMetrics, ref_graph, cand_graph, by_name: dict) -> dict:
    """The first differing tensor, the nodes that make it in each model, and how the inputs of
    the candidate's node (the model under test; the reference's where the candidate has none)
    compare, where `by_name` has them."""
    ref_node = _producers(ref_graph)[first.name]
    cand_node = _producers(cand_graph).get(first.name)
    graph, node = (cand_graph, cand_node) if cand_node is not None else (ref_graph, ref_node)
    constants = {t.name for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    inputs = []
    for name in dict.fromkeys(node.input):
        if not name:
            continue
        if name in by_name:
            m = by_name[name]
            inputs.append({"name": name, "status": "agrees" if m.ok else "differs",
                           "max_rel_error": m.max_rel_error})
        elif name in constants:
            inputs.append({"name": name, "status": "weight"})
        elif name in graph_inputs:
            inputs.append({"name": name, "status": "graph input"})
        else:
            inputs.append({"name": name, "status": "not compared"})
    return {
        "tensor": first.name,
        "metrics": asdict(first),
        "reference_node": _node_record(ref_node),
        "candidate_node": _node_record(cand_node) if cand_node is not None else None,
        "inputs": inputs,
    }


def _its_inputs(names: list[str]) -> str:
    return f"its input{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}"


def _node_record(node: onnx.NodeProto) -> dict:
    return {"name": node.name, "op_type": node.op_type}


def _node_label(record: dict | None) -> str:
    if record is None:
        return "?"
    return f"{record['op_type']} {record['name']!r}" if record["name"] else record["op_type"]


def _first_note(first: dict, differing: int, compared: int, index: int, where: str) -> str:
    m = first["metrics"]
    ref_node, cand_node = first["reference_node"], first["candidate_node"]
    made_by = f"made by {_node_label(ref_node)} in the reference"
    if cand_node is not None and cand_node != ref_node:
        made_by += f" and by {_node_label(cand_node)} in the candidate"
    agree = [i["name"] for i in first["inputs"] if i["status"] == "agrees"]
    inputs = f"; {_its_inputs(agree)} {'agree' if len(agree) > 1 else 'agrees'}" if agree else ""
    return (f"first tensor to differ on {where} (input set {index + 1}): {first['tensor']!r}, "
            f"{made_by}: {how_far(m)}{inputs}; {differing} of {compared} shared tensors differ")


def how_far(metrics: dict) -> str:
    """How a differing tensor differs: by how much, or how otherwise (integers compared
    exactly, a shape, inf/NaN moved), where no figure says it."""
    if metrics["max_abs_error"] == float("inf") and metrics["note"]:
        return metrics["note"]
    return (f"max abs err {metrics['max_abs_error']:.3g} > tolerance {metrics['tolerance']:.3g} "
            f"({metrics['max_rel_error']:.3g} scale-relative)")


def _record(method: str, note: str, differing: list[OutputMetrics] = (),
            index: int | None = None, error: str | None = None) -> dict:
    worst = max(differing, key=lambda m: m.max_rel_error) if differing else None
    return {
        "method": method,
        "compared": 0,
        "input_set": None if index is None else index + 1,
        "differing": len(differing),
        "first": None,
        "listed": [asdict(m) for m in differing[:LISTED + 1]],
        "worst": asdict(worst) if worst is not None else None,
        "note": note,
        "error": error,
    }
