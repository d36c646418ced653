"""External data, read safely: every file must lie inside the model's folder (no absolute
paths, no `..`, no symlink leading out) and every range inside its file.

Main-graph initializers are not read here: `DeferredData` learns where their bytes lie and the
fold reads the few it needs. Tensors elsewhere (subgraphs, attributes, sparse) are read in.
"""

from __future__ import annotations

import math
import os

import onnx

from bnfold.errors import BnfoldError
from bnfold.onnxio.deferred import DeferredData
from bnfold.onnxio.tensors import iter_tensors_by_scope


def load_external_data(
    model: onnx.ModelProto, base_dir: str, model_path: str, deferred: DeferredData
) -> set[str]:
    """Check every external tensor's file and range; main-graph initializers are deferred,
    the rest (subgraphs, attributes, sparse) read into memory. Returns the data files used."""
    real_base = os.path.realpath(base_dir)
    data_files: set[str] = set()
    for tensor, is_main in iter_tensors_by_scope(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        data_path, offset, length = _external_span(tensor, real_base, model_path)
        if is_main and tensor.name and tensor.name not in deferred:
            tensor.ClearField("raw_data")  # the external bytes win, as in onnx and ORT
            deferred.add(tensor.name, data_path, offset, length)
        else:
            tensor.raw_data = _read_span(data_path, offset, length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        data_files.add(data_path)
    return data_files


def _external_span(
    tensor: onnx.TensorProto, real_base: str, model_path: str
) -> tuple[str, int, int]:
    """(real path, offset, length) of an external tensor's bytes, all checked."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    if not all(isinstance(v, str) and "\0" not in v for v in (*info, *info.values())):
        raise BnfoldError(
            f"tensor {tensor.name!r} in {model_path!r} has external data fields that are not "
            f"valid text: re-export the model"
        )
    location = info.get("location", "")
    data_path = _confined_path(real_base, location, tensor.name, model_path)
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise BnfoldError(
            f"tensor {tensor.name!r} in {model_path!r} has a non-numeric external data "
            f"offset/length: re-export the model"
        ) from None
    size = os.path.getsize(data_path)
    end = offset + (length if length is not None else size - offset)
    if offset < 0 or offset > size or end > size or (length is not None and length < 0):
        raise BnfoldError(
            f"tensor {tensor.name!r} reads bytes {offset}..{end} of {location!r}, which has "
            f"{size}: the data file is truncated or does not belong to this model"
        )
    # Checked before anything is read: a 32-byte tensor declaring 20 GiB (a sparse file)
    # would otherwise be read or copied in full into an output no loader accepts.
    expected = tensor_nbytes(tensor)
    if expected is not None and end - offset != expected:
        raise BnfoldError(
            f"tensor {tensor.name!r} declares {end - offset} bytes of external data in "
            f"{location!r}, but its dims {list(tensor.dims)} and type need {expected}: "
            f"re-export the model"
        )
    return data_path, offset, end - offset


# Types stored several to a byte (bits per element); the rest use their numpy item size.
_PACKED_BITS = {
    onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
    **{getattr(onnx.TensorProto, n): 2 for n in ("UINT2", "INT2") if hasattr(onnx.TensorProto, n)},
}


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data `tensor`'s dims and type call for; None when the type has no fixed
    size (STRING, unknown). Negative dims raise BnfoldError."""
    if any(d < 0 for d in tensor.dims):
        raise BnfoldError(
            f"tensor {tensor.name!r} has negative dims {list(tensor.dims)}: re-export the model"
        )
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return count * itemsize


def _read_span(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def _confined_path(real_base: str, location: str, tensor_name: str, model_path: str) -> str:
    """The real path of an external data file, which must lie inside the model's folder."""
    if not location:
        raise BnfoldError(
            f"tensor {tensor_name!r} in {model_path!r} is external but names no file: "
            f"re-export the model"
        )
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise BnfoldError(
            f"tensor {tensor_name!r} points at absolute path {location!r}; bnfold only reads "
            f"external data from the model's own folder: move the data file beside the model"
        )
    normal = os.path.normpath(location)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise BnfoldError(
            f"tensor {tensor_name!r} points at {location!r}, outside the model's folder: "
            f"move the data file beside the model"
        )
    real = os.path.realpath(os.path.join(real_base, normal))
    if os.path.commonpath([real, real_base]) != real_base:
        raise BnfoldError(
            f"tensor {tensor_name!r} data {location!r} resolves (through a symlink) outside the "
            f"model's folder: copy the data file beside the model"
        )
    if not os.path.isfile(real):
        raise BnfoldError(
            f"external data file {location!r} for tensor {tensor_name!r} is missing: keep it "
            f"beside {os.path.basename(model_path)!r}"
        )
    return real
