"""Safe loading and atomic saving of ONNX models.

Model files are untrusted: external data may only be read from inside the model's own folder
(no absolute paths, no `..`, no symlink leading out), offsets and lengths must lie inside the
data file, and every failure is a BnfoldError that says what to do. Saving writes to a temporary
folder beside the destination and renames into place, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import BnfoldError
from bnfold.onnxio.deferred import DEFER_MIN_BYTES, DeferredData
from bnfold.onnxio.external import load_external_data
from bnfold.onnxio.stream import (
    TYPED_DATA,
    WireError,
    read_model,
    serialize_whole,
    write_model,
    write_values,
)
from bnfold.onnxio.nodes import node_names
from bnfold.onnxio.preallocate import reserve
from bnfold.onnxio.tensors import all_graphs, iter_tensors, iter_tensors_by_scope

# Smaller files are parsed by protobuf in one call, weights included. Deferring saves at most
# the file's size in memory, while finding the large initializers takes a Python step per graph
# field: 0.1 s on a 48k-node graph of small weights, three times protobuf's whole parse.
DIRECT_PARSE_MAX_BYTES = 8 * 2**20
# A model with nothing deferred and at most this many bytes of tensors is copied with its new
# values and serialised by protobuf in one call, and the checker reads those bytes: the
# streaming writer's Python step per initializer (0.3 s at 48k nodes) buys nothing there.
SERIALIZE_WHOLE_MAX_BYTES = 32 * 2**20
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
    model, deferred, data_files = load_model_deferred(path)
    deferred.materialize(model.graph)
    return model, data_files


def load_model_deferred(
    path: str | os.PathLike, *, nodes_read_later: bool = False, map_files: bool = False
) -> tuple[onnx.ModelProto, DeferredData, set[str]]:
    """Load `path` leaving large main-graph initializers' bytes where they lie (see
    bnfold.onnxio.deferred); also gives the real paths of the external data files it uses.

    `nodes_read_later`: the caller reads every node through bnfold.onnxio.nodes.NodeTable,
    which checks the nodes' names itself, so loading checks only the others (at 48k nodes,
    reading every node's names twice costs more than parsing the file). `map_files`: see
    DeferredData."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BnfoldError(f"{path!r} does not exist: check the path")
    if os.path.isdir(path):
        raise BnfoldError(f"{path!r} is a folder: give the .onnx file inside it")
    if os.path.getsize(path) == 0:
        raise BnfoldError(f"{path!r} is empty: re-export the model")
    deferred = DeferredData(map_files)
    try:
        model, data_files = _load_into(path, deferred, not nodes_read_later)
    except BaseException:
        deferred.close()
        raise
    return model, deferred, data_files


