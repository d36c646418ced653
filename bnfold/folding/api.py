"""The fold entry points: `fold` (in memory) and `fold_file` (path to path, verified)."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterable

import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.engine import fold_model
from bnfold.folding.graph import PendingTensors
from bnfold.folding.report import FoldReport
from bnfold.onnxio.files import external_data_name, load_model, load_model_deferred, save_model
from bnfold.onnxio.deferred import DeferredData


class FoldResult:
    """The folded model, the report, and where fold_file wrote it (None when not written)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        report: FoldReport,
        output_path: str | None = None,
        pending: PendingTensors | None = None,
        deferred: DeferredData | None = None,
    ):
        self._model = model
        self._pending = pending
        self._deferred = deferred
        self._unavailable: BnfoldError | None = None
        self._file: tuple[str, tuple[int, ...]] | None = None  # a written file holding it all
        self.report = report
        self.output_path = output_path
        self.written: list[str] = []  # fold_file: the model file, then its external data file
        # fold_file --in-place: the input's external data files the new model no longer reads
        self.unused_data: list[str] = []

    @property
    def model(self) -> onnx.ModelProto:
        # fold/fold_file leave weights outside the proto (folded ones in numpy, untouched ones
        # in their files); put them in on demand.
        if self._unavailable is not None:
            raise self._unavailable  # a half-read model is never handed out
        if self._file is not None:
            path, identity = self._file
            if _identity(path) != identity:
                self._unavailable = BnfoldError(
                    f"{path!r} changed since bnfold wrote it: fold the model again")
                raise self._unavailable
            self._model, self._file = load_model(path), None
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            try:
                deferred.materialize(self._model.graph, skip=self._pending or ())
            except BnfoldError as exc:
                self._unavailable = exc
                raise
        if self._pending:
            self._pending.apply(self._model.graph)
        return self._model

    def _move_to_file(self, path: str) -> None:
        """The folded model is all in `path` (written; verified or about to be): drop what
        memory holds of it, and the maps of the input its values were computed from, so
        verification runs beside one copy of the weights and a kept result holds no files."""
        if self._pending is not None:
            self._pending.clear()  # the writer's frame still refers to the same object
        self._pending = None
        if self._deferred is not None:
            self._deferred.close()
            self._deferred = None
        self._file = (path, _identity(path))

    def _load_from_file(self) -> None:
        """Read the whole model in before its (staged) file goes away."""
        path, _ = self._file
        self._model, self._file = load_model(path), None

    def _renamed(self, path: str) -> None:
        if self._file is not None:  # a rename keeps the identity (device, inode, size, mtime)
            self._file = (path, self._file[1])

    def __repr__(self) -> str:
        summary = self.report.to_dict()["summary"]
        return f"FoldResult({summary}, output_path={self.output_path!r})"


