"""Apply the fold rules to every graph of a model (subgraphs first) until nothing changes."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.affine_pairs import standalone_pairs
from bnfold.folding.batched import fold_plain_conv_bn
from bnfold.folding.constants import ConstantSubgraphs
from bnfold.folding.functions import inline_bn_functions
from bnfold.folding.graph import (
    GraphView,
    NameAllocator,
    PendingTensors,
    TypeTable,
    node_label,
    subgraphs,
)
from bnfold.folding.report import FOLDED, KEPT, LOWERED, FoldEntry, FoldReport
from bnfold.folding.rules import FOLD_RULES, LOWER_RULES
from bnfold.folding.rules.common import LINEAR_OPS, batchnorm_affine
from bnfold.onnxio.tensors import all_graphs, iter_other_tensors
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.nodes import NodeTable
from bnfold.onnxio.validity import sort_nodes_topologically

_CANDIDATE_OPS = ("BatchNormalization", "Mul", "Add")


def fold_model(
    model: onnx.ModelProto,
    *,
    lower_standalone: bool = False,
    pending: PendingTensors | None = None,
    deferred: DeferredData | None = None,
    freeze_inputs: Iterable[str] | str = (),
) -> FoldReport:
    """Fold `model` in place and return what happened.

    With `pending`, new values of main-graph initializers are left there instead of being
    copied into the model (save_model writes them straight from numpy; `pending.apply`
    puts them in the model). `deferred` holds the bytes of initializers loaded without them.
    `freeze_inputs` names graph inputs that have an initializer (IR ≥ 4), or is "all": they
    stop being inputs, so their initializers become constants that may fold.
    """
    inlined = inline_bn_functions(model)
    main = NodeTable(model.graph)
    report = FoldReport(nodes_before=count_nodes(model.graph, main),
                        params_before=count_params(model))
    if inlined:
        report.notes.append(inlined)
    if sort_nodes_topologically(model, main):
        main = NodeTable(model.graph)
        # ONNX Runtime sorts by itself, but onnx.checker (and other tools) reject the order.
        report.notes.append("nodes were out of topological order (onnx.checker rejects that): "
                            "sorted them; results are unchanged")
    frozen = freeze_initializer_inputs(model, freeze_inputs)
    report.frozen_inputs = frozen
    if frozen:
        report.notes.append(f"froze {len(frozen)} initializer input(s): {', '.join(frozen)}")
    folder = _ModelFolder(model, lower_standalone, report, pending, deferred, main)
    del main  # the folder hands it to the main graph's view, which drops it when done with it
    # Every folded value is checked for range and finiteness before it is used, so numpy's
    # overflow/invalid warnings would only be stray stderr lines.
    with np.errstate(all="ignore"):
        folder.fold_graph(model.graph, None, "main")
    report.nodes_after = count_nodes(model.graph)
    report.params_after = count_params(model)
    return report


class _ModelFolder:
    def __init__(
        self,
        model: onnx.ModelProto,
        lower_standalone: bool,
        report: FoldReport,
        pending: PendingTensors | None,
        deferred: DeferredData | None,
        main: NodeTable,
    ):
        self.main_graph = model.graph
        self.main_table: NodeTable | None = main  # the main graph's nodes, until they change
        self.pending = pending
        self.deferred = deferred
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1
        )
        self.names = NameAllocator(model, main)
        self.types = TypeTable(model)
        self.computed = ConstantSubgraphs(self.opset)
        self.initializers_are_inputs = model.ir_version < 4
        self.lower_standalone = lower_standalone
        self.report = report
        self.dead: list[str] = []
        self.refused: dict[int, list[str]] = {}

    def view(self, graph: onnx.GraphProto, outer: GraphView | None, path: str,
             fresh: bool = False) -> GraphView:
        if graph is self.main_graph:
            table = None if fresh else self.main_table
            self.main_table = None  # the view owns it now (and drops it once unedited use ends)
            return GraphView(graph, self.names, self.types, outer, path, self.pending, self.opset,
                             self.deferred, self.computed, self.initializers_are_inputs,
                             table=table)
        return GraphView(graph, self.names, self.types, outer, path, None, self.opset,
                         computed=self.computed, constants_as_nodes=self.initializers_are_inputs)

    def fold_graph(self, graph: onnx.GraphProto, outer: GraphView | None, path: str
                   ) -> list[str]:
        """Fold `graph` (its subgraphs first) and drop the constants its folds left unused;
        returns such names that belong to an enclosing graph."""
        # Names the folds of this graph may have left unused; its Mul/Add refusals by index.
        saved, self.dead, saved_refused, self.refused = self.dead, [], self.refused, {}
        try:
            return self._fold_graph(graph, outer, path)
        finally:
            self.dead, self.refused = saved, saved_refused

    def _fold_graph(self, graph: onnx.GraphProto, outer: GraphView | None, path: str
                    ) -> list[str]:
        view = self.view(graph, outer, path)
        _check_arity(view)
        has_subgraphs = False
        for index in view.subgraph_nodes:
            node = view.nodes[index]
            for attr_name, sub in subgraphs(node):
                has_subgraphs = True
                self.dead.extend(self.fold_graph(
                    sub, view, f"{path}/{node_label(node)}/{attr_name}"))
        if has_subgraphs:  # folds inside changed which outer names the subgraphs read
            view = self.view(graph, outer, path, fresh=True)
        # The plain Conv→BN pairs first, all at once (the bulk of a large CNN); then the rules,
        # pair by pair, for everything else. One view for every pass: it keeps its maps current
        # through each edit, and building it is the graph-size cost of a pass. Each pass that
        # changes something removes a node, so this ends.
        batched, dead = fold_plain_conv_bn(view, FOLD_RULES[0])
        view.table = None  # stale from the first edit on; its name tuples are a graph's worth
        self.dead.extend(dead)
        # The report lists the folds as the rules alone would: the first pass in node order
        # (the batched pairs are ones it would have folded where they stand), then each pass.
        folded = sorted(batched + self.fold_pass(view), key=lambda placed: placed[0])
        while folded:
            self.report.entries.extend(entry for _, entry in folded)
            folded = self.fold_pass(view)
        self.settle_kept(view)
        if graph is self.main_graph:
            self.report.altered_values |= view.altered
        leftover = view.drop_unused(self.dead)
        view.commit()
        return leftover

    def fold_pass(self, view: GraphView) -> list[tuple[int, FoldEntry]]:
        """One pass of the rules over the graph's nodes: (node index, entry) of each fold.
        Why each Mul/Add that a rule matched stayed goes to self.refused (a BN's reasons are
        worked out again at the end, with more context)."""
        folded: list[tuple[int, FoldEntry]] = []
        refused = self.refused
        for index, node in list(view.live_nodes_of(_CANDIDATE_OPS)):
            if index in view.removed:
                continue
            if node.domain not in ("", "ai.onnx"):
                continue
            refused.pop(index, None)
            reasons: list[str] = []
            for rule in FOLD_RULES:
                match = rule.match(view, index)
                if match is None:
                    continue
                problem = rule.check(view, match)
                if problem is not None:
                    if node.op_type != "BatchNormalization":
                        target = node_label(view.nodes[match.target_index])
                        reasons.append(f"into {target}: {problem}")
                    continue
                into = match.extra.get("into") or node_label(view.nodes[match.target_index])
                self.dead.extend(rule.rewrite(view, match))
                # A Mul/Add (a frozen BN) folded by conv-bn is reported as conv-mul / conv-add.
                label = rule.name if node.op_type == "BatchNormalization" else rule.name.replace(
                    "bn", node.op_type.lower())
                folded.append((index, FoldEntry(node_label(node), node.op_type, FOLDED,
                                                view.path, into, label, output=node.output[0])))
                break
            else:
                if reasons:
                    refused[index] = list(dict.fromkeys(reasons))
        return folded

    def settle_kept(self, view: GraphView) -> None:
        """Record why each remaining BN stays, each Mul/Add of a per-channel constant that
        a rule matched (a frozen BN, as tf2onnx writes them), and each per-channel Mul→Add or
        Add→Mul pair that none matched; lower a BN to Mul+Add when asked and possible."""
        pairs = dict(standalone_pairs(view, self.refused))
        for index, node in list(view.live_nodes_of(_CANDIDATE_OPS)):
            if index in pairs:
                self.report.entries.append(FoldEntry(
                    node_label(node), node.op_type, KEPT, view.path, None, None,
                    [_pair_reason(view, index, pairs[index])]))
                continue
            if node.op_type != "BatchNormalization":
                if index in self.refused and _scales_channels(view, node):
                    self.report.entries.append(FoldEntry(node_label(node), node.op_type, KEPT,
                                                         view.path, None, None,
                                                         self.refused[index]))
                continue
            reasons = refusal_reasons(view, index)
            label = node_label(node)
            if self.lower_standalone:
                rule = LOWER_RULES[0]
                match = rule.match(view, index)
                problem = rule.check(view, match)
                if problem is None:
                    self.dead.extend(rule.rewrite(view, match))
                    self.report.entries.append(
                        FoldEntry(label, node.op_type, LOWERED, view.path, "Mul+Add", rule.name,
                                  reasons)
                    )
                    continue
                reasons.append(f"not lowered: {problem}")
            self.report.entries.append(
                FoldEntry(label, node.op_type, KEPT, view.path, None, None, reasons)
            )


def _scales_channels(view: GraphView, node: onnx.NodeProto) -> bool:
    """Whether a Mul/Add has a constant operand of more than one value. A scalar one is not
    reported when it stays: a hard-sigmoid's x + 3 or an attention scale is no frozen BN."""
    for name in node.input:
        values = view.constant_array(name)
        if values is not None and values.size > 1:
            return True
    return False


