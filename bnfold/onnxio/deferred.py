"""Initializer bytes left in their files until something needs them.

Folding reads the weights next to a BatchNormalization and nothing else; every other tensor only
has to reach the output. So the loader records where each large main-graph initializer's bytes
lie (inside the .onnx file itself, or in an external data file already checked to be inside the
model's folder), the fold reads the few it needs with `pread`, and the writer copies the rest
file to file (`copy_file_range`, kernel side) without ever holding them in Python. Peak memory is
then the graph, the folded weights and one tensor, not the whole model twice.

A deferred tensor's TensorProto has its dims, type and name but no data; `materialize` puts the
bytes back when a caller wants a complete ModelProto.
"""

from __future__ import annotations

import mmap
import os
import weakref
from typing import BinaryIO

import onnx

from bnfold.errors import BnfoldError

# Smaller tensors are parsed into the proto as usual: deferring them saves nothing.
DEFER_MIN_BYTES = 4096
_CHUNK = 8 * 2**20
# Tensors this large are read through a memory map of their file (`view`) where the caller
# allows maps: the page cache's own pages, no copy. Smaller ones are cheaper to pread.
MAP_MIN_BYTES = 2**20
# A map keeps a descriptor of its own for as long as an array made from it lives: past this
# many files (one data file per tensor), `view` reads instead.
MAX_MAPPED_FILES = 8
# Models saved with one data file per tensor can name thousands of files: keep only the most
# recently used open (a closed one reopens, checked unchanged) instead of hitting EMFILE.
MAX_OPEN_FILES = 32


