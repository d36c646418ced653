"""Safe loading and atomic saving of ONNX models.

Model files are untrusted: external data may only be read from inside the model's own folder
(no absolute paths, no `..`, no symlink leading out), offsets and lengths must lie inside the
data file, and every failure is a BnfoldError that says what to do. Saving writes to a temporary
folder beside the destination and renames into place, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import BnfoldError
from bnfold.io_stream import WireError, read_model, write_model

# Protobuf cannot serialise a message over 2 GiB; leave headroom for the graph itself.
_PROTOBUF_LIMIT = 2**31 - 2**26
_ITEM_SIZE = {
    onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT16: 2,
    onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4,
}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load `path` with its external data, refusing anything that reads outside its folder."""
    return load_model_info(path)[0]


def load_model_info(path: str | os.PathLike) -> tuple[onnx.ModelProto, set[str]]:
    """Like load_model, also giving the real paths of the external data files it read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BnfoldError(f"{path!r} does not exist: check the path")
    if os.path.isdir(path):
        raise BnfoldError(f"{path!r} is a folder: give the .onnx file inside it")
    if os.path.getsize(path) == 0:
        raise BnfoldError(f"{path!r} is empty: re-export the model")
    try:
        model = _parse_file(path)
    except PermissionError:
        raise BnfoldError(f"cannot read {path!r}: permission denied") from None
    except OSError as exc:
        raise BnfoldError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BnfoldError(
            f"{path!r} is not a valid ONNX model ({type(exc).__name__}): re-export it or check "
            f"that the file is complete"
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise BnfoldError(f"{path!r} is not an ONNX model (no graph or IR version): re-export it")
    base_dir = os.path.dirname(os.path.abspath(path))
    return model, _load_external_data(model, base_dir, path)


def _parse_file(path: str) -> onnx.ModelProto:
    """Parse straight from a read-only memory map, dropping pages as they are consumed.

    upb copies what it parses, so consumed pages can go (MADV_DONTNEED) and the file and the
    parsed model are never resident in full at the same time.
    """
    page = mmap.PAGESIZE
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        released = 0

        def release(end: int) -> None:
            nonlocal released
            upto = end - end % page
            if upto - released >= 16 * 2**20 and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto

        with memoryview(mapped) as view:
            try:
                return read_model(view, release)
            except WireError as exc:
                raise DecodeError(str(exc)) from None


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers (sparse ones too), tensor attributes,
    subgraphs and functions included — everything that can point at external data."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _load_external_data(model: onnx.ModelProto, base_dir: str, model_path: str) -> set[str]:
    """Read every external tensor into memory; returns the data files read (real paths)."""
    real_base = os.path.realpath(base_dir)
    data_files: set[str] = set()
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
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
        if offset < 0 or end > size or (length is not None and length < 0):
            raise BnfoldError(
                f"tensor {tensor.name!r} reads bytes {offset}..{end} of {location!r}, which has "
                f"{size}: the data file is truncated or does not belong to this model"
            )
        with open(data_path, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(end - offset)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        data_files.add(data_path)
    return data_files


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


def estimated_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the tensors, from their dims (protobuf's ByteSize encodes the whole
    model to answer, which costs more than saving it)."""
    total = 0
    for tensor in iter_tensors(model):
        count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
        total += count * _ITEM_SIZE.get(tensor.data_type, 8)
    return total


def external_data_name(model_path: str | os.PathLike) -> str:
    """The data file save_model writes beside `model_path` when it uses external data."""
    return os.path.basename(os.fspath(model_path)) + ".data"


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    accept: Callable[[str], bool] | None = None,
    overrides=None,
) -> bool:
    """Write `model` to `path` atomically; returns whether it was written.

    External data (one `<name>.data` file beside the model) is used when asked, or by default
    when the model would not fit in one protobuf (2 GiB). `accept(staged_path)` can inspect the
    fully written file before it is moved into place (e.g. to verify it) and veto the write.
    `overrides` (bnfold.folding.graph.PendingTensors) are new initializer values to write in place
    of the model's own.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise BnfoldError(f"output {path!r} is a folder: give a file name ending in .onnx")
    if not os.path.isdir(folder):
        raise BnfoldError(f"output folder {folder!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise BnfoldError(f"cannot write to {folder!r}: permission denied; choose another -o")
    if external_data is None:
        external_data = estimated_bytes(model) > _PROTOBUF_LIMIT
    name = os.path.basename(path)
    data_name = external_data_name(path)
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=".bnfold-", dir=folder)
        staged = os.path.join(staging, name)
        if external_data:
            if overrides:
                overrides.apply(model.graph)
            _write_with_external_data(model, staged, os.path.join(staging, data_name), data_name)
        else:
            with open(staged, "wb") as handle:
                write_model(model, handle, overrides)
        if accept is not None and not accept(staged):
            return False
        staged_data = os.path.join(staging, data_name)
        if external_data and os.path.getsize(staged_data) > 0:
            os.replace(staged_data, os.path.join(folder, data_name))
        os.replace(staged, path)
        return True
    except OSError as exc:
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_with_external_data(
    model: onnx.ModelProto, model_path: str, data_path: str, location: str
) -> None:
    """Move tensors of 1 KiB or more into one data file, serialise, then restore them in memory.

    Restoring (instead of onnx.save_model's convert-in-place) keeps the caller's model intact
    without reading the data back from disk.
    """
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    offset = 0
    try:
        with open(data_path, "wb") as data:
            for tensor in iter_tensors(model):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                    continue
                raw = tensor.raw_data
                pad = -offset % 4096  # page-aligned, as onnx and ORT's mmap prefer
                data.write(b"\0" * pad)
                offset += pad
                data.write(raw)
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                offset += len(raw)
        with open(model_path, "wb") as handle:
            handle.write(model.SerializeToString())
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (a report) atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise BnfoldError(f"folder {folder!r} does not exist: create it first")
    staged = None
    try:
        handle, staged = tempfile.mkstemp(prefix=".bnfold-", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(staged, path)
    except OSError as exc:
        if staged and os.path.exists(staged):
            os.unlink(staged)
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def ensure_folder(path: str | os.PathLike) -> str:
    """Create output folder `path` (and parents) if needed; a BnfoldError when it cannot be."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise BnfoldError(
            f"cannot create output folder {path!r}: {exc.strerror or exc}; choose another --out"
        ) from None
    return path
