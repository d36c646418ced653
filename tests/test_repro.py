"""`verify --repro DIR`: the smallest piece of the candidate that still differs, cut around the
located tensor, fed the reference's values, written whole for a bug report (or not at all)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.cli import cli
from bnfold.folding.api import fold
from bnfold.verification.runs import verify
from test_locate import FusingEngine, _perturbed, _scaled, files  # noqa: F401 (files: a fixture)


class ChainFusingEngine(FusingEngine):
    """y2 comes out 1% off when the model computes it from a Relu it does not mark: a fusion
    that needs the node before the one located, so the piece has to grow back one step."""

    name = "chain"

    def open(self, label, model, feed):
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        elif not isinstance(model, onnx.ModelProto):
            model = onnx.load(model)
        outputs = {o.name for o in model.graph.output}
        fused = any(n.op_type == "Relu" and "r1" in n.output for n in model.graph.node)
        if fused and "r1" not in outputs and "y2" in {o for n in model.graph.node
                                                        for o in n.output}:
            model = _scaled(model, "y2", 1.01)
        return self._inner.open(label, model.SerializeToString(), feed)


def _engine(monkeypatch, name: str, module: str, cls: str) -> None:
    from bnfold.deploy import engines

    monkeypatch.setitem(engines.ENGINES, name, (module, cls, "test"))


def _read_case(folder) -> tuple[onnx.ModelProto, dict, np.ndarray]:
    model = onnx.load(os.path.join(folder, "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    with np.load(os.path.join(folder, "inputs.npz")) as data:
        feed = dict(data)
    cases = os.path.join(folder, "test_data_set_0")
    for index, value in enumerate(model.graph.input):
        tensor = onnx.load_tensor(os.path.join(cases, f"input_{index}.pb"))
        assert tensor.name == value.name
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), feed[value.name])
    expected = numpy_helper.to_array(onnx.load_tensor(os.path.join(cases, "output_0.pb")))
    return model, feed, expected


def test_a_fusion_grows_the_piece_back_one_node_and_trims_nothing_it_needs(
        monkeypatch, files, tmp_path):
    _engine(monkeypatch, "chain", __name__, "ChainFusingEngine")
    folder = tmp_path / "repro"
    result = verify(files["original"], files["folded"], engine="chain", repro=str(folder),
                    ground_truth=False)
    assert not result.ok and result.located["verdict"] == "fusion"
    repro = result.located["repro"]
    # Conv alone agrees (r1 fed); Relu + Conv differs; cutting the Relu off again agrees
    assert repro["written"] and repro["op_types"] == ["Relu", "Conv"]
    assert repro["inputs"] == {"y1": [1, 4, 8, 8]} and repro["runs"] == 3
    assert 0.009 < repro["metrics"]["max_rel_error"] < 0.011
    assert repro["onnxruntime"]["ok"] and repro["onnxruntime"]["max_rel_error"] < 1e-6
    model, feed, expected = _read_case(folder)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Conv"]
    assert [o.name for o in model.graph.output] == ["y2"]
    # the piece computes the reference's y2 in ONNX Runtime: the case is the right one
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    saved = json.loads((folder / "repro.json").read_text())
    assert saved["tensor"] == "y2" and saved["on"] == "chain"
    bound = repro["metrics"]["tolerance"]
    assert saved["command"] == (f"bnfold verify {os.path.relpath(folder)} --engine chain "
                                f"--atol {bound!r} --rtol 0")
    # the folder is a test case: rerun against its stored value, it fails as it did here
    rerun = verify(str(folder), engine="chain", atol=bound, rtol=0, ground_truth=False)
    assert not rerun.ok and rerun.test_case["tolerance_from"] == "--rtol/--atol"
    assert rerun.outputs[0].max_abs_error == repro["metrics"]["max_abs_error"]
    assert verify(str(folder), atol=bound, rtol=0, ground_truth=False).ok  # ORT agrees
    assert "--repro: 2 node(s) (Relu, Conv) ending at 'y2' still differ on chain" in \
        " ".join(result.located["note"].split())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bnfold")]


def test_a_wrong_fold_is_cut_to_its_node_in_onnx_runtime(files, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()  # an empty folder is taken
    run = CliRunner().invoke(cli, ["verify", files["original"], files["wrong2"], "--repro",
                                   str(folder), "--no-ground-truth"], prog_name="bnfold")
    assert run.exit_code == 1, run.output
    text = " ".join(run.output.split())
    assert "first tensor to differ on ONNX Runtime (input set 1): 'y2'" in text  # implies --locate
    assert "--repro: 1 node(s) (Conv) ending at 'y2' still differ on ONNX Runtime" in text
    assert "rerun with --locate" not in text and "Traceback" not in run.output
    model, feed, expected = _read_case(folder)
    assert list(feed) == ["r1"]
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert np.abs(got - expected).max() > 1e-3  # the piece carries the wrong weight
    # its rerun command judges the piece in ONNX Runtime against the stored reference value
    command = json.loads((folder / "repro.json").read_text())["command"].split()
    assert command[:3] == ["bnfold", "verify", os.path.relpath(folder)] and "--engine" not in command
    rerun = CliRunner().invoke(cli, command[1:], prog_name="bnfold")
    assert rerun.exit_code == 1, rerun.output
    assert "NOT equivalent over the 1 stored input set(s)" in rerun.output


def test_models_that_agree_get_no_repro(files, tmp_path):
    result = verify(files["original"], files["folded"], repro=str(tmp_path / "r"),
                    ground_truth=False)
    assert result.ok and result.located is None and not (tmp_path / "r").exists()
    assert ("the models agree: --locate had nothing to look for and --repro wrote nothing"
            in result.notes)


def test_a_folder_in_use_is_refused_before_any_work(files, tmp_path):
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    run = CliRunner().invoke(cli, ["verify", files["original"], files["wrong2"], "--repro",
                                   str(folder)], prog_name="bnfold")
    assert run.exit_code == 1
    assert "exists and is not an empty folder: name a new one" in run.output
    assert "Traceback" not in run.output and "NOT equivalent" not in run.output
    assert os.listdir(folder) == ["keep.txt"]


def test_no_piece_that_differs_writes_nothing_and_says_why(monkeypatch, files, tmp_path):
    from bnfold.verification import reduce

    _engine(monkeypatch, "chain", __name__, "ChainFusingEngine")
    monkeypatch.setattr(reduce, "MAX_LEVELS", 0)  # the Conv alone, which agrees
    folder = tmp_path / "none"
    result = verify(files["original"], files["folded"], engine="chain", repro=str(folder),
                    ground_truth=False)
    assert result.located["repro"]["written"] is False and result.located["repro"]["runs"] == 1
    assert ("--repro: no piece of up to 0 steps back from 'y2' differs on chain (1 runs): the "
            "difference needs more of the model, so nothing was written") in result.located["note"]
    assert not folder.exists() and os.listdir(tmp_path) == []


def test_the_piece_keeps_subgraph_reads_and_freezes_shapes():
    """A node with a subgraph reads outer tensors: the cut feeds them too; a shape tensor is
    frozen to its value, so the piece has static shapes."""
    from onnx import helper

    from bnfold.verification.reduce import build_piece, reduce_to_piece

    branch = helper.make_graph([helper.make_node("Mul", ["a", "k"], ["out"])], "then", [],
                               [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT,
                                                              None)])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["out2"])], "else", [],
                              [helper.make_tensor_value_info("out2", onnx.TensorProto.FLOAT,
                                                             None)])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["a", "s"], ["k"]),
             helper.make_node("If", ["c"], ["t"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3]),
        helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    values = {"x": x, "c": np.array(True), "a": np.maximum(x, 0), "s": np.array([2, 3]),
              "k": np.maximum(x, 0), "t": np.maximum(x, 0) ** 2}
    seen = []

    def differs(payload, feed):
        seen.append(sorted(feed))
        return "metrics"

    piece, payload, metrics, runs = reduce_to_piece(
        model, "t", values, lambda n: values[n].dtype.kind == "f", differs)
    assert [model.graph.node[i].op_type for i in piece.nodes] == ["If"]
    assert sorted(piece.inputs) == ["a", "k"] and piece.constants == ["c"]
    assert seen == [["a", "k"]] and runs == 1 and metrics == "metrics"
    built = build_piece(model, piece, "t", values)
    onnx.checker.check_model(built, full_check=True)
    got = ort.InferenceSession(payload).run(None, {"a": values["a"], "k": values["k"]})[0]
    np.testing.assert_array_equal(got, values["t"])


@pytest.mark.parametrize("external", [False, True])
def test_a_piece_reads_its_weights_from_a_model_loaded_without_them(tmp_path, external):
    """The candidate is read with its large weights left in the file (inline or external
    data): the piece gets the bytes of its own weights, not an empty tensor."""
    from onnx import helper

    import golden
    from bnfold.onnxio.files import save_model

    r = golden.rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             golden.bn_node("c", "y", prefix="bn", name="bn"),
             helper.make_node("Relu", ["y"], ["z"])]
    weights = [golden.tensor("w", r.normal(size=(32, 16, 3, 3))),  # 18 KiB: deferred
               *golden.bn_params("bn", 32, seed=4)]
    original = golden.model(nodes, [("x", [1, 16, 6, 6])], [("z", None)], weights)
    save_model(original, str(tmp_path / "o.onnx"))
    save_model(_perturbed(fold(original).model, "conv"), str(tmp_path / "f.onnx"),
               external_data=external)
    result = verify(str(tmp_path / "o.onnx"), str(tmp_path / "f.onnx"),
                    repro=str(tmp_path / "r"), ground_truth=False)
    assert result.located["repro"]["op_types"] == ["Conv"]
    model, feed, expected = _read_case(tmp_path / "r")
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.dims[0] == 32
                                        and len(t.dims) == 4))
    stored = numpy_helper.to_array(next(
        t for t in onnx.load(str(tmp_path / "f.onnx")).graph.initializer if len(t.dims) == 4))
    np.testing.assert_array_equal(weight, stored)
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert np.abs(got - expected).max() > 1e-3  # the broken weight came with it