def _load_into(path: str, deferred: DeferredData, check_nodes: bool = True
               ) -> tuple[onnx.ModelProto, set[str]]:
    try:
        model = _parse_file(path, deferred)
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
    _check_names(model, path, check_nodes)
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        return model, load_external_data(model, base_dir, path, deferred)
    except OSError as exc:
        raise BnfoldError(
            f"cannot read the external data of {path!r}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from None


def _check_names(model: onnx.ModelProto, path: str, check_nodes: bool = True) -> None:
    """Names must be text (protobuf hands invalid UTF-8 back as bytes, which would fail deep in
    the fold) and main-graph initializers unique (the checker rejects duplicates; ONNX Runtime
    silently keeps the last one, so which one a fold should use is not defined). Without
    `check_nodes` the nodes' own names are left to NodeTable."""
    initializers = [t.name for t in model.graph.initializer]
    if len(set(initializers)) != len(initializers):
        seen: set[str] = set()
        name = next(n for n in initializers if n in seen or seen.add(n))
        raise BnfoldError(
            f"initializer {name!r} is defined more than once in {path!r}; names must be "
            f"unique (onnx.checker rejects this model): re-export it"
        )
    for graph in all_graphs(model.graph):
        names = initializers if graph is model.graph else [t.name for t in graph.initializer]
        names = chain(names, (v.name for v in (*graph.input, *graph.output, *graph.value_info)))
        if check_nodes:
            names = chain(names, *(node_names(node) for node in graph.node))
        bad = next((n for n in names if type(n) is not str), None)
        if bad is not None:
            raise BnfoldError(
                f"{path!r} holds a name that is not valid UTF-8 ({bad[:40]!r}): re-export it"
            )


def _parse_file(path: str, deferred: DeferredData) -> onnx.ModelProto:
    """Parse straight from a read-only memory map, dropping pages as they are consumed.

    upb copies what it parses, so consumed pages can go (MADV_DONTNEED) and the file and the
    parsed model are never resident in full at the same time. Large initializers are not
    parsed at all: `deferred` learns where their bytes are. A file under
    DIRECT_PARSE_MAX_BYTES is parsed whole in one call instead.
    """
    page = mmap.PAGESIZE
    handle = deferred.file(os.path.realpath(path))
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if len(mapped) < DIRECT_PARSE_MAX_BYTES:
            model = onnx.ModelProto()
            with memoryview(mapped) as view:
                model.ParseFromString(view)
            return model
        released = 0

        def release(end: int) -> None:
            nonlocal released
            upto = end - end % page
            if upto - released >= 16 * 2**20 and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto

        spans: dict[str, tuple[int, int]] = {}
        with memoryview(mapped) as view:
            try:
                model = read_model(view, release, spans, DEFER_MIN_BYTES)
            except WireError as exc:
                raise DecodeError(str(exc)) from None
    for name, (offset, length) in spans.items():
        deferred.add(name, os.path.realpath(path), offset, length)
    return model


def estimated_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the tensors, from their dims (protobuf's ByteSize encodes the whole
    model to answer, which costs more than saving it)."""
    total = 0
    for tensor in iter_tensors(model, schema_only=True):
        total += math.prod(tensor.dims) * _ITEM_SIZE.get(tensor.data_type, 8)
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
    deferred: DeferredData | None = None,
    check: bool = True,
) -> list[str]:
    """Write `model` to `path` atomically; returns the files written (`path`, then its external
    data file when it has one), an empty list when `accept` vetoed the write.

    External data (one `<name>.data` file beside the model) is used when asked, or by default
    when the model would not fit in one protobuf (2 GiB). `accept(staged_path)` can inspect the
    fully written file before it is moved into place (e.g. to verify it) and veto the write.
    `overrides` (bnfold.folding.graph.PendingTensors) are new initializer values to write in place
    of the model's own; `deferred` holds the bytes of initializers the model was loaded without.
    The model itself is left as it was. A model with nothing deferred and at most
    SERIALIZE_WHOLE_MAX_BYTES of tensors is serialised in one call; larger ones are streamed,
    so memory grows by one tensor, not the model. With `check`, a model that fails
    onnx.checker is refused (BnfoldError) before anything is written. SIGTERM/SIGHUP during
    the save (a verification can take minutes) exit through the cleanup, so no staging folder
    is left.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise BnfoldError(f"output {path!r} is a folder: give a file name ending in .onnx")
    if not os.path.isdir(folder):
        raise BnfoldError(f"output folder {folder!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise BnfoldError(f"cannot write to {folder!r}: permission denied; choose another -o")
    if deferred is not None:
        deferred.check_unchanged()  # mapped weights are read again to be written
    size = estimated_bytes(model)
    if external_data is None:
        external_data = size > _PROTOBUF_LIMIT
    whole = None
    if not external_data and not deferred and size <= SERIALIZE_WHOLE_MAX_BYTES:
        whole = serialize_whole(model, overrides)
    if check:
        from bnfold.onnxio.validity import check_before_write, check_serialized

        if whole is not None:
            check_serialized(model, whole, overrides)
        else:
            check_before_write(model, overrides, deferred)
    with _signals_exit():
        return _save_staged(model, path, external_data, accept, overrides, deferred, whole)


def _save_staged(model, path, external_data, accept, overrides, deferred,
                 whole=None) -> list[str]:
    """`whole`: the model already serialised (serialize_whole), written as it is."""
    folder = os.path.dirname(path)
    name = os.path.basename(path)
    data_name = external_data_name(path)
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=".bnfold-", dir=folder)
        staged = os.path.join(staging, name)
        if external_data:
            _write_with_external_data(
                model, staged, os.path.join(staging, data_name), data_name, overrides, deferred
            )
        else:
            with open(staged, "wb") as handle:
                if whole is not None:
                    reserve(handle, len(whole))
                    handle.write(whole)
                else:
                    write_model(model, handle, overrides, deferred)
        if accept is not None and not accept(staged):
            return []
        written = [path]
        staged_data = os.path.join(staging, data_name)
        if external_data and os.path.getsize(staged_data) > 0:
            written.append(os.path.join(folder, data_name))
            os.replace(staged_data, written[-1])
        os.replace(staged, path)
        return written
    except OSError as exc:
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _signals_exit() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise SystemExit (SIGINT already raises
    KeyboardInterrupt), so `finally` blocks run and remove staging. Only signals left at their
    default (which would kill the process outright) are taken; the previous handlers come back.
    A signal arriving while ONNX Runtime runs takes effect when that run returns (bounded by the
    verification timeout)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            taken[number] = signal.signal(number, _exit_on_signal)
    try:
        yield
    finally:
        for number, previous in taken.items():
            signal.signal(number, previous)


_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file


def _write_with_external_data(
    model: onnx.ModelProto, model_path: str, data_path: str, location: str, overrides, deferred
) -> None:
    """Move tensors of 1 KiB or more into one data file, serialise, then put the model back.

    Each tensor's bytes go straight from where they are (the proto, a pending override, or the
    source file) into the data file; the proto is only emptied while the small remainder is
    serialised, so the caller's model is unchanged afterwards and nothing is held twice.
    """
    restore: list[Callable[[], None]] = []
    offset = 0
    try:
        with open(data_path, "wb") as data:
            for tensor, is_main in iter_tensors_by_scope(model):
                override = overrides.get(tensor.name) if overrides and is_main else None
                from_source = is_main and deferred is not None and deferred.holds(tensor)
                if override is None and not from_source and not tensor.HasField("raw_data"):
                    continue  # typed data stays where it is
                raw, undo = _detach_raw_data(tensor)
                restore.append(undo)
                if override is not None:
                    payload = override[0]
                    tensor.data_type = override[1]
                    del tensor.dims[:]
                    tensor.dims.extend(override[0].shape)
                    for field in TYPED_DATA:
                        tensor.ClearField(field)
                else:
                    payload = None if from_source else raw  # None: still in the source file
                size = deferred.nbytes(tensor.name) if payload is None else (
                    len(payload) if isinstance(payload, bytes) else payload.nbytes)
                if size < _EXTERNAL_MIN_BYTES:  # stays inline
                    inline = deferred.read(tensor.name) if payload is None else (
                        payload if isinstance(payload, bytes) else payload.tobytes())
                    tensor.raw_data = inline
                    continue
                pad = -offset % 4096  # page-aligned, as onnx and ORT's mmap prefer
                data.write(b"\0" * pad)
                offset += pad
                if payload is None:
                    deferred.copy_to(tensor.name, data)
                elif isinstance(payload, bytes):
                    data.write(payload)
                else:
                    write_values(data, payload)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset), ("length", size)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                offset += size
        with open(model_path, "wb") as handle:
            handle.write(model.SerializeToString())
    finally:
        for undo in reversed(restore):
            undo()


def _detach_raw_data(tensor: onnx.TensorProto) -> tuple[bytes | None, Callable[[], None]]:
    """Take raw_data out of `tensor` (read once, never copied with the rest); returns it and a
    function that puts the tensor back exactly as it was."""
    raw = tensor.raw_data if tensor.HasField("raw_data") else None
    tensor.ClearField("raw_data")
    saved = onnx.TensorProto()
    saved.CopyFrom(tensor)

    def undo() -> None:
        tensor.CopyFrom(saved)
        if raw is not None:
            tensor.raw_data = raw

    return raw, undo


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
