"""Add of two Conv branches → BatchNormalization into both Convs.

Octave convolution (OctConv, OctResNet) sums a Conv of the high-frequency features and a Conv
of the low-frequency ones, one of them upsampled by a Resize, before one BN. The BN is affine
per channel, so BN(a + b) = s·a + s·b + t: each Conv takes a conv-bn fold with the BN's scale,
W'ᵢ[o] = Wᵢ[o]·s[o], and one of them takes the shift too: b'₁ = b₁·s + t, b'₂ = b₂·s. The Add
stays and produces the BN's output.

A Resize (or Upsample) between a Conv and the Add resamples each channel alone by a fixed
linear map (nearest, linear or cubic), so the scale passes through it unchanged when it keeps
the channel axis as it is (its scale there is 1, or its size there is the channel count). The
shift goes into a branch without one, else through a nearest-neighbour one, which copies a
per-channel constant exactly (interpolation only sums to it up to rounding). A float16 model
from onnxconverter-common keeps the Resize in float32 between a Cast up and a Cast back to the
Conv's type; widening is exact, so the pair is looked through. Each link (Conv output, Cast,
Resize output, Add output) must be read by the next node alone.

The sum may be a tree of Adds (RepViT's `RepVggDw`: BN(conv(x) + conv₁(x) + x)), and one of
its leaves may be the input x of a summed Conv: s·x is that Conv's identity kernel scaled by s
(`identity_kernel`), so W' = (W + δ)·s there, and the Add that took x goes.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.folding.graph import GraphView
from bnfold.folding.names import node_label
from bnfold.folding.rules.common import (
    AttributeProblem,
    ChannelAffine,
    Match,
    apply_plan,
    attribute_reason,
    batchnorm_affine,
    is_batchnorm,
    plan_problem,
    produced_by,
    typed_attribute,
)
from bnfold.folding.rules.conv_bn import ConvBnRule
from bnfold.folding.rules.identity_kernel import plan_with_identity
from bnfold.folding.rules.into_producer import optional_constant

_CONV_RULE = ConvBnRule()
_MAX_ADDS = 8  # Adds in the sum under the BN
_RESAMPLING_OPS = ("Resize", "Upsample")
_LINEAR_MODES = ("nearest", "linear", "cubic")
_F16, _BF16, _F32, _F64 = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                           onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
_WIDER = {_F16: (_F32, _F64), _BF16: (_F32, _F64), _F32: (_F64,)}  # exact widenings


class AddBnRule:
    name = "add-bn"

    def match(self, view: GraphView, index: int) -> Match | None:
        node = view.nodes[index]
        if not is_batchnorm(node):
            return None
        add = produced_by(view, node.input[0], "Add")
        if add is None or len(add[1].input) != 2:
            return None
        found = _summands(view, add[0], index)
        if found is None:
            return None  # not a sum of Convs: not this rule's pattern
        branches, adds, identity = found
        if identity is not None and not any(
                not chain and view.nodes[conv].input[0] == identity[0]
                for conv, chain, _ in branches):
            return None  # a summand that is neither a Conv nor the input of one
        return Match(node_index=index, target_index=add[0],
                     extra={"branches": branches, "adds": adds, "identity": identity})

    @attribute_reason
    def check(self, view: GraphView, match: Match) -> str | None:
        for add_index, reader in match.extra["adds"]:
            add = view.nodes[add_index]
            problem = view.sole_consumer_problem(add.output[0], reader)
            if problem:
                return f"{node_label(add)} output {problem}"
            if add.input[0] == add.input[1]:
                return f"{node_label(add)} adds {add.input[0]!r} to itself"
        affine = batchnorm_affine(view, match.node_index)
        if isinstance(affine, str):
            return affine
        channels = affine.scale.shape[0]
        parts, exact_shift = [], []
        for conv_index, chain, add_index in match.extra["branches"]:
            conv = view.nodes[conv_index]
            for link, reader in zip((conv_index, *chain), (*chain, add_index)):
                problem = view.sole_consumer_problem(view.nodes[link].output[0], reader)
                if problem:
                    return f"{node_label(view.nodes[link])} output {problem}"
            part = Match(node_index=match.node_index, target_index=conv_index)
            shape = _CONV_RULE.output_channels(view, part)
            if isinstance(shape, str):
                return f"{node_label(conv)}: {shape}"
            if shape[0] != channels:
                return (f"{node_label(conv)} has {shape[0]} output channels but the BN has "
                        f"{channels}")
            exact = True
            if chain:
                resample_index = chain[len(chain) // 2]  # alone, or between the two Casts
                mode = _resample_mode(view, resample_index, channels, shape[1])
                if mode not in _LINEAR_MODES:
                    return mode
                exact = mode == "nearest"
            parts.append(part)
            exact_shift.append(exact)
        ranks = {part.extra["weight"].ndim for part in parts}
        if len(ranks) > 1:
            return (f"{node_label(view.nodes[match.target_index])} adds Conv outputs of ranks "
                    f"{sorted(ranks)}")
        if not any(exact_shift):
            return (f"every branch of {node_label(view.nodes[match.target_index])} passes an "
                    f"interpolating Resize, which would not carry the BN's shift exactly")
        shifted = exact_shift.index(True)
        shifts = [affine.shift if number == shifted else np.zeros(channels)
                  for number in range(len(parts))]
        absorbing = _absorb_identity(view, match, parts, shifts, affine.scale)
        if isinstance(absorbing, str):
            return absorbing
        for number, part in enumerate(parts):
            conv = view.nodes[part.target_index]
            if number != absorbing:
                part.affine = ChannelAffine(affine.scale, shifts[number])
                problem = _CONV_RULE.plan(view, part)
                if problem:
                    return f"into {node_label(conv)}: {problem}"
            if number != shifted and (len(conv.input) < 3 or not conv.input[2]):
                part.updates = [u for u in part.updates if u.slot != 2]  # no bias, none needed
            if number != absorbing:
                problem = plan_problem(part, view)
                if problem:
                    return f"into {node_label(conv)}: {problem}"
        match.affine = affine
        match.extra["parts"] = parts
        match.extra["into"] = ", ".join(node_label(view.nodes[p.target_index]) for p in parts)
        return None

    def rewrite(self, view: GraphView, match: Match) -> list[str]:
        """Apply each Conv's plan; the Add produces the BN's output; the Add of the identity
        goes, its other summand producing its output."""
        dead = []
        for part in match.extra["parts"]:
            dead += apply_plan(view, part)
            view.alter(view.nodes[part.target_index].output[0])
        for _, chain, _ in match.extra["branches"]:
            for link in chain:
                view.alter(view.nodes[link].output[0])
        for add_index, _ in match.extra["adds"][1:]:
            view.alter(view.nodes[add_index].output[0])
        view.bypass(match.node_index, match.target_index)
        identity = match.extra["identity"]
        if identity is not None:
            name, add_index = identity
            add = view.nodes[add_index]
            other = add.input[1] if add.input[0] == name else add.input[0]
            if add_index != match.target_index:  # x may have widened the sum's shape there
                view.drop_value_info(add.output[0])
            view.bypass(add_index, view.producer_of(other)[0])
        return dead + list(match.affine.dead_inputs)


def _summands(view: GraphView, top: int, bn: int):
    """The leaves of the tree of Adds under Add `top` (each inner Add read by its parent
    alone): ([(Conv, Resize or None, the Add it feeds)], [(Add, its reader)], the one other
    leaf as (name, the Add it feeds) or None), or None when there is no Conv or more than one
    other leaf. A Conv's output that another summed Conv reads is that other leaf (RepViT's
    first block sums the stem Conv's output with two Convs of it)."""
    leaves, adds = [], [(top, bn)]
    work = [(name, top) for name in view.nodes[top].input]
    while work:
        name, reader = work.pop(0)
        branch = _branch(view, name)
        inner = None if branch is not None else produced_by(view, name, "Add")
        if (inner is not None and len(inner[1].input) == 2 and len(adds) < _MAX_ADDS
                and len(view.live_consumers(name)) == 1 and name not in view.graph_outputs):
            adds.append((inner[0], reader))
            work += [(n, inner[0]) for n in inner[1].input]
        else:
            leaves.append((name, reader, branch))
    read = {view.nodes[b[0]].input[0] for _, _, b in leaves if b is not None and not b[1]}
    branches, others = [], []
    for name, reader, branch in leaves:
        if branch is None or name in read:
            others.append((name, reader))
        else:
            branches.append((*branch, reader))
    if not branches or len(others) > 1:
        return None
    return branches, adds, (others[0] if others else None)