def refusal_reasons(view: GraphView, index: int) -> list[str]:
    """Why no fold rule applies to BN `index`, one reason per neighbour considered."""
    affine = batchnorm_affine(view, index)
    if isinstance(affine, str):
        return [affine]
    reasons = []
    for rule in FOLD_RULES:
        match = rule.match(view, index)
        if match is None:
            continue
        reason = rule.check(view, match)
        if reason is not None:
            reasons.append(f"into {node_label(view.nodes[match.target_index])}: {reason}")
    if not reasons:
        reasons.append(_neighbourhood(view, index))
    return list(dict.fromkeys(reasons))


def _neighbourhood(view: GraphView, index: int) -> str:
    node = view.nodes[index]
    source, consumers, target = _surroundings(view, node.input[0], node.output[0])
    after = next((c for c in consumers if c.op_type in _AFTER_BN_REASONS), None)
    if after is not None:
        return f"{_AFTER_BN_REASONS[after.op_type]} (input from {source}, output to {target})"
    return (
        f"no Conv/ConvTranspose/Gemm/MatMul beside it (input from {source}, output to {target})"
    )


def _surroundings(view: GraphView, data: str, output: str
                  ) -> tuple[str, list[onnx.NodeProto], str]:
    """What produces `data` (a label), the live nodes reading `output`, and those readers as
    text ('A, B, C', 'graph output', 'nothing')."""
    producer = view.producer_of(data)
    source = node_label(producer[1]) if producer else f"graph input {data!r}"
    consumers = [view.nodes[i] for i in view.live_consumers(output)]
    readers = [node_label(c) for c in consumers]
    if output in view.graph_outputs:
        readers.append("graph output")
    return source, consumers, ", ".join(readers[:3]) or "nothing"


