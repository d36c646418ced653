"""Cross-engine verification: the candidate runs on an engine, the reference in ORT CPU with
optimisation off; tolerances follow the precision the engine reports. OpenVINO runs here (the
`openvino` extra, in dev); TensorRT and CUDA tests are marked and skip with the reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import golden
from bnfold.cli import cli
from bnfold.deploy.engines import EngineOptions
from bnfold.deploy.engines.ort import cuda_provider_available
from bnfold.deploy.engines.trt import unavailable_reason as trt_unavailable
from bnfold.folding.api import fold
from bnfold.deploy.fp16 import convert_to_fp16
from bnfold.errors import BnfoldError
from bnfold.onnxio.files import save_model
from bnfold.sample_model import build_sample_model
from bnfold.verification.runs import verify

HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO,
                                    reason="openvino is not installed (pip install bnfold[openvino])")
CPU_ENGINES = ["ort-cpu", pytest.param("openvino", marks=needs_openvino)]


def _conv_bn(group: int = 1):
    w = golden.rng(2).normal(size=(6, 6 // group, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=group, pads=[1, 1, 1, 1]),
             golden.bn_node("c", "y")]
    return golden.model(nodes, [("x", ["N", 6, 8, 8])], [("y", None)],
                        [golden.tensor("w", w), *golden.bn_params("bn", 6)])


def _convtranspose_bn():
    w = golden.rng(3).normal(size=(4, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]),
             golden.bn_node("c", "y")]
    return golden.model(nodes, [("x", [1, 4, 5, 5])], [("y", None)],
                        [golden.tensor("w", w), *golden.bn_params("bn", 6)])


def _gemm_bn():
    w = golden.rng(4).normal(size=(8, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1), golden.bn_node("g", "y")]
    return golden.model(nodes, [("x", [3, 5])], [("y", None)],
                        [golden.tensor("w", w), *golden.bn_params("bn", 8)])


PATTERNS = {"conv_bn": _conv_bn, "grouped_conv_bn": lambda: _conv_bn(3),
            "convtranspose_bn": _convtranspose_bn, "gemm_bn": _gemm_bn,
            "sample": build_sample_model}


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    original = build_sample_model()
    folded = fold(original).model
    paths = {"original": folder / "sample.onnx", "folded": folder / "sample.folded.onnx",
             "fp16": folder / "sample.fp16.onnx", "wrong": folder / "sample.wrong.onnx"}
    save_model(original, str(paths["original"]))
    save_model(folded, str(paths["folded"]))
    save_model(convert_to_fp16(folded), str(paths["fp16"]))
    save_model(_wrong(folded), str(paths["wrong"]))
    return {k: str(v) for k, v in paths.items()}


def _wrong(folded: onnx.ModelProto) -> onnx.ModelProto:
    """One weight perturbed in the first Conv and one channel's bias dropped in the last."""
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    convs = [n for n in broken.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    inits = {t.name: t for t in broken.graph.initializer}
    weight = numpy_helper.to_array(inits[convs[0].input[1]]).copy()
    weight.reshape(-1)[0] += 0.5
    inits[convs[0].input[1]].CopyFrom(numpy_helper.from_array(weight, convs[0].input[1]))
    bias = numpy_helper.to_array(inits[convs[-1].input[2]]).copy()
    bias[0] = 0.0
    inits[convs[-1].input[2]].CopyFrom(numpy_helper.from_array(bias, convs[-1].input[2]))
    return broken


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_folded_patterns_pass_on_every_cpu_engine(engine, pattern):
    original = PATTERNS[pattern]()
    result = verify(original, fold(original).model, engine=engine)
    assert result.ok, [(m.name, m.max_rel_error, m.tolerance, m.note) for m in result.outputs]
    assert result.engine["name"] == engine and result.engine["precision"] == "float32"
    assert result.engine["tolerance_precision"] == "float32"
    assert result.engine["rtol"] == 1e-5


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_candidate_with_an_extra_output_is_refused_as_plain_verify_does(engine):
    original = _conv_bn()
    extra = onnx.ModelProto()
    extra.CopyFrom(fold(original).model)
    extra.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    extra.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    with pytest.raises(BnfoldError, match=r"^the models have different interfaces \(inputs "
                                          r"\['x'\] vs \['x'\], outputs \['y'\] vs "
                                          r"\['y', 'z'\]\)"):
        verify(original, extra)
    with pytest.raises(BnfoldError) as info:
        verify(original, extra, engine=engine)
    assert str(info.value) == ("the models have different outputs (['y'] vs ['y', 'z']): "
                               "compare a model with its own folded, converted or built version")


def _matmul_chain(layers: int, n: int = 512) -> onnx.ModelProto:
    """x → y through `layers` MatMuls by the identity: the same function for any depth, ~0.27
    GFLOP a layer (200 layers: seconds on a CPU core)."""
    nodes, last = [], "x"
    for i in range(layers):
        name = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [last, "eye"], [name]))
        last = name
    return golden.model(nodes, [("x", [n, n])], [("y", [n, n])],
                        [golden.tensor("eye", np.eye(n, dtype=np.float32))])


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_candidate_runs_on_the_engine_are_bounded_by_the_timeout(engine):
    # The reference (one layer) runs well within 0.1 s; the candidate (200) cannot, and is
    # stopped: ORT terminates between nodes, OpenVINO cancels between layers.
    with pytest.raises(BnfoldError) as info:
        verify(_matmul_chain(1), _matmul_chain(200), engine=engine, timeout=0.1,
               ground_truth=False)
    assert str(info.value) == ("the candidate ran longer than 0.1 s on one input set: raise "
                               "--verify-timeout or give smaller --shape dims")
    assert verify(_matmul_chain(1), _matmul_chain(3), engine=engine, timeout=60,
                  ground_truth=False).ok


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_wrong_candidate_fails_naming_the_output(engine, sample_files):
    result = verify(sample_files["original"], sample_files["wrong"], engine=engine)
    assert not result.ok
    (bad,) = [m for m in result.outputs if not m.ok]
    assert bad.name == "head_bn.out" and bad.max_abs_error > bad.tolerance
    cli_run = CliRunner().invoke(cli, ["verify", sample_files["original"], sample_files["wrong"],
                                       "--engine", engine])
    assert cli_run.exit_code == 1, cli_run.output
    assert "head_bn.out" in cli_run.output and "NOT equivalent" in cli_run.output
    # whose difference: the original passes on the same engine, so it came with the candidate
    record = result.engine["reference_on_engine"]
    assert record["reference_ok"] and not record["candidate_matches_reference"]
    assert any(note.startswith(f"the reference passes on {engine} (") and
               note.endswith("): the difference comes with the candidate")
               for note in result.notes)


