"""`bnfold bench` through click, on a throwaway group (until cli.py registers it)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold.cli.common import BnfoldGroup
from bnfold.cli.deploy_commands import bench_command, build_command
from bnfold.onnxio.files import save_model
from bnfold.sample_model import build_sample_model

FAST = ["--runs", "20", "--min-time", "0.02", "--warmup-time", "0", "--threads", "1"]


def _cli():
    group = BnfoldGroup(name="bnfold")
    group.add_command(build_command)
    group.add_command(bench_command)
    return group


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "sample.onnx"
    save_model(build_sample_model(), str(path))
    return str(path)


def test_bench_folds_in_memory_and_writes_json(sample_path, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(_cli(), ["bench", sample_path, "--engine", "ort-cpu",
                                         "--json", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "original" in result.output and "folded" in result.output
    assert "ORT_ENABLE_ALL" in result.output
    data = json.loads(out.read_text())
    assert data["engine"] == "ort-cpu" and data["unit"] == "ms"
    assert [m["label"] for m in data["models"]] == ["original", "folded"]
    for model in data["models"]:
        for key in ("p50", "p90", "p95", "p99", "mean", "std", "cov", "runs"):
            assert key in model
        assert len(model["samples_ms"]["host"]) == model["runs"] >= 20
    assert data["environment"]["onnxruntime"]


def test_bench_compare_and_plot(sample_path, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "latency.png"
    result = CliRunner().invoke(_cli(), ["bench", sample_path, "--compare", sample_path,
                                         "--engine", "ort-cpu", "--plot", str(plot), *FAST])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_string_input_needs_inputs_file(tmp_path):
    x = helper.make_tensor_value_info("ids", TensorProto.STRING, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ids.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(_cli(), ["bench", str(path), "--engine", "ort-cpu", *FAST])
    assert result.exit_code == 1
    assert "--inputs" in result.output and "Traceback" not in result.output
    feed = tmp_path / "ids.npz"
    np.savez(feed, ids=np.array([["a", "b", "c"]] * 2))
    result = CliRunner().invoke(_cli(), ["bench", str(path), "--engine", "ort-cpu",
                                         "--inputs", str(feed), *FAST])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,code,text", [
    (["--engine", "tvm"], 2, "'tvm' is not one of"),
    (["--engine", "torch"], 2, "--model SPEC"),  # an ONNX MODEL with --engine torch
    (["--engine", "ort-cpu", "--shape", "input"], 2, "NAME=DxDxD"),
    (["--engine", "ort-cpu", "--shape", "other=1x3"], 1, "does not take"),
])
def test_bench_user_errors(sample_path, args, code, text):
    result = CliRunner().invoke(_cli(), ["bench", sample_path, *args, *FAST])
    assert result.exit_code == code, result.output
    assert text in result.output
    assert "Traceback" not in result.output


def test_bench_needs_a_model():  # bad usage: exit 2, as click's own
    result = CliRunner().invoke(_cli(), ["bench", "--engine", "ort-cpu"])
    assert result.exit_code == 2 and "give an ONNX MODEL" in result.output


def test_bench_checks_its_json_path_before_measuring(sample_path, tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", sample_path, "--engine", "ort-cpu",
                                         "--json", str(tmp_path / "missing" / "b.json"), *FAST])
    assert result.exit_code == 1 and "--json" in result.output
    assert result.output.count("\n") == 1  # its one error line: refused before any timing


def test_bench_torch_engine_with_a_factory():
    pytest.importorskip("torch")
    result = CliRunner().invoke(_cli(), ["bench", "--engine", "torch", "--model",
                                         "test_engines:make_tiny_net", "--shape",
                                         "input=2x3x8x8", *FAST])
    assert result.exit_code == 0, result.output
    assert "fused (2 BN)" in result.output


def _conv1d_bn(tmp_path, length="length", name="seq.onnx"):
    import golden

    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1]), golden.bn_node("c", "y")]
    inits = [golden.tensor("W", golden.rng(0).standard_normal((4, 3, 3))),
             *golden.bn_params("bn", 4)]
    path = tmp_path / name
    save_model(golden.model(nodes, [("x", ["N", 3, length])], [("y", None)], inits), str(path))
    return str(path)


def test_bench_settles_a_symbolic_length_as_verify_does(tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", _conv1d_bn(tmp_path), "--engine", "ort-cpu",
                                         *FAST])
    assert result.exit_code == 0, result.output
    assert "'length' set to 64" in " ".join(result.output.split())
    assert "original" in result.output and "folded" in result.output


def test_bench_refuses_models_with_other_inputs_in_one_line(sample_path, tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", sample_path, "--compare",
                                         _conv1d_bn(tmp_path), "--engine", "ort-cpu", *FAST])
    assert result.exit_code == 1, result.output
    assert "bench feeds every model the same inputs" in " ".join(result.output.split())
    assert "Traceback" not in result.output and "Required inputs" not in result.output


def test_bench_says_why_a_model_without_batchnorm_is_timed_alone(tmp_path):
    import golden

    path = tmp_path / "relu.onnx"
    save_model(golden.model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])],
                            [("y", None)], []), str(path))
    result = CliRunner().invoke(_cli(), ["bench", str(path), "--engine", "ort-cpu", *FAST])
    assert result.exit_code == 0, result.output
    assert "has no BatchNormalization: nothing to fold" in " ".join(result.output.split())