def _pair_reason(view: GraphView, first: int, second: int) -> str:
    """Why a per-channel Mul→Add (Add→Mul) pair that no rule matched stays, with what it reads
    and what reads it."""
    head, tail = view.nodes[first], view.nodes[second]
    data = next(name for name in head.input if view.constant_array(name) is None)
    source, consumers, target = _surroundings(view, data, tail.output[0])
    pair = ("per-channel scale and shift, Mul → Add" if head.op_type == "Mul"
            else "per-channel shift and scale, Add → Mul")
    if any(c.op_type in LINEAR_OPS for c in consumers):
        return (f"{pair} {node_label(tail)}: a Mul/Add pair folds into the "
                f"Conv/ConvTranspose/Gemm/MatMul that produces its input, and {source} is none, "
                f"or into MatMuls with constant B that alone read it (output to {target})")
    return (f"{pair} {node_label(tail)}: no Conv/ConvTranspose/Gemm/MatMul beside it (input "
            f"from {source}, output to {target})")


# Why a BN that feeds one of these (and has no producer to fold into) stays.
_AFTER_BN_REASONS = {
    "ConvTranspose": "it feeds a ConvTranspose, where its shift would reach border outputs "
                     "unevenly: a BN before a ConvTranspose cannot fold into its weights",
    "MatMul": "it feeds a MatMul, but not as the first input of a MatMul that alone reads it: "
              "only then does a BN fold into the MatMul's B",
}


