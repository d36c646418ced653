"""Inputs for running a model: generated from its declared inputs, or read from a .npz file.

Used by `verify` and `bench` alike so both feed a model the same way.

Generated values by type: floats are seeded standard normal; a bool input takes True in one run
and False in the next (so both branches of an `If` on it are checked); integers are small and
non-negative, below the table size where the input indexes a Gather; uint8 spans 0–255. A string
input is drawn from the keys of the ai.onnx.ml LabelEncoder/CategoryMapper nodes that alone read
it (the model's own vocabulary); any other string input needs `--inputs`.

Dims: `--shape` wins; a symbolic batch (axis 0, or a dim named like one) is `batch` (2 unless
the caller says otherwise; verification uses 1); any other
symbolic dim comes from the model's own evidence (a numeric dim_param, `imgsz`-style metadata)
or, failing that, from a short ladder of sizes tried until ONNX Runtime runs the model (see
`bnfold.verification.runs`). The same dim_param always gets the same value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.errors import BnfoldError

DEFAULT_BATCH = 2
# Sizes tried for symbolic dims without evidence: multiples of 32 first (strided convs and
# concatenations need them), small first (cheap to run), then small odd ones.
SIZE_LADDER = (64, 32, 128, 96, 224, 256, 320, 384, 512, 640, 48, 16, 8, 1)
# Generated inputs of one run above this are refused before anything is allocated.
MAX_GENERATED_BYTES = 256 << 20
_BATCH_NAMES = re.compile(r"^(n|b|bs|batch|batch_?size|batches|unk__\d+_batch|N)$", re.IGNORECASE)
_SHAPE_RE = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")
_METADATA_SIZE_KEYS = ("imgsz", "img_size", "image_size", "input_size")

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}
_INT_TYPES = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64,
}
_INT_HIGH = 10  # exclusive bound for integers that index nothing we can see


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


def type_name(elem: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem) if elem else "non-tensor"
    except ValueError:
        return f"type {elem}"


@dataclass
class InputSpec:
    """One input to generate: its dims (ints, or dim_param / '?axis' labels still open)."""

    name: str
    elem_type: int
    dims: list[int | str]
    int_high: int = _INT_HIGH  # exclusive upper bound for generated integers
    vocabulary: tuple[str, ...] = ()  # what a string input is drawn from

    @property
    def is_bool(self) -> bool:
        return self.elem_type == onnx.TensorProto.BOOL


@dataclass
class InputPlan:
    """How to generate every input of a model; open dims are filled in by `settle`."""

    specs: list[InputSpec]
    batch: int = DEFAULT_BATCH
    chosen: dict[str, int] = field(default_factory=dict)  # open dim label -> value
    notes: list[str] = field(default_factory=list)

    @property
    def open_dims(self) -> list[str]:
        labels = [d for s in self.specs for d in s.dims if isinstance(d, str)]
        return [d for d in dict.fromkeys(labels) if d not in self.chosen]

    @property
    def has_bool(self) -> bool:
        return any(s.is_bool for s in self.specs)

    @property
    def generated_non_float(self) -> list[InputSpec]:
        return [s for s in self.specs if s.elem_type not in _FLOAT_TYPES]

    def shape_of(self, spec: InputSpec, fill: dict[str, int] | None = None) -> tuple[int, ...]:
        values = {**self.chosen, **(fill or {})}
        return tuple(d if isinstance(d, int) else values[d] for d in spec.dims)

    def settle(self, try_feed: Callable[[dict[str, np.ndarray]], str | None], seed: int) -> None:
        """Give every open dim a value: the first ladder size whose feed `try_feed` runs
        (it returns None on success, else ONNX Runtime's message)."""
        labels = self.open_dims
        if not labels:
            return
        tried: list[int] = []
        first_problem = ""
        for size in SIZE_LADDER:
            for fill in self._fills(labels, size):
                if self._bytes(fill) > MAX_GENERATED_BYTES:
                    continue  # never allocated
                problem = try_feed(self.feed(seed, 0, fill))
                if problem is None:
                    self.chosen.update(fill)
                    self.notes.append(_chosen_note(fill, size))
                    return
                first_problem = first_problem or problem
            tried.append(size)
        hint = ""
        if self.generated_non_float:
            hint = (f"; the values generated for {names_of(self.generated_non_float)} may be "
                    f"what it rejects")
        raise BnfoldError(
            f"no size for the symbolic dims {', '.join(_label_text(x) for x in labels)} lets "
            f"ONNX Runtime run the model (tried {', '.join(map(str, tried))}; at "
            f"{tried[0] if tried else '-'}: {first_problem or 'inputs too large'}{hint}): give "
            f"concrete shapes with --shape NAME=DxD... or real data with --inputs data.npz"
        )

    def _fills(self, labels: list[str], size: int) -> Iterator[dict[str, int]]:
        """Every open dim at `size`; then, for unnamed dims that may be a batch exporters did
        not name (silero's state [2, ?, 128]), each one in turn at the batch size."""
        yield {label: size for label in labels}
        if len(labels) > 1:
            for batch_label in labels:
                if ":" in batch_label and size != self.batch:
                    yield {label: self.batch if label == batch_label else size for label in labels}

    def _bytes(self, fill: dict[str, int] | None = None) -> int:
        total = 0
        for spec in self.specs:
            dtype = _numpy_dtype(spec.elem_type)
            itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
            total += math.prod(self.shape_of(spec, fill)) * itemsize
        return total

    def check_size(self) -> None:
        total = self._bytes()
        if total > MAX_GENERATED_BYTES:
            biggest = max(self.specs, key=lambda s: math.prod(self.shape_of(s)))
            raise BnfoldError(
                f"generated inputs would take {total / 2**20:,.0f} MiB (input {biggest.name!r} "
                f"{list(self.shape_of(biggest))}), over the {MAX_GENERATED_BYTES >> 20} MiB "
                f"limit: give smaller dims with --shape NAME=DxD... or real data with --inputs"
            )

    def feed(self, seed: int, run: int, fill: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Run `run`'s feed (bool inputs alternate True/False with the run index)."""
        rng = np.random.default_rng(seed + run)
        feed = {}
        for spec in self.specs:
            shape = self.shape_of(spec, fill)
            feed[spec.name] = _generate(spec, shape, rng, run)
        return feed


def plan_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch: int = DEFAULT_BATCH,
) -> InputPlan:
    """What to generate for each input of `model`, with every dim the model pins down fixed."""
    shapes = shapes or {}
    inputs = graph_inputs(model)
    names = {vi.name for vi in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise BnfoldError(
            f"--shape names {', '.join(unknown)}, which the model does not take; "
            f"its inputs are: {', '.join(sorted(names)) or '(none)'}"
        )
    bounds = _gather_bounds(model)
    vocabularies = _string_vocabularies(model)
    metadata_size = _metadata_size(model)
    plan = InputPlan([], batch)
    _seed_given_dim_params(inputs, shapes, plan)
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise BnfoldError(
                f"input {value.name!r} is not a tensor (a sequence or map): pass real data "
                f"with --inputs data.npz"
            )
        elem = value.type.tensor_type.elem_type
        vocabulary = vocabularies.get(value.name, ()) if elem == onnx.TensorProto.STRING else ()
        if not vocabulary and (elem == onnx.TensorProto.STRING or _numpy_dtype(elem) is None):
            why = (" (it is read by nodes other than LabelEncoder/CategoryMapper, whose keys "
                   "would say which strings it takes)" if elem == onnx.TensorProto.STRING else "")
            raise BnfoldError(
                f"input {value.name!r} is {type_name(elem)}; bnfold cannot generate it{why}: "
                f"pass real data with --inputs data.npz"
            )
        dims = _declared_dims(value, shapes, plan, batch, metadata_size)
        plan.specs.append(InputSpec(value.name, elem, dims, bounds.get(value.name, _INT_HIGH),
                                    vocabulary))
    return plan


def _declared_dims(value, shapes, plan: InputPlan, batch: int, metadata_size) -> list[int | str]:
    if value.name in shapes:
        given = shapes[value.name]
        declared = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
        if declared is not None and len(declared) != len(given):
            raise BnfoldError(
                f"--shape {value.name} has {len(given)} dims but the model declares "
                f"{len(declared)}: give all of them"
            )
        return list(given)
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise BnfoldError(
            f"input {value.name!r} has no declared shape: give one with --shape {value.name}=DxDx..."
        )
    rank = len(tensor_type.shape.dim)
    dims: list[int | str] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
            continue
        label = dim.dim_param or f"{value.name}:{axis}"
        dims.append(label)
        if label in plan.chosen:
            continue
        if dim.dim_param.isdigit() and int(dim.dim_param) > 0:
            plan.chosen[label] = int(dim.dim_param)
        elif axis == 0 or _BATCH_NAMES.match(dim.dim_param or ""):
            plan.chosen[label] = batch
        elif metadata_size and rank == 4 and axis >= 2:
            plan.chosen[label] = metadata_size[axis - 2]
            plan.notes.append(f"{_label_text(label)} = {metadata_size[axis - 2]}, from the "
                              f"model's metadata")
    return dims


def _seed_given_dim_params(inputs, shapes, plan: InputPlan) -> None:
    """A --shape value settles its dim_params on every input, whichever comes first."""
    for value in inputs:
        if value.name not in shapes or not value.type.tensor_type.HasField("shape"):
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            if not dim.dim_param:
                continue
            previous = plan.chosen.setdefault(dim.dim_param, size)
            if previous != size:
                raise BnfoldError(
                    f"--shape gives dim {dim.dim_param!r} two sizes ({previous} and {size}); the "
                    f"model says they are the same dim: give one size"
                )


def _metadata_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W) from metadata such as ultralytics' imgsz='[640, 640]', when present."""
    for prop in model.metadata_props:
        if prop.key.lower() not in _METADATA_SIZE_KEYS:
            continue
        try:
            values = json.loads(prop.value)
        except ValueError:
            continue
        if isinstance(values, int):
            values = [values, values]
        if (isinstance(values, list) and len(values) == 2
                and all(isinstance(v, int) and 0 < v <= 8192 for v in values)):
            return values[0], values[1]
    return None


def _gather_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Inputs used as Gather indices into a table of known size: that size bounds them."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    sizes[node.output[0]] = list(attr.t.dims)
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gather", "GatherElements") or len(node.input) < 2:
            continue
        table = sizes.get(node.input[0])
        if not table:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if -len(table) <= axis < len(table):
            size = table[axis]
            bounds[node.input[1]] = min(bounds.get(node.input[1], size), size)
    return bounds


# ai.onnx.ml ops that map strings by a table: the attribute holding the strings they know.
_STRING_KEYS = {"LabelEncoder": ("keys_strings", "classes_strings"), "CategoryMapper": ("cats_strings",)}


def _string_vocabularies(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """String inputs read only by LabelEncoder/CategoryMapper nodes: the keys those know (a
    value outside them maps to the default, which the model handles too, but keys exercise the
    real paths)."""
    found: dict[str, list[str]] = {}
    refused: set[str] = set()
    for node in model.graph.node:
        keys = None
        if node.domain == "ai.onnx.ml" and node.op_type in _STRING_KEYS:
            for attr in node.attribute:
                if attr.name in _STRING_KEYS[node.op_type] and attr.strings:
                    keys = [k.decode("utf-8", "replace") for k in attr.strings]
                    break
        for slot, name in enumerate(node.input):
            if keys is None or slot != 0:
                refused.add(name)
            else:
                found.setdefault(name, []).extend(keys)
    return {name: tuple(dict.fromkeys(keys)) for name, keys in found.items()
            if name not in refused}


def _numpy_dtype(elem: int):
    if elem in _FLOAT_TYPES:
        return _FLOAT_TYPES[elem]
    if elem in _INT_TYPES:
        return _INT_TYPES[elem]
    if elem == onnx.TensorProto.BOOL:
        return np.bool_
    return None


def _generate(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, run: int):
    elem = spec.elem_type
    if spec.vocabulary:
        picks = rng.integers(0, len(spec.vocabulary), size=shape)
        return np.array(spec.vocabulary, dtype=object)[picks]
    if elem in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(_FLOAT_TYPES[elem])
    if elem == onnx.TensorProto.BOOL:
        return np.full(shape, run % 2 == 0, dtype=np.bool_)
    dtype = _INT_TYPES[elem]
    unbounded = spec.int_high == _INT_HIGH
    high = 256 if elem == onnx.TensorProto.UINT8 and unbounded else max(1, spec.int_high)
    return rng.integers(0, high, size=shape).astype(dtype)


def _chosen_note(fill: dict[str, int], size: int) -> str:
    parts = {}
    for label, value in fill.items():
        parts.setdefault(value, []).append(_label_text(label))
    text = "; ".join(f"{', '.join(labels)} set to {value}" for value, labels in parts.items())
    return (f"symbolic dims: {text} (the first sizes of {_ladder_text()} that ONNX Runtime ran; "
            f"choose with --shape NAME=DxD...)")


def _label_text(label: str) -> str:
    return f"{label.split(':')[0]} axis {label.split(':')[1]}" if ":" in label else repr(label)


def _ladder_text() -> str:
    return "/".join(str(s) for s in SIZE_LADDER[:4]) + "/…"


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    npz_path: str | os.PathLike | None = None,
    batch: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:
    """One input feed for `model` without running it: from `npz_path` when given, else
    generated; a symbolic dim other than the batch must then be given in `shapes`."""
    if npz_path is not None:
        return load_npz_inputs(model, npz_path)
    plan = plan_inputs(model, shapes, batch)
    if plan.open_dims:
        first = plan.open_dims[0]
        raise BnfoldError(
            f"dim {_label_text(first)} is symbolic: give concrete dims with --shape NAME=DxDx..."
        )
    plan.check_size()
    return plan.feed(seed, 0)


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


def names_of(specs: Iterable[InputSpec]) -> str:
    return ", ".join(f"{s.name!r} ({type_name(s.elem_type)})" for s in specs)
