"""PyTorch engine: the framework baseline, a module vs its Conv/Linear+BN-fused counterpart.

Eager by default, `torch.compile` with `torch_compile=True`. Fusion uses torch's own
`fuse_conv_bn_eval` / `fuse_linear_bn_eval` on an fx trace, and the fused module is checked
against the original on the bench input before it is timed. GPU timing (CUDA events) is used
when the module runs on CUDA; that path is unverified on hardware here.
"""

from __future__ import annotations


import numpy as np

from bnfold.engines import INSTALL_HINTS, EngineOptions, Timing, first_line
from bnfold.errors import BnfoldError


def require_torch():
    try:
        import torch
    except ImportError:
        raise BnfoldError(f"PyTorch is not installed: {INSTALL_HINTS['torch']}") from None
    return torch


def fuse_bn(module):
    """An eval-mode copy of `module` with every Conv→BN and Linear→BN pair fused.

    Returns (fused module, number of pairs fused). A BN whose input also feeds something
    else is left alone: fusing it would change what the other consumer sees.
    """
    require_torch()
    import copy

    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    module = copy.deepcopy(module).eval()
    try:
        traced = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise BnfoldError(
            f"torch.fx cannot trace the model ({first_line(exc)}): bench its ONNX export "
            f"with --engine ort-cpu instead"
        ) from None
    modules = dict(traced.named_modules())
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    fused = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), bns):
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        if len(producer.users) != 1:
            continue
        first, bn = modules[producer.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(first, convs):
            replacement = fuse_conv_bn_eval(first, bn)
        elif isinstance(first, nn.Linear):
            replacement = fuse_linear_bn_eval(first, bn)
        else:
            continue
        _set_submodule(traced, producer.target, replacement)
        node.replace_all_uses_with(producer)
        traced.graph.erase_node(node)
        fused += 1
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()  # the fused-away BNs would still hold state
    return traced.eval(), fused


def _set_submodule(root, target: str, module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _check_same(original, fused, inputs, label: str) -> None:
    torch = require_torch()
    try:
        with torch.no_grad():
            a = original(*inputs)
            b = fused(*inputs)
    except RuntimeError as exc:  # torch reports shape/type mismatches as RuntimeError
        raise BnfoldError(
            f"{label} cannot run on input {list(inputs[0].shape)} ({first_line(exc)}): "
            f"give the right --shape input=DxD..."
        ) from None
    a_t = a if isinstance(a, torch.Tensor) else a[0]
    b_t = b if isinstance(b, torch.Tensor) else b[0]
    scale = float(a_t.abs().max()) or 1.0
    error = float((a_t.double() - b_t.double()).abs().max()) / scale
    if not error <= 1e-4:
        raise BnfoldError(
            f"the fused {label} differs from the original (scale-relative error {error:.2g}): "
            f"please report the model"
        )


class TorchSession:
    def __init__(self, label, module, inputs, timer):
        self.label = label
        self._module = module
        self._inputs = inputs
        self._timer = timer
        self._torch = require_torch()

    def run(self) -> Timing | None:
        torch = self._torch
        with torch.inference_mode():
            if self._timer is None:
                self._module(*self._inputs)
                return None
            timer = self._timer
            with torch.cuda.stream(timer.stream):
                timer.start()
                import time

                start = time.perf_counter()
                self._module(*self._inputs)
                enqueue_ms = (time.perf_counter() - start) * 1e3
            return Timing(timer.stop(), enqueue_ms)

    def close(self) -> None:
        self._module = None


class TorchEngine:
    """Opens torch.nn.Module models; the feed is numpy arrays in forward-argument order."""

    name = "torch"

    def __init__(self, options: EngineOptions):
        torch = require_torch()
        from bnfold.engines._cuda import cuda_timer

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
        inputs = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                  for a in feed.values()]
        if self.options.torch_compile:
            try:
                module = torch.compile(module)
                with torch.inference_mode():
                    module(*inputs)
            except Exception as exc:  # compile errors come from many layers (dynamo, inductor)
                raise BnfoldError(
                    f"torch.compile failed on {label} ({first_line(exc)}): drop --torch-compile "
                    f"(inductor needs a C++ compiler on CPU)"
                ) from None
        return TorchSession(label, module, inputs, self._timer)

    def environment(self) -> dict:
        torch = self._torch
        env = {"torch": torch.__version__, "device": self.device,
               "torch_threads": torch.get_num_threads(),
               "torch_compile": self.options.torch_compile}
        if self.device == "cuda":
            env["device_name"] = torch.cuda.get_device_name(0)
        return env


def torch_models(spec: str, checkpoint: str | None, shape: tuple[int, ...] | None, seed: int):
    """(models [(label, module)], feed) for `bench --engine torch --model SPEC`.

    The original and its fused version; the fused one is checked against the original first.
    """
    torch = require_torch()
    from bnfold import zoo

    module = zoo.create(spec, checkpoint)  # the same loader as `bnfold export`
    if shape is None:
        if ":" in spec:
            raise BnfoldError(f"give the input shape for {spec!r} with --shape input=DxD...")
        shape = zoo.model_input_shape(spec, module)
    feed = {"input": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    fused, count = fuse_bn(module)
    if count == 0:
        return [(spec, module)], feed
    example = [torch.from_numpy(feed["input"])]
    _check_same(module.eval(), fused, example, spec)
    return [("original", module), (f"fused ({count} BN)", fused)], feed