def _absorb_identity(view: GraphView, match: Match, parts: list[Match],
                     shifts: list[np.ndarray], scale: np.ndarray) -> int | None | str:
    """Plan the identity leaf's s·x into the first summed Conv of x that takes it: that
    Conv's number in `parts`, None without an identity leaf, or why none takes it."""
    identity = match.extra["identity"]
    if identity is None:
        return None
    problems = []
    for number, ((_, chain, _), part) in enumerate(zip(match.extra["branches"], parts)):
        conv = view.nodes[part.target_index]
        if chain or conv.input[0] != identity[0]:
            continue
        problem = plan_with_identity(view, part, scale, scale, shifts[number])
        if problem is None:
            return number
        problems.append(f"{node_label(conv)}: {problem}")
    return f"{identity[0]!r} is a summand no Conv of it can absorb ({'; '.join(problems)})"


def _branch(view: GraphView, name: str) -> tuple[int, tuple[int, ...]] | None:
    """(Conv index, the nodes between it and `name`) when `name` is a Conv's output directly,
    through one Resize/Upsample, or through Cast up → Resize → Cast back to the Conv's type (a
    float16 model keeps Resize in float32 so); else None."""
    conv = produced_by(view, name, "Conv")
    if conv is not None:
        return conv[0], ()
    chain = []
    cast = produced_by(view, name, "Cast")
    if cast is not None and cast[1].input:
        chain.append(cast[0])
        name = cast[1].input[0]
    found = view.producer_of(name)
    if (found is None or found[1].op_type not in _RESAMPLING_OPS
            or found[1].domain not in ("", "ai.onnx") or not found[1].input):
        return None
    chain.insert(0, found[0])
    name = found[1].input[0]
    if cast is not None:
        widen = produced_by(view, name, "Cast")
        if widen is None or not widen[1].input:
            return None
        chain.insert(0, widen[0])
        name = widen[1].input[0]
    conv = produced_by(view, name, "Conv")
    if conv is None or (cast is not None and not _round_trip(view, conv[1], *(
            view.nodes[i] for i in (chain[0], chain[-1])))):
        return None
    return conv[0], tuple(chain)


