"""A user's model from a factory spec: `module:factory`, `path/to/file.py:factory`, either
followed by literal arguments, `timm:create_model('resnet18', num_classes=10)`. The factory
may be a class or an attribute of one: `efficientnet_pytorch:EfficientNet.from_name('efficientnet-b0')`.

The module is imported (from the working folder too, as `python -m` does) or the file run as a
module, and the factory called with the arguments. Arguments are read as Python literals
(strings, numbers, True/False/None, tuples, lists, dicts, sets) with `ast.literal_eval`, never
evaluated: a spec names code to run, it does not carry any.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from bnfold.errors import BnfoldError

_ARGUMENTS_HINT = ("arguments are Python literals (strings, numbers, True/False/None, tuples, "
                   "lists, dicts), e.g. timm:create_model('resnet18', num_classes=10)")


@dataclass(frozen=True)
class FactorySpec:
    module: str  # a dotted module name, or the path of a .py file
    factory: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        """A path (`code/nets.py`, or `nets.py` where that file exists), not a module name
        (`pkg.py` can also be a package's submodule called py)."""
        return os.sep in self.module or (self.module.endswith(".py")
                                         and os.path.isfile(self.module))

    def call_text(self) -> str:
        """How the factory is called, for messages: `build()`, `create_model('resnet18')`."""
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.factory}({', '.join(parts)})"


def parse_factory_spec(spec: str) -> FactorySpec:
    """`module:factory` or `file.py:factory`, with optional `(literal arguments)`."""
    head, paren, call = spec.partition("(")
    module, _, factory = head.strip().rpartition(":")
    factory = factory.strip()
    if not module or not all(part.isidentifier() for part in factory.split(".")):
        raise BnfoldError(f"cannot read model spec {spec!r}: write module:factory, e.g. "
                          f"mypkg.nets:build (or file.py:build, or build('arg', n=2))")
    if not paren:
        return FactorySpec(module, factory)
    args, kwargs = _literal_arguments(spec, paren + call)
    return FactorySpec(module, factory, args, kwargs)


def _literal_arguments(spec: str, text: str) -> tuple[tuple, dict]:
    try:
        tree = ast.parse("f" + text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        raise BnfoldError(f"cannot read the arguments of {spec!r}: {_ARGUMENTS_HINT}") from None
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
        raise BnfoldError(f"cannot read the arguments of {spec!r}: {_ARGUMENTS_HINT}")
    try:
        if any(isinstance(a, ast.Starred) for a in tree.args) or any(
                k.arg is None for k in tree.keywords):
            raise ValueError("*args/**kwargs")
        args = tuple(ast.literal_eval(a) for a in tree.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise BnfoldError(f"cannot read the arguments of {spec!r}: {_ARGUMENTS_HINT}") from None
    return args, kwargs


def build_from_factory(spec: str):
    """What the factory named by `spec` returns (checked to be a module by the caller)."""
    parsed = parse_factory_spec(spec)
    module = _import_file(spec, parsed.module) if parsed.is_file else _import(parsed.module)
    factory = module
    for part in parsed.factory.split("."):  # Class.from_config: an attribute of an attribute
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise BnfoldError(f"{parsed.module!r} has no callable {parsed.factory!r}: name a "
                          f"function that returns the model")
    _check_call(spec, parsed, factory)
    try:
        return factory(*parsed.args, **parsed.kwargs)
    except Exception as exc:  # the user's factory failed: any exception type
        text = " ".join(str(exc).split())[:200] or "no message"
        raise BnfoldError(f"{parsed.module}:{parsed.call_text()} raised {type(exc).__name__}: "
                          f"{text}: fix the factory or its arguments") from None


def spec_file_stem(spec: str) -> str:
    """A file name stem for what `spec` builds: `mypkg.nets.build`, `nets.build`, and for a
    call with arguments, the readable part of them (`timm.create_model_resnet18`)."""
    parsed = parse_factory_spec(spec)
    module = (os.path.splitext(os.path.basename(parsed.module))[0] if parsed.is_file
              else parsed.module)
    stem = f"{module}.{parsed.factory}"
    if parsed.args or parsed.kwargs:
        call = parsed.call_text()[len(parsed.factory):]
        stem += "_" + (re.sub(r"[^A-Za-z0-9.=-]+", "_", call).strip("_") or "args")[:60]
    return stem


@contextmanager
def _on_import_path(folder: str) -> Iterator[None]:
    """`folder` first on sys.path while inside (unless it is there already)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            sys.path.remove(folder)


def _import(name: str):
    # Like `python -m`, look in the working folder too: `bnfold export --model mynet:build`.
    with _on_import_path(os.getcwd()):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise BnfoldError(
                f"cannot import {name!r} ({exc}): check the name and that it is on PYTHONPATH"
            ) from None
        except Exception as exc:  # the user's module ran and failed: any exception type
            raise BnfoldError(import_failure(name, exc)) from None


def _import_file(spec: str, path: str):
    """The .py file at `path` run as a module, its folder on the import path meanwhile (so it
    can import its neighbours, as `python file.py` could)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise BnfoldError(f"model spec {spec!r}: {path!r} is not a file: check the path")
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    name = f"_bnfold_factory_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise BnfoldError(f"model spec {spec!r}: {path!r} cannot be imported: give a .py file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    with _on_import_path(os.path.dirname(path)):
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file ran and failed: any exception type
            del sys.modules[name]
            raise BnfoldError(import_failure(path, exc)) from None
    return module


def _check_call(spec: str, parsed: FactorySpec, factory) -> None:
    """The factory accepts the arguments given, or a one-line error saying what it needs."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: just call it
        return
    try:
        signature.bind(*parsed.args, **parsed.kwargs)
    except TypeError as exc:
        required = [p.name for p in signature.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)]
        if not parsed.args and not parsed.kwargs and required:
            raise BnfoldError(
                f"{spec} needs arguments ({', '.join(required)}): give them in the spec, e.g. "
                f"{spec}({', '.join(f'{r}=...' for r in required)}) (literals), or add a "
                f"factory that takes none"
            ) from None
        raise BnfoldError(f"{spec}: {exc}: give the arguments {parsed.factory}"
                          f"{signature} takes") from None


def import_failure(module_name: str, exc: BaseException) -> str:
    """One line for a module that raised while importing; a torchvision built for another
    torch (`operator torchvision::nms does not exist`) named as such."""
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    if "torchvision::" in text or module_name.split(".")[0] == "torchvision":
        import torch

        return (f"importing {module_name!r} failed ({type(exc).__name__}: {text}): the installed "
                f"torchvision does not match torch {torch.__version__}; install the torchvision "
                f"release built for this torch, or define the network in your own "
                f"module:factory")
    return (f"importing {module_name!r} failed ({type(exc).__name__}: {text}): fix the error in "
            f"that module, or point --model at another module:factory")
