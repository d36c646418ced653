"""Atomic writes for what training produces: a temp file in the same folder, then os.replace."""

from __future__ import annotations

import os
import tempfile

from bnfold.errors import BnfoldError


def write_atomic(path: str | os.PathLike, write) -> str:
    """Call `write(temp_path)`, then move the file to `path`; returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise BnfoldError(f"folder {folder!r} does not exist: create it first")
    handle, staged = tempfile.mkstemp(prefix=".bnfold-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        write(staged)
        os.replace(staged, path)
    except OSError as exc:
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return path


def save_state_dict(model, path: str | os.PathLike) -> str:
    """torch.save(model.state_dict()) atomically: loadable with weights_only=True."""
    import torch

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda staged: torch.save(state, staged))


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> str:
    return write_atomic(path, lambda staged: figure.savefig(staged, format="png", dpi=dpi))
