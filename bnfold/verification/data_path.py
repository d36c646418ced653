"""The tensors every value of an output flows through: where a bisection may look.

Bisecting a graph's node list for the first tensor that differs goes wrong on a DAG: a tensor on
a parallel branch (a shape computed from the input, the skip of a residual block) agrees although
it comes after the cause, and the search jumps past it. Along the output's *dominators* (the
tensors that every path from the graph inputs to the output passes through) it cannot: a cause
before a dominator reaches the output only through it. So the search bisects that chain, then
walks back from the first dominator that differs to the node where the difference starts.

Only data edges count: a tensor is data when `is_data(name)` says so (a float tensor); shape
and index computations would otherwise make every path bypass the data tensors. Immediate
dominators follow Cooper, Harvey and Kennedy's intersection on the topological order.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

_ROOT = ""  # the virtual source every graph input hangs from


def dominator_chain(graph: onnx.GraphProto, output: str,
                    is_data: Callable[[str], bool]) -> list[str]:
    """The data tensors every data path from the graph inputs to `output` passes through, in
    order, `output` last (graph inputs included where one input feeds everything)."""
    producers = {out: node for node in graph.node for out in node.output if out}
    order = {_ROOT: -1}
    idom: dict[str, str] = {}
    initializers = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name not in initializers and is_data(value.name):
            order[value.name] = len(order)
            idom[value.name] = _ROOT
    for node in graph.node:
        preds = [i for i in dict.fromkeys(node.input) if i in idom]
        for out in node.output:
            if not out or not is_data(out) or not preds:
                continue
            dominator = preds[0]
            for pred in preds[1:]:
                dominator = _intersect(pred, dominator, idom, order)
            order[out] = len(order)
            idom[out] = dominator
    if output not in idom or output not in producers:
        return []
    chain, name = [], output
    while name != _ROOT:
        chain.append(name)
        name = idom[name]
    return chain[::-1]


def data_inputs(graph: onnx.GraphProto, tensor: str, is_data: Callable[[str], bool],
                comparable: set[str]) -> list[str]:
    """The data tensors the node making `tensor` reads, each replaced by its own data inputs,
    recursively, where it cannot be compared (a tensor only one model computes)."""
    producers = {out: node for node in graph.node for out in node.output if out}
    found: list[str] = []
    seen: set[str] = set()
    stack = [i for i in producers[tensor].input if i] if tensor in producers else []
    while stack:
        name = stack.pop(0)
        if name in seen or not is_data(name):
            continue
        seen.add(name)
        if name in comparable:
            found.append(name)
        elif name in producers:
            stack.extend(i for i in producers[name].input if i)
    return found


def _intersect(a: str, b: str, idom: dict[str, str], order: dict[str, int]) -> str:
    while a != b:
        while order[a] > order[b]:
            a = idom[a]
        while order[b] > order[a]:
            b = idom[b]
    return a