def _gc_paused(function):
    """Run `function` with the cyclic garbage collector paused. A fold of a large graph makes
    hundreds of thousands of small objects (node wrappers, name tuples), and each automatic
    collection walks all that survive: a third of the fold's time at 48k nodes. The fold makes
    no cycles worth collecting early; whatever it leaves is collected once it returns."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()

    return paused


@_gc_paused
def fold(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    lower_standalone: bool = False,
    freeze_inputs: Iterable[str] | str = (),
) -> FoldResult:
    """Fold every foldable BatchNormalization; the input (file or ModelProto) is not modified.

    `freeze_inputs`: graph inputs that have an initializer (IR ≥ 4) to turn into constants
    first, or "all". Below IR 4 such listings are constants already and fold as they are.

    >>> result = fold("resnet.onnx")
    >>> result.report.folded_count, len(result.report.kept)
    """
    options = dict(lower_standalone=lower_standalone, freeze_inputs=freeze_inputs)
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return FoldResult(model, fold_model(model, **options))
    # From a file, weights stay where they are until `result.model` is asked for, so a caller
    # that only wants the report (`bnfold inspect`) never loads the model in full.
    model, deferred, _ = load_model_deferred(model_or_path, nodes_read_later=True)
    pending = PendingTensors()
    report = _fold_deferred(model, options, pending, deferred)
    deferred.release_files()
    return FoldResult(model, report, pending=pending, deferred=deferred)


def _fold_deferred(
    model: onnx.ModelProto, options: dict, pending: PendingTensors, deferred: DeferredData
) -> FoldReport:
    try:
        return fold_model(model, pending=pending, deferred=deferred, **options)
    except BaseException:
        deferred.close()
        raise


def default_output_path(input_path: str | os.PathLike) -> str:
    """MODEL.onnx -> MODEL.folded.onnx beside it."""
    root, ext = os.path.splitext(os.fspath(input_path))
    return f"{root}.folded{ext or '.onnx'}"


@_gc_paused
def fold_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    lower_standalone: bool = False,
    in_place: bool = False,
    verify_options: dict | None = None,
    freeze_inputs: Iterable[str] | str = (),
) -> FoldResult:
    """Fold `input_path` into `output_path` (default MODEL.folded.onnx; the input itself with
    `in_place`), written atomically.

    With `verify`, the written file is checked against the input with ONNX Runtime (graph
    optimisation off) before it is moved into place; when it does not match, nothing is written
    and `result.output_path` is None, with the failure in `result.report.verification`.
    """
    input_path = os.fspath(input_path)
    if output_path:
        output_path = os.fspath(output_path)
    else:
        output_path = input_path if in_place else default_output_path(input_path)
    replaces_input = _same_file(input_path, output_path)
    if replaces_input and not in_place:
        raise BnfoldError(
            f"output {output_path!r} is the input: choose another -o, or pass --in-place"
        )
    # Large weights are read through maps of the input's files; every array made from one is
    # dropped before this returns (the result then stands on the file written).
    model, deferred, source_data_files = load_model_deferred(input_path, nodes_read_later=True,
                                                             map_files=True)
    if os.path.realpath(output_path) in source_data_files:
        deferred.close()
        raise BnfoldError(
            f"output {output_path!r} is the input's external data file: choose another -o"
        )
    output_data = os.path.realpath(
        os.path.join(os.path.dirname(os.path.abspath(output_path)), external_data_name(output_path))
    )
    if output_data == os.path.realpath(input_path):
        deferred.close()
        raise BnfoldError(
            f"writing {output_path!r} would put its external data over the input "
            f"{input_path!r}: choose another -o"
        )
    if output_data in source_data_files and not in_place:
        deferred.close()
        raise BnfoldError(
            f"writing {output_path!r} would replace {os.path.basename(output_data)!r}, which holds "
            f"the input's own weights: choose another -o (or --in-place to replace the input)"
        )
    pending = PendingTensors()
    options = dict(lower_standalone=lower_standalone, freeze_inputs=freeze_inputs)
    report = _fold_deferred(model, options, pending, deferred)
    result = FoldResult(model, report, pending=pending, deferred=deferred)

    if verify and not report.changed:
        # The output is the input's graph written back: running both proves nothing, and a
        # model ORT cannot run (an opset-6 BN, an int input only real data satisfies) would
        # fail a command that changed nothing.
        report.notes.append("nothing was folded: the output is the input unchanged, so there "
                            "is nothing to verify")
        verify = False

    def accept(staged_path: str) -> bool:
        if not verify:
            return True
        from bnfold.verification.runs import verify as run_verify

        result._move_to_file(staged_path)
        outcome = run_verify(input_path, staged_path, sites=fold_sites(model, report),
                             **(verify_options or {}))
        result.report.verification = outcome.to_dict()
        if not outcome.ok:
            result._load_from_file()  # the caller may want to look at the failed fold
        return outcome.ok

    try:
        written = save_model(
            model, output_path, external_data=bool(source_data_files) or None, accept=accept,
            overrides=pending, deferred=deferred,
        )
    except BaseException:
        deferred.close()
        raise
    result.output_path = output_path if written else None
    result.written = written
    if written and replaces_input:
        kept = {os.path.realpath(path) for path in written}
        result.unused_data = sorted(path for path in source_data_files if path not in kept)
    if written:
        # The written file holds the model (when verified, accept moved the result there
        # already): result.model reads it back, checked unchanged, and the folded values and
        # the maps of the input they were computed from go now, with their descriptors.
        if result._file is None:
            result._move_to_file(os.path.abspath(output_path))
        result._renamed(os.path.abspath(output_path))
    return result


def fold_sites(model: onnx.ModelProto, report: FoldReport) -> list[str]:
    """Tensors that both the original and the folded main graph compute at each fold: the
    output of a folded BN/Mul/Add, now produced by the node it folded into."""
    produced = {name for node in model.graph.node for name in node.output}
    return [e.output for e in report.folded if e.graph == "main" and e.output in produced
            and e.output not in report.altered_values]


def _identity(path: str) -> tuple[int, ...]:
    try:
        info = os.stat(path)
    except OSError:
        return ()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)

