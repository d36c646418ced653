"""Sample BatchNorm networks and model specs, for export, training and tests.

    >>> import bnfold.pytorch.zoo
    >>> model = bnfold.pytorch.zoo.create("resnet18")                     # a sample, eval mode
    >>> model = bnfold.pytorch.zoo.create("mypkg.nets:build", "ckpt.pt")  # your factory + checkpoint
    >>> bnfold.pytorch.zoo.default_input_shape("resnet18")
    (1, 3, 32, 32)

A spec is a sample name (SAMPLE_NAMES), `module:factory` or `file.py:factory`, either with
optional literal arguments, `timm:create_model('resnet18', num_classes=10)` (the factory must
return a torch.nn.Module; bnfold.pytorch.zoo.factory), or `torchvision:NAME` (only where
torchvision is installed; bnfold never depends on it). torch itself is imported on first use
only.
"""

from __future__ import annotations

import os
import re
import warnings

from bnfold.errors import BnfoldError
from bnfold.pytorch.zoo.factory import build_from_factory, import_failure, spec_file_stem

SAMPLE_NAMES = (
    "paper-mlp",
    "resnet18",
    "mobilenetv2",
    "convtranspose-decoder",
    "conv1d",
    "preact",
)
TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_INPUT_SHAPE = (1, 3, 224, 224)


def require_torch():
    """The torch module, or a BnfoldError that says how to install it."""
    try:
        import torch
    except ImportError:
        raise BnfoldError(
            "this needs PyTorch, which is not installed: pip install 'bnfold[torch]'"
        ) from None
    return torch


def create(spec: str, checkpoint: str | None = None, notes: list[str] | None = None):
    """Build the model named by `spec`, load `checkpoint` into it if given, and return it in
    eval mode. What was adapted on the way (a stripped key prefix, a container) goes to `notes`."""
    torch = require_torch()
    if spec in SAMPLE_NAMES:
        model = _create_sample(spec, checkpoint)
    elif spec.startswith(TORCHVISION_PREFIX):
        model = _create_torchvision(spec[len(TORCHVISION_PREFIX):])
    elif ":" in spec:
        model = build_from_factory(spec)
    else:
        raise BnfoldError(
            f"unknown model {spec!r}: use a sample ({', '.join(SAMPLE_NAMES)}), "
            "module:factory, or torchvision:NAME"
        )
    if not isinstance(model, torch.nn.Module):
        raise BnfoldError(
            f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module: "
            "make the factory return the model"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, notes)
    return model.eval()


def file_stem(spec: str) -> str:
    """A file name stem for what `spec` builds: the sample's name, `torchvision.NAME`,
    `module.factory` (with the readable part of any arguments)."""
    if spec in SAMPLE_NAMES:
        return spec
    if spec.startswith(TORCHVISION_PREFIX):
        return spec.replace(":", ".")
    return spec_file_stem(spec)


def default_input_shape(spec: str) -> tuple[int, ...]:
    """The input shape (batch 1) a sample or torchvision model expects; factories must say theirs."""
    if spec in SAMPLE_NAMES:
        from bnfold.pytorch.zoo.nets import SAMPLES

        return SAMPLES[spec][1]
    if spec.startswith(TORCHVISION_PREFIX):
        return TORCHVISION_INPUT_SHAPE
    raise BnfoldError(
        f"no default input shape for {spec!r}: pass one with --input-shape, e.g. 1x3x224x224"
    )


def model_input_shape(spec: str, model) -> tuple[int, ...]:
    """Like default_input_shape, but sized to a built model (paper-mlp's input width varies)."""
    in_features = getattr(model, "in_features", None)
    if spec == "paper-mlp" and isinstance(in_features, int):
        return (1, in_features)
    return default_input_shape(spec)


CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")  # tried in this order
# Prefixes wrappers add to every key: DataParallel/DDP, Lightning and most trainers, torch.compile.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")
ZIP_MAGIC = b"PK\x03\x04"
SAVE_HINT = "save it with torch.save(model.state_dict(), path)"


