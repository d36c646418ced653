"""What other exporters write around a BatchNormalization, each in a miniature model.

Named for the exporter habit they reproduce: the IR-3 model zoo (initializers listed as inputs,
weights from ConstantOfShape), torch.onnx (identical initializers turned into Identity nodes),
paddle2onnx / tf2onnx (Identity, Dropout and Cast between a Conv and its BN).
"""

from __future__ import annotations

import math
import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, bn_node, bn_params, count_ops, rng, tensor
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import BnfoldError

FEED = {"x": rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}


def build(nodes, initializers, *, ir_version=8, opset=13, list_initializers=False,
          x_shape=(2, 3, 6, 6), output="y", y_shape=("N", "C", "H", "W")):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if list_initializers:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in initializers]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(y_shape))],
                              initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          ir_version=ir_version)
    onnx.checker.check_model(m)
    return m


def assert_folded(m, folded_count, feed=FEED, **options):
    result = bnfold.fold(m, **options)
    assert result.report.folded_count == folded_count, result.report.entries
    assert count_ops(result.model, "BatchNormalization") == count_ops(m, "BatchNormalization") - folded_count
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model, feed)
    return result


def conv_weight(seed=0, shape=(4, 3, 3, 3)):
    return tensor("W", rng(seed).standard_normal(shape))


# ---- IR-3 model zoo --------------------------------------------------------------------------
def test_zoo_ir3_initializers_listed_as_inputs_fold_and_stay_declared():
    inits = [conv_weight(), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = build(nodes, inits, ir_version=3, opset=7, list_initializers=True)
    result = assert_folded(m, 1)
    graph = result.model.graph
    initializers = {t.name for t in graph.initializer}
    declared = {v.name for v in graph.input} - {"x"}
    assert declared == initializers  # every initializer listed, nothing stale
    assert not any(name.startswith("bn_") for name in initializers)
    assert result.model.ir_version == 3


def test_zoo_ir3_weights_from_constant_of_shape_fold():
    # light_resnet50 in onnx's test data: W = ConstantOfShape(W__SHAPE), shapes listed as inputs.
    shape = tensor("W__SHAPE", np.array([4, 3, 3, 3]), np.int64)
    nodes = [
        helper.make_node("ConstantOfShape", ["W__SHAPE"], ["W"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])),
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "y"),
    ]
    m = build(nodes, [shape, *bn_params("bn", 4)], ir_version=3, opset=9, list_initializers=True)
    result = assert_folded(m, 1)
    graph = result.model.graph
    assert count_ops(result.model, "ConstantOfShape") == 0
    assert {v.name for v in graph.input} - {"x"} == {t.name for t in graph.initializer}
    assert "W__SHAPE" not in {t.name for t in graph.initializer}


@pytest.mark.parametrize("generated, value", [(True, 0.02), (True, 3e38), (False, None)],
                         ids=["constant-of-shape", "constant-of-shape-near-the-top", "reshape"])
def test_a_large_generated_weight_stays_generated(generated, value):
    # A fold would store the weight a few stored values generate: 18 KB from 4 here, 94 MB
    # from 80 KB over light_resnet50. A weight reshaped from stored values folds as usual.
    # Near the float32 top the weight has no headroom either: the growth is the reason given,
    # found from the shape alone before any pass over the values.
    shape = (32, 16, 3, 3)
    if generated:
        source = [tensor("W__SHAPE", np.array(shape), np.int64)]
        make = helper.make_node("ConstantOfShape", ["W__SHAPE"], ["W"],
                                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))
    else:
        flat = rng(3).standard_normal(math.prod(shape)) * 0.1
        source = [tensor("W_flat", flat),
                  tensor("W__SHAPE", np.array(shape), np.int64)]
        make = helper.make_node("Reshape", ["W_flat", "W__SHAPE"], ["W"])
    nodes = [make, helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = build(nodes, [*source, *bn_params("bn", 32)], x_shape=(1, 16, 6, 6))
    result = bnfold.fold(m)
    if value is None or value < 1:  # near the top, the model's own outputs overflow
        feed = {"x": rng(2).standard_normal((1, 16, 6, 6)).astype(np.float32)}
        assert_same_outputs(m, result.model, feed)
    if not generated:
        assert result.report.folded_count == 1
        return
    assert result.report.folded_count == 0
    (kept,) = result.report.kept
    assert kept.reasons == ["into Conv(c): its weight 'W' is generated at run time by ConstantOfShape from 4 "
                            "stored value(s): folding would store its 18 KB in the file, so it "
                            "stays generated"]
    assert result.model.ByteSize() < 2000


def test_ir3_weights_in_constant_nodes_fold_into_declared_initializers():
    weight = rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(weight)),
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "y"),
    ]
    m = build(nodes, bn_params("bn", 4), ir_version=3, opset=7, list_initializers=True)
    result = assert_folded(m, 1)
    graph = result.model.graph
    assert {v.name for v in graph.input} - {"x"} == {t.name for t in graph.initializer}


