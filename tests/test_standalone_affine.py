"""Per-channel Mul→Add / Add→Mul pairs that no rule folds: listed as kept, with their reason.

tf2onnx writes a pre-activation BN (DenseNet's, between a Concat and a Relu) as Mul by C values
then Add of C values; a Keras Normalization layer is Add (−μ) then Mul (1/σ). A LayerNorm
written out (Div → Mul γ → Add β) and scalar constants are no frozen BN and stay unlisted.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, rng, tensor
from click.testing import CliRunner
from onnx import TensorProto, helper

import bnfold
from bnfold.cli import cli

FEED = {"x": rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}
CHANNEL = (1, 3, 1, 1)


def build(nodes, initializers, outputs=("y",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "a", "b", "c"])
         for name in outputs],
        initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def pre_activation(order=("Mul", "Add")):
    """x, x → Concat → first → second → Relu: tf2onnx's DenseNet BN (Mul, then Add)."""
    operand = {"Mul": "s", "Add": "t"}
    nodes = [helper.make_node("Concat", ["x", "x"], ["cat"], name="concat", axis=1),
             helper.make_node(order[0], ["cat", operand[order[0]]], ["a"], name="first"),
             helper.make_node(order[1], ["a", operand[order[1]]], ["b"], name="second"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    return build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, (1, 6, 1, 1))),
                         tensor("t", rng(3).standard_normal((1, 6, 1, 1)))])


def entries(report):
    return [(e.node, e.op_type, e.status) for e in report.entries]


@pytest.mark.parametrize("order,kind", [
    (("Mul", "Add"), "scale and shift"),
    (("Add", "Mul"), "shift and scale"),
])
def test_tf2onnx_pre_activation_pair_is_listed_kept_with_its_neighbours(order, kind):
    m = pre_activation(order)
    result = bnfold.fold(m)
    assert entries(result.report) == [("first", order[0], "kept")]
    assert result.report.kept[0].reasons == [
        f"per-channel {kind}, {order[0]} → {order[1]} second: no Conv/ConvTranspose/Gemm/MatMul "
        "beside it (input from concat, output to relu)"]
    summary = result.report.to_dict()["summary"]
    assert summary["mul_add_kept"] == 1 and summary["kept"] == 0
    assert not result.report.changed
    assert_same_outputs(m, result.model, FEED)


def test_two_frozen_bns_in_a_row_are_two_entries():
    nodes = [helper.make_node("Concat", ["x", "x"], ["cat"], name="concat", axis=1),
             helper.make_node("Mul", ["cat", "s"], ["a"], name="mul1"),
             helper.make_node("Add", ["a", "t"], ["b"], name="add1"),
             helper.make_node("Mul", ["b", "s"], ["c"], name="mul2"),
             helper.make_node("Add", ["c", "t"], ["y"], name="add2")]
    m = build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, (1, 6, 1, 1))),
                      tensor("t", rng(3).standard_normal((1, 6, 1, 1)))])
    assert entries(bnfold.fold(m).report) == [("mul1", "Mul", "kept"), ("mul2", "Mul", "kept")]


def test_channels_last_pair_is_listed():
    # tf2onnx keeps NHWC between Transposes: the constants have C values on the last axis.
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["nhwc", "s"], ["a"], name="bn_mul"),
             helper.make_node("Add", ["a", "t"], ["y"], name="bn_add")]
    m = build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, (3,))),
                      tensor("t", rng(3).standard_normal((3,)))])
    result = bnfold.fold(m)
    assert entries(result.report) == [("bn_mul", "Mul", "kept")]
    assert result.report.kept[0].reasons[0].endswith(
        "(input from to_nhwc, output to graph output)")


@pytest.mark.parametrize("scale_shape,shift_shape", [
    ((), (1, 6, 1, 1)),            # a scalar scale: x·k + t is no per-channel affine
    ((1, 6, 1, 1), (1, 1, 1, 6)),  # C values on different axes
    ((1, 6, 6, 1), (1, 6, 1, 1)),  # values along two axes
])
def test_pairs_that_are_not_per_channel_are_not_listed(scale_shape, shift_shape):
    nodes = [helper.make_node("Concat", ["x", "x"], ["cat"], name="concat", axis=1),
             helper.make_node("Mul", ["cat", "s"], ["a"], name="first"),
             helper.make_node("Add", ["a", "t"], ["y"], name="second")]
    m = build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, scale_shape)),
                      tensor("t", rng(3).standard_normal(shift_shape))])
    assert bnfold.fold(m).report.entries == []


