"""Turn a user's module into a plain eval-mode copy that export and fusion can handle.

Shared by `bnfold export` and `bench --engine torch`:
- `nn.DataParallel` / `DistributedDataParallel` are unwrapped (their `.module` is the model);
- weights under `torch.nn.utils.parametrizations` / `parametrize` (weight_norm, spectral_norm)
  or the old hook-based `nn.utils.weight_norm` / `spectral_norm` are made permanent on the copy,
  evaluated in eval mode (so spectral_norm runs no power iteration and the weight is the one the
  eval forward uses). The TorchScript exporter cannot export the parametrization's own ops
  (`aten::vdot`), fx cannot trace them, and the old weight_norm cannot even be deep-copied.
The caller's model is never modified.

    >>> model, notes = eval_copy(torch.nn.DataParallel(net))
"""

from __future__ import annotations

import copy
import inspect

from bnfold.errors import BnfoldError


def eval_copy(model) -> tuple[object, list[str]]:
    """(an eval-mode copy of `model` with wrappers removed and parametrizations baked, notes)."""
    import torch
    from torch import nn

    notes = []
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(f"unwrapped {type(model).__name__}: exporting its .module")
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            notes.append("unwrapped torch.compile's OptimizedModule: exporting its _orig_mod")
            model = model._orig_mod
        else:
            break
    model = _deepcopy_with_hook_weights(model)
    model.eval()
    baked = _remove_parametrizations(torch, model) + _remove_weight_hooks(model)
    if baked:
        notes.append(f"made {len(baked)} parametrized weight(s) permanent on the exported copy "
                     f"({_few(baked)})")
    return model, notes


def _hook_norms():
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm


def _weight_hooks(model):
    """(module name, module, hook key, hook) for each old-style weight_norm/spectral_norm hook."""
    kinds = _hook_norms()
    for name, module in model.named_modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, kinds):
                yield name, module, key, hook


def _deepcopy_with_hook_weights(model):
    """copy.deepcopy, except that old weight_norm's computed `weight` (a non-leaf tensor that
    deepcopy refuses) is dropped for the copy and recomputed on both sides afterwards."""
    import torch

    lazy = [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()]
    if lazy:
        raise BnfoldError(
            f"{', '.join(lazy[:3]) or 'the model'} still has uninitialised Lazy* parameters: run "
            f"one forward on an example in the factory so their shapes are known"
        )
    computed = []
    for _, module, _, hook in _weight_hooks(model):
        value = getattr(module, hook.name, None)
        if isinstance(value, torch.Tensor) and not value.is_leaf:
            computed.append((module, hook.name, value))
            delattr(module, hook.name)
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # user modules may hold anything (locks, files, C handles)
        raise BnfoldError(
            f"cannot copy the model ({type(exc).__name__}: {_first_line(exc)}): bnfold works on a "
            "copy so your model stays untouched; make it deep-copyable (e.g. no open files or "
            "locks as attributes)"
        ) from None
    finally:
        for module, name, value in computed:
            setattr(module, name, value)


def _remove_parametrizations(torch, model) -> list[str]:
    from torch.nn.utils import parametrize

    baked = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        # deepcopy shares the injected Parametrized* class with the caller's module, and
        # removal deletes the weight property from that class: give the copy a class of its own.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for tensor_name in list(module.parametrizations.keys()):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            baked.append(f"{name}.{tensor_name}" if name else tensor_name)
    return baked


def _remove_weight_hooks(model) -> list[str]:
    import torch

    baked = []
    for name, module, key, hook in list(_weight_hooks(model)):
        with torch.no_grad():
            if isinstance(hook, _hook_norms()[1]):
                weight = hook.compute_weight(module, do_power_iteration=False)
            else:
                weight = hook.compute_weight(module)
        for suffix in ("_g", "_v", "_orig", "_u"):
            if hasattr(module, hook.name + suffix):
                delattr(module, hook.name + suffix)
        if hasattr(module, hook.name):
            delattr(module, hook.name)
        module.register_parameter(hook.name, torch.nn.Parameter(weight.detach().clone()))
        del module._forward_pre_hooks[key]
        # spectral_norm also registered state_dict hooks that expect weight_orig: drop them.
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
            for hook_key in [k for k, h in hooks.items() if type(h).__module__.startswith(
                    "torch.nn.utils.spectral_norm")]:
                del hooks[hook_key]
        baked.append(f"{name}.{hook.name}" if name else hook.name)
    return baked


def forward_parameters(model) -> list[inspect.Parameter] | None:
    """The forward's named parameters (no self, *args, **kwargs); None if it takes *args only."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                p.KEYWORD_ONLY)]
    if not named and any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return named


def flatten_outputs(output, prefix: str = "") -> list[tuple[str, object]]:
    """[(stable name, tensor)] in the order the TorchScript exporter flattens them.

    A single tensor is `output`; tuple/list items are `output_0`, `output_1`, … (nested:
    `output_1_0`); dict entries are named by their key (a tuple under key `aux` gives `aux_0`,
    a dict under it `aux.key`), int keys like indices (`{0: a, 1: b}` gives `output_0`,
    `output_1`, as `(a, b)` does). None entries are dropped, as the exporter drops them.
    """
    import torch

    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)]
    if output is None:
        return []
    if isinstance(output, dict):
        found = []
        for key, value in output.items():
            found += flatten_outputs(value, _key_name(prefix, key))
        return found
    if isinstance(output, (tuple, list)):
        found = []
        for index, value in enumerate(output):
            found += flatten_outputs(value, f"{prefix}_{index}" if prefix else f"output_{index}")
        return found
    raise BnfoldError(
        f"the model returns a {type(output).__name__} at {prefix or 'its output'}: return "
        "tensors (or tuples, lists, dicts of tensors) from forward"
    )


def _key_name(prefix: str, key) -> str:
    if isinstance(key, str):
        return f"{prefix}.{key}" if prefix else key
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{prefix}_{key}" if prefix else f"output_{key}"
    raise BnfoldError(
        f"the model returns a dict with a {type(key).__name__} key ({key!r}) at "
        f"{prefix or 'its output'}: key output dicts by str or int"
    )


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
