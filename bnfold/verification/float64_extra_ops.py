"""Kernels onnx.reference lacks in float64, for the float64 ground truth.

- MeanVarianceNormalization: onnx.reference expands its function body, whose constants
  (the exponent 2, epsilon 1e-9) are float32, and Pow then refuses a float64 input. Here it
  is the body computed in the input's dtype, epsilon rounded through float32 as there.
- Opset 1-6 (models ONNX Runtime does not run): Add, Sub, Mul, Div and Pow with
  `broadcast=1` align the second input at `axis` (a bias [C] against [N, C, H, W] at axis 1),
  where numpy aligns trailing dims; and onnx.reference has no Dropout-1/6, Reshape-1 (shape
  as an attribute), Gemm-1 or Clip-1. The old model zoo's models failed on each.
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


def legacy_ops() -> list:
    """Kernels for a model of opset 1-6 (only such a model gets them: they replace
    onnx.reference's for every version of their op)."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_reshape import reshape_reference_implementation

    class Dropout(OpRun):  # inference: the input; the mask, if asked for, keeps everything
        op_domain = ""

        def _run(self, x, **_attributes):
            if len(self.onnx_node.output) > 1:
                return x, np.ones(x.shape, dtype=x.dtype)
            return (x,)

    class Reshape(OpRun):  # Reshape-1: the shape is an attribute
        op_domain = ""

        def _run(self, data, shape=None, **_attributes):
            return (reshape_reference_implementation(data, np.asarray(shape, np.int64)),)

    class Gemm(OpRun):  # Gemm-1: C is required, `broadcast` says it may broadcast
        op_domain = ""

        def _run(self, a, b, c, alpha=None, beta=None, transA=None, transB=None,
                 **_attributes):
            a, b = (a.T if transA else a), (b.T if transB else b)
            alpha = 1.0 if alpha is None else alpha
            beta = 1.0 if beta is None else beta
            return ((alpha * (a @ b) + beta * c).astype(a.dtype),)

    class Clip(OpRun):  # Clip-1: bounds as attributes
        op_domain = ""

        def _run(self, x, min=None, max=None, **_attributes):  # noqa: A002 (ONNX's names)
            low = -np.inf if min is None else min
            high = np.inf if max is None else max
            return (np.clip(x, low, high).astype(x.dtype),)

    return [*legacy_broadcast_ops(), Dropout, Reshape, Gemm, Clip]


def legacy_broadcast_ops() -> list:
    """Add, Sub, Mul, Div, Pow that honour opset 1-6's `broadcast` and `axis` attributes
    (onnx.reference's kernels otherwise)."""
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
