"""bnfold: fold BatchNormalization into neighbouring weights in ONNX models, verifiably.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")          # FoldResult(model, report)
    >>> bnfold.verify("model.onnx", result.model).ok

The API loads on first use: `import bnfold` (and so `bnfold --help`) imports neither onnx nor
numpy, `fold` and `fold_file` load onnx and numpy, and `verify` its own modules (onnxruntime
loads inside verify()). torch and tensorrt never load from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from bnfold.folding.api import FoldResult, fold, fold_file
    from bnfold.folding.report import FoldReport
    from bnfold.verification.runs import VerifyResult, verify

__version__ = "0.1.0"
__all__ = ["BnfoldError", "FoldResult", "FoldReport", "VerifyResult", "fold", "fold_file", "verify"]

# Public name -> the module that defines it. The modules are named apart from the functions
# (bnfold.folding, bnfold.verification.runs), so importing one never shadows `bnfold.fold` or
# `bnfold.verify`. Lazy because `bnfold fold --no-verify` would otherwise pay for importing
# verification (~12 ms) and `bnfold --help` for onnx and numpy (~170 ms).
_HOMES = {
    "FoldResult": "bnfold.folding.api",
    "fold": "bnfold.folding.api",
    "fold_file": "bnfold.folding.api",
    "FoldReport": "bnfold.folding.report",
    "VerifyResult": "bnfold.verification.runs",
    "verify": "bnfold.verification.runs",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
