"""Atomic writes for what training produces: a temp file in the same folder, then os.replace."""

from __future__ import annotations

import os

from bnfold.onnxio.staged_files import write_atomic


def save_state_dict(model, path: str | os.PathLike) -> str:
    """torch.save(model.state_dict()) atomically: loadable with weights_only=True."""
    import torch

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda staged: torch.save(state, staged))


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> str:
    return write_atomic(path, lambda staged: figure.savefig(staged, format="png", dpi=dpi))
