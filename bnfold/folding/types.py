"""Element type and rank of the tensors a rule looks at: declared, else shape-inferred once."""

from __future__ import annotations

import onnx

from bnfold.onnxio.files import iter_tensors
from bnfold.onnxio.tensors import subgraphs

class TypeTable:
    """Element type and rank of tensors, from declared value infos, else shape inference.

    Inference runs at most once per model, on a copy whose large tensors are emptied, so it
    costs the graph's size rather than the weights'.
    """

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self._known: dict[str, tuple[int, int | None]] = {}
        self._collected = False  # the declarations are read on the first lookup
        self._inferred = False

    def lookup(self, name: str) -> tuple[int, int | None] | None:
        """(elem_type, rank or None) of `name`, or None when unknown."""
        if not self._collected:
            self._collected = True
            self._collect(self._model.graph)
        if name not in self._known and not self._inferred:
            self._inferred = True
            self._infer()
        found = self._known.get(name)
        return found

    def _collect(self, graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            self._known.setdefault(tensor.name, (tensor.data_type, len(tensor.dims)))
        for value in (*graph.input, *graph.output, *graph.value_info):
            tensor_type = value.type.tensor_type
            if not value.type.HasField("tensor_type") or not tensor_type.elem_type:
                continue
            rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
            known = self._known.get(value.name)
            if known is None or (known[1] is None and rank is not None):
                self._known[value.name] = (tensor_type.elem_type, rank)
        for node in graph.node:
            for _, sub in subgraphs(node):
                self._collect(sub)

    def _infer(self) -> None:
        emptied: list[tuple[onnx.TensorProto, bytes]] = []
        try:
            for tensor in iter_tensors(self._model, schema_only=True):
                if tensor.HasField("raw_data") and len(tensor.raw_data) > 4096:
                    emptied.append((tensor, tensor.raw_data))
                    tensor.ClearField("raw_data")
            small = self._model.SerializeToString()
        finally:
            for tensor, raw in emptied:
                tensor.raw_data = raw
        try:
            inferred = onnx.shape_inference.infer_shapes(onnx.load_from_string(small))
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
            return  # ranks stay unknown; rules that need them refuse with that reason
        self._collect(inferred.graph)
