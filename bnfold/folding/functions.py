"""BatchNormalizations inside model-local functions: inlined where they are called, so they fold.

torch.onnx's TorchScript exporter writes chosen modules as FunctionProtos
(`export_modules_as_functions`), their weights passed in at each call; other tools write
functions too. The fold rules read graphs, so a BN inside a function would go unseen and the
report would not even count it. When a function that the graphs call (directly or through
other functions) holds a BN, every called function is inlined at its call sites by onnx's own
inliner: a BN's Conv is often a function of its own (`export_modules_as_functions=True` makes
one of every module type), and a fold needs both in one graph. Each call gets its own copy of
the body, so each folds its own weights. Functions nothing calls stay as they are, and so does
a model whose called functions hold no BN.
"""

from __future__ import annotations

import onnx
import onnx.inliner

from bnfold.onnxio.tensors import all_graphs

FunctionId = tuple[str, str]  # (domain, name), as a call names it


def inline_bn_functions(model: onnx.ModelProto) -> str | None:
    """Inline, in place, every function the graphs call when one of them holds a
    BatchNormalization; returns a note for the report (what was inlined, or why it could not
    be), or None when there was nothing to inline."""
    if not model.functions:
        return None
    called = {(n.domain, n.op_type) for g in all_graphs(model.graph) for n in g.node}
    reachable = _reachable(model, called)
    holding = _holding_bn(model) & reachable
    if not holding:
        return None
    selected = sorted(reachable)
    names = ", ".join(name for _, name in selected)
    bn_names = ", ".join(name for _, name in sorted(holding))
    calls = sum(1 for g in all_graphs(model.graph) for n in g.node
                if (n.domain, n.op_type) in reachable)
    try:
        inlined = onnx.inliner.inline_selected_functions(model, selected)
    except Exception as exc:  # onnx's C++ inliner: any failure leaves the model as it was
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"model-local function(s) {bn_names} hold BatchNormalization but could not be "
                f"inlined ({first[:200]}): their BNs stay unfolded and uncounted")
    model.CopyFrom(inlined)
    return (f"inlined model-local function(s) {names} ({calls} call(s) from the graph), so the "
            f"BatchNormalization in {bn_names} could fold")


def _holding_bn(model: onnx.ModelProto) -> set[FunctionId]:
    """Functions whose body, its subgraphs or a function it calls hold a BatchNormalization."""
    bodies = {(f.domain, f.name): f for f in model.functions}
    calls: dict[FunctionId, set[FunctionId]] = {}
    holding: set[FunctionId] = set()
    for key, function in bodies.items():
        calls[key] = set()
        for node in _function_nodes(function):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                holding.add(key)
            elif (node.domain, node.op_type) in bodies:
                calls[key].add((node.domain, node.op_type))
    changed = True
    while changed:  # a caller of a holding function holds one too
        changed = False
        for key, callees in calls.items():
            if key not in holding and callees & holding:
                holding.add(key)
                changed = True
    return holding


def _reachable(model: onnx.ModelProto, called: set[FunctionId]) -> set[FunctionId]:
    """The functions the graph calls, and those they call in turn."""
    bodies = {(f.domain, f.name): f for f in model.functions}
    reached: set[FunctionId] = set()
    work = [key for key in called if key in bodies]
    while work:
        key = work.pop()
        if key in reached:
            continue
        reached.add(key)
        work.extend((n.domain, n.op_type) for n in _function_nodes(bodies[key])
                    if (n.domain, n.op_type) in bodies)
    return reached


def _function_nodes(function: onnx.FunctionProto):
    """The nodes of a function's body and of the subgraphs in it."""
    for node in function.node:
        yield node
        for attr in node.attribute:
            graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for graph in graphs:
                for inner in all_graphs(graph):
                    yield from inner.node
