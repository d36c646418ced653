"""PyTorch engine: the framework baseline, a module vs its Conv/Linear+BN-fused counterpart.

Eager by default, `torch.compile` with `torch_compile=True`. Fusion uses torch's own
`fuse_conv_bn_eval` / `fuse_linear_bn_eval` on an fx trace, and the fused module is checked
against the original on the bench input before it is timed. GPU timing (CUDA events) is used
when the module runs on CUDA; that path is unverified on hardware here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnfold.deploy.engines import INSTALL_HINTS, EngineOptions, Precision, Timing, first_line
from bnfold.errors import BnfoldError


def require_torch():
    try:
        import torch
    except ImportError:
        raise BnfoldError(f"PyTorch is not installed: {INSTALL_HINTS['torch']}") from None
    return torch


@dataclass
class Fusion:
    module: object  # the fused fx.GraphModule (eval mode)
    fused: list[str] = field(default_factory=list)  # "conv+bn" per fused call site
    skipped: list[str] = field(default_factory=list)  # "fc→bn: why not"


def fuse_bn(module, example_inputs=None) -> Fusion:
    """An eval-mode copy of `module` with Conv/ConvTranspose/Linear→BN pairs fused, per call site.

    `module` should be plain (see bnfold.pytorch.zoo.prepare.eval_copy). A pair is fused only where it
    is exactly one affine map: the producer's output feeds the BN alone; a Conv module called
    at several sites gets one fused copy per site (the other calls keep the original); a Linear
    only when its output is 2-D (N, F), so BatchNorm1d's channel axis 1 is the feature axis —
    on (N, C, L) BN normalises C while the Linear mixes L; a Conv only when its input is
    batched (Conv1d on an unbatched (C, L) makes BatchNorm1d normalise L). That needs shapes:
    give `example_inputs` (positional tensors) or Linear and Conv1d pairs are skipped.
    """
    require_torch()
    import copy

    from torch import fx, nn

    module = copy.deepcopy(module).eval()
    try:
        traced = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise BnfoldError(
            f"torch.fx cannot trace the model ({first_line(exc)}): bench its ONNX export "
            f"with --engine ort-cpu instead"
        ) from None
    shapes = _output_shapes(traced, example_inputs)
    result = Fusion(traced)
    for node in list(traced.graph.nodes):
        if node.op != "call_module":
            continue
        bn = traced.get_submodule(node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        producer = node.args[0] if node.args else None
        label = f"{getattr(producer, 'target', producer)}→{node.target}"
        reason, replacement = _fusion_for(traced, producer, bn, shapes)
        if reason is not None:
            if reason:  # "" = not a pair at all (BN after a ReLU, an add, an input)
                result.skipped.append(f"{label}: {reason}")
            continue
        _install(traced, producer, replacement)
        node.replace_all_uses_with(producer)
        traced.graph.erase_node(node)
        result.fused.append(label.replace("→", "+"))
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()  # the fused-away BNs would still hold state
    return result


def _output_shapes(traced, example_inputs) -> dict:
    """node name -> output shape, from one run on the example (empty when not given)."""
    if example_inputs is None:
        return {}
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(traced).propagate(*example_inputs)
    except Exception:  # shapes are an aid: without them Linear pairs are skipped, not guessed
        return {}
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in traced.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def _fusion_for(traced, producer, bn, shapes):
    """(None, fused module) if the pair fuses; else (reason, None), reason "" if no pair."""
    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if not isinstance(producer, fx.Node) or producer.op != "call_module":
        return "", None
    first = traced.get_submodule(producer.target)
    if not isinstance(first, (*convs, *transposed, nn.Linear)):
        return "", None
    if len(producer.users) != 1:
        return "the producer's output also feeds something else", None
    if not bn.track_running_stats or bn.running_mean is None:
        return "the BN has no running statistics", None
    width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    if bn.num_features != width:
        return f"BN has {bn.num_features} channels, the producer {width}", None
    if isinstance(first, nn.Linear):
        shape = shapes.get(producer.name)
        if shape is None:
            return "the Linear's output shape is unknown (no example input)", None
        if len(shape) != 2:
            return (f"the Linear's output is {len(shape)}-D {shape}: BN normalises axis 1, "
                    "the Linear's features are the last axis"), None
        return None, fuse_linear_bn_eval(first, bn)
    unbatched = _unbatched_reason(first, bn, shapes.get(producer.name))
    if unbatched:
        return unbatched, None
    if isinstance(first, transposed):
        if first.groups != 1:
            return "grouped ConvTranspose (torch's fuser scales the wrong weight axis)", None
        return None, fuse_conv_bn_eval(first, bn, transpose=True)
    return None, fuse_conv_bn_eval(first, bn)


def _unbatched_reason(conv, bn, shape) -> str | None:
    """Why the BN may normalise another axis than `conv`'s channels, or None.

    On an unbatched input (Conv1d on (C, L)) the conv's channels are axis 0 of its output,
    while BatchNorm1d reads a 2-D tensor as (N, C) and normalises axis 1. Without a shape this
    is only ruled out where the BN refuses the unbatched rank (BatchNorm2d after Conv2d).
    """
    from torch import nn

    name, batched = type(conv).__name__, len(conv.kernel_size) + 2
    if shape is not None:
        if len(shape) == batched:
            return None
        return (f"the {name}'s output is {len(shape)}-D {shape} (an unbatched input): "
                f"{type(bn).__name__} normalises axis 1, the {name}'s channels are axis 0")
    ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}.get(type(bn))
    if ranks is not None and batched - 1 not in ranks:
        return None
    return (f"the {name}'s output shape is unknown (no example input): on an unbatched input "
            f"{type(bn).__name__} would normalise another axis than its channels")


def _install(traced, producer, replacement) -> None:
    """Put the fused module where this call site (only) will use it."""
    target = producer.target
    other_uses = [n for n in traced.graph.nodes if n is not producer and (
        (n.op == "call_module" and n.target == target)
        or (n.op == "get_attr" and str(n.target).startswith(target + ".")))]
    if not other_uses:
        _set_submodule(traced, target, replacement)
        return
    base = target.replace(".", "_") + "_fused"
    index = 0
    while hasattr(traced, f"{base}{index}"):
        index += 1
    traced.add_submodule(f"{base}{index}", replacement)
    producer.target = f"{base}{index}"


def _set_submodule(root, target: str, module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _check_same(original, fused, args, kwargs, label: str) -> None:
    torch = require_torch()
    from bnfold.pytorch.zoo.prepare import flatten_outputs

    with torch.no_grad():
        a = flatten_outputs(original(*args, **kwargs))
        try:
            b = flatten_outputs(fused(*args, **kwargs))
        except Exception as exc:  # fx traced a Python branch one way (e.g. `if mask is None`)
            raise BnfoldError(
                f"the fused {label} does not run ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:150]}): torch.fx could not trace its forward "
                f"faithfully; bench it without fusion (--engine ort-cpu on its export)"
            ) from None
    worst = 0.0
    bound = 1e-4
    for (name, x), (_, y) in zip(a, b):
        if x.dtype in (torch.float16, torch.bfloat16):
            bound = 1e-2  # their rounding unit is 1e-3 and 8e-3: BN fused or not rounds apart
        scale = float(x.abs().max()) if x.numel() else 0.0
        error = float((x.double() - y.double()).abs().max()) / (scale or 1.0) if x.numel() else 0.0
        worst = max(worst, error) if error == error else float("nan")
    if len(a) != len(b) or not worst <= bound:
        raise BnfoldError(
            f"the fused {label} differs from the original (scale-relative error {worst:.2g}): "
            f"please report the model"
        )


class TorchSession:
    def __init__(self, label, module, inputs, timer, keywords: dict | None = None):
        self.label = label
        self._module = module
        self._inputs = inputs
        self._keywords = keywords or {}
        self._timer = timer
        self._torch = require_torch()
        self.precision = module_precision(self._torch, module, timer is not None)
        self.output_names: list[str] | None = None  # the ONNX names, in export order, if known

    def outputs(self, feed: dict | None = None) -> dict:
        """Outputs flattened as the exporter flattens them, named by `output_names` (the ONNX
        export's outputs, in order) when set, else `output`, `output_0`, ..."""
        torch = self._torch
        from bnfold.pytorch.zoo.prepare import flatten_outputs

        args, keywords = self._inputs, self._keywords
        if feed is not None:
            device = args[0].device if args else next(iter(keywords.values())).device
            tensors = {name: torch.from_numpy(np.asarray(a, order="C")).to(device)
                       for name, a in feed.items()}
            args, keywords = split_call(self._module, tensors)
        with torch.inference_mode():
            flat = flatten_outputs(self._module(*args, **keywords))
        names = self.output_names or [name for name, _ in flat]
        if len(names) != len(flat):
            raise BnfoldError(
                f"{self.label} returns {len(flat)} tensors, the ONNX model has {len(names)} "
                f"outputs: compare a module with its own export"
            )
        return {name: value.detach().float().cpu().numpy() if value.is_floating_point()
                else value.detach().cpu().numpy() for name, (_, value) in zip(names, flat)}

    def run(self) -> Timing | None:
        torch = self._torch
        with torch.inference_mode():
            if self._timer is None:
                self._module(*self._inputs, **self._keywords)
                return None
            timer = self._timer
            with torch.cuda.stream(timer.stream):
                timer.start()
                import time

                start = time.perf_counter()
                self._module(*self._inputs, **self._keywords)
                enqueue_ms = (time.perf_counter() - start) * 1e3
            return Timing(timer.stop(), enqueue_ms)

    def close(self) -> None:
        self._module = None


class TorchEngine:
    """Opens torch.nn.Module models; the feed is numpy arrays by forward-argument name (passed
    by keyword when forward names them all, else in order)."""

    name = "torch"

    def __init__(self, options: EngineOptions):
        torch = require_torch()
        from bnfold.deploy.engines._cuda import cuda_timer

        self.options = options
        self._torch = torch
        self._timer = cuda_timer()
        self.device = "cuda" if self._timer is not None else "cpu"
        if options.threads is not None:
            if options.threads < 1:
                raise BnfoldError("--threads must be at least 1")
            torch.set_num_threads(options.threads)
        mode = "torch.compile" if options.torch_compile else "eager"
        self.notes = [f"PyTorch {mode} on {self.device}, inference_mode, eval()"]

    def open(self, label: str, model, feed: dict) -> TorchSession:
        torch = self._torch
        if not isinstance(model, torch.nn.Module):
            raise BnfoldError(f"the torch engine takes torch modules (--model SPEC), not {label}")
        module = model.eval().to(self.device)
        tensors = {name: torch.from_numpy(np.asarray(a, order="C")).to(self.device)
                   for name, a in feed.items()}
        args, keywords = split_call(module, tensors)
        if self.options.torch_compile:
            try:
                module = torch.compile(module)
                with torch.inference_mode():
                    module(*args, **keywords)
            except Exception as exc:  # compile errors come from many layers (dynamo, inductor)
                raise BnfoldError(
                    f"torch.compile failed on {label} ({first_line(exc)}): drop --torch-compile "
                    f"(inductor needs a C++ compiler on CPU)"
                ) from None
        return TorchSession(label, module, args, self._timer, keywords)

    def environment(self) -> dict:
        torch = self._torch
        env = {"torch": torch.__version__, "device": self.device,
               "torch_threads": torch.get_num_threads(),
               "torch_compile": self.options.torch_compile}
        if self.device == "cuda":
            env["device_name"] = torch.cuda.get_device_name(0)
        return env


def module_precision(torch, module, cuda: bool) -> Precision:
    """The lowest parameter dtype of the module, and TF32 when torch allows it on CUDA."""
    from bnfold.deploy.engines import lowest_precision

    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
    counts: dict[str, int] = {}
    for parameter in getattr(module, "parameters", lambda: [])():
        kind = names.get(parameter.dtype, "float32")
        counts[kind] = counts.get(kind, 0) + 1
    found = set(counts)
    source = "the module's parameter dtypes"
    if cuda and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        found.add("tf32")
        source += "; torch.backends allow TF32 on CUDA"
    return Precision(lowest_precision(found), source, counts)


def split_call(module, tensors: dict) -> tuple[list, dict]:
    """(positional, keyword) arguments: by keyword when forward names every input."""
    from bnfold.pytorch.zoo.prepare import forward_parameters

    params = forward_parameters(module)
    if params is not None and set(tensors) <= {p.name for p in params}:
        return [], dict(tensors)
    return list(tensors.values()), {}


def torch_models(spec: str, checkpoint: str | None, shapes, seed: int,
                 inputs_path: str | None = None):
    """(models [(label, module)], feed {name: array}, notes) for `bench --engine torch`.

    The model is prepared as for export (DataParallel unwrapped, parametrizations made
    permanent: both the original and the fused copy time that), inputs are matched to forward's
    arguments (`shapes` {name: dims}, or an .npz), and the fused copy — when any pair fused —
    is checked against the original on the feed before it is timed. `notes` say what was not
    fused and why (all of it, when nothing fused).
    """
    torch = require_torch()
    from bnfold.pytorch import zoo
    from bnfold.pytorch.export_inputs import InputSpec, load_example_npz
    from bnfold.pytorch.export_run import BENCH_HINT, example_inputs, resolve_inputs, run_counting
    from bnfold.pytorch.zoo.prepare import eval_copy, forward_parameters

    if isinstance(shapes, tuple):  # one shape, the old signature
        shapes = {"input": shapes}
    shapes = dict(shapes or {})
    notes: list[str] = []
    module = zoo.create(spec, checkpoint, notes=notes)  # the same loader as `bnfold export`
    module, prepared = eval_copy(module)
    notes += prepared
    if inputs_path:
        specs = load_example_npz(inputs_path)
    elif shapes:
        params = forward_parameters(module) or []
        names = {p.name for p in params}
        specs = [InputSpec(tuple(dims), None if name == "input" and name not in names else name)
                 for name, dims in shapes.items()]
    elif ":" in spec:
        raise BnfoldError(f"give the input shape for {spec!r} with --shape NAME=DxD... "
                          "(one per forward argument) or --inputs file.npz")
    else:
        specs = [InputSpec(zoo.model_input_shape(spec, module))]
    specs, _ = resolve_inputs(torch, module, specs, (), False, BENCH_HINT)
    tensors = example_inputs(torch, module, specs, seed)
    run_counting(torch, module, module, tensors, specs, BENCH_HINT)  # a wrong shape fails here, in one line
    feed = {s.name: t.numpy() for s, t in zip(specs, tensors)}
    args, keywords = split_call(module, dict(zip(feed, tensors)))
    fusion = fuse_bn(module, tensors if not keywords else _positional(module, keywords))
    notes += [f"not fused: {reason}" for reason in fusion.skipped]
    if not fusion.fused:
        notes.append("nothing fused: the model has no Conv/ConvTranspose/Linear→BatchNorm pair "
                     "that fuses exactly" + ("" if fusion.skipped else " (no such pair at all)")
                     + "; timing the original alone")
        return [(spec, module)], feed, notes
    _check_same(module, fusion.module, args, keywords, spec)
    return [("original", module), (f"fused ({len(fusion.fused)} BN)", fusion.module)], feed, notes


def fused_candidate(spec: str, checkpoint: str | None, feed: dict) -> tuple[object, list[str]]:
    """(the BN-fused module of `spec`, notes): what `verify --engine torch` runs against the
    ONNX export, prepared as `bnfold export` and `bench --engine torch` prepare it."""
    torch = require_torch()
    from bnfold.pytorch import zoo
    from bnfold.pytorch.zoo.prepare import eval_copy

    notes: list[str] = []
    module, prepared = eval_copy(zoo.create(spec, checkpoint, notes=notes))
    notes += prepared
    tensors = {name: torch.from_numpy(np.asarray(a, order="C")) for name, a in feed.items()}
    args, keywords = split_call(module, tensors)
    fusion = fuse_bn(module, args if not keywords else _positional(module, keywords))
    notes.append(f"torch: {len(fusion.fused)} Conv/Linear+BN pair(s) fused in the candidate"
                 + (f"; not fused: {'; '.join(fusion.skipped)}" if fusion.skipped else ""))
    return fusion.module, notes


def _positional(module, keywords: dict) -> list | None:
    """The keyword inputs in forward order, for ShapeProp (None if a gap needs a default)."""
    from bnfold.pytorch.zoo.prepare import forward_parameters

    ordered = []
    for param in forward_parameters(module) or []:
        if param.name not in keywords:
            break
        ordered.append(keywords[param.name])
    return ordered if len(ordered) == len(keywords) else None
