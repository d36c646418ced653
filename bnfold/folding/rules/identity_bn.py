"""BN on a residual's identity path, summed with a Conv of the same input: into that Conv.

RepVGG, MobileOne and their kin (timm's `repvgg_*`, `mobileone_*`), exported before
reparameterisation, sum a k×k Conv→BN branch, a 1×1 Conv→BN branch and a BN of the block's
input itself: y = conv_k(x) + conv_1(x) + BN(x). Once the branch BNs have folded, the identity
BN is s·x + t, and s·x is a Conv of x whose kernel has s[o] at the centre tap joining input
channel o to output channel o (`identity_kernel`). So it joins a Conv in the sum that reads the
same x: W'[o, o mod (Cin/g), centre] = W[…] + s[o], b' = b + t. The BN and the Add that took its
output go (the other summand produces the Add's output).

FastViT's RepMixer subtracts the BN instead, x + γ·(mixer(x) − BN(x)): a Sub with the BN as
its second input takes −s and −t the same way. MobileOne blocks without a scale branch add the
identity to a constant 0 first (`0 + BN(x)`); such Adds pass the BN on unchanged and go too.

The Conv must have as many output channels as inputs (the BN's C), map each position to itself
through its centre tap, and reach the Add/Sub only through Adds that nothing else reads, so it
is a summand of it with weight 1.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    is_batchnorm,
    produced_by,
)
from bnfold.folding.rules.identity_kernel import plan_with_identity

_MAX_DEPTH = 8  # Adds between the Conv and the identity's Add, and zero Adds after the BN


class IdentityBnRule:
    name = "identity-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        value, zero_adds = node.output[0], []
        while True:
            readers = view.live_consumers(value)
            if len(readers) != 1:
                return None
            reader = view.nodes[readers[0]]
            if reader.domain not in ("", "ai.onnx") or len(reader.input) != 2:
                return None
            if (reader.op_type != "Add" or len(zero_adds) >= _MAX_DEPTH
                    or not _adds_zero(view, reader, value)):
                break
            zero_adds.append(readers[0])
            value = reader.output[0]
        if reader.op_type == "Sub" and reader.input[1] == value != reader.input[0]:
            sign = -1.0
        elif reader.op_type == "Add":
            sign = 1.0
        else:
            return None
        convs = _summed_convs(view, readers[0], value, node.input[0])
        if not convs:
            return None  # no Conv of the same input in the sum: not this rule's pattern
        return Match(node_index=index, target_index=convs[0][0],
                     extra={"add": readers[0], "convs": convs, "sign": sign,
                            "zero_adds": zero_adds, "value": value})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        bn = view.nodes[match.node_index]
        add = view.nodes[match.extra["add"]]
        passed = [bn] + [view.nodes[i] for i in match.extra["zero_adds"]]
        for node in passed:
            if node.output[0] in view.graph_outputs:
                return f"{node.output[0]!r} is also a graph output"
        if add.input[0] == add.input[1]:
            return f"{node_label(add)} adds {add.input[0]!r} to itself"
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        sign = match.extra["sign"]
        ones = np.ones_like(affine.scale)
        problems = []
        for conv_index, path in match.extra["convs"]:
            part = Match(node_index=match.node_index, target_index=conv_index)
            problem = plan_with_identity(view, part, ones, sign * affine.scale,
                                         sign * affine.shift)
            if problem is None:
                match.target_index = conv_index
                match.updates = part.updates
                match.affine = affine
                value = match.extra["value"]
                other = add.input[1] if add.input[0] == value else add.input[0]
                match.extra["summand"] = view.producer_of(other)[0]
                match.extra["path"] = path
                return None
            problems.append(f"{node_label(view.nodes[conv_index])}: {problem}")
        return "; ".join(problems)

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Add the identity taps; the other summand produces the Add's output; the BN and the
        zero Adds go."""
        dead = apply_plan(view, match)
        for index in (match.target_index, *match.extra["path"]):  # they now carry s·x + t too
            view.alter(view.nodes[index].output[0])
        view.bypass(match.extra["add"], match.extra["summand"])
        for index in (match.node_index, *match.extra["zero_adds"]):
            node = view.nodes[index]
            view.remove_node(index)
            view.drop_value_info(node.output[0])
            if index != match.node_index:
                dead.extend(node.input)  # the zero
        return dead + list(match.affine.dead_inputs)


def _adds_zero(view: GraphView, add, value: str) -> bool:
    """Whether Add `add` adds a constant 0 (one element, rank ≤ 1: it broadcasts without
    changing the shape) to `value`, passing it on unchanged."""
    other = add.input[1] if add.input[0] == value else add.input[0]
    if other == value:
        return False
    zero = view.constant_array(other)
    return (zero is not None and zero.dtype.kind == "f" and zero.size == 1 and zero.ndim <= 1
            and float(zero.reshape(-1)[0]) == 0.0)


def _summed_convs(view: GraphView, add_index: int, bn_output: str, source: str
                  ) -> list[tuple[int, list[int]]]:
    """Convs reading `source` that reach Add/Sub `add_index` as summands (through Adds read by
    nothing else), nearest first, with the Adds on the way."""
    add = view.nodes[add_index]
    found: list[tuple[int, list[int]]] = []
    work = [(name, add_index, []) for name in add.input if name != bn_output]
    while work:
        name, reader, path = work.pop(0)
        if view.sole_consumer_problem(name, reader) or len(path) > _MAX_DEPTH:
            continue
        conv = produced_by(view, name, "Conv")
        if conv is not None:
            if conv[1].input and conv[1].input[0] == source:
                found.append((conv[0], path))
            continue
        inner = produced_by(view, name, "Add")
        if inner is not None and len(inner[1].input) == 2:
            work += [(n, inner[0], path + [inner[0]]) for n in inner[1].input]
    return found