def _round_trip(view: GraphView, conv, widen, narrow) -> bool:
    """Whether Cast `widen` takes the Conv's float output to a type holding all its values and
    Cast `narrow` brings the resampled result back to the Conv's type."""
    elem = view.constant_dtype(conv.input[1]) if len(conv.input) > 1 else None
    try:
        up = typed_attribute(widen, "to", "int", -1)
        down = typed_attribute(narrow, "to", "int", -1)
    except AttributeProblem:
        return False
    return down == elem and up in _WIDER.get(elem, ())


def _resample_mode(view: GraphView, index: int, channels: int, rank: int) -> str:
    """The mode of Resize/Upsample `index` (on a rank-`rank` tensor of `channels` channels) when
    it is linear per channel and keeps the channel axis as it is, else why it is not known to."""
    node = view.nodes[index]
    label = node_label(node)
    mode = typed_attribute(node, "mode", "string", "nearest")
    if mode not in _LINEAR_MODES:
        return f"{label} has mode {mode!r}"
    if typed_attribute(node, "coordinate_transformation_mode", "string", "") == (
            "tf_crop_and_resize"):
        return f"{label} crops (tf_crop_and_resize) and fills with a constant the BN would scale"
    if node.op_type == "Upsample" and view.opset < 9:
        factors, sizes = typed_attribute(node, "scales", "floats", None), None
    else:
        # Upsample-9 and Resize-10 read (X, scales); Resize-11 and later (X, roi, scales, sizes).
        slots = (1, None) if node.op_type == "Upsample" or view.opset < 11 else (2, 3)
        factors, sizes = (None if slot is None else optional_constant(view, node, slot, role)
                          for slot, role in zip(slots, (f"{label} scales", f"{label} sizes")))
        for found in (factors, sizes):
            if isinstance(found, str):
                return found
    if factors is not None and np.size(factors):
        values, unchanged = np.asarray(factors).reshape(-1).tolist(), 1
    elif sizes is not None and np.size(sizes):
        values, unchanged = np.asarray(sizes).reshape(-1).tolist(), channels
    else:
        return f"{label} has neither scales nor sizes"
    axes = typed_attribute(node, "axes", "ints", None)  # opset 18: the axes values are for
    axes = list(range(len(values))) if axes is None else [a + rank if a < 0 else a for a in axes]
    if len(axes) != len(values):
        return f"{label} has {len(values)} scales or sizes for {len(axes)} axes"
    channel = dict(zip(axes, values)).get(1, unchanged)
    if channel != unchanged:
        return f"{label} resamples the channel axis ({channel:g}), so channels would mix"
    return mode
