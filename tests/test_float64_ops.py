"""The float64 evaluation's tap-by-tap pooling and ConvTranspose against ONNX Runtime: the same
output sizes (ceil_mode, auto_pad, pads) and values to float32 rounding, and onnx.reference's
own kernels where they decline."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from golden import rng
from onnx import TensorProto, helper

from bnfold.verification.float64 import evaluate_float64
from bnfold.verification.float64_ops import conv_transpose_by_taps, pool_by_taps


def single_op(op_type: str, x_shape, inits=(), outputs=("y",), opset=19, **attrs):
    names = ["x", *(name for name, _ in inits)]
    node = helper.make_node(op_type, names, list(outputs), **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [helper.make_tensor(name, TensorProto.FLOAT, value.shape, value.reshape(-1))
         for name, value in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def assert_matches_ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    exact = evaluate_float64(model, {"x": x})
    for output, want in zip(model.graph.output, expected):
        got = exact[output.name]
        assert got.shape == want.shape
        assert got.dtype == np.float64
        scale = max(float(np.abs(got).max()), 1e-30)
        assert float(np.abs(got - want).max()) / scale < 2e-6


POOLS = [
    dict(kernel_shape=[3, 3], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),  # BN-Inception's stem
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], ceil_mode=1),
    dict(kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1),
    # on the width of 10, ceil would start a 6th window in the tail padding: it is dropped
    dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[3, 2], pads=[1, 0, 1, 1]),
    dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[3, 2], auto_pad="SAME_LOWER", strides=[2, 3]),
    dict(kernel_shape=[3, 3], auto_pad="VALID", strides=[2, 2]),
]


@pytest.mark.parametrize("attrs", POOLS)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool_matches_onnx_runtime(attrs, count_include_pad):
    x = rng(0).standard_normal((2, 3, 11, 10)).astype(np.float32)
    assert_matches_ort(single_op("AveragePool", x.shape, count_include_pad=count_include_pad,
                                 **attrs), x)


@pytest.mark.parametrize("attrs", [*POOLS, dict(kernel_shape=[3, 3], dilations=[2, 1],
                                                pads=[2, 1, 2, 1], ceil_mode=1)])
def test_max_pool_matches_onnx_runtime(attrs):
    x = rng(1).standard_normal((2, 3, 11, 10)).astype(np.float32)
    assert_matches_ort(single_op("MaxPool", x.shape, **attrs), x)


@pytest.mark.parametrize("spatial", [1, 3])
def test_pools_of_other_ranks_match_onnx_runtime(spatial):
    x = rng(2).standard_normal((1, 2, *[7] * spatial)).astype(np.float32)
    for op in ("MaxPool", "AveragePool"):
        assert_matches_ort(single_op(op, x.shape, kernel_shape=[3] * spatial,
                                     strides=[2] * spatial, pads=[1] * 2 * spatial,
                                     ceil_mode=1), x)


def test_max_pool_with_indices_runs_onnx_reference_kernel():
    x = rng(3).standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert pool_by_taps(x, "average", [2, 2], "NOTSET", 0, 0, [2, 2], None, None) is None
    model = single_op("MaxPool", x.shape, outputs=("y", "indices"), kernel_shape=[2, 2],
                      strides=[2, 2])
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.INT64
    exact = evaluate_float64(model, {"x": x})
    expected = x.reshape(1, 2, 3, 2, 3, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(exact["y"], expected.astype(np.float64))


CONV_TRANSPOSES = [
    dict(strides=[2, 2], pads=[1, 1, 1, 1]),  # a ViT decoder's 4x4 upsampling
    dict(strides=[2, 3], pads=[0, 1, 2, 0], output_padding=[1, 0]),
    dict(strides=[1, 1], dilations=[2, 1], group=2),
    dict(strides=[3, 2], group=4, pads=[1, 1, 0, 0]),
]


@pytest.mark.parametrize("attrs", CONV_TRANSPOSES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_transpose_matches_onnx_runtime(attrs, bias):
    r = rng(4)
    group = attrs.get("group", 1)
    w = (r.standard_normal((4, 8 // group, 4, 3)) * 0.3).astype(np.float32)
    inits = [("w", w)] + ([("b", r.standard_normal(8).astype(np.float32))] if bias else [])
    x = r.standard_normal((2, 4, 5, 6)).astype(np.float32)
    assert_matches_ort(single_op("ConvTranspose", x.shape, inits, **attrs), x)


def test_conv_transpose_with_output_shape_runs_onnx_reference_kernel():
    r = rng(5)
    x = r.standard_normal((1, 2, 4, 4)).astype(np.float32)
    w = r.standard_normal((2, 3, 3, 3)).astype(np.float32)
    assert conv_transpose_by_taps(x, w, None, "NOTSET", None, 1, None, [9, 9], None,
                                  [2, 2]) is None
    assert_matches_ort(single_op("ConvTranspose", x.shape, [("w", w)], strides=[2, 2],
                                 output_shape=[9, 9]), x)
