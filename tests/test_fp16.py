"""fp16 conversion: structure, numerics under ONNX Runtime CPU, and refusals."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BnfoldError
from bnfold.deploy.fp16 import convert_to_fp16
from bnfold.sample_model import build_sample_model


def _run(model, feed):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture(scope="module")
def folded():
    return bnfold.fold(build_sample_model()).model


def test_io_stays_float32_and_weights_become_float16(folded):
    before = folded.SerializeToString()
    converted = convert_to_fp16(folded)
    assert folded.SerializeToString() == before  # input untouched
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [TensorProto.FLOAT]
    assert converted.graph.node[0].op_type == "Cast"
    assert converted.graph.node[-1].op_type == "Cast"
    assert {t.data_type for t in converted.graph.initializer} == {TensorProto.FLOAT16}
    onnx.checker.check_model(converted)


def test_fp16_model_runs_and_matches_fp32_on_ort_cpu(folded):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = _run(folded, {"input": x})
    result = _run(convert_to_fp16(folded), {"input": x})
    assert result.dtype == np.float32
    scale = np.abs(reference).max()
    assert np.abs(result - reference).max() <= 1e-2 * scale


def _matmul_model(weight, constant=None):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if constant is not None:
        nodes.append(helper.make_node("Constant", [], ["c"], value_float=constant))
    else:
        nodes.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.float32(0.5), "c")))
    nodes += [helper.make_node("Add", ["h", "c"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_add_relu_with_scalar_constant():
    w = np.random.default_rng(1).standard_normal((4, 3))
    model = _matmul_model(w, constant=0.25)
    converted = convert_to_fp16(model)
    constant = next(n for n in converted.graph.node if n.op_type == "Constant")
    assert constant.attribute[0].name == "value"
    assert constant.attribute[0].t.data_type == TensorProto.FLOAT16
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, {"x": x}), _run(model, {"x": x}), atol=1e-2)


def test_refuses_overflow_naming_the_tensor():
    w = np.ones((4, 3))
    w[0, 0] = 1e6
    with pytest.raises(BnfoldError, match="initializer 'w' would overflow float16"):
        convert_to_fp16(_matmul_model(w))


def test_refuses_flush_to_zero_naming_the_tensor():
    w = np.ones((4, 3))
    w[1, 2] = 1e-9
    with pytest.raises(BnfoldError, match="initializer 'w' would flush to zero"):
        convert_to_fp16(_matmul_model(w))


def test_refuses_overflowing_constant():
    with pytest.raises(BnfoldError, match="Constant node"):
        convert_to_fp16(_matmul_model(np.ones((4, 3)), constant=1e9))