@pytest.mark.parametrize("names", [["W", "bn_scale", "bn_bias", "bn_mean", "bn_var"], "all"])
def test_freeze_inputs_makes_ir4_initializer_inputs_foldable(names):
    inits = [conv_weight(), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    m = build(nodes, inits, list_initializers=True)
    assert bnfold.fold(m).report.folded_count == 0
    result = assert_folded(m, 1, freeze_inputs=names)
    assert [v.name for v in result.model.graph.input] == ["x"]
    assert "froze" in result.report.notes[0]


def test_freeze_unknown_input_is_a_user_error():
    m = build([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
              [conv_weight(), *bn_params("bn", 4)])
    with pytest.raises(BnfoldError, match="not a graph input with an initializer"):
        bnfold.fold(m, freeze_inputs=["x"])


# ---- torch.onnx ------------------------------------------------------------------------------
def test_torch_identity_of_shared_zero_bias_folds():
    # torch.onnx dedups identical initializers (zero biases) into Identity nodes.
    zero = tensor("zero_bias", np.zeros(4))
    nodes = [
        helper.make_node("Identity", ["zero_bias"], ["conv1.bias"]),
        helper.make_node("Identity", ["zero_bias"], ["conv2.bias"]),
        helper.make_node("Conv", ["x", "W", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        bn_node("c1", "b1"),
        helper.make_node("Conv", ["b1", "W2", "conv2.bias"], ["c2"]),
        bn_node("c2", "y", prefix="bn2", name="bn2"),
    ]
    inits = [conv_weight(), tensor("W2", rng(2).standard_normal((4, 4, 3, 3))), zero,
             *bn_params("bn", 4), *bn_params("bn2", 4, seed=3)]
    result = assert_folded(build(nodes, inits), 2)
    assert count_ops(result.model, "Identity") == 0
    assert "zero_bias" not in {t.name for t in result.model.graph.initializer}


def test_bn_parameters_from_reshape_and_cast_of_constants_fold():
    # tf2onnx-style: the BN scale is Reshape(Cast(float64 constant)).
    nodes = [
        helper.make_node("Cast", ["scale64"], ["scale_flat"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["scale_flat", "shape"], ["bn_scale"]),
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "y"),
    ]
    params = bn_params("bn", 4)[1:]
    inits = [conv_weight(), tensor("scale64", rng(5).uniform(0.5, 1.5, (1, 4)), np.float64),
             tensor("shape", np.array([4]), np.int64), *params]
    result = assert_folded(build(nodes, inits), 1)
    assert count_ops(result.model, "Cast") == count_ops(result.model, "Reshape") == 0


def test_parameter_from_an_unevaluated_op_is_refused_with_that_op():
    nodes = [
        helper.make_node("Relu", ["scale_raw"], ["bn_scale"]),
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "y"),
    ]
    inits = [conv_weight(), tensor("scale_raw", np.ones(4)), *bn_params("bn", 4)[1:]]
    result = bnfold.fold(build(nodes, inits))
    assert result.report.folded_count == 0
    assert "computed at run time by Relu" in result.report.kept[0].reasons[0]


def test_oversized_constant_of_shape_is_refused_before_allocation():
    shape = tensor("W__SHAPE", np.array([4, 3, 1 << 20, 1 << 10]), np.int64)
    nodes = [
        helper.make_node("ConstantOfShape", ["W__SHAPE"], ["W"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "y"),
    ]
    result = bnfold.fold(build(nodes, [shape, *bn_params("bn", 4)]))
    assert result.report.folded_count == 0
    assert "values (over" in result.report.kept[0].reasons[0]


# ---- paddle2onnx / tf2onnx: no-ops between the producer and the BN ---------------------------
def test_paddle_convtranspose_identity_add_identity_bn_folds():
    w = tensor("Wt", rng(0).standard_normal((3, 4, 2, 2)))
    nodes = [
        helper.make_node("ConvTranspose", ["x", "Wt"], ["t"], strides=[2, 2]),
        helper.make_node("Identity", ["t"], ["t_id"]),
        helper.make_node("Add", ["t_id", "shift"], ["a"]),
        helper.make_node("Identity", ["a"], ["a_id"]),
        bn_node("a_id", "y", momentum=0.9),
    ]
    inits = [w, tensor("shift", rng(4).standard_normal((1, 4, 1, 1))), *bn_params("bn", 4)]
    result = assert_folded(build(nodes, inits, opset=9), 1)
    assert count_ops(result.model, "Identity") == count_ops(result.model, "Add") == 0
    assert [n.op_type for n in result.model.graph.node] == ["ConvTranspose"]


@pytest.mark.parametrize("noop", [
    helper.make_node("Dropout", ["c"], ["d"], ratio=0.5),
    helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
])
def test_inference_dropout_and_same_type_cast_are_looked_through(noop):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), noop, bn_node("d", "y")]
    result = assert_folded(build(nodes, [conv_weight(), *bn_params("bn", 4)], opset=11), 1)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_identity_whose_output_is_also_read_elsewhere_is_not_looked_through():
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Identity", ["c"], ["c_id"]),
        bn_node("c_id", "b"),
        helper.make_node("Add", ["b", "c_id"], ["y"]),
    ]
    result = bnfold.fold(build(nodes, [conv_weight(), *bn_params("bn", 4)]))
    assert result.report.folded_count == 0
    assert "also feeds" in result.report.kept[0].reasons[0]
    assert_same_outputs(build(nodes, [conv_weight(), *bn_params("bn", 4)]), result.model, FEED)


def test_cast_to_another_type_is_not_a_no_op():
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["c16"], ["d"], to=TensorProto.FLOAT),
        bn_node("d", "y"),
    ]
    result = bnfold.fold(build(nodes, [conv_weight(), *bn_params("bn", 4)]))
    assert result.report.folded_count == 0