def test_layer_norm_written_out_is_not_a_frozen_bn():
    # torch.onnx before opset 17: (x − mean) / √(var + ε) · γ + β over the last axis.
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
             helper.make_node("Sub", ["x", "mean"], ["centred"]),
             helper.make_node("Mul", ["centred", "centred"], ["squared"]),
             helper.make_node("ReduceMean", ["squared"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Div", ["centred", "std"], ["normed"]),
             helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="ln_gamma"),
             helper.make_node("Add", ["scaled", "beta"], ["y"], name="ln_beta")]
    m = build(nodes, [tensor("eps", np.array(1e-5)), tensor("gamma", rng(2).uniform(size=6)),
                      tensor("beta", rng(3).standard_normal(6))])
    assert bnfold.fold(m).report.entries == []


def test_input_normalisation_before_a_conv_says_which_side_folds():
    # torch: (x − mean) / std written as x·(1/std) + (−mean/std) in front of the first Conv.
    nodes = [helper.make_node("Mul", ["x", "s"], ["a"], name="norm_mul"),
             helper.make_node("Add", ["a", "t"], ["b"], name="norm_add"),
             helper.make_node("Conv", ["b", "W"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    m = build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, CHANNEL)),
                      tensor("t", rng(3).standard_normal(CHANNEL)),
                      tensor("W", rng(0).standard_normal((4, 3, 3, 3)))])
    result = bnfold.fold(m)
    assert entries(result.report) == [("norm_mul", "Mul", "kept")]
    assert result.report.kept[0].reasons == [
        "per-channel scale and shift, Mul → Add norm_add: a Mul/Add pair folds into the "
        "Conv/ConvTranspose/Gemm/MatMul that produces its input, and graph input 'x' is none, "
        "or into MatMuls with constant B that alone read it (output to conv1)"]


def test_bias_add_then_layer_scale_is_not_listed():
    # A ViT's dense output: MatMul, its bias Add, then LayerScale's Mul by γ.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="dense"),
             helper.make_node("Add", ["mm", "b"], ["biased"], name="dense_bias"),
             helper.make_node("Mul", ["biased", "gamma"], ["y"], name="layer_scale")]
    m = build(nodes, [tensor("W", rng(0).standard_normal((6, 6))),
                      tensor("b", rng(3).standard_normal(6)),
                      tensor("gamma", rng(2).uniform(size=6))])
    assert bnfold.fold(m).report.entries == []


def test_pair_whose_first_output_is_read_twice_is_not_listed():
    nodes = [helper.make_node("Mul", ["x", "s"], ["a"], name="first"),
             helper.make_node("Add", ["a", "t"], ["y"], name="second"),
             helper.make_node("Relu", ["a"], ["z"], name="other")]
    m = build(nodes, [tensor("s", rng(2).uniform(0.5, 1.5, CHANNEL)),
                      tensor("t", rng(3).standard_normal(CHANNEL))], outputs=("y", "z"))
    assert bnfold.fold(m).report.entries == []


def test_summary_counts_folded_and_kept_mul_add(tmp_path):
    # One frozen BN folds into its Conv (conv-mul, conv-add), one after a Relu stays.
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="conv_bn_mul"),
             helper.make_node("Add", ["m", "t"], ["r"], name="conv_bn_add"),
             helper.make_node("Relu", ["r"], ["h"], name="relu"),
             helper.make_node("Mul", ["h", "s"], ["m2"], name="pre_mul"),
             helper.make_node("Add", ["m2", "t"], ["y"], name="pre_add")]
    channel = (1, 4, 1, 1)
    m = build(nodes, [tensor("W", rng(0).standard_normal((4, 3, 3, 3))),
                      tensor("s", rng(2).uniform(0.5, 1.5, channel)),
                      tensor("t", rng(3).standard_normal(channel))])
    source = tmp_path / "m.onnx"
    onnx.save(m, source)
    result = CliRunner().invoke(cli, ["fold", str(source), "--no-verify"], prog_name="bnfold")
    assert result.exit_code == 0, result.output
    assert "Mul/Add folded: 2  kept: 1" in result.output
    assert "folded 2: conv-mul 1, conv-add 1" in result.output
    assert "kept 1 (0 BatchNormalization, 1 Mul/Add):" in result.output
    assert "  pre_mul (Mul): per-channel scale and shift, Mul → Add pre_add: " in result.output
