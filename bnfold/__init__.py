"""bnfold: fold BatchNormalization into neighbouring weights in ONNX models, verifiably.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")          # FoldResult(model, report)
    >>> bnfold.verify("model.onnx", result.model).ok

onnxruntime loads on first use of `verify`; torch and tensorrt never load from here.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError

# The functions live in modules named apart from them (bnfold.folding, bnfold.verification.runs),
# so `bnfold.fold` and `bnfold.verify` are never shadowed by a submodule import.
# Both load onnx and numpy only (onnxruntime loads inside verify()).
from bnfold.folding.api import FoldResult, fold, fold_file  # noqa: E402
from bnfold.folding.report import FoldReport  # noqa: E402
from bnfold.verification.runs import VerifyResult, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BnfoldError", "FoldResult", "FoldReport", "VerifyResult", "fold", "fold_file", "verify"]
