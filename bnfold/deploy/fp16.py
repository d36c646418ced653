"""Convert a (folded) ONNX model to float16, keeping its inputs and outputs float32.

Used by `bnfold build --fp16` on TensorRT 11.x, whose networks are strongly typed: precision
lives in the graph, not in a builder flag. Float32 initializers and Constant tensors become
float16; a Cast sits at each float32 graph input and output, so callers feed and read fp32.
A value that would overflow float16 or flush to zero is refused, naming the tensor: folding
can scale weights far out of the fp16 range, and a silent inf is worse than no engine.

    >>> fp16_model = convert_to_fp16(bnfold.fold("m.onnx").model)
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.precision import FLOAT16, range_problem

# Inputs that the ONNX spec fixes as float32 whatever the data type (Resize/Upsample scales).
_FIXED_FLOAT32_INPUTS = {("Resize", 2), ("Upsample", 1)}


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of `model` with float32 I/O (the input is not modified)."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    keep_fp32 = _fixed_float32_names(graph)
    _convert_graph(graph, keep_fp32, top_level=True)
    _cast_boundary(graph)
    try:
        onnx.checker.check_model(converted)
        onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        message = str(exc).strip().splitlines()[0][:300]
        raise BnfoldError(
            f"the float16 version of the model is not valid ONNX ({message}): an op in it has "
            f"no float16 form; build without --fp16"
        ) from None
    return converted


def _fixed_float32_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        for index, name in enumerate(node.input):
            if (node.op_type, index) in _FIXED_FLOAT32_INPUTS and name:
                names.add(name)
    return names


def _convert_graph(graph: onnx.GraphProto, keep_fp32: set[str], top_level: bool) -> None:
    initializer_names = {t.name for t in graph.initializer}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep_fp32:
            graph.initializer[index].CopyFrom(_tensor_to_fp16(tensor, f"initializer {tensor.name!r}"))
    for node in graph.node:
        _convert_node(node, keep_fp32)
    if not top_level:
        # Subgraph inputs/outputs (Loop/Scan bodies) carry the converted types.
        for value in list(graph.input) + list(graph.output):
            _value_to_fp16(value)
    else:
        # Weights listed as graph inputs (IR < 4) follow their initializers.
        for value in graph.input:
            if value.name in initializer_names and value.name not in keep_fp32:
                _value_to_fp16(value)
    # Intermediate types are re-inferred by whoever reads the model; stale fp32 entries would lie.
    del graph.value_info[:]


def _convert_node(node: onnx.NodeProto, keep_fp32: set[str]) -> None:
    what = f"{node.op_type} node {node.name or node.output[0]!r}"
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            _convert_graph(attr.g, keep_fp32, top_level=False)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for sub in attr.graphs:
                _convert_graph(sub, keep_fp32, top_level=False)
    if node.op_type == "Constant" and node.output[0] not in keep_fp32:
        _convert_constant(node, what)
    elif node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    elif node.op_type == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_tensor_to_fp16(attr.t, f"value of {what}"))
    elif node.op_type in ("RandomNormal", "RandomUniform", "EyeLike", "RandomNormalLike",
                          "RandomUniformLike"):
        for attr in node.attribute:
            if attr.name == "dtype" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def _convert_constant(node: onnx.NodeProto, what: str) -> None:
    for attr in list(node.attribute):
        if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_tensor_to_fp16(attr.t, f"value of {what}"))
        elif attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            import numpy as np

            array = np.array(values if attr.name == "value_floats" else values[0], np.float32)
            tensor = numpy_helper.from_array(array, node.output[0])
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value",
                                                        _tensor_to_fp16(tensor, f"value of {what}")))


def _tensor_to_fp16(tensor: onnx.TensorProto, what: str) -> onnx.TensorProto:
    import numpy as np

    values = numpy_helper.to_array(tensor).astype(np.float64)
    problem = range_problem(values, FLOAT16, what=what)
    if problem:
        raise BnfoldError(f"cannot convert to float16: {problem}; build without --fp16")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


def _value_to_fp16(value: onnx.ValueInfoProto) -> None:
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == TensorProto.FLOAT:
        tensor_type.elem_type = TensorProto.FLOAT16


def _cast_boundary(graph: onnx.GraphProto) -> None:
    """Cast float32 graph inputs to fp16 on entry and fp16 results to float32 on exit."""
    initializer_names = {t.name for t in graph.initializer}
    taken = _all_names(graph)

    def fresh(base: str) -> str:
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        return name

    entry_casts = []
    for value in graph.input:
        if value.name in initializer_names:
            continue
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = fresh(f"{value.name}_fp16")
        _rename_uses(graph, value.name, inner)
        entry_casts.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16,
                                            name=fresh(f"cast_{value.name}_to_fp16")))
    exit_casts = []
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = fresh(f"{value.name}_fp16")
        _rename_uses(graph, value.name, inner)
        _rename_producer(graph, value.name, inner)
        exit_casts.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT,
                                           name=fresh(f"cast_{value.name}_to_fp32")))
    nodes = entry_casts + list(graph.node) + exit_casts
    del graph.node[:]
    graph.node.extend(nodes)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every consumer of `old` at `new`, subgraphs included (they may read outer names)."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                if old not in {v.name for v in sub.input}:  # shadowed inside: leave it
                    _rename_uses(sub, old, new)


def _rename_producer(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
                return
    # An output that is a graph input or initializer passed straight through.
    graph.node.append(helper.make_node("Identity", [old], [new]))
