"""The benchmark's model generators (tools/onnx_models.py) build valid, runnable, seeded models."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "onnx_models.py"
_SPEC = importlib.util.spec_from_file_location("onnx_models", _PATH)
onnx_models = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(onnx_models)

SMALL = dict(width=0.125, resolution=32)
# (BatchNormalization nodes, of which directly after a Conv or Gemm), counted from the architectures
EXPECTED_BN = {
    "resnet50": (53, 53),  # stem + 16 blocks x 3 + 4 downsample shortcuts
    "mobilenetv2": (52, 52),  # stem + 2 (t=1 block) + 16 x 3 + last 1x1 conv
    "densenet121": (121, 62),  # stem + 58 layers x 2 + 3 transitions + final; pre-activation ones not
    "vgg16": (15, 15),  # 13 convs + 2 in the Gemm head
}


def _ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # ORT would otherwise fold the BNs itself; the models must run as written
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def test_names_cover_expected_models():
    assert set(onnx_models.NAMES) == set(EXPECTED_BN)


@pytest.mark.parametrize("name", onnx_models.NAMES)
def test_small_variant_is_valid_and_runs(name):
    model = onnx_models.build(name, seed=0, **SMALL)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, 32, 32]

    session = _ort_session(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (2, 1000)
    assert np.isfinite(logits).all()
    # neither vanished nor exploded through the depth
    assert 1e-2 < np.abs(logits).max() < 1e3


@pytest.mark.parametrize("name", onnx_models.NAMES)
def test_batchnorm_count_and_placement(name):
    model = onnx_models.build(name, seed=0, **SMALL)
    producers = {out: node for node in model.graph.node for out in node.output}
    batchnorms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    after_linear = [n for n in batchnorms
                    if n.input[0] in producers and producers[n.input[0]].op_type in ("Conv", "Gemm")]
    assert (len(batchnorms), len(after_linear)) == EXPECTED_BN[name]


@pytest.mark.parametrize("name", onnx_models.NAMES)
def test_batchnorm_statistics_are_realistic(name):
    model = onnx_models.build(name, seed=0, **SMALL)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        gamma, _, _, var = (weights[i] for i in node.input[1:])
        # the residual-branch BNs of resnet50 have γ scaled down by RESIDUAL_GAIN
        low = 0.5 * min(1.0, onnx_models.RESIDUAL_GAIN)
        assert low <= gamma.min() and gamma.max() <= 1.5
        assert 0.5 <= var.min() and var.max() <= 2.0


def test_build_is_seeded():
    a = onnx_models.build("mobilenetv2", seed=3, **SMALL)
    b = onnx_models.build("mobilenetv2", seed=3, **SMALL)
    c = onnx_models.build("mobilenetv2", seed=4, **SMALL)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_full_size_resnet50_has_resnet50_parameter_count():
    model = onnx_models.build("resnet50")
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    # torchvision's resnet50 has 25.56M parameters (BN running stats counted here too)
    assert 25.5e6 < params < 25.7e6


def test_main_writes_each_model(tmp_path):
    assert onnx_models.main(["--out", str(tmp_path), "--width", "0.125", "--resolution", "32",
                             "--models", "vgg16", "densenet121"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["densenet121.onnx", "vgg16.onnx"]
    onnx.checker.check_model(str(tmp_path / "vgg16.onnx"))


@pytest.mark.parametrize("kwargs", [dict(resolution=100), dict(width=0), dict(resolution=0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        onnx_models.build("resnet50", **kwargs)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        onnx_models.build("resnet18")
