"""Kernels onnx.reference lacks in float64, for the float64 ground truth.

- MeanVarianceNormalization: onnx.reference expands its function body, whose constants
  (the exponent 2, epsilon 1e-9) are float32, and Pow then refuses a float64 input. Here it
  is the body computed in the input's dtype, epsilon rounded through float32 as there.
- Add, Sub, Mul, Div and Pow before opset 7, with `broadcast=1`: the second input aligned
  at `axis` (a bias [C] against [N, C, H, W] at axis 1), where numpy aligns trailing dims.
  onnx.reference knows only numpy's broadcasting, so the old model zoo's models failed there.
- Upsample (opset 7 and 9) with mode "linear": onnx.reference has only integer-scale
  "nearest". Upsample is Resize with asymmetric coordinates (input position = output position
  / scale), which is how ONNX Runtime computes it, so onnx.reference's Resize does the work.
"""

from __future__ import annotations

import numpy as np


def mean_variance_normalization():
    from onnx.reference.op_run import OpRun

    class MeanVarianceNormalization(OpRun):
        op_domain = ""

        def _run(self, X, axes=None):
            axes = tuple((0, 2, 3) if axes is None else axes)
            kind = X.dtype.type
            mean = np.mean(X, axis=axes, keepdims=True)
            variance = np.mean(X * X, axis=axes, keepdims=True) - mean * mean
            std = np.sqrt(variance) + kind(np.float32(1e-9))
            return (((X - mean) / std).astype(X.dtype),)

    return MeanVarianceNormalization


def upsample():
    from onnx.reference.ops.op_resize import Resize
    from onnx.reference.ops.op_upsample import Upsample as ReferenceUpsample

    class Upsample(ReferenceUpsample):
        op_domain = ""

        def _run(self, x, scale=None, mode=None, scales=None, height_scale=None,
                 width_scale=None):
            factors = np.asarray(scale if scale is not None else scales, dtype=np.float64)
            if mode in ("linear", "bilinear"):
                resize = Resize.__new__(Resize)  # its kernel only: no node to build it from
                return resize._run(x, None, scales=factors.astype(np.float32),
                                   coordinate_transformation_mode="asymmetric",
                                   mode="linear")
            return super()._run(x, factors, mode=mode)

    return Upsample


def legacy_broadcast_ops() -> list:
    """Add, Sub, Mul, Div, Pow that honour opset 1-6's `broadcast` and `axis` attributes
    (onnx.reference's kernels otherwise, so opset 7 and later is unchanged)."""
    from onnx.reference.ops.op_add import Add
    from onnx.reference.ops.op_div import Div
    from onnx.reference.ops.op_mul import Mul
    from onnx.reference.ops.op_pow import Pow
    from onnx.reference.ops.op_sub import Sub

    def legacy(base):
        class Legacy(base):
            op_domain = ""

            def _run(self, a, b):  # binary kernels get no attributes: they are on self
                return base._run(self, a, aligned(a, b, getattr(self, "broadcast", None),
                                                   getattr(self, "axis", None)))

        Legacy.__name__ = Legacy.__qualname__ = base.__name__
        return Legacy

    return [legacy(op) for op in (Add, Sub, Mul, Div, Pow)]


def aligned(a: np.ndarray, b: np.ndarray, broadcast, axis) -> np.ndarray:
    """`b` shaped to broadcast against `a` as opset 1-6 did: its dims placed from `axis`
    (default: against `a`'s trailing dims, which numpy does anyway)."""
    b = np.asarray(b)
    if not broadcast or b.ndim >= np.ndim(a) or axis is None:
        return b
    start = axis if axis >= 0 else axis + np.ndim(a)
    trailing = np.ndim(a) - start - b.ndim
    if start < 0 or trailing < 0:
        return b  # not a shape opset 6 accepts: let the kernel refuse it
    return b.reshape(b.shape + (1,) * trailing)
