"""bnfold: fold BatchNormalization into neighbouring weights in ONNX models, verifiably.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")          # FoldResult(model, report)
    >>> bnfold.verify("model.onnx", result.model).ok

onnxruntime loads on first use of `verify`; torch and tensorrt never load from here.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError

# Bound eagerly: `bnfold.fold` is also the name of the subpackage, and importing any of its
# modules (bnfold.fold.math, ...) would otherwise replace the lazy function with the package.
from bnfold.fold.api import FoldResult, fold, fold_file  # noqa: E402  (onnx + numpy only)

__version__ = "0.1.0"
__all__ = ["BnfoldError", "FoldResult", "FoldReport", "VerifyResult", "fold", "fold_file", "verify"]

_LAZY = {
    "FoldReport": ("bnfold.fold.report", "FoldReport"),
    "verify": ("bnfold.verify", "verify"),
    "VerifyResult": ("bnfold.verify", "VerifyResult"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
