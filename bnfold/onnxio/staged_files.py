"""Small outputs written whole or not at all: a temporary file in the target's folder, a rename.

Reports, engines, timing caches, checkpoints and figures go through `write_atomic`; a model
goes through bnfold.onnxio.files.save_model, which stages a folder the same way. The staged
file gets the permission bits the target would have had (`replacement_mode`), not mkstemp's
0o600, which would hide a JSON report from every other user of a CI runner or container.
Standard library only: the training commands use it without importing onnx.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable

from bnfold.errors import BnfoldError


def replacement_mode(path: str | os.PathLike) -> int:
    """The permission bits for a file about to replace `path`: the existing file's, or what
    `open()` gives a new file (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call `write(staged_path)`, then move that file to `path`; returns the absolute path.
    A failure leaves `path` as it was and no staged file behind."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise BnfoldError(f"folder {folder!r} does not exist: create it first")
    staged = None
    try:
        handle, staged = tempfile.mkstemp(prefix=".bnfold-", suffix=os.path.splitext(path)[1],
                                          dir=folder)
        os.close(handle)
        write(staged)
        os.chmod(staged, replacement_mode(path))
        os.replace(staged, path)
    except OSError as exc:
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if staged is not None and os.path.exists(staged):
            os.unlink(staged)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    def write(staged: str) -> None:
        with open(staged, "wb") as stream:
            stream.write(data)

    return write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write a small text file (a report) atomically, as UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Before any work: `option`'s file `path` can be written (its folder exists and takes a new
    file), so a command never does its work and then fails on the last, cheapest write."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise BnfoldError(f"{option} {os.fspath(path)!r}: its folder does not exist; create it "
                          f"first")
    try:
        handle, probe = tempfile.mkstemp(prefix=".bnfold-probe-", dir=folder)
    except OSError as exc:
        raise BnfoldError(f"{option} {os.fspath(path)!r}: cannot write in {folder!r} "
                          f"({exc.strerror or exc}); choose another path") from None
    os.close(handle)
    os.unlink(probe)
