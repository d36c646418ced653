"""bnfold: fold BatchNormalization into neighbouring weights in ONNX models, verifiably.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")          # FoldResult(model, report)
    >>> bnfold.verify("model.onnx", result.model).ok

Heavy modules load on first use, so `import bnfold` stays cheap and never imports torch.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError

__version__ = "0.1.0"
__all__ = ["BnfoldError", "FoldResult", "FoldReport", "VerifyResult", "fold", "fold_file", "verify"]

_LAZY = {
    "fold": ("bnfold.fold.api", "fold"),
    "fold_file": ("bnfold.fold.api", "fold_file"),
    "FoldResult": ("bnfold.fold.api", "FoldResult"),
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
