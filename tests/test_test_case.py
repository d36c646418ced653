"""`bnfold verify CASE [CANDIDATE]`: an ONNX test-case folder (model.onnx, test_data_set_N/)
judged against the outputs stored in it, in ONNX Runtime and on an engine."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import golden
from bnfold.cli import cli
from bnfold.errors import BnfoldError
from bnfold.folding.api import fold
from bnfold.onnxio.files import save_model
from bnfold.verification.runs import verify


def _conv_bn() -> onnx.ModelProto:
    rng = golden.rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             golden.bn_node("c", "y")]
    inits = [golden.tensor("w", rng.standard_normal((4, 3, 3, 3))),
             *golden.bn_params("bn", 4)]
    return golden.model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def _write_case(folder, model, feeds, outputs=None, names=True) -> str:
    """`model` and, per feed, its inputs and outputs (computed in ORT unless given)."""
    os.makedirs(folder)
    save_model(model, os.path.join(folder, "model.onnx"))
    for index, feed in enumerate(feeds):
        data = os.path.join(folder, f"test_data_set_{index}")
        os.mkdir(data)
        got = outputs[index] if outputs else dict(zip(
            [o.name for o in model.graph.output], golden.run(model, feed)))
        for kind, values in (("input", feed), ("output", got)):
            for k, (name, value) in enumerate(values.items()):
                tensor = numpy_helper.from_array(np.asarray(value), name if names else "")
                with open(os.path.join(data, f"{kind}_{k}.pb"), "wb") as stream:
                    stream.write(tensor.SerializeToString())
    return str(folder)


def _feed(seed: int) -> dict[str, np.ndarray]:
    return {"x": golden.rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}


@pytest.fixture
def case(tmp_path):
    return _write_case(tmp_path / "case", _conv_bn(), [_feed(1), _feed(2)])


def _invoke(*args):
    return CliRunner().invoke(cli, ["verify", *args], prog_name="bnfold")


def test_the_case_model_and_its_fold_match_the_stored_outputs(case, tmp_path):
    run = _invoke(case)
    assert run.exit_code == 0, run.output
    assert "equivalent over the 2 stored input set(s)" in run.output
    assert "rtol 0.001 (scale-relative), atol 1e-07: from onnx's backend test runner" in \
        " ".join(run.output.split())
    folded = str(tmp_path / "folded.onnx")
    save_model(fold(onnx.load(os.path.join(case, "model.onnx"))).model, folded)
    result = verify(case, folded)
    assert result.ok and result.runs == 2
    assert result.test_case["data_sets"] == ["test_data_set_0", "test_data_set_1"]
    assert 0 < result.outputs[0].max_rel_error < 1e-6  # folding moved float32 rounding only
    assert result.ground_truth["y"]["candidate_rel_error"] < 1e-6


def test_a_wrong_stored_output_in_any_data_set_fails(tmp_path):
    model = _conv_bn()
    feeds = [_feed(1), _feed(2)]
    good = [dict(zip(["y"], golden.run(model, f))) for f in feeds]
    bad = [good[0], {"y": good[1]["y"] * np.float32(1.01)}]
    run = _invoke(_write_case(tmp_path / "bad", model, feeds, bad))
    assert run.exit_code == 1 and "NOT equivalent over the 2 stored input set(s)" in run.output
    assert "rerun with --locate" not in run.output
    result = verify(str(tmp_path / "bad"))
    assert 0.009 < result.outputs[0].max_rel_error < 0.011
    # the same case passes with a tolerance that covers 1%
    assert verify(str(tmp_path / "bad"), rtol=0.02).ok


def test_unnamed_tensors_bind_by_position_and_named_ones_by_name(tmp_path):
    nodes = [helper.make_node("Sub", ["a", "b"], ["d"]), helper.make_node("Cast", ["d"], ["i"],
                                                                           to=7)]
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    model = helper.make_model(helper.make_graph(
        nodes, "sub", [helper.make_tensor_value_info(n, f32, [3]) for n in "ab"],
        [helper.make_tensor_value_info("d", f32, [3]), helper.make_tensor_value_info("i", i64, [3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    feed = {"a": np.array([5, 1, 2], np.float32), "b": np.array([1, 1, 1], np.float32)}
    assert verify(_write_case(tmp_path / "pos", model, [feed], names=False)).ok
    # stored in the other order, under their names: bound by name, so still a − b
    swapped = {"b": feed["b"], "a": feed["a"]}
    result = verify(_write_case(tmp_path / "named", model, [swapped]))
    assert result.ok and {m.name for m in result.outputs} == {"d", "i"}
    # an integer output is compared exactly
    wrong = [{"d": np.array([4, 0, 1], np.float32), "i": np.array([4, 0, 2], np.int64)}]
    result = verify(_write_case(tmp_path / "int", model, [feed], wrong))
    failed = {m.name: m for m in result.outputs if not m.ok}
    assert list(failed) == ["i"] and failed["i"].note == "1 of 3 values differ (compared exactly)"


def test_a_case_storing_some_outputs_judges_those_and_says_so(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["n"])]
    model = golden.model(nodes, [("x", [4])], [("r", [4]), ("n", [4])], [])
    feed = {"x": np.array([-1, 2, -3, 4], np.float32)}
    result = verify(_write_case(tmp_path / "c", model, [feed], [{"n": -feed["x"]}]))
    assert result.ok and [m.name for m in result.outputs] == ["n"]
    assert "the test case stores no value for output(s) r: not judged" in result.notes
    assert result.ground_truth_skipped == "the test case stores only some of the model's outputs"


@pytest.mark.parametrize("damage,message", [
    ("no_model", "is a folder but not an ONNX test case"),
    ("gap", "output_K.pb files are numbered [0, 2], not 0 to 1: a file is missing"),
    ("dtype", "input_0.pb holds float64 but the model's input 'x' is FLOAT"),
    ("count", "inputs: 2 stored, the model has 1 (x)"),
    ("huge", "declares 1,000,000,000,000 values in a"),
    ("external", "keeps its data in another file: store it inline"),
    ("garbage", "is not a TensorProto"),
    ("no_outputs", "holds no output_K.pb: a test case without outputs cannot be judged"),
])
def test_a_bad_case_is_refused_in_one_line(case, damage, message):
    data = os.path.join(case, "test_data_set_0")

    def store(name, tensor):
        with open(os.path.join(data, name), "wb") as stream:
            stream.write(tensor.SerializeToString() if isinstance(tensor, onnx.TensorProto)
                         else tensor)

    if damage == "no_model":
        os.remove(os.path.join(case, "model.onnx"))
    elif damage == "gap":
        store("output_2.pb", numpy_helper.from_array(np.zeros(1, np.float32)))
    elif damage == "dtype":
        store("input_0.pb", numpy_helper.from_array(np.zeros((1, 3, 8, 8)), "x"))
    elif damage == "count":
        store("input_1.pb", numpy_helper.from_array(np.zeros(1, np.float32), "z"))
    elif damage == "huge":
        tensor = numpy_helper.from_array(np.zeros(4, np.float32), "x")
        tensor.dims[:] = [10**6, 10**6]
        store("input_0.pb", tensor)
    elif damage == "external":
        tensor = numpy_helper.from_array(np.zeros(4, np.float32), "x")
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="../../secret.bin")
        store("input_0.pb", tensor)
    elif damage == "garbage":
        store("input_0.pb", b"\xff\xff\xff\xff not protobuf")
    elif damage == "no_outputs":
        os.remove(os.path.join(data, "output_0.pb"))
    run = _invoke(case)
    assert run.exit_code == 1, run.output
    assert message in " ".join(run.output.split()) and "Traceback" not in run.output
    assert len(run.output.strip().splitlines()) <= 3  # one line, wrapped by the console


def test_options_a_case_brings_itself_are_refused(case, tmp_path):
    # bad usage (exit 2) at the command line; the library's verify() refuses them too
    run = _invoke(case, "--shape", "x=1x3x8x8")
    assert run.exit_code == 2 and "do not apply" in run.output
    run = _invoke(case, "--locate")
    assert run.exit_code == 2 and "to locate, verify CASE/model.onnx" in " ".join(
        run.output.split())
    with pytest.raises(BnfoldError, match="do not apply"):
        verify(case, runs=2)
    model = str(tmp_path / "alone.onnx")
    save_model(_conv_bn(), model)
    run = _invoke(model)
    assert run.exit_code == 2 and "missing CANDIDATE" in run.output


def test_a_candidate_without_a_stored_output_is_refused(case, tmp_path):
    renamed = _conv_bn()
    renamed.graph.node[-1].output[0] = "out"
    renamed.graph.output[0].name = "out"
    path = str(tmp_path / "renamed.onnx")
    save_model(renamed, path)
    run = _invoke(case, path)
    assert run.exit_code == 1 and "the candidate has no output 'y'" in run.output


def _sequence_passthrough() -> onnx.ModelProto:
    """out = SequenceAt([X, Y], 1): OpenVINO names the input port of Y 'out', not 'Y'."""
    nodes = [helper.make_node("SequenceConstruct", ["X", "Y"], ["s"]),
             helper.make_node("SequenceAt", ["s", "one"], ["out"])]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 3]),
                       helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_on_openvino_an_input_named_after_a_later_tensor_is_fed_by_position(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    feed = {"X": np.zeros((2, 3), np.float32), "Y": np.arange(6, dtype=np.float32).reshape(2, 3)}
    case = _write_case(tmp_path / "seq", _sequence_passthrough(), [feed])
    result = verify(case, engine="openvino")
    assert result.ok, result.outputs
    assert result.outputs[0].max_abs_error == 0 and result.engine["name"] == "openvino"
    assert result.test_case["tolerance_from"] == "onnx's backend test runner"
    # plain verify --engine feeds it the same way
    model = str(tmp_path / "seq.onnx")
    save_model(_sequence_passthrough(), model)
    assert verify(model, model, engine="openvino", inputs=feed).ok


def _onnx_case(group: str, name: str) -> str:
    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", group, name)
    if not os.path.isdir(folder):
        pytest.skip(f"this onnx wheel does not ship {group}/{name}")
    return folder


def test_onnx_backend_cases_pass_and_their_folds_too(tmp_path):
    """Third-party cases: outputs stored by PyTorch with onnx's own test data."""
    case = _onnx_case("pytorch-converted", "test_Conv2d_depthwise_padded")
    result = verify(case)
    assert result.ok and result.outputs[0].max_rel_error < 1e-6
    # opset-6 BatchNormalization: ORT has no kernel for it, OpenVINO runs it
    bn = _onnx_case("pytorch-converted", "test_BatchNorm2d_eval")
    run = _invoke(bn)
    assert run.exit_code == 1 and "ONNX Runtime cannot load the candidate model" in run.output
    assert "run it on another engine with --engine" in " ".join(run.output.split())
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    assert verify(bn, engine="openvino").ok