# ---- tf2onnx: a Keras BN is left as Mul → Add --------------------------------------------------
def fold_rules(m, feed):
    """Fold `m`; check it against the original on `feed`; the rules of the folds, in order."""
    result = bnfold.fold(m)
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model, feed)
    return [e.rule for e in result.report.folded], result.model


def dense_bn(x_shape, reshape=None, scale_shape=(6,)):
    """Keras Dense(6) → BN as tf2onnx writes it: MatMul → (Reshape) → Mul → Add."""
    out = "mm"
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"])]
    inits = [tensor("B", rng(0).standard_normal((x_shape[-1], 6))),
             tensor("s", rng(1).uniform(0.5, 1.5, scale_shape)),
             tensor("t", rng(2).standard_normal(6))]
    if reshape is not None:
        reshape_nodes, reshape_inits = reshape
        nodes += reshape_nodes
        inits += reshape_inits
        out = "r"
    nodes += [helper.make_node("Mul", [out, "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    return nodes, inits


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 5, 4)])
def test_keras_dense_bn_mul_folds_into_the_matmul_at_any_rank(x_shape):
    nodes, inits = dense_bn(x_shape)
    m = build(nodes, inits, x_shape=x_shape, y_shape=["?"] * len(x_shape))
    rules, folded = fold_rules(m, {"x": rng(3).standard_normal(x_shape).astype(np.float32)})
    assert rules == ["matmul-mul"]
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]  # a Dense's bias add


def test_keras_dense_on_a_sequence_folds_through_its_reshape():
    # Tensordot: [2, 5, 4] → Reshape [-1, 4] → MatMul → Reshape to Concat(leading dims, [6])
    shape_nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "free"], ["lead"]),
        helper.make_node("Concat", ["lead", "cols"], ["to32"], axis=0),
        helper.make_node("Cast", ["to32"], ["to"], to=TensorProto.INT64),
    ]
    nodes, inits = dense_bn((20, 4), reshape=(
        shape_nodes + [helper.make_node("Reshape", ["mm", "to"], ["r"])],
        [tensor("free", np.array([0, 1]), np.int64), tensor("cols", np.array([6]), np.int64)]))
    nodes[0] = helper.make_node("Reshape", ["x", "flat"], ["x2"])
    nodes.insert(1, helper.make_node("MatMul", ["x2", "B"], ["mm"]))
    inits.append(tensor("flat", np.array([-1, 4]), np.int64))
    m = build(nodes, inits, x_shape=(2, 5, 4), y_shape=["?"] * 3)
    rules, folded = fold_rules(m, {"x": rng(3).standard_normal((2, 5, 4)).astype(np.float32)})
    assert rules == ["matmul-mul"]
    assert "Mul" not in [n.op_type for n in folded.graph.node]
    assert count_ops(folded, "Reshape") == 2


