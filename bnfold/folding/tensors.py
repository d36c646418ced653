"""Tensor values for the fold: read (size-checked, deferred bytes), written, and kept pending.

`tensor_to_array` refuses data whose size does not match its dims; `PendingTensors` holds new
initializer values until save_model writes them straight from numpy; `fill_tensor` stores a
value as raw data; `Constant` is a constant tensor as a graph view sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.product import WeightProduct
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.stream import fill_tensor
from bnfold.precision import bfloat16_bits_to_float32

# Little-endian storage, as ONNX requires for raw_data.
_RAW_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
}


def tensor_to_array(tensor: onnx.TensorProto, raw: bytes | memoryview | None = None
                    ) -> np.ndarray:
    """A tensor's values, refusing data whose size does not match its dims. `raw` gives the
    bytes of a tensor loaded without them (bnfold.onnxio.deferred); floats are read in place
    (read-only), without a copy."""
    dims = tuple(tensor.dims)  # each field read crosses into protobuf: read each once
    if dims and min(dims) < 0:
        raise BnfoldError(
            f"tensor {tensor.name!r} declares negative dims {list(dims)}: the file is "
            f"corrupt; re-export the model"
        )
    count = math.prod(dims)
    data_type = tensor.data_type
    if raw is None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BnfoldError(
                f"tensor {tensor.name!r} keeps its data in an external file that was not "
                f"loaded: give bnfold the model's path, or load it with its external data"
            )
        if tensor.HasField("raw_data"):
            # One read of raw_data: each access copies the bytes out of the protobuf.
            raw = tensor.raw_data
    if data_type == onnx.TensorProto.BFLOAT16:
        if raw is not None:
            bits = np.frombuffer(raw, dtype=np.uint16)
        else:
            bits = np.asarray(tensor.int32_data, dtype=np.uint16)
        _check_count(tensor, bits.size, count)
        return bfloat16_bits_to_float32(bits).reshape(dims)
    dtype = _RAW_FLOAT_TYPES.get(data_type)
    if raw is not None and dtype is not None:
        if len(raw) != count * dtype.itemsize:
            _check_count(tensor, len(raw) // dtype.itemsize, count, len(raw) % dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype).reshape(dims)
    if raw is not None and not tensor.HasField("raw_data"):
        tensor = _with_raw_data(tensor, bytes(raw))
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:  # KeyError: an unknown data_type
        raise BnfoldError(
            f"tensor {tensor.name!r} is corrupt ({type(exc).__name__}: {exc}): re-export the model"
        ) from None
    _check_count(tensor, array.size, count)
    return array


def _with_raw_data(tensor: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
    full = onnx.TensorProto()
    full.CopyFrom(tensor)
    full.raw_data = raw
    return full


def _check_count(tensor: onnx.TensorProto, have: int, want: int, stray_bytes: int = 0) -> None:
    if have != want or stray_bytes:
        raise BnfoldError(
            f"tensor {tensor.name!r} declares dims {list(tensor.dims)} ({want} values) but holds "
            f"{have}: the file is corrupt; re-export the model"
        )


class PendingTensors:
    """Replacement values for initializers, by name, applied at save time or on demand."""

    def __init__(self):
        self._items: dict[str, tuple[np.ndarray, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, name: str, stored, elem_type: int) -> None:
        """`stored`: an array, or a WeightProduct (bnfold.folding.product) left uncomputed
        until it is written or read back."""
        if not isinstance(stored, WeightProduct):
            stored = np.asarray(stored, order="C")
        self._items[name] = (stored, elem_type)

    def names(self) -> set[str]:
        return set(self._items)

    def get(self, name: str) -> tuple[np.ndarray, int] | None:
        return self._items.get(name)

    def values(self, name: str) -> np.ndarray:
        stored, elem_type = self._items[name]
        if isinstance(stored, WeightProduct):  # read back by a second fold: computed once
            stored = np.asarray(stored)
            self._items[name] = (stored, elem_type)
        if elem_type == onnx.TensorProto.BFLOAT16:
            return bfloat16_bits_to_float32(stored)
        return stored

    def clear(self) -> None:
        """Forget every value (the caller has them elsewhere, e.g. in a written file)."""
        self._items.clear()

    def apply(self, graph: onnx.GraphProto) -> None:
        """Write every pending value into `graph`'s initializers and forget them."""
        for tensor in graph.initializer:
            item = self._items.pop(tensor.name, None)
            if item is not None:
                fill_tensor(tensor, item[0], item[1])
        self._items.clear()  # entries for initializers the fold removed


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
    return None


@dataclass
class Constant:
    """A constant tensor visible in a graph: an initializer or a Constant node's value."""

    tensor: onnx.TensorProto
    owner: onnx.GraphProto  # the graph that holds it (an outer one for outer-scope names)
    is_initializer: bool
    deferred: DeferredData | None = None  # holds the bytes when the tensor was loaded without
    value: np.ndarray | None = None  # a value computed from other constants (folding.constants)
