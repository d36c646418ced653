"""Every refusal: the BN stays, the graph stays valid and numerically equal, the report says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, bn_node, bn_params, count_ops, model, rng, tensor
from onnx import helper

import bnfold
from bnfold.errors import BnfoldError


def fold_refused(m: onnx.ModelProto, feed, reason_part: str):
    result = bnfold.fold(m)
    assert result.report.folded_count == 0
    assert count_ops(result.model, "BatchNormalization") == count_ops(m, "BatchNormalization")
    reasons = " | ".join(r for e in result.report.kept for r in e.reasons)
    assert reason_part in reasons, reasons
    onnx.checker.check_model(result.model)
    if feed is not None:
        assert_same_outputs(m, result.model, feed)
    return result


def conv_bn_model(bn_attrs=None, extra_nodes=(), outputs=(("y", None),), opset=17, bn_channels=4,
                  inits_extra=()):
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", bn_channels), *inits_extra]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", **(bn_attrs or {})),
             *extra_nodes]
    return model(nodes, [("x", [2, 3, 6, 6])], list(outputs), inits, opset=opset)


FEED = {"x": rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}


def test_training_mode_is_refused():
    m = conv_bn_model({"training_mode": 1}, opset=15, outputs=(("y", [2, 4, 4, 4]),))
    fold_refused(m, None, "training_mode=1")


def test_used_running_stat_outputs_are_refused():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    bn = helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                          ["y", "running_mean", "running_var", "saved_mean", "saved_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 4, 4, 4]), ("running_mean", [4])], inits, opset=9)
    fold_refused(m, None, "running-statistics outputs are used")


def test_spatial_zero_is_refused():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3)))]
    inits += [tensor(t.name, np.resize(onnx.numpy_helper.to_array(t), (4, 4, 4))) for t in bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", spatial=0)]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 4, 4, 4])], inits, opset=7)
    fold_refused(m, None, "spatial=0")


def test_producer_output_feeding_another_node_is_refused():
    m = conv_bn_model(extra_nodes=[helper.make_node("Relu", ["c"], ["r"], name="Relu_3")],
                      outputs=(("y", None), ("r", None)))
    result = fold_refused(m, FEED, "also feeds Relu_3")
    assert result.report.kept[0].reasons[0].startswith("into conv:")


def test_producer_output_being_a_graph_output_is_refused():
    m = conv_bn_model(outputs=(("y", None), ("c", None)))
    fold_refused(m, FEED, "is also a graph output")


def test_parameter_given_as_graph_input_is_refused():
    r = rng(0)
    params = bn_params("bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 6]),
         helper.make_tensor_value_info("bn_mean", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 4, 4])],
        [tensor("W", r.standard_normal((4, 3, 3, 3))), *(p for p in params if p.name != "bn_mean")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = dict(FEED, bn_mean=np.zeros(4, np.float32))
    fold_refused(m, feed, "mean 'bn_mean' is a graph input")


def test_initializer_listed_as_input_at_ir4_is_refused_with_the_freeze_hint():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 3, 3, 3])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 4, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    result = fold_refused(m, FEED, "--freeze-input W makes it a constant")
    assert [v.name for v in result.model.graph.input] == ["x", "W"]


def test_channel_count_mismatch_is_refused():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    # A Reshape between Conv and BN hides the mismatch from the BN itself: make it direct instead.
    m = model([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
              [("x", [2, 3, 6, 6])], [("y", None)], inits)
    for t in m.graph.initializer:
        if t.name.startswith("bn_"):
            t.CopyFrom(tensor(t.name, np.ones(5)))
    fold_refused(m, None, "4 output channels but the BN has 5")


def test_non_positive_variance_is_refused():
    m = conv_bn_model({"epsilon": 0.0})
    for t in m.graph.initializer:
        if t.name == "bn_var":
            t.CopyFrom(tensor("bn_var", [1.0, 0.0, 1.0, 1.0]))
    fold_refused(m, None, "var+epsilon is not positive (channel 1")


def test_padded_conv_after_bn_is_refused():
    r = rng(0)
    inits = [*bn_params("bn", 3), tensor("W", r.standard_normal((4, 3, 3, 3)))]
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], inits)
    fold_refused(m, FEED, "conv zero-pads its input")


def test_same_padding_conv_after_bn_is_refused():
    r = rng(0)
    inits = [*bn_params("bn", 3), tensor("W", r.standard_normal((4, 3, 3, 3)))]
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "W"], ["y"], auto_pad="SAME_UPPER", name="conv")]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], inits)
    fold_refused(m, FEED, "zero-pads its input")


def test_gemm_trans_a_after_bn_is_refused():
    r = rng(0)
    inits = [*bn_params("bn", 4), tensor("B", r.standard_normal((3, 5)))]
    nodes = [bn_node("x", "n"), helper.make_node("Gemm", ["n", "B"], ["y"], transA=1, name="gemm")]
    m = model(nodes, [("x", [3, 4])], [("y", [4, 5])], inits)
    fold_refused(m, {"x": r.standard_normal((3, 4)).astype(np.float32)}, "transA=1")


def test_conv_weight_computed_at_run_time_is_refused():
    r = rng(0)
    nodes = [helper.make_node("Conv", ["x", "w_in"], ["c"], name="conv"), bn_node("c", "y")]
    m = model(nodes, [("x", [2, 3, 6, 6]), ("w_in", [4, 3, 3, 3])], [("y", None)], bn_params("bn", 4))
    feed = dict(FEED, w_in=r.standard_normal((4, 3, 3, 3)).astype(np.float32))
    fold_refused(m, feed, "Conv weight 'w_in' is a graph input")


@pytest.mark.parametrize("stored", ["int8", "float"])
def test_quantized_conv_weight_is_refused_with_what_to_do(stored):
    # ONNX Runtime's quantizer stores int8 weights (DequantizeLinear); QAT exports from
    # pytorch-quantization keep float ones behind QuantizeLinear → DequantizeLinear.
    r = rng(0)
    weight = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    scale = (np.abs(weight).reshape(4, -1).max(1) / 127).astype(np.float32)
    zero = np.zeros(4, np.int8)
    if stored == "int8":
        inits = [onnx.numpy_helper.from_array(np.round(weight / scale[:, None, None, None])
                                              .astype(np.int8), "w_q")]
        nodes = []
    else:
        inits = [tensor("w_f", weight)]
        nodes = [helper.make_node("QuantizeLinear", ["w_f", "w_scale", "w_zero"], ["w_q"], axis=0)]
    inits += [tensor("w_scale", scale), onnx.numpy_helper.from_array(zero, "w_zero"),
              *bn_params("bn", 4)]
    nodes += [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
              helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], inits)
    fold_refused(m, FEED, "Conv weight 'w' is quantized (DequantizeLinear): a fold would make "
                          "it a float weight; fold BatchNormalization before quantizing")


def test_matmul_with_3d_output_is_refused():
    r = rng(0)
    inits = [tensor("B", r.standard_normal((5, 6))), *bn_params("bn", 4)]
    nodes = [helper.make_node("MatMul", ["a", "B"], ["mm"]), bn_node("mm", "y")]
    m = model(nodes, [("a", [2, 4, 5])], [("y", [2, 4, 6])], inits)
    fold_refused(m, {"a": r.standard_normal((2, 4, 5)).astype(np.float32)}, "MatMul output has rank 3")


def test_float16_fold_that_would_overflow_is_refused():
    """γ/√(σ²+ε) of 1e3 on weights of 100 gives 1e5 > 65504: every peer writes inf here."""
    inits = [tensor("W", np.full((4, 3, 1, 1), 100.0), np.float16),
             tensor("bn_scale", np.full(4, 1.0), np.float16), tensor("bn_bias", np.zeros(4), np.float16),
             tensor("bn_mean", np.zeros(4), np.float16), tensor("bn_var", np.full(4, 1e-6), np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", epsilon=0.0)]
    m = model(nodes, [("x", [1, 3, 2, 2])], [("y", None)], inits, elem=onnx.TensorProto.FLOAT16)
    result = fold_refused(m, None, "would overflow float16")
    weights = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert all(np.isfinite(w).all() for w in weights)


def test_float16_fold_that_would_flush_to_zero_is_refused():
    inits = [tensor("W", np.full((4, 3, 1, 1), 1e-4), np.float16),
             tensor("bn_scale", np.full(4, 1e-4), np.float16), tensor("bn_bias", np.zeros(4), np.float16),
             tensor("bn_mean", np.zeros(4), np.float16), tensor("bn_var", np.full(4, 1.0), np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 2, 2])], [("y", None)], inits, elem=onnx.TensorProto.FLOAT16)
    fold_refused(m, None, "would flush to zero in float16")


def test_bn_with_missing_inputs_is_a_user_error():
    m = conv_bn_model()
    bn = m.graph.node[1]
    del bn.input[3:]
    with pytest.raises(BnfoldError, match=r"'bn' has 3 inputs .*X, scale, B, mean, var"):
        bnfold.fold(m)


@pytest.mark.parametrize("op_type,inputs", [("Conv", ["c0"]), ("Gemm", ["c0"]), ("MatMul", ["c0"]),
                                            ("Add", ["c0"]), ("Mul", ["c0", "c0", "c0"])])
def test_malformed_neighbour_is_a_user_error(op_type, inputs):
    m = conv_bn_model()
    m.graph.node[0].output[0] = "c0"
    m.graph.node.insert(1, helper.make_node(op_type, inputs, ["c"], name="broken"))
    with pytest.raises(BnfoldError, match=f"{op_type} 'broken' has {len(inputs)} inputs.*malformed"):
        bnfold.fold(m)


def test_long_bn_chain_before_a_conv_folds_completely():
    """Each pass folds the BN next to the Conv; the engine loops until nothing changes."""
    r = rng(0)
    chain = 20
    inits = [tensor("W", r.standard_normal((4, 3, 1, 1)))]
    nodes, name = [], "x"
    for i in range(chain):
        inits += bn_params(f"bn{i}", 3, seed=i)
        nodes.append(bn_node(name, f"n{i}", f"bn{i}", f"bn{i}"))
        name = f"n{i}"
    nodes.append(helper.make_node("Conv", [name, "W"], ["y"], name="conv"))
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], inits)
    result = bnfold.fold(m)
    assert result.report.folded_count == chain and not result.report.kept
    assert_same_outputs(m, result.model, FEED)


def test_lying_tensor_dims_are_a_user_error():
    m = conv_bn_model()
    weight = m.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-8]
    with pytest.raises(BnfoldError, match="'W' declares dims"):
        bnfold.fold(m)


def test_lowering_refused_when_rank_is_unknown():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    m = model(nodes, [("x", [2, 4, 5, 5])], [("y", [2, 4, 5, 5])], bn_params("bn", 4))
    del m.graph.input[0].type.tensor_type.shape.dim[:]
    m.graph.input[0].type.tensor_type.ClearField("shape")
    m.graph.output[0].type.tensor_type.ClearField("shape")
    result = bnfold.fold(m, lower_standalone=True)
    assert result.report.kept and "not lowered" in result.report.kept[0].reasons[-1]


@pytest.mark.parametrize("bn_first", [False, True])
def test_conv_bias_computed_at_run_time_is_refused(bn_first):
    r = rng(0)
    weight = tensor("W", r.standard_normal((4, 3, 1, 1)))
    if bn_first:
        nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "W", "b_in"], ["y"], name="conv")]
        params = bn_params("bn", 3)
    else:
        nodes = [helper.make_node("Conv", ["x", "W", "b_in"], ["c"], name="conv"), bn_node("c", "y")]
        params = bn_params("bn", 4)
    m = model(nodes, [("x", [2, 3, 6, 6]), ("b_in", [4])], [("y", None)], [weight, *params])
    feed = dict(FEED, b_in=r.standard_normal(4).astype(np.float32))
    fold_refused(m, feed, "Conv bias 'b_in' is a graph input")


def test_opset6_training_mode_is_refused():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]  # is_test defaults to 0
    m = model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 4, 4, 4])], inits, opset=6, ir_version=4)
    result = bnfold.fold(m)
    assert result.report.folded_count == 0
    assert "is_test=0" in result.report.kept[0].reasons[0]


@pytest.mark.parametrize("data_type", [onnx.TensorProto.INT4, onnx.TensorProto.INT8],
                         ids=["int4", "int8"])
def test_gemm_weight_that_is_not_floating_point_is_refused(data_type):
    # Found by fuzzing: an INT4 B reached the writer as an unstorable array (a traceback).
    b = helper.make_tensor("B", data_type, [5, 3], [1, -2, 3, 0, 1] * 3)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", transB=1),
             bn_node("g", "y")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [b, tensor("C", np.zeros(5)), *bn_params("bn", 5)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    name = onnx.TensorProto.DataType.Name(data_type)
    fold_refused(m, None, f"B is {name}, not float16/bfloat16/float32/float64")