class DeferredData:
    """Where the bytes of deferred main-graph initializers lie, by initializer name."""

    def __init__(self, map_files: bool = False):
        # Whether `view` may map files. A map is read after the file was checked, so whoever
        # allows it must drop every array made from one before handing anything back (fold_file
        # does: its result stands on the file it wrote) and check_unchanged before reading.
        self.map_files = map_files
        self._files: dict[str, BinaryIO] = {}  # real path -> file opened for reading
        self._identity: dict[str, tuple[int, ...]] = {}  # real path -> the file first opened
        self._spans: dict[str, tuple[str, int, int]] = {}  # name -> (real path, offset, length)
        # real path -> read-only map of it (None: it cannot be mapped). Never closed here: the
        # arrays made from it keep it alive, and it goes when the last of them does.
        self._maps: dict[str, mmap.mmap | None] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._files)

    def file(self, path: str) -> BinaryIO:
        """`path` opened for reading (at most MAX_OPEN_FILES stay open). Opened again after it
        was closed, it must still be the same unchanged file."""
        handle = self._files.pop(path, None)
        if handle is not None:
            self._files[path] = handle  # most recently used last
            return handle
        if len(self._files) >= MAX_OPEN_FILES:
            self._files.pop(next(iter(self._files))).close()
        try:
            handle = open(path, "rb")  # noqa: SIM115 (closed by release_files/close)
        except OSError as exc:
            if path not in self._identity:
                raise  # the first open: the loader turns this into its own message
            raise BnfoldError(
                f"cannot reopen {path!r} ({exc.strerror or exc}): it was moved or deleted "
                f"after bnfold read the model; load or fold it again"
            ) from None
        identity = _identity(os.fstat(handle.fileno()))
        if self._identity.setdefault(path, identity) != identity:
            handle.close()
            raise BnfoldError(
                f"{path!r} changed after bnfold read the model: load or fold it again"
            )
        self._files[path] = handle
        return handle

    def release_files(self) -> None:
        """Close the open files (a kept FoldResult must not hold descriptors); reading a tensor
        afterwards reopens its file, refusing one that has changed since."""
        _close_all(self._files)
        self._maps.clear()

    def add(self, name: str, path: str, offset: int, length: int) -> None:
        self.file(path)
        self._spans[name] = (path, offset, length)

    def __contains__(self, name: str) -> bool:
        return name in self._spans

    def __len__(self) -> int:
        return len(self._spans)

    def nbytes(self, name: str) -> int:
        return self._spans[name][2]

    def read(self, name: str) -> bytes:
        """The tensor's raw bytes (a fresh copy)."""
        path, offset, length = self._spans[name]
        parts, done = [], 0
        while done < length:  # pread may return less than asked (Linux caps one call ~2 GiB)
            parts.append(self._pread(name, path, min(length - done, 2**30), offset + done))
            done += len(parts[-1])
        return b"".join(parts)

    def view(self, name: str) -> memoryview:
        """The tensor's raw bytes, read-only: with map_files, a view of its file's pages where
        the OS can map it (the file must then not be truncated while the view is in use), else
        a copy, as `read`."""
        path, offset, length = self._spans[name]
        if not self.map_files:
            return memoryview(self.read(name))
        if path not in self._maps:
            live = sum(mapped is not None for mapped in self._maps.values())
            self._maps[path] = _map(self.file(path)) if live < MAX_MAPPED_FILES else None
        mapped = self._maps[path]
        if mapped is None:
            return memoryview(self.read(name))
        self._check_map(path, mapped, offset + length)
        return memoryview(mapped)[offset:offset + length]

    def check_unchanged(self) -> None:
        """Refuse (BnfoldError) when a file read through a map has changed since it was first
        opened: its arrays would read other bytes, or fault past a new end. Run before they
        are read again (bnfold.onnxio.files.save_model does)."""
        for path, mapped in self._maps.items():
            if mapped is not None:
                self._check_map(path, mapped, len(mapped))

    def _check_map(self, path: str, mapped: mmap.mmap, end: int) -> None:
        try:
            size = mapped.size()  # the file's length now, through the map's own descriptor
            now = _identity(os.stat(path))
        except (OSError, ValueError):
            now, size = None, -1
        if size < end or now != self._identity.get(path):
            raise BnfoldError(
                f"{path!r} changed or was truncated while bnfold was reading it: run again "
                f"on a complete, unchanging file"
            )

    def _pread(self, name: str, path: str, size: int, offset: int) -> bytes:
        source = self.file(path)
        try:
            if hasattr(os, "pread"):
                part = os.pread(source.fileno(), size, offset)
            else:  # Windows: no pread; the file object is only ever used from here
                source.seek(offset)
                part = source.read(size)
        except OSError as exc:
            raise BnfoldError(f"cannot read the data of tensor {name!r}: {exc}") from None
        if not part:
            raise BnfoldError(
                f"the data of tensor {name!r} ends early: its file changed or was truncated "
                f"while bnfold was reading it; run again on a complete file"
            )
        return part

    def copy_to(self, name: str, handle: BinaryIO) -> None:
        """Append the tensor's bytes to `handle`, file to file where the OS allows it."""
        path, offset, length = self._spans[name]
        try:
            out_fd = handle.fileno()
        except (AttributeError, OSError, ValueError):
            out_fd = None
        if out_fd is not None and hasattr(os, "copy_file_range"):
            handle.flush()
            done = _copy_range(self.file(path).fileno(), out_fd, offset, length)
            handle.seek(0, os.SEEK_END)
        else:
            done = 0
        while done < length:
            part = self._pread(name, path, min(length - done, _CHUNK), offset + done)
            handle.write(part)
            done += len(part)

    def materialize(self, graph: onnx.GraphProto, skip=()) -> None:
        """Read every deferred initializer of `graph` (except names in `skip`) into the proto,
        then close the files: afterwards the model stands alone."""
        try:
            for tensor in graph.initializer:
                if self.holds(tensor) and tensor.name not in skip:
                    tensor.raw_data = self.read(tensor.name)
        finally:
            self.close()

    def names(self) -> set[str]:
        """Names of the tensors whose bytes may be here (holds() tells for each tensor)."""
        return set(self._spans)

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """True when `tensor` (a main-graph initializer) has its bytes here, not in itself."""
        return tensor.name in self._spans and not tensor.HasField("raw_data")

    def close(self) -> None:
        self._spans.clear()
        self._maps.clear()
        self._finalizer()


def _copy_range(in_fd: int, out_fd: int, offset: int, length: int) -> int:
    """Bytes copied with copy_file_range; stops early (caller finishes) where it is refused."""
    done = 0
    while done < length:
        try:
            copied = os.copy_file_range(in_fd, out_fd, min(length - done, 2**30), offset + done)
        except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: fall back to read/write
            return done
        if copied == 0:
            return done
        done += copied
    return done


def _map(handle: BinaryIO) -> mmap.mmap | None:
    try:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # an empty or special file, or no mmap here: pread instead
        return None


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _close_all(files: dict[str, BinaryIO]) -> None:
    for handle in files.values():
        handle.close()
    files.clear()
