"""The models verification reads, and the copies of them it rewrites with extra outputs.

A model comes as a ModelProto, serialized bytes or a path. A path goes to ONNX Runtime and the
engines as it is (they read its weights themselves, once bnfold's loader has vetted the file);
the graph is read without its weights. Fold sites, float64 judgements and `--locate` compare
inner tensors by rewriting both models with those tensors as extra outputs, in a scratch folder
beside the candidate.
"""

from __future__ import annotations

import os
import tempfile

import onnx

from bnfold.errors import BnfoldError

ModelSource = onnx.ModelProto | str | os.PathLike | bytes


def scratch_beside(candidate: ModelSource) -> str | None:
    """Where models rewritten for a comparison go: beside the candidate (the output's folder,
    on the disk the user chose for it), never the input's; None for the system's."""
    return os.path.dirname(os.path.abspath(candidate)) if is_path(candidate) else None


def scratch_folder(prefix: str, beside: str | None) -> tempfile.TemporaryDirectory:
    """A temporary folder in `beside`, or the system's where that folder refuses one (a
    read-only folder given to `bnfold verify`)."""
    try:
        return tempfile.TemporaryDirectory(prefix=prefix, dir=beside)
    except OSError:
        return tempfile.TemporaryDirectory(prefix=prefix)


def is_path(source: ModelSource) -> bool:
    return isinstance(source, (str, os.PathLike))


def with_outputs(source: ModelSource, names: list[str], path: str,
                  types: dict[str, int] | None = None) -> str | bytes:
    """`source` with `names` appended to its graph outputs, as what ORT takes; `types` gives
    their element types (engines other than ORT need them), else they are left to infer."""
    if not is_path(source):
        model = onnx.ModelProto()
        model.CopyFrom(source if isinstance(source, onnx.ModelProto) else load_source(source)[0])
        add_outputs(model, names, types)
        return model.SerializeToString()
    from bnfold.onnxio.files import load_model_deferred, save_model

    model, deferred, _ = load_model_deferred(source)
    try:
        add_outputs(model, names, types)
        save_model(model, path, deferred=deferred, check=False)  # typeless extra outputs: ORT infers them
    finally:
        deferred.close()
    return path


def add_outputs(model: onnx.ModelProto, names: list[str],
                 types: dict[str, int] | None = None) -> None:
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            value = model.graph.output.add(name=name)
            if types and name in types:
                value.type.tensor_type.elem_type = types[name]


def load_source(source: ModelSource,
                header_only: bool = True) -> tuple[onnx.ModelProto | None, str | bytes]:
    """The model's graph (weights left out for a path: ORT reads the file itself, once
    bnfold's loader has vetted it) and what to hand ONNX Runtime."""
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    if isinstance(source, bytes):
        try:
            return onnx.load_from_string(source), source
        except Exception as exc:  # protobuf's DecodeError and friends
            raise BnfoldError(f"the model bytes do not parse as ONNX ({exc})") from None
    from bnfold.onnxio.files import load_model, load_model_deferred

    if not header_only:
        return load_model(source), os.fspath(source)
    model, deferred, _ = load_model_deferred(source)
    deferred.close()
    return model, os.fspath(source)
