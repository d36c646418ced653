"""Verification runs on the models users have, without options: symbolic dims, non-float
inputs, non-finite outputs, near-zero outputs, sizes, and a trustworthy float64 truth."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from golden import bn_node, bn_params, rng, tensor
from onnx import TensorProto, helper

import bnfold
from bnfold.cli import cli
from bnfold.errors import BnfoldError
from bnfold.onnxio.files import save_model
from bnfold.verification.runs import weight_precision


def make(nodes, inputs, outputs, inits, opset=13, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          ir_version=ir_version)
    onnx.checker.check_model(m)
    return m


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def paddle_det_model():
    """paddle2onnx-style: x [?, 3, ?, ?], stride-2 Conv, ConvTranspose back up, Concat with the
    input (so only even sizes run), Identity before a BN that carries `momentum`."""
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3)) * 0.3),
             tensor("Wt", r.standard_normal((4, 4, 2, 2)) * 0.3), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["c_id"]),
        bn_node("c_id", "b", momentum=0.9, epsilon=1e-5),
        helper.make_node("ConvTranspose", ["b", "Wt"], ["up"], strides=[2, 2]),
        helper.make_node("Concat", ["up", "x"], ["y"], axis=1),
    ]
    return make(nodes, [vi("x", ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1",
                                 "p2o.DynamicDimension.2"])],
                [vi("y", ["p2o.DynamicDimension.0", 7, "p2o.DynamicDimension.1",
                          "p2o.DynamicDimension.2"])], inits, opset=11)


def test_paddle_dynamic_dims_fold_verify_and_write(tmp_path):
    src = tmp_path / "det.onnx"
    save_model(paddle_det_model(), src)
    result = bnfold.fold_file(src)
    verification = result.report.verification
    assert result.output_path and verification["ok"]
    assert result.report.folded_count == 1
    assert verification["shapes"]["x"] == [1, 3, 64, 64]
    assert any("set to 64" in note for note in verification["notes"])
    # momentum made onnx.reference train the BN; the truth now agrees with the original
    truth = verification["ground_truth"]["y"]
    assert truth["reference_rel_error"] < 1e-6 and truth["candidate_rel_error"] < 1e-6


def test_odd_sizes_are_skipped_until_ort_runs(tmp_path):
    # A model that needs H divisible by 3 (Reshape into thirds): 64, 32, 128 fail; 224 does not
    # divide either; the ladder stops at the first that runs.
    shape = tensor("shape", np.array([0, 3, -1, 3]), np.int64)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    m = make(nodes, [vi("x", [1, 3, "h"])], [vi("y", [1, 3, "q", 3])], [shape])
    outcome = bnfold.verify(m, m)
    assert outcome.ok
    assert outcome.shapes["x"][2] % 3 == 0
    with pytest.raises(BnfoldError, match="--shape"):
        m2 = make([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [vi("x", [1, 7, "h"])], [vi("y", [1, 3, "q", 3])], [shape])
        bnfold.verify(m2, m2)


def test_same_dim_param_gets_the_same_value_and_shape_wins():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    m = make(nodes, [vi("a", ["N", 3, "len"]), vi("b", ["N", 3, "len"])],
             [vi("y", ["N", 3, "len"])], [])
    outcome = bnfold.verify(m, m)
    assert outcome.shapes["a"] == outcome.shapes["b"] == [1, 3, 64]
    given = bnfold.verify(m, m, shapes={"a": (1, 3, 5)})
    assert given.shapes["a"] == given.shapes["b"] == [1, 3, 5]


def if_model(else_shift: float = 0.0):
    """cond ? x·2 : x + shift — a bool input selects the branch."""
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])], "then", [], [vi("t", [2, 3])],
        [tensor("two", np.full((1,), 2.0))])
    else_graph = helper.make_graph(
        [helper.make_node("Add", ["x", "shift"], ["e"])], "else", [], [vi("e", [2, 3])],
        [tensor("shift", np.full((1,), 1.0 + else_shift))])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    return make([node], [vi("cond", [], TensorProto.BOOL), vi("x", [2, 3])], [vi("y", [2, 3])], [])


def test_bool_input_checks_both_branches():
    outcome = bnfold.verify(if_model(), if_model())
    assert outcome.ok and outcome.runs == 2
    # a change in the else branch alone is caught
    assert not bnfold.verify(if_model(), if_model(else_shift=0.5)).ok


def test_int_scalar_input_indexes_within_its_table():
    table = tensor("table", rng(0).standard_normal((5, 4)))
    nodes = [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)]
    m = make(nodes, [vi("idx", [3], TensorProto.INT64)], [vi("y", [3, 4])], [table])
    assert bnfold.verify(m, m, runs=3).ok  # an index ≥ 5 would make ORT fail


def test_int64_scalar_input_like_a_sample_rate_index_is_generated():
    table = tensor("table", rng(0).standard_normal((2, 4)))
    nodes = [helper.make_node("Gather", ["table", "which"], ["row"], axis=0),
             helper.make_node("Add", ["x", "row"], ["y"])]
    m = make(nodes, [vi("x", [3, 4]), vi("which", [], TensorProto.INT64)], [vi("y", [3, 4])],
             [table])
    outcome = bnfold.verify(m, m, runs=4)
    assert outcome.ok and outcome.shapes["which"] == []


def test_rejected_generated_ints_name_the_input():
    # ids used as a Reshape shape: ORT rejects small random values
    nodes = [helper.make_node("Reshape", ["x", "ids"], ["y"])]
    m = make(nodes, [vi("x", [2, 3]), vi("ids", [2], TensorProto.INT64)], [vi("y", [3, 2])], [])
    with pytest.raises(BnfoldError, match=r"'ids' \(INT64\).*--inputs"):
        bnfold.verify(m, m)


def sigmoid_head(shift_drop: bool = False):
    """Conv → BN → Sigmoid with logits near −15: outputs ~1e-7..5e-4, where ORT's float32
    sigmoid has an absolute error ~1e-7, far above 1e-5 of their scale."""
    r = rng(3)
    w = r.standard_normal((8, 32, 3, 3)) * 0.1
    scale, bias, mean, var = (r.uniform(0.5, 1.5, 8), np.full(8, -15.0),
                              r.normal(0, 0.5, 8), r.uniform(0.5, 2.0, 8))
    if shift_drop:
        bias = bias.copy()
        bias[3] = -14.0
    inits = [tensor("W", w), tensor("bn_scale", scale), tensor("bn_bias", bias),
             tensor("bn_mean", mean), tensor("bn_var", var)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "b"),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    return make(nodes, [vi("x", [2, 32, 8, 8])], [vi("y", [2, 8, 8, 8])], inits)


def test_near_zero_outputs_are_judged_against_the_models_own_noise():
    m = sigmoid_head()
    folded = bnfold.fold(m).model
    outcome = bnfold.verify(m, folded)
    metrics = outcome.outputs[0]
    assert metrics.max_rel_error > 1e-5  # the fixed tolerance alone would call it NOT equivalent
    assert outcome.ok and metrics.noise_floor > 0
    assert "float32 noise" in metrics.note
    # a wrong fold (one channel's shift moved by 1) still fails
    wrong = bnfold.fold(sigmoid_head(shift_drop=True)).model
    assert not bnfold.verify(m, wrong).ok
    # explicit tolerances are used as given
    assert not bnfold.verify(m, folded, rtol=1e-5).ok


def half_conv_model(weight_type=TensorProto.FLOAT16, as_constant=False):
    """float32 in and out, Cast around a Conv→BN computed in `weight_type` (what
    onnxconverter-common's float16 conversion with keep_io_types writes)."""
    r = rng(31)
    dtype = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}[weight_type]
    weight = helper.make_tensor("W", weight_type, [8, 8, 3, 3],
                                (r.standard_normal((8, 8, 3, 3)) / 8).astype(dtype).ravel())
    params = [helper.make_tensor(f"bn_{role}", weight_type, [8], values.astype(dtype))
              for role, values in (("scale", r.uniform(0.5, 1.5, 8)), ("bias", r.normal(0, 1, 8)),
                                   ("mean", r.normal(0, 1, 8)), ("var", r.uniform(0.5, 2, 8)))]
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=weight_type),
             helper.make_node("Conv", ["h", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "b"),
             helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=weight))
    inits = params if as_constant else [weight, *params]
    return make(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])], inits)