def test_shared_b_gets_a_folded_copy_and_float16_folds_in_float16():
    b = tensor("B", rng(0).standard_normal((4, 6)), np.float16)
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"]),
             helper.make_node("Mul", ["mm", "s"], ["m"]),
             helper.make_node("MatMul", ["x", "B"], ["other"]),
             helper.make_node("Add", ["m", "other"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [5, 6])],
        [b, tensor("s", rng(1).uniform(0.5, 1.5, 6), np.float16)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = bnfold.fold(m)
    assert [e.rule for e in result.report.folded] == ["matmul-mul"]
    folded_b, other_b = [n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"]
    assert other_b == "B" and folded_b != "B"  # the other MatMul keeps the original B
    assert_same_outputs(m, result.model, {"x": rng(3).standard_normal((5, 4)).astype(np.float16)},
                        rtol=2e-3)


def test_reshape_that_moves_the_columns_is_not_folded_through():
    # [5, 6] → [5, 3, 2]: a vector of 2 scales the reshaped last axis, not B's columns
    nodes, inits = dense_bn((5, 4), scale_shape=(2,), reshape=(
        [helper.make_node("Reshape", ["mm", "to"], ["r"])],
        [tensor("to", np.array([5, 3, 2]), np.int64)]))
    inits[2] = tensor("t", rng(2).standard_normal(2))
    m = build(nodes, inits, x_shape=(5, 4), y_shape=[5, 3, 2])
    rules, _ = fold_rules(m, {"x": rng(3).standard_normal((5, 4)).astype(np.float32)})
    assert rules == []
    (kept,) = bnfold.fold(m).report.kept
    assert kept.op_type == "Mul" and "may move the MatMul's 6 columns" in kept.reasons[0]


def test_mul_of_a_run_time_matmul_is_not_folded():
    # attention scores: MatMul(Q, Kᵀ) · scale; Kᵀ is not a constant
    nodes = [helper.make_node("MatMul", ["x", "x"], ["mm"]),
             helper.make_node("Mul", ["mm", "s"], ["y"])]
    m = build(nodes, [tensor("s", np.array(0.125))], x_shape=(4, 4), y_shape=[4, 4])
    rules, _ = fold_rules(m, {"x": rng(3).standard_normal((4, 4)).astype(np.float32)})
    assert rules == []


def conv1d_bn(axes, opset=13, batch=2):
    """Keras Conv1D → BN as tf2onnx writes it: Conv (2-D) → Squeeze → Mul → Add."""
    squeeze = (helper.make_node("Squeeze", ["c", "axes"], ["q"]) if opset >= 13
               else helper.make_node("Squeeze", ["c"], ["q"], axes=axes))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), squeeze,
             helper.make_node("Mul", ["q", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    inits = [tensor("W", rng(0).standard_normal((4, 3, 1, 3))),
             tensor("s", rng(1).uniform(0.5, 1.5, (1, 4, 1))),
             tensor("t", rng(2).standard_normal((1, 4, 1)))]
    if opset >= 13:
        inits.append(tensor("axes", np.array(axes), np.int64))
    return build(nodes, inits, x_shape=(batch, 3, 1, 8), y_shape=["?"] * 3, opset=opset)


@pytest.mark.parametrize("axes,opset", [([2], 13), ([-2], 13), ([2], 11)])
def test_keras_conv1d_bn_folds_through_the_squeeze(axes, opset):
    feed = {"x": rng(3).standard_normal((2, 3, 1, 8)).astype(np.float32)}
    rules, folded = fold_rules(conv1d_bn(axes, opset), feed)
    assert rules == ["conv-mul", "conv-add"]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Squeeze"]


def test_bn_behind_a_squeeze_folds_and_the_squeeze_stays():
    # torch: Conv2d over [N, C, 1, T] → squeeze(2) → BatchNorm1d (a CRNN's head)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Squeeze", ["c", "axes"], ["q"]), bn_node("q", "y")]
    inits = [tensor("W", rng(0).standard_normal((4, 3, 1, 3))),
             tensor("axes", np.array([2]), np.int64), *bn_params("bn", 4)]
    m = build(nodes, inits, x_shape=(2, 3, 1, 8), y_shape=["?"] * 3)
    result = assert_folded(m, 1, feed={"x": rng(3).standard_normal((2, 3, 1, 8)).astype(np.float32)})
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Squeeze"]


def test_squeeze_of_the_batch_axis_is_not_folded_through():
    m = conv1d_bn([0], batch=1)
    feed = {"x": rng(3).standard_normal((1, 3, 1, 8)).astype(np.float32)}
    rules, _ = fold_rules(m, feed)
    assert rules == []


# ---- what the report says -------------------------------------------------------------------
def test_bn_before_convtranspose_names_the_real_reason():
    w = tensor("Wt", rng(0).standard_normal((3, 4, 2, 2)))
    nodes = [bn_node("x", "b", prefix="bn"), helper.make_node("ConvTranspose", ["b", "Wt"], ["y"])]
    result = bnfold.fold(build(nodes, [w, *bn_params("bn", 3)]))
    reason = result.report.kept[0].reasons[0]
    assert reason.startswith("it feeds a ConvTranspose") and "no Conv/" not in reason


def test_frozen_bn_as_mul_add_is_labelled_by_its_op():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["y"])]
    inits = [conv_weight(), tensor("s", rng(1).uniform(0.5, 1.5, (1, 4, 1, 1))),
             tensor("t", rng(2).standard_normal((1, 4, 1, 1)))]
    m = build(nodes, inits)
    result = bnfold.fold(m)
    assert [e.rule for e in result.report.folded] == ["conv-mul", "conv-add"]
    assert_same_outputs(m, result.model, FEED)


def test_frozen_bn_mul_that_stays_is_reported_kept_with_its_reason():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "t"], ["a"], name="bn_add"),
             helper.make_node("Mul", ["c", "half"], ["h"], name="scalar_mul"),
             helper.make_node("Add", ["a", "h"], ["y"], name="sum")]
    inits = [conv_weight(), tensor("s", rng(1).uniform(0.5, 1.5, (1, 4, 1, 1))),
             tensor("t", rng(2).standard_normal((1, 4, 1, 1))), tensor("half", np.array(0.5))]
    result = bnfold.fold(build(nodes, inits))
    # The conv output feeds two Muls, so neither folds; the scalar one is no frozen BN.
    assert [(e.node, e.op_type, e.status) for e in result.report.entries] == [
        ("bn_mul", "Mul", "kept")]
    assert result.report.kept[0].reasons == ["into conv: conv output 'c' also feeds scalar_mul"]
    summary = result.report.to_dict()["summary"]
    assert summary["kept"] == 0 and summary["mul_add_kept"] == 1
    assert count_ops(result.model, "Mul") == 2


