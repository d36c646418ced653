"""Golden models for the fold tests, built in code (seeded) and run with ORT optimisation off."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tensor(name: str, values, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def bn_params(prefix: str, channels: int, seed: int = 1, dtype=np.float32) -> list[onnx.TensorProto]:
    r = rng(seed)
    return [
        tensor(f"{prefix}_scale", r.uniform(0.5, 1.5, channels), dtype),
        tensor(f"{prefix}_bias", r.normal(0, 0.5, channels), dtype),
        tensor(f"{prefix}_mean", r.normal(0, 0.5, channels), dtype),
        tensor(f"{prefix}_var", r.uniform(0.5, 2.0, channels), dtype),
    ]


def bn_node(x: str, y: str, prefix: str = "bn", name: str = "bn", **attrs) -> onnx.NodeProto:
    inputs = [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"]
    return helper.make_node("BatchNormalization", inputs, [y], name=name, **attrs)


def model(
    nodes, inputs, outputs, initializers, opset: int = 17, elem=TensorProto.FLOAT, ir_version=IR_VERSION
) -> onnx.ModelProto:
    """`inputs`/`outputs`: list of (name, shape)."""
    graph = helper.make_graph(
        nodes,
        "golden",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        initializers,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    # Outputs given without a shape take the inferred one (the checker wants a shape on graph I/O).
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(built).graph.value_info}
    inferred.update({v.name: v for v in onnx.shape_inference.infer_shapes(built).graph.output})
    for value in built.graph.output:
        if not value.type.tensor_type.HasField("shape") and value.name in inferred:
            value.type.CopyFrom(inferred[value.name].type)
    onnx.checker.check_model(built)
    return built


def run(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def count_ops(m: onnx.ModelProto, op_type: str) -> int:
    total = 0

    def walk(graph):
        nonlocal total
        for node in graph.node:
            total += node.op_type == op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(m.graph)
    return total


def assert_same_outputs(original, folded, feed, rtol=1e-5):
    """Scale-relative comparison: max|a − b| ≤ rtol·max|a| for every output."""
    expected, actual = run(original, feed), run(folded, feed)
    assert len(expected) == len(actual), "the folded model lost or gained an output"
    for a, b in zip(expected, actual):
        assert a.shape == b.shape
        scale = float(np.abs(a.astype(np.float64)).max())
        err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} × {scale:.3g}"