def read_state_dict(path: str | os.PathLike, notes: list[str] | None = None) -> dict:
    """The state_dict saved at `path`, loaded weights-only (never runs pickled code).

    Plain, or inside a common container ("state_dict", "model_state_dict", "model"), as
    Lightning and most training scripts save it; the container is noted in `notes`.
    """
    torch = require_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BnfoldError(f"checkpoint {path!r} does not exist: check the path")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        raise BnfoldError(_unreadable(path, exc)) from None
    if _is_state_dict(torch, data):
        return data
    if isinstance(data, dict):
        for key in CONTAINER_KEYS:
            if _is_state_dict(torch, data.get(key)):
                if notes is not None:
                    notes.append(f"loaded the state_dict under the checkpoint's {key!r} key")
                return data[key]
        keys = [str(k) for k in data]
        raise BnfoldError(
            f"checkpoint {path!r} holds no state_dict of tensors (top-level keys: "
            f"{_few(keys, 8)}; none of {', '.join(CONTAINER_KEYS)} holds one): {SAVE_HINT}"
        )
    raise BnfoldError(f"checkpoint {path!r} holds a {type(data).__name__}, not a state_dict "
                      f"of tensors: {SAVE_HINT}")


def _is_state_dict(torch, data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _unreadable(path: str, exc: BaseException) -> str:
    """The real reason torch.load(weights_only=True) refused `path`, in one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    with open(path, "rb") as handle:
        head = handle.read(4)
    if "Weights only load failed" in text and "GLOBAL" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        refused = found.group(1) if found else None
        top = _top_level_type(_object_opcodes(path))
        if refused is None or top == refused:
            what = f" (it needs class {refused})" if refused else ""
            return (f"checkpoint {path!r} is a pickled Python object{what}, not a state_dict: "
                    "bnfold loads weights only (weights_only=True) and never runs a file's code; "
                    f"where the model is built, {SAVE_HINT}")
        what = (f"a numpy value ({refused})" if refused.startswith("numpy.")
                else f"an object of type {refused}")
        where = f" inside its top-level {top}" if top in ("dict", "list") else ""
        return (f"checkpoint {path!r} holds {what}{where}, which weights_only=True loading "
                "refuses (bnfold loads no other way: it never runs a file's code): save only "
                "tensors, e.g. "
                "torch.save(model.state_dict(), path), or re-save the checkpoint with plain "
                "types (dict, list, str, int, float, tensors) in place of that object")
    operand = re.search(r"Unsupported operand (\d+)", text)
    protocol = next((arg for name, arg in _object_opcodes(path, 1) if name == "PROTO"), None)
    if operand and protocol is not None and protocol >= 4:
        # torch's weights-only unpickler reads protocols up to 3: 149 is protocol 4's FRAME.
        return (f"checkpoint {path!r} was saved with pickle protocol {protocol}, which "
                f"weights_only=True loading cannot read (unsupported opcode {operand.group(1)}): "
                "re-save it with torch.save's default protocol (no pickle_protocol argument)")
    if head == ZIP_MAGIC:
        detail = (text.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        return (f"checkpoint {path!r} is a damaged or truncated torch.save archive ({detail}): "
                "copy it again or re-save it")
    if not head or head[0] != 0x80:  # neither a zip archive nor a pickle (protocol 2+)
        return (f"checkpoint {path!r} is not a PyTorch checkpoint (neither a torch.save zip "
                f"archive nor a pickle; it starts with {head!r}): {SAVE_HINT}")
    return (f"checkpoint {path!r} is a legacy pickle that weights-only loading rejects "
            f"({(text.strip().splitlines() or ['?'])[-1][:120]}): load it once in Python and "
            f"re-save with torch.save(model.state_dict(), path)")


def _object_opcodes(path: str, limit: int = 32) -> list[tuple[str, object]]:
    """The first (opcode name, argument) pairs of the pickle that holds the checkpoint's
    object, read and never run; [] where the file is not understood (torch.save's zip
    archive and its legacy format are)."""
    import io
    import itertools
    import pickletools
    import zipfile

    def head(stream, skipped: int):
        for _ in range(skipped):
            for _ in pickletools.genops(stream):
                pass
        return [(op.name, arg) for op, arg, _ in itertools.islice(pickletools.genops(stream), limit)]

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                return head(io.BytesIO(archive.read(name)), 0)
        with open(path, "rb") as stream:  # legacy: magic number, protocol, sys_info, object
            return head(stream, 3)
    except (ValueError, KeyError, OSError, StopIteration, zipfile.BadZipFile):
        return []


def _top_level_type(opcodes) -> str | None:
    """What the top-level object is built from: "dict", "list" or a class's module.name."""
    strings = []
    for name, arg in opcodes:
        if name in ("PROTO", "FRAME", "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            continue
        if "UNICODE" in name or "STRING" in name:
            strings.append(arg)  # STACK_GLOBAL's module and name (protocol 4+)
            continue
        if name == "GLOBAL":
            return arg.replace(" ", ".")
        if name == "STACK_GLOBAL" and len(strings) == 2:
            return ".".join(strings)
        return {"EMPTY_DICT": "dict", "EMPTY_LIST": "list"}.get(name)
    return None


def load_checkpoint(model, path: str | os.PathLike, notes: list[str] | None = None) -> None:
    """Load a checkpoint as load_state_dict(strict=True) would, after unwrapping containers
    and stripping a wrapper's key prefix (`module.`, `model.`): every key present (or filled
    in by the module, as BN's num_batches_tracked is for older checkpoints), no extras, every
    shape equal."""
    state = read_state_dict(path, notes)
    expected = model.state_dict()
    state = _strip_prefix(state, expected, notes)
    # BatchNorm fills in a missing num_batches_tracked (checkpoints older than torch 0.4.1), so
    # load_state_dict(strict=True) accepts its absence: so do we.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    _refuse_keys(path, missing, unexpected)
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise BnfoldError(
            f"checkpoint {os.fspath(path)!r} has wrong shapes ({_few(wrong)}; checkpoint vs model): "
            "use the checkpoint saved from this model"
        )
    # strict=False returns what strict=True would refuse (after the modules' own legacy
    # handling) instead of raising a multi-line error.
    result = model.load_state_dict(state, strict=False)
    _refuse_keys(path, list(result.missing_keys), list(result.unexpected_keys))


def _refuse_keys(path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise BnfoldError(
            f"checkpoint {os.fspath(path)!r} does not fit the model ({'; '.join(parts)}): "
            "use the checkpoint saved from this model"
        )


def _strip_prefix(state: dict, expected: dict, notes: list[str] | None) -> dict:
    """Drop the wrapper prefixes all keys share (`module.`, `model.module.`, ...) when that
    makes more of them match the model's keys."""
    def matches(keys) -> int:
        return len(set(keys) & set(expected))

    levels = [("", state)]
    while len(levels) < 4:
        prefix = next((p for p in KEY_PREFIXES if all(k.startswith(p) for k in levels[-1][1])),
                      None)
        if prefix is None:
            break
        levels.append((levels[-1][0] + prefix,
                       {k[len(prefix):]: v for k, v in levels[-1][1].items()}))
    stripped, best = max(levels, key=lambda level: matches(level[1]))  # first of equals: less
    if stripped and notes is not None:
        notes.append(f"stripped the key prefix {stripped!r} from the checkpoint "
                     "(saved from a wrapper such as DataParallel or Lightning)")
    return best


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _create_sample(name: str, checkpoint: str | None):
    from bnfold.pytorch.zoo.nets import SAMPLES, PaperMLP

    factory = SAMPLES[name][0]
    if name == "paper-mlp" and checkpoint is not None:
        # The paper net's input width (64 for digits, 784 for MNIST) and arm come from the checkpoint.
        state = read_state_dict(checkpoint)
        state = _strip_prefix(state, {"hidden.0.linear.weight": None}, None)
        weight = state.get("hidden.0.linear.weight")
        if weight is not None and weight.dim() == 2:
            batchnorm = any(k.startswith("hidden.0.bn.") for k in state)
            return PaperMLP(in_features=int(weight.shape[1]), batchnorm=batchnorm)
    return factory()


def _create_torchvision(name: str):
    try:
        import torchvision
    except ImportError:
        raise BnfoldError(
            f"torchvision:{name} needs torchvision, which is not installed: install it, "
            "or use a sample or module:factory"
        ) from None
    except Exception as exc:  # a torchvision built for another torch fails at import
        raise BnfoldError(import_failure("torchvision", exc)) from None
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise BnfoldError(
            f"torchvision has no model {name!r}: see torchvision.models.list_models()"
        ) from None


def randomize_batchnorm(model, seed: int = 0):
    """Give every BN non-trivial statistics and affine terms (seeded), in place; returns `model`.

    A freshly built BN is the identity (mean 0, var 1, γ 1, β 0), so folding it proves little:
    tests and demos use this to make each fold change the weights.
    """
    torch = require_torch()
    from torch.nn.modules.batchnorm import _BatchNorm

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    module.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return model
