"""Stage 2, verification: does the folded model compute what the original does?

`runs` runs both in ONNX Runtime (optimisation off) on inputs from `inputs` (declared shapes,
the symbolic-dim ladder, non-float inputs, .npz) and judges them with `comparison` (tolerances,
non-finite values, the model's own float32 noise); `float64` is the ground truth where
affordable; `on_engine` runs the candidate on the engine that will deploy it. onnxruntime is
imported when a verification runs, never at import.
"""

from bnfold.verification.runs import VerifyResult, verify

__all__ = ["VerifyResult", "verify"]