def test_fp16_model_passes_at_fp16_and_fails_at_float32(sample_files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "fp16.json"
    passed = runner.invoke(cli, ["verify", sample_files["original"], sample_files["fp16"],
                                 "--engine", "ort-cpu", "--json", str(out)])
    assert passed.exit_code == 0, passed.output
    assert "engine precision: float16" in passed.output
    assert "float16 tolerances, from the engine's precision" in passed.output
    data = json.loads(out.read_text())
    assert data["engine"]["precision"] == data["engine"]["tolerance_precision"] == "float16"
    assert data["engine"]["rtol"] == 1e-2
    failed = runner.invoke(cli, ["verify", sample_files["original"], sample_files["fp16"],
                                 "--engine", "ort-cpu", "--tolerances", "float32"])
    assert failed.exit_code == 1, failed.output
    assert "float32 tolerances, from --tolerances" in failed.output
    assert "head_bn.out" in failed.output


@needs_openvino
def test_openvino_reports_the_precision_it_compiled_to(sample_files):
    f32 = verify(sample_files["original"], sample_files["folded"], engine="openvino")
    assert f32.engine["precision"] == "float32"
    assert "INFERENCE_PRECISION_HINT=f32" in f32.engine["precision_source"]
    assert set(f32.engine["layer_precisions"]) <= {"f32", "i32", "i64"}
    low = verify(sample_files["original"], sample_files["folded"], engine="openvino",
                 engine_options=EngineOptions(inference_precision="bf16"))
    # bf16 where the CPU has it, else OpenVINO keeps f32: either way what ran is judged.
    assert low.ok and low.engine["precision"] in ("bfloat16", "float32")
    assert low.engine["tolerance_precision"] == low.engine["precision"]


@needs_openvino
def test_openvino_bench_checks_outputs_and_refuses_speedup_of_a_wrong_model(sample_files,
                                                                             tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, [
        "bench", sample_files["original"], "--compare", sample_files["folded"], "--compare",
        sample_files["wrong"], "--engine", "openvino", "--threads", "1", "--runs", "10",
        "--min-time", "0", "--warmup-time", "0", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "NOT equivalent" in result.output
    data = json.loads(out.read_text())
    by_label = {m["label"]: m for m in data["models"]}
    assert by_label["sample.folded.onnx"]["outputs_ok"] is True
    assert by_label["sample.folded.onnx"]["speedup_vs_first"] > 0
    wrong = by_label["sample.wrong.onnx"]
    assert wrong["outputs_ok"] is False and wrong["speedup_vs_first"] is None
    assert "head_bn.out" in wrong["outputs_check"]["summary"]
    compiled = data["environment"]["compiled"]
    assert all(c["inference_precision"] == "f32" and c["inference_num_threads"] == 1
               for c in compiled.values())


def test_ort_bench_marks_wrong_model_and_no_check_skips(sample_files, tmp_path):
    args = ["bench", sample_files["original"], "--compare", sample_files["wrong"], "--engine",
            "ort-cpu", "--threads", "1", "--runs", "10", "--min-time", "0", "--warmup-time", "0"]
    checked = CliRunner().invoke(cli, args)
    assert checked.exit_code == 1 and "NOT equivalent" in checked.output
    unchecked = CliRunner().invoke(cli, [*args, "--no-check"])
    assert unchecked.exit_code == 0 and "NOT equivalent" not in unchecked.output


def test_openvino_missing_says_how_to_install(monkeypatch):
    import sys

    from bnfold.deploy.engines import get_engine
    from bnfold.errors import BnfoldError

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(BnfoldError, match=r"bnfold\[openvino\]"):
        get_engine("openvino")


def test_engine_options_need_engine_and_engine_files_need_trt(sample_files, tmp_path):
    runner = CliRunner()
    usage = runner.invoke(cli, ["verify", sample_files["original"], sample_files["folded"],
                                "--tolerances", "float16"])
    assert usage.exit_code == 2 and "need --engine" in usage.output
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"not an engine")
    refused = runner.invoke(cli, ["verify", sample_files["original"], str(plan), "--engine",
                                  "openvino"])
    assert refused.exit_code == 1 and "--engine trt" in refused.output


def _resnet():
    import torch

    from bnfold.pytorch.zoo import create, randomize_batchnorm

    torch.manual_seed(0)  # the torch test rebuilds the same weights
    return randomize_batchnorm(create("resnet18"), seed=0)


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    pytest.importorskip("torch", reason="the sample net is exported from PyTorch (bnfold[torch])")
    from bnfold.pytorch.export import export_onnx

    folder = tmp_path_factory.mktemp("resnet")
    path = folder / "resnet18.onnx"
    export_onnx(_resnet(), (1, 3, 32, 32), str(path))
    folded = folder / "resnet18.folded.onnx"
    save_model(fold(str(path)).model, str(folded))
    return str(path), str(folded)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_sample_net_folded_passes_cross_engine(engine, resnet_files):
    result = verify(*resnet_files, engine=engine, ground_truth=False)
    assert result.ok, [(m.name, m.max_rel_error, m.tolerance, m.note) for m in result.outputs]


def test_torch_engine_runs_the_fused_module_against_its_export(resnet_files):
    from bnfold.deploy.engines.torch_engine import fuse_bn

    fused = fuse_bn(_resnet())
    assert len(fused.fused) == 20
    result = verify(resnet_files[0], fused.module, engine="torch", ground_truth=False)
    assert result.ok, [(m.name, m.max_rel_error, m.tolerance) for m in result.outputs]
    assert result.engine["name"] == "torch" and result.engine["precision"] == "float32"
    assert ("the candidate's runs on torch are not bounded by the 300 s timeout: PyTorch "
            "cannot interrupt a forward") in result.notes


def test_locate_on_torch_says_a_module_cannot_be_marked(resnet_files):
    import torch

    from bnfold.deploy.engines.torch_engine import fuse_bn

    module = fuse_bn(_resnet()).module
    with torch.no_grad():
        next(module.parameters()).add_(0.5)  # a wrong candidate: something to locate
    result = verify(resnet_files[0], module, engine="torch", ground_truth=False, locate=True)
    assert not result.ok and result.located is None
    assert ("--locate needs an ONNX candidate: the tensors inside a PyTorch module cannot be "
            "marked as outputs") in result.notes


# --- GPU paths: run as-is on a machine with the hardware; skip with the reason here. ---

@pytest.mark.gpu
@pytest.mark.skipif(not cuda_provider_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_ort_cuda_verify_reports_tf32_or_float32(sample_files):
    result = verify(sample_files["original"], sample_files["folded"], engine="ort-cuda")
    assert result.ok and result.engine["precision"] in ("tf32", "float32")
    wrong = verify(sample_files["original"], sample_files["wrong"], engine="ort-cuda")
    assert not wrong.ok


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(trt_unavailable() is not None,
                    reason=f"TensorRT engine unavailable: {trt_unavailable()}")
def test_trt_fp16_engine_is_judged_at_fp16_and_build_verifies(sample_files, tmp_path):
    result = verify(sample_files["original"], sample_files["folded"], engine="trt",
                    engine_options=EngineOptions(inference_precision="f16"))
    assert result.ok, result.outputs
    assert result.engine["precision"] == "float16"
    assert "inspector" in result.engine["precision_source"]
    assert not verify(sample_files["original"], sample_files["wrong"], engine="trt").ok
    engine_path = tmp_path / "sample.engine"
    built = CliRunner().invoke(cli, ["build", sample_files["folded"], "-o", str(engine_path),
                                     "--shapes", "input:2x3x32x32", "--fp16"])
    assert built.exit_code == 0, built.output
    assert "verified against" in built.output and "equivalent" in built.output
    again = CliRunner().invoke(cli, ["verify", sample_files["folded"], str(engine_path),
                                     "--engine", "trt", "--shape", "input=2x3x32x32"])
    assert again.exit_code == 0, again.output


@needs_openvino
def test_openvino_names_outputs_as_the_onnx_graph_does_through_identity():
    # OpenVINO merges `out = Identity(mid)` into one port named {'mid', 'out'}.
    nodes = [helper.make_node("Relu", ["x"], ["mid"]), helper.make_node("Identity", ["mid"], ["out"]),
             helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Identity", ["t"], ["out2"])]
    m = golden.model(nodes, [("x", [2, 3])], [("out", [2, 3]), ("out2", [2, 3])], [])
    result = verify(m, m, engine="openvino")
    assert result.ok and sorted(o.name for o in result.outputs) == ["out", "out2"]


@needs_openvino
def test_openvino_judges_an_fp16_model_at_fp16(sample_files):
    # OpenVINO runs float32 kernels on decompressed float16 weights; the values are still
    # float16-rounded, so float16 tolerances apply, read from the graph's own types.
    result = verify(sample_files["original"], sample_files["fp16"], engine="openvino")
    assert result.ok, [(m.name, m.max_rel_error, m.tolerance) for m in result.outputs]
    assert result.engine["precision"] == "float16"


@needs_openvino
def test_openvino_input_of_the_wrong_dtype_is_one_line(sample_files, tmp_path):
    npz = tmp_path / "x64.npz"
    np.savez(npz, input=np.zeros((2, 3, 16, 16), np.float64))
    run = CliRunner().invoke(cli, ["bench", sample_files["original"], "--engine", "openvino",
                                   "--inputs", str(npz), "--min-time", "0.01"])
    assert run.exit_code == 1
    assert "float64" in run.output and "Traceback" not in run.output


class OffsetEngine:
    """ORT on the CPU, except that every float output comes back offset by 1% of its scale: an
    engine that computes any model differently from the reference."""

    name = "offset"

    def __init__(self, options):
        from bnfold.deploy.engines.ort import OrtCpuEngine

        self._inner, self.notes = OrtCpuEngine(options), []

    def open(self, label, model, feed):
        session = self._inner.open(label, model, feed)
        exact = session.outputs
        session.outputs = lambda feed=None: {
            name: value + np.float32(0.01) * np.abs(value).max() if value.dtype.kind == "f"
            else value for name, value in exact(feed).items()}
        return session

    def environment(self):
        return {}


@pytest.mark.parametrize("candidate,matches", [("folded", True), ("wrong", False)])
def test_a_failure_on_the_engine_says_whose_difference_it_is(monkeypatch, sample_files,
                                                              candidate, matches):
    """An engine that computes the original as differently as the folded model: the folded one
    fails against ONNX Runtime, but the report says it matches the original on that engine.
    A wrong candidate differs from both."""
    from bnfold.deploy import engines

    from bnfold.verification.ort_runner import OrtRunner

    monkeypatch.setitem(engines.ENGINES, "offset", (__name__, "OffsetEngine", "test"))
    optimised_sessions = []
    plain_session = OrtRunner.session
    monkeypatch.setattr(OrtRunner, "session", lambda self, payload, role, optimised=False: (
        optimised_sessions.append(role) if optimised else None,
        plain_session(self, payload, role, optimised))[1])
    result = verify(sample_files["original"], sample_files[candidate], engine="offset",
                    ground_truth=False)
    assert not result.ok
    record = result.engine["reference_on_engine"]
    assert not record["reference_ok"] and record["candidate_matches_reference"] is matches
    worst = max(record["reference"], key=lambda m: m["max_rel_error"])
    assert 0.009 < worst["max_rel_error"] < 0.03  # the engine's 1% offset, against ORT
    # three judgements against the reference's noise, one optimised ORT run to measure it
    assert optimised_sessions == ["reference (optimised)"]
    (note,) = [n for n in result.notes if n.startswith("the reference ")]
    if matches:
        assert note.startswith("the reference itself differs on offset (")
        assert note.endswith("): the difference is offset's, not the candidate's")
        assert all(m["max_rel_error"] < 1e-5 for m in record["candidate_vs_reference"])
    else:
        assert note.startswith("the reference also differs on offset (")
        assert "and there the candidate differs from it too (head_bn.out: " in note


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_a_scalar_input_reaches_the_engine_as_a_scalar(tmp_path, engine):
    """A 0-d feed (a temperature, a scale, a piece `verify --repro` cut) stays 0-d on its way to
    the engine: np.ascontiguousarray made it [1], which OpenVINO refused."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), golden.bn_node("c", "b"),
             helper.make_node("Mul", ["b", "s"], ["y"])]
    w = golden.rng(6).normal(size=(3, 2, 1, 1)).astype(np.float32)
    model = golden.model(nodes, [("x", [1, 2, 4, 4]), ("s", [])], [("y", None)],
                         [golden.tensor("w", w), *golden.bn_params("bn", 3)])
    save_model(model, str(tmp_path / "m.onnx"))
    save_model(fold(model).model, str(tmp_path / "f.onnx"))
    result = verify(str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx"), engine=engine,
                    ground_truth=False)
    assert result.ok and result.shapes["s"] == []
    assert result.outputs[0].max_rel_error < 1e-5
