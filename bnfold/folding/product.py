"""A folded weight that is never held whole: W·s computed chunk by chunk as it is written.

Folding a 100 MB model used to read each weight into fresh memory, multiply it into a second
fresh array and copy that into the output file: three passes over memory the process had never
touched, where a file copy touches only the output's page cache. `WeightProduct` keeps the
weight (typically a read-only view of the source file's pages, bnfold.onnxio.deferred) and the
per-channel factors, and computes the float32 values a few MiB at a time into one reused buffer
when the writer asks for them (`chunks`). The values are those of `np.multiply(W, s,
dtype=float64)` rounded into float32, bit for bit.

The checks a fold runs on its result need only the result's minimum and maximum. With a factor
f fixed over a slice of W, rounding is monotonic, so over that slice min(f·W) is f·min(W) or
f·max(W) (whichever is lower, by the sign of f), and likewise for max; NaN and 0·inf come out
as the full product's would. So `min()`/`max()` reduce W per slice and multiply a vector.

Anything else (`np.asarray(product)`, `tobytes()`) computes the whole array, as before.
"""

from __future__ import annotations

import numpy as np

# Products smaller than this are computed at once: the saving is in the large weights.
LAZY_MIN_BYTES = 2**20
_CHUNK_BYTES = 4 * 2**20


class WeightProduct:
    """weight·factors (numpy broadcasting, factors never widening the weight) computed in
    float64 and rounded into float32, held as its operands."""

    dtype = np.dtype(np.float32)

    def __init__(self, weight: np.ndarray, factors: np.ndarray,
                 shape: tuple[int, ...] | None = None):
        if factors.ndim != weight.ndim or np.broadcast_shapes(weight.shape, factors.shape) != (
                weight.shape):
            raise ValueError("factors must broadcast along the weight's own axes")
        self._weight = weight
        self._factors = factors
        self.shape = weight.shape if shape is None else tuple(shape)
        self._extremes: tuple[np.float32, np.float32] | None = None
        self._source: np.ndarray | None = None  # [min, max] of the weight itself

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._weight.size

    @property
    def nbytes(self) -> int:
        return self._weight.size * self.dtype.itemsize

    def reshape(self, shape) -> WeightProduct:
        """The same values (C order) under another shape."""
        shape = tuple(shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.size} values into {shape}")
        reshaped = WeightProduct(self._weight, self._factors, shape)
        reshaped._extremes, reshaped._source = self._extremes, self._source
        return reshaped

    def astype(self, dtype, copy: bool = True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return np.asarray(self).astype(dtype)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self._weight.shape, self.dtype)
        np.multiply(self._weight, self._factors, out=out, dtype=np.float64, casting="unsafe")
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)

    def tobytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.chunks())

    def min(self) -> np.float32:
        return self._bounds()[0]

    def max(self) -> np.float32:
        return self._bounds()[1]

    def source_bounds(self, array: np.ndarray) -> np.ndarray | None:
        """[min, max] of `array` when it is this product's weight (the same memory), found
        with the product's own bounds instead of two more passes; None otherwise."""
        weight = self._weight
        if (array.dtype != weight.dtype or array.size != weight.size or not array.size
                or not (array.flags.c_contiguous and weight.flags.c_contiguous)
                or array.__array_interface__["data"][0] != weight.__array_interface__["data"][0]):
            return None
        self._bounds()
        return self._source

    def _bounds(self) -> tuple[np.float32, np.float32]:
        if self._extremes is None:
            if self.size == 0:
                raise ValueError("zero-size product has no minimum or maximum")
            weight, factors = self._weight, self._factors
            axes = tuple(i for i, n in enumerate(factors.shape) if n == 1)
            high = weight.max(axis=axes, keepdims=True)
            low = weight.min(axis=axes, keepdims=True)
            with np.errstate(all="ignore"):
                at_high = np.multiply(high, factors, dtype=np.float64)
                at_low = np.multiply(low, factors, dtype=np.float64)
                lowest = np.minimum(at_high, at_low).min()
                highest = np.maximum(at_high, at_low).max()
                self._extremes = (self.dtype.type(lowest), self.dtype.type(highest))
            self._source = np.array([low.min(), high.max()], dtype=weight.dtype)
        return self._extremes

    def chunks(self, max_bytes: int = _CHUNK_BYTES, take=None):
        """The values in C order as consecutive byte views of one reused buffer (each is
        overwritten by the next: copy or write it before asking for another). With `take`
        (nbytes -> a writable uint8 array of at least that size), each chunk is computed into
        a buffer of its own from `take` instead (bnfold.onnxio.background's pool)."""
        weight, factors = self._weight, self._factors
        while weight.ndim > 1 and weight.shape[0] == 1:
            weight, factors = weight[0], factors[0]
        if weight.ndim == 0 or weight.size == 0:
            whole = memoryview(np.asarray(self).reshape(-1)).cast("B")
            if take is not None:
                out = take(whole.nbytes)[:whole.nbytes]
                out[...] = whole
                whole = memoryview(out)
            yield whole
            return
        rows = weight.shape[0]
        row_bytes = max(1, (weight.size // rows) * self.dtype.itemsize)
        step = max(1, max_bytes // row_bytes)
        buffer = None if take is not None else np.empty(
            (min(step, rows),) + weight.shape[1:], self.dtype)
        per_row = factors.shape[0] != 1
        for start in range(0, rows, step):
            count = min(step, rows - start)
            if buffer is None:
                nbytes = count * row_bytes  # weight.size > 0: row_bytes is exact here
                out = take(nbytes)[:nbytes].view(self.dtype).reshape(
                    (count,) + weight.shape[1:])
            else:
                out = buffer[:count]
            np.multiply(weight[start:start + count],
                        factors[start:start + count] if per_row else factors,
                        out=out, dtype=np.float64, casting="unsafe")
            yield memoryview(out).cast("B")