@pytest.mark.parametrize("as_constant", [False, True])
def test_a_model_computing_in_float16_is_judged_at_float16_tolerance(as_constant):
    m = half_conv_model(as_constant=as_constant)
    assert weight_precision(m) == "float16"
    outcome = bnfold.verify(m, bnfold.fold(m).model)
    metrics = outcome.outputs[0]
    # float16's scale-relative tolerance (1e-2), though the outputs are float32 (1e-5)
    assert outcome.ok and metrics.tolerance >= 1e-2 * metrics.scale
    assert "weights are float16: judged at float16 tolerance" in " ".join(outcome.notes)
    on_cpu = bnfold.verify(m, bnfold.fold(m).model, engine="ort-cpu")
    assert on_cpu.ok and on_cpu.engine["tolerance_precision"] == "float16"
    m32 = half_conv_model(TensorProto.FLOAT)
    assert weight_precision(m32) is None
    assert bnfold.verify(m32, bnfold.fold(m32).model).outputs[0].tolerance < 1e-4


def overflow_model(limit: float = 80.0):
    nodes = [helper.make_node("Mul", ["x", "k"], ["s"]), helper.make_node("Exp", ["s"], ["y"])]
    return make(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], [tensor("k", np.full((1,), limit))])


def test_infinite_outputs_compare_by_position():
    assert bnfold.verify(overflow_model(), overflow_model()).ok
    moved = bnfold.verify(overflow_model(), overflow_model(200.0))
    assert not moved.ok and "different positions" in moved.outputs[0].note


