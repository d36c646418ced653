"""Kernels onnx.reference lacks in float64, for the float64 ground truth.

- MeanVarianceNormalization: onnx.reference expands its function body, whose constants
  (the exponent 2, epsilon 1e-9) are float32, and Pow then refuses a float64 input. Here it
  is the body computed in the input's dtype, epsilon rounded through float32 as there.
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