def test_zoo_ir3_bn_inside_if_branches_folds_into_constant_nodes():
    # Below IR 4 an If branch cannot declare initializers (it has no inputs): folded values
    # there become Constant nodes; the main graph's stay declared initializers.
    def branch(tag):
        return helper.make_graph(
            [helper.make_node("Conv", ["x", "W"], ["c" + tag], pads=[1, 1, 1, 1]),
             bn_node("c" + tag, "o" + tag, prefix="bn" + tag, name="bn" + tag)],
            "b" + tag, [], [helper.make_tensor_value_info("o" + tag, TensorProto.FLOAT, [2, 4, 6, 6])])

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("t"), else_branch=branch("e")),
             helper.make_node("Conv", ["x", "W"], ["c2"], pads=[1, 1, 1, 1]), bn_node("c2", "y2")]
    inits = [conv_weight(), tensor("cond", np.array(False), np.bool_), *bn_params("bnt", 4, seed=2),
             *bn_params("bne", 4, seed=3), *bn_params("bn", 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, 6, 6]) for n in ("y", "y2")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(m, full_check=True)
    result = bnfold.fold(m)
    assert result.report.folded_count == 3
    onnx.checker.check_model(result.model, full_check=True)
    for attr in result.model.graph.node[0].attribute:
        assert not attr.g.initializer
        assert [n.op_type for n in attr.g.node].count("Constant") == 2  # weight and bias
    assert_same_outputs(m, result.model, FEED)


@pytest.mark.parametrize("op,operands", [
    ("Expand", [tensor("flat", np.zeros(1 << 20)), tensor("to", np.array([4096, 1]), np.int64)]),
    ("Mul", [tensor("col", np.zeros((1 << 16, 1))), tensor("row", np.zeros((1, 1 << 16)))]),
])
def test_broadcast_growth_is_refused_before_evaluation(op, operands):
    # the BN scale itself would be 4 G values: refused from the shapes, never evaluated
    nodes = [helper.make_node(op, [t.name for t in operands], ["bn_scale"]),
             helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    inits = [conv_weight(), *operands, *bn_params("bn", 4)[1:]]
    result = bnfold.fold(build(nodes, inits))
    assert result.report.folded_count == 0
    assert "values (over" in " ".join(result.report.kept[0].reasons)
