"""The engine registry, lazy imports, missing-library errors, ORT CPU and torch sessions."""

import subprocess
import sys

import numpy as np
import pytest

import bnfold
from bnfold.deploy.bench import bench_models
from bnfold.deploy.engines import ENGINES, EngineOptions, best_available, get_engine
from bnfold.deploy.engines.ort import cuda_provider_available
from bnfold.errors import BnfoldError
from bnfold.sample_model import build_sample_model

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

BUDGET = {"runs": 20, "min_time": 0.02, "warmup_time": 0.0}


def test_importing_the_cli_loads_neither_torch_nor_tensorrt():
    code = ("import sys, bnfold, bnfold.cli, bnfold.cli.deploy_commands, bnfold.deploy.engines, bnfold.deploy.bench; "
            "bad = [m for m in ('torch', 'tensorrt', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_registry_is_explicit_and_unknown_engine_is_refused():
    assert set(ENGINES) == {"ort-cpu", "ort-cuda", "trt", "torch", "openvino"}
    with pytest.raises(BnfoldError, match="unknown engine 'tvm'.*ort-cpu"):
        get_engine("tvm")


def test_best_available_explains_its_choice():
    name, why = best_available()
    assert name in ("trt", "ort-cuda", "ort-cpu") and why
    if not cuda_provider_available():
        assert name in ("trt", "ort-cpu")


@pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed here")
def test_ort_cuda_missing_says_to_uninstall_onnxruntime_first():
    with pytest.raises(BnfoldError, match="pip uninstall onnxruntime && pip install bnfold\\[gpu\\]"):
        get_engine("ort-cuda")


def test_ort_cpu_bench_original_vs_folded():
    model = build_sample_model()
    folded = bnfold.fold(model).model
    result = bench_models([("original", model), ("folded", folded)], "ort-cpu",
                          shapes={"input": (2, 3, 32, 32)}, options=EngineOptions(threads=1),
                          **BUDGET)
    assert [m.label for m in result.models] == ["original", "folded"]
    assert all(m.host.runs >= 20 and m.gpu is None for m in result.models)
    assert result.environment["intra_op_num_threads"] == 1
    assert any("ORT_ENABLE_ALL" in note for note in result.notes)


def test_ort_cpu_bad_feed_is_a_clear_error():
    with pytest.raises(BnfoldError, match="cannot run original"):
        bench_models([("original", build_sample_model())], "ort-cpu",
                     inputs={"input": np.zeros((2, 3, 5), np.float32)}, **BUDGET)


def test_ort_cpu_opens_a_model_given_as_path_proto_or_bytes(tmp_path):
    """verify hands engines serialized models of its own (the reference after a failure,
    outputs marked by --locate): all three forms give the same outputs."""
    model = build_sample_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    feed = {"input": np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)}
    engine = get_engine("ort-cpu", EngineOptions())
    values = []
    for form in (str(path), model, model.SerializeToString()):
        opened = engine.open("m", form, feed)
        values.append(opened.outputs(feed))
        opened.close()
    assert all(np.array_equal(v["head_bn.out"], values[0]["head_bn.out"]) for v in values)


def make_tiny_net():
    """A factory for `--model test_engines:make_tiny_net` (Conv→BN→ReLU, Linear→BN)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6))
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_fuse_bn_fuses_conv_and_linear_pairs_exactly():
    from bnfold.deploy.engines.torch_engine import fuse_bn

    net = make_tiny_net()
    x = torch.randn(4, 3, 8, 8)
    fusion = fuse_bn(net, [x])
    fused, count = fusion.module, len(fusion.fused)
    assert count == 2 and fusion.skipped == []
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    with torch.no_grad():
        expected, got = net(x), fused(x)
    assert float((expected - got).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_fuse_bn_leaves_a_shared_conv_output_alone():
    from bnfold.deploy.engines.torch_engine import fuse_bn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    fusion = fuse_bn(Branchy().eval())
    assert fusion.fused == []
    assert fusion.skipped == ["conv→bn: the producer's output also feeds something else"]


def test_torch_engine_benches_original_and_fused():
    from bnfold.deploy.engines.torch_engine import torch_models

    models, feed, notes = torch_models("test_engines:make_tiny_net", None, (2, 3, 8, 8), seed=0)
    assert notes == []
    assert [label for label, _ in models] == ["original", "fused (2 BN)"]
    result = bench_models(models, "torch", inputs=feed, **BUDGET)
    assert all(m.host.runs >= 20 for m in result.models)
    assert result.environment["torch"] == torch.__version__


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_provider_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_ort_cuda_bench_reports_gpu_and_host_time():
    model = build_sample_model()
    result = bench_models([("original", model)], "ort-cuda", shapes={"input": (2, 3, 32, 32)},
                          **BUDGET)
    m = result.models[0]
    assert m.host.runs >= 20
    if torch.cuda.is_available():
        assert m.gpu is not None and m.enqueue is not None


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_provider_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_ort_cuda_graphs_refuse_transfers():
    with pytest.raises(BnfoldError, match="--cuda-graphs"):
        get_engine("ort-cuda", EngineOptions(cuda_graphs=True, include_transfers=True))


@pytest.mark.parametrize("text,said", [
    # silero-vad with an If inlined: OpenVINO 2026.4's message, first line and all
    ("Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'false' failed at src/frontends/"
     "common_translators/src/unconverted_ops_report.cpp:151:\nFrontEnd API failed with "
     "OpConversionFailure:\nModel wasn't fully converted. Failed operations detailed log:\n-- "
     "Conv-16 with a message:\nWhile validating ONNX node '<Node(Conv): c>': Check 'data."
     "get_partial_shape().rank().is_static()' failed at src/frontends/onnx/frontend/src/op/"
     "conv.cpp:38:\nFrontEnd API failed with GeneralFailure:\nThe input data tensor's rank has to "
     "be known (static)\n\nSummary:\n-- Conversion is failed for: Conv-16, ReduceMean-16\n\n",
     "Conversion is failed for: Conv-16, ReduceMean-16 (The input data tensor's rank has to be "
     "known (static))"),
    ("Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'false' failed at src/frontends/"
     "common_translators/src/unconverted_ops_report.cpp:151:\nFrontEnd API failed with "
     "OpConversionFailure:\nModel wasn't fully converted.\nSummary:\n-- No conversion rule found "
     "for operations: ai.onnx.ml.LabelEncoder\n\n",
     "No conversion rule found for operations: ai.onnx.ml.LabelEncoder"),
    ("plain message", "plain message"),
])
def test_openvino_errors_are_told_by_their_cause_not_the_file_that_raised_them(text, said):
    from bnfold.deploy.engines.openvino import openvino_message

    assert openvino_message(RuntimeError(text)) == said