def test_large_declared_input_is_refused_before_allocation():
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [100_000, 3, 224, 224])],
             [vi("y", [100_000, 3, 224, 224])], [])
    with pytest.raises(BnfoldError, match="MiB limit"):
        bnfold.verify(m, m)


def test_model_ort_cannot_load_says_how_to_proceed():
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], [])
    m.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BnfoldError, match="--no-verify"):
        bnfold.verify(m, m)


def test_bool_output_and_big_constant_of_shape_in_the_ground_truth():
    nodes = [helper.make_node("Greater", ["x", "zero"], ["y"]),
             helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0)]
    inits = [tensor("zero", np.zeros(1)), tensor("shape", np.array([3000, 1000]), np.int64)]
    m = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3], TensorProto.BOOL), vi("total", [])], inits)
    outcome = bnfold.verify(m, m)
    assert outcome.ok and outcome.ground_truth_skipped is None
    # 3M values made at run time are within the float64 budget; a bool output has no error
    assert set(outcome.ground_truth) == {"total"}


def test_plain_fold_command_prints_the_chosen_sizes(tmp_path):
    src = tmp_path / "det.onnx"
    save_model(paddle_det_model(), src)
    result = CliRunner().invoke(cli, ["fold", str(src)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "set to 64" in result.output and "wrote" in result.output


def two_layer_saturated_head(shift: float = -15.0):
    r = rng(4)
    inits = [tensor("W1", r.standard_normal((8, 16, 3, 3)) * 0.2), *bn_params("bn1", 8, seed=5),
             tensor("W2", r.standard_normal((8, 8, 3, 3)) * 0.1),
             tensor("bn2_scale", r.uniform(0.5, 1.5, 8)), tensor("bn2_bias", np.full(8, shift)),
             tensor("bn2_mean", r.normal(0, 0.5, 8)), tensor("bn2_var", r.uniform(0.5, 2.0, 8))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             bn_node("c1", "b1", prefix="bn1", name="bn1"),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             bn_node("c2", "b2", prefix="bn2", name="bn2"),
             helper.make_node("Sigmoid", ["b2"], ["y"])]
    return make(nodes, [vi("x", [1, 16, 8, 8])], [vi("y", [1, 8, 8, 8])], inits)


@pytest.mark.parametrize("shift, why", [
    (-15.0, "only against the model's own float32 noise"),  # outputs ~1e-7: over atol
    (-40.0, "within its tolerance of zero"),  # outputs ~1e-18: anything near 0 passes
])
def test_fold_sites_catch_a_wrong_fold_that_a_saturated_output_hides(shift, why, tmp_path):
    m = two_layer_saturated_head(shift)
    src = tmp_path / "head.onnx"
    save_model(m, src)
    result = bnfold.fold_file(src)
    verification = result.report.verification
    assert verification["ok"] and {s["name"] for s in verification["sites"]} == {"b1", "b2"}
    assert any(why in note and "fold site(s) were compared" in note
               for note in verification["notes"])
    # float32 rounds the saturated tail to 0 where float64 keeps 1e-18: no disagreement
    assert verification["ground_truth_skipped"] is None
    wrong = result.model
    bias = next(t for t in wrong.graph.initializer if t.name == wrong.graph.node[0].input[2])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[1] += 0.05  # one channel's shift off by 5% of its activations' scale
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    outcome = bnfold.verify(m, wrong, sites=["b1", "b2"])
    assert not outcome.ok
    assert "b1" in [s.name for s in outcome.sites if not s.ok]
    if shift == -40.0:  # the outputs alone pass the wrong fold: the note says they cannot tell
        alone = bnfold.verify(m, wrong)
        assert alone.ok and not alone.sites
        assert any("cannot show a difference between the models; verify with real inputs" in note
                   for note in alone.notes)
        on_engine = bnfold.verify(m, wrong, engine="ort-cpu")
        assert any("within its tolerance of zero" in note for note in on_engine.notes)


def test_an_output_with_one_value_everywhere_is_blind():
    from bnfold.verification.comparison import blind_spot, compare

    reference = np.full((2, 10), 0.1, np.float32)  # a softmax over constant logits
    assert "one value everywhere" in blind_spot(compare("y", reference, reference, None, None))
    varied = np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10)
    assert blind_spot(compare("y", varied, varied, None, None)) is None
    single = np.array([0.5], np.float32)  # one value is not "constant": a wrong fold moves it
    assert blind_spot(compare("y", single, single, None, None)) is None
    tiny = np.array([1e-20, 3e-9], np.float32)
    assert "tolerance of zero" in blind_spot(compare("y", tiny, tiny * 2, None, None))
    assert blind_spot(compare("y", varied, varied + 1, None, None)) is None  # failed: not blind
    labels = np.zeros(5, np.int64)  # compared exactly: equality tells
    assert blind_spot(compare("y", labels, labels, None, None)) is None


def test_shape_given_for_a_later_input_settles_the_shared_dim_param():
    nodes = [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)]
    m = make(nodes, [vi("a", ["N", 3, "H", "W"]), vi("b", ["N", 3, "H", "W"])],
             [vi("y", ["N", 6, "H", "W"])], [])
    outcome = bnfold.verify(m, m, shapes={"b": (4, 3, 16, 16)})
    assert outcome.shapes["a"] == outcome.shapes["b"] == [4, 3, 16, 16]
    with pytest.raises(BnfoldError, match="two sizes"):
        bnfold.verify(m, m, shapes={"a": (4, 3, 16, 16), "b": (2, 3, 16, 16)})