# Inputs each op the rules read must have (at least, at most), so a malformed node is a user
# error with a message rather than an IndexError inside a rule.
_ARITY = {
    "BatchNormalization": (5, 5, "X, scale, B, mean, var"),
    "Conv": (2, 3, "X, W, optional B"),
    "ConvTranspose": (2, 3, "X, W, optional B"),
    "Gemm": (2, 3, "A, B, optional C"),
    "MatMul": (2, 2, "A, B"),
    "Mul": (2, 2, "A, B"),
    "Add": (2, 2, "A, B"),
}


def _check_arity(view: GraphView) -> None:
    """Run on a view just built, whose table is current."""
    table = view.table
    for index, op_type in enumerate(table.op_types):
        if op_type not in _ARITY or table.domains[index] not in ("", "ai.onnx"):
            continue
        least, most, names = _ARITY[op_type]
        inputs, outputs = table.inputs[index], table.outputs[index]
        required = [name for name in inputs[:least] if name]
        if len(required) < least or len(inputs) > most or not outputs or not outputs[0]:
            raise BnfoldError(
                f"{op_type} {node_label(table.nodes[index])!r} has {len(inputs)} inputs and "
                f"{len(outputs)} outputs; it needs {names} and an output: the model is "
                f"malformed; re-export it"
            )


def freeze_initializer_inputs(model: onnx.ModelProto, names: Iterable[str] | str) -> list[str]:
    """Drop graph inputs that have an initializer (all of them for "all"); returns their names."""
    if not names or model.ir_version < 4:
        return []  # below IR 4 the listing is mandatory and already means "constant"
    initializers = {t.name for t in model.graph.initializer}
    overridable = [v.name for v in model.graph.input if v.name in initializers]
    if names == "all":
        wanted = overridable
    else:
        wanted = list(dict.fromkeys([names] if isinstance(names, str) else names))
    unknown = [n for n in wanted if n not in overridable]
    if unknown:
        raise BnfoldError(
            f"--freeze-input {', '.join(unknown)}: not a graph input with an initializer; "
            f"those are: {', '.join(overridable[:20]) or '(none)'}"
            f"{' …' if len(overridable) > 20 else ''}"
        )
    frozen = set(wanted)
    for index in reversed(range(len(model.graph.input))):
        if model.graph.input[index].name in frozen:
            del model.graph.input[index]
    return wanted


def count_nodes(graph: onnx.GraphProto, table: NodeTable | None = None) -> int:
    """Nodes in `graph` and its subgraphs (`table`: graph's, to find them without a walk)."""
    if table is None:
        return sum(len(g.node) for g in all_graphs(graph))
    return len(table) + sum(count_nodes(sub) for index in table.implicit
                            for _, sub in subgraphs(table.nodes[index]))


def count_params(model: onnx.ModelProto) -> int:
    """Values held in initializers and Constant tensors, subgraphs included."""
    main = sum(map(math.prod, map(_DIMS, model.graph.initializer)))  # no Python step per tensor
    return main + sum(math.prod(t.dims) for t in iter_other_tensors(model, schema_only=True))


_DIMS = operator.attrgetter("dims")
