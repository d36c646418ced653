"""The fold entry points: `fold` (in memory) and `fold_file` (path to path, verified)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from bnfold.errors import BnfoldError
from bnfold.fold.engine import fold_model
from bnfold.fold.report import FoldReport
from bnfold.io import load_model, load_model_info, save_model


@dataclass
class FoldResult:
    model: onnx.ModelProto
    report: FoldReport
    output_path: str | None = None  # where fold_file wrote it (None when not written)


def fold(
    model_or_path: onnx.ModelProto | str | os.PathLike, *, lower_standalone: bool = False
) -> FoldResult:
    """Fold every foldable BatchNormalization; the input (file or ModelProto) is not modified.

    >>> result = fold("resnet.onnx")
    >>> result.report.folded_count, len(result.report.kept)
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    else:
        model = load_model(model_or_path)
    report = fold_model(model, lower_standalone=lower_standalone)
    return FoldResult(model, report)


def default_output_path(input_path: str | os.PathLike) -> str:
    """MODEL.onnx -> MODEL.folded.onnx beside it."""
    root, ext = os.path.splitext(os.fspath(input_path))
    return f"{root}.folded{ext or '.onnx'}"


def fold_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    lower_standalone: bool = False,
    in_place: bool = False,
    verify_options: dict | None = None,
) -> FoldResult:
    """Fold `input_path` into `output_path` (default MODEL.folded.onnx), written atomically.

    With `verify`, the written file is checked against the input with ONNX Runtime (graph
    optimisation off) before it is moved into place; when it does not match, nothing is written
    and `result.output_path` is None, with the failure in `result.report.verification`.
    """
    input_path = os.fspath(input_path)
    output_path = os.fspath(output_path) if output_path else default_output_path(input_path)
    if _same_file(input_path, output_path) and not in_place:
        raise BnfoldError(
            f"output {output_path!r} is the input: choose another -o, or pass --in-place"
        )
    model, source_has_external = load_model_info(input_path)
    result = FoldResult(model, fold_model(model, lower_standalone=lower_standalone))

    def accept(staged_path: str) -> bool:
        if not verify:
            return True
        from bnfold.verify import verify as run_verify

        outcome = run_verify(input_path, staged_path, **(verify_options or {}))
        result.report.verification = outcome.to_dict()
        return outcome.ok

    written = save_model(
        result.model, output_path, external_data=source_has_external or None, accept=accept
    )
    result.output_path = output_path if written else None
    return result


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)

