"""Inputs for running a model: generated from its declared shapes, or read from a .npz file.

Used by `verify` and `bench` alike so both feed a model the same way.
A symbolic first (batch) dim defaults to 2; any other symbolic dim must be given with
`--shape name=DxD...`, because guessing a spatial or sequence size silently would test the
wrong model.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx

from bnfold.errors import BnfoldError

DEFAULT_BATCH = 2

_SHAPE_RE = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input=1x3x224x224' -> ('input', (1, 3, 224, 224))."""
    match = _SHAPE_RE.match(text.strip())
    if not match:
        raise BnfoldError(
            f"cannot read shape {text!r}: write NAME=DxDxD, e.g. input=1x3x224x224"
        )
    dims = tuple(int(d) for d in re.split(r"[x,]", match.group(2)))
    if any(d <= 0 for d in dims):
        raise BnfoldError(f"shape {text!r} has a zero dim: every dim must be at least 1")
    return match.group(1).strip(), dims


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (IR<4 lists weights as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def resolve_shape(
    value: onnx.ValueInfoProto, shapes: dict[str, tuple[int, ...]], batch: int = DEFAULT_BATCH
) -> tuple[int, ...]:
    """Concrete dims for one input: --shape wins; else symbolic dim 0 -> batch, else ask."""
    if value.name in shapes:
        return shapes[value.name]
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise BnfoldError(
            f"input {value.name!r} has no declared shape: give one with --shape {value.name}=DxDx..."
        )
    dims = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        elif axis == 0:
            dims.append(batch)
        else:
            label = dim.dim_param or "?"
            raise BnfoldError(
                f"input {value.name!r} dim {axis} is symbolic ({label}): give it with "
                f"--shape {value.name}=DxDx..."
            )
    return tuple(dims)


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    npz_path: str | os.PathLike | None = None,
    batch: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:
    """One input feed for `model`: from `npz_path` when given, else seeded standard normal."""
    if npz_path is not None:
        return load_npz_inputs(model, npz_path)
    shapes = shapes or {}
    names = {vi.name for vi in graph_inputs(model)}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise BnfoldError(
            f"--shape names {', '.join(unknown)}, which the model does not take; "
            f"its inputs are: {', '.join(sorted(names)) or '(none)'}"
        )
    rng = np.random.default_rng(seed)
    feed = {}
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        if elem not in _FLOAT_TYPES:
            type_name = onnx.TensorProto.DataType.Name(elem) if elem else "non-tensor"
            raise BnfoldError(
                f"input {value.name!r} is {type_name}; only float inputs can be generated: "
                f"pass real data with --inputs data.npz"
            )
        dims = resolve_shape(value, shapes, batch)
        feed[value.name] = rng.standard_normal(dims).astype(_FLOAT_TYPES[elem])
    return feed


def load_npz_inputs(model: onnx.ModelProto, npz_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a feed from .npz; every model input must be present under its own name."""
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise BnfoldError(f"inputs file {os.fspath(npz_path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BnfoldError(
            f"cannot read inputs file {os.fspath(npz_path)!r} ({exc}): save it with numpy.savez"
        ) from None
    missing = [vi.name for vi in graph_inputs(model) if vi.name not in arrays]
    if missing:
        raise BnfoldError(
            f"{os.fspath(npz_path)!r} lacks arrays for model inputs {', '.join(missing)}: "
            f"it has {', '.join(sorted(arrays)) or 'none'}; save them under those names"
        )
    return {vi.name: arrays[vi.name] for vi in graph_inputs(model)}
