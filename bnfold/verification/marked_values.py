"""The reference's inner tensors, in memory a group at a time.

`--locate` compares inner tensors, and a run with every tensor marked as an output holds all
of them at once: in the runtime (a marked tensor's buffer is never reused), in the values it
returns, and again in the candidate's run. A YOLO at 1280×1280 has 1 GiB of them, which made
`--locate` peak near 6 GiB. So the tensors are split, in node order, into groups whose
estimated size (shape inference at the input set's concrete shapes) stays under
GROUP_BYTES, and each group is marked and compared in a run of its own. A model whose tensors
fit in one group is marked whole, as before.

`ReferenceValues` runs the reference (ORT, optimisation off) with a group marked and keeps
the values while they fit in CACHE_BYTES; a value asked for again after it was let go is
computed again by another run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import onnx

from bnfold.verification.model_sources import with_outputs

GROUP_BYTES = 256 * 2**20  # estimated bytes of marked tensors per run
CACHE_BYTES = 2 * GROUP_BYTES  # reference values kept between runs


def plan_groups(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str],
                budget: int | None = None) -> list[list[str]]:
    """`names` (in order) cut into runs whose estimated bytes stay within `budget`; a tensor
    of unknown size counts as the largest known one (or the feed, when none is known)."""
    budget = GROUP_BYTES if budget is None else budget
    sizes = estimated_sizes(model, feed)
    known = [size for size in sizes.values() if size is not None]
    unknown = max(known, default=sum(v.nbytes for v in feed.values()))
    groups: list[list[str]] = [[]]
    total = 0
    for name in names:
        size = sizes.get(name) or unknown
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups if groups[0] else []


def estimated_sizes(model: onnx.ModelProto,
                    feed: dict[str, np.ndarray]) -> dict[str, int | None]:
    """Bytes of each tensor the main graph's nodes make, by ONNX shape inference with the
    graph inputs at the feed's shapes (None where a shape or type stays unknown). Weights
    count by their dims: a model loaded without its large weights is enough."""
    graph = model.graph
    header = onnx.GraphProto(name=graph.name)
    header.node.extend(graph.node)  # no outputs: every tensor's inferred shape is value_info
    for tensor in graph.initializer:
        if _small(tensor):  # shapes and axes: inference propagates their values
            header.initializer.add().CopyFrom(tensor)
        else:
            header.input.add().CopyFrom(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    initializers = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.name in feed:
            array = feed[value.name]
            header.input.add().CopyFrom(onnx.helper.make_tensor_value_info(
                value.name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                list(array.shape)))
        else:
            header.input.add().CopyFrom(value)
    shell = onnx.ModelProto(ir_version=model.ir_version)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    shell.graph.CopyFrom(header)
    sizes: dict[str, int | None] = {out: None for node in graph.node for out in node.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, data_prop=True)
    except Exception:  # inference refuses some graphs: every size stays unknown
        return sizes
    for value in inferred.graph.value_info:
        if value.name in sizes:
            sizes[value.name] = _bytes(value)
    return sizes


def _small(tensor: onnx.TensorProto) -> bool:
    """A weight held in the proto and small enough to be a shape, not a deferred one."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count <= 64 and (bool(tensor.raw_data) or count == 0 or any(
        len(getattr(tensor, field)) for field in ("int64_data", "int32_data", "float_data",
                                                  "double_data", "uint64_data")))


def _bytes(value: onnx.ValueInfoProto) -> int | None:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if any(d < 0 for d in dims):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    except Exception:  # an element type numpy does not have (float8, int4)
        itemsize = 1
    return int(np.prod(dims, dtype=np.int64)) * itemsize


class ReferenceValues:
    """The reference's value of any of `names` on each input set: computed by marking them,
    a group per run, kept while they fit in CACHE_BYTES."""

    def __init__(self, reference, feeds: list[dict], runner, folder: str):
        self._reference, self._feeds, self._runner = reference, feeds, runner
        self._folder = folder
        self._kept: list[dict[str, np.ndarray]] = [{} for _ in feeds]
        self.runs = 0

    def get(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        """`names`' values on input set `index` (those that are tensors), computing the ones
        not kept in one run."""
        kept = self._kept[index]
        missing = [n for n in dict.fromkeys(names) if n not in kept]
        got = {n: kept[n] for n in names if n in kept}
        if missing:
            fresh = self._run(index, missing)
            size = sum(v.nbytes for v in fresh.values())
            held = sum(v.nbytes for values in self._kept for v in values.values())
            if held + size > CACHE_BYTES:
                for values in self._kept:
                    values.clear()
            if size <= CACHE_BYTES:
                kept.update(fresh)
            got.update(fresh)
        return {n: got[n] for n in names if n in got}

    def _run(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        self.runs += 1
        path = os.path.join(self._folder, f"reference{self.runs}.onnx")
        marked = with_outputs(self._reference, names, path)
        role = "reference (tensors marked)"
        try:
            session = self._runner.session(marked, role)
            values = self._runner.run(session, self._feeds[index], role)
        finally:
            if isinstance(marked, str):
                os.unlink(marked)
        wanted = set(names)
        return {n: v for n, v in values.items() if n in wanted and isinstance(v, np.ndarray)
                and v.dtype.kind != "O"}


class LazyValues(Mapping):
    """An input set and the reference's tensors as one mapping for `--repro`: membership
    without running anything, values fetched (and `require`d in one run) when read."""

    def __init__(self, feed: dict, names: list[str], reference: ReferenceValues, index: int):
        self._feed, self._names, self._reference, self._index = feed, set(names), reference, index
        self._read: dict[str, np.ndarray] = {}

    def require(self, names) -> None:
        wanted = [n for n in names if n in self._names and n not in self._read]
        if wanted:
            self._read.update(self._reference.get(self._index, wanted))

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._feed:
            return self._feed[name]
        self.require([name])
        return self._read[name]

    def __contains__(self, name) -> bool:
        return name in self._feed or name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter([*self._feed, *sorted(self._names - set(self._feed))])

    def __len__(self) -> int:
        return len(self._feed) + len(self._names - set(self._feed))
