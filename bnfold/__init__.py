"""bnfold: fold BatchNormalization into neighbouring weights in ONNX models, verifiably.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")          # FoldResult(model, report)
    >>> bnfold.verify("model.onnx", result.model).ok

onnxruntime loads on first use of `verify`; torch and tensorrt never load from here.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError

# Bound eagerly: `bnfold.fold` and `bnfold.verify` are also module names, and importing
# bnfold.fold.math or bnfold.verify would otherwise replace a lazy function with the module.
# Both load onnx and numpy only (onnxruntime loads inside verify()).
from bnfold.fold.api import FoldResult, fold, fold_file  # noqa: E402
from bnfold.fold.report import FoldReport  # noqa: E402
from bnfold.verify import VerifyResult, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BnfoldError", "FoldResult", "FoldReport", "VerifyResult", "fold", "fold_file", "verify"]
