"""Every sample exports with all its BatchNorms kept, matches torch in ORT, and folds correctly."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold.pytorch import zoo  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pytorch.export import count_bn_modules, export_onnx  # noqa: E402

# BN modules per sample, counted by hand from bnfold/zoo/nets.py (not from the code under test).
EXPECTED_BN = {"paper-mlp": 3, "resnet18": 20, "mobilenetv2": 14, "convtranspose-decoder": 2,
               "conv1d": 3, "preact": 5}
# preact: BN → ReLU → Conv has nothing to fold into, except the bn2 of each block (after conv1).
EXPECTED_FOLDED = {**EXPECTED_BN, "preact": 2}


def ort_run(path_or_model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_sample_names_match_expectations():
    assert set(zoo.SAMPLE_NAMES) == set(EXPECTED_BN)


@pytest.mark.parametrize("name", zoo.SAMPLE_NAMES)
def test_sample_exports_keeps_every_bn_and_folds_to_torch_numbers(name, tmp_path):
    model = zoo.randomize_batchnorm(zoo.create(name), seed=1)
    assert not model.training
    assert count_bn_modules(model) == EXPECTED_BN[name]
    path = str(tmp_path / f"{name}.onnx")
    result = export_onnx(model, zoo.default_input_shape(name), path)

    exported = onnx.load(path)
    onnx.checker.check_model(exported)
    bn_nodes = [n for n in exported.graph.node if n.op_type == "BatchNormalization"]
    assert result.bn_modules == result.bn_nodes == len(bn_nodes) == EXPECTED_BN[name]
    for node in bn_nodes:
        assert len(node.output) == 1
        assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")
    assert result.max_rel_error < 1e-5, result

    folded = bnfold.fold(path)
    assert folded.report.folded_count == EXPECTED_FOLDED[name], folded.report.to_dict()
    remaining = sum(n.op_type == "BatchNormalization" for n in folded.model.graph.node)
    assert remaining == EXPECTED_BN[name] - EXPECTED_FOLDED[name]
    x = np.random.default_rng(2).standard_normal(zoo.default_input_shape(name)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).double().numpy()
    got = ort_run(folded.model, x).astype(np.float64)
    # Folding rounds W·s to float32 once per layer; through up to ~20 stacked layers (resnet18)
    # those roundings compound, so 1e-4 of the output scale, not fp32 epsilon, is the bound.
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    # The bound is tight enough to notice wrong BN statistics (so this test can fail).
    other = zoo.randomize_batchnorm(copy.deepcopy(model), seed=2)
    with torch.no_grad():
        other_out = other(torch.from_numpy(x)).double().numpy()
    assert np.abs(other_out - expected).max() > 100 * 1e-4 * scale


def test_dynamic_batch_export_runs_other_batch_sizes(tmp_path):
    model = zoo.randomize_batchnorm(zoo.create("conv1d"))
    path = str(tmp_path / "c.onnx")
    result = export_onnx(model, (1, 4, 64), path, dynamic_batch=True)
    assert result.dynamic_batch
    x = np.random.default_rng(0).standard_normal((5, 4, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(path, x), expected, rtol=1e-5, atol=1e-5)


def test_export_does_not_switch_the_callers_model_to_eval(tmp_path):
    model = zoo.create("conv1d").train()
    export_onnx(model, (1, 4, 64), str(tmp_path / "c.onnx"))
    assert model.training


def test_untrained_bn_statistics_stay_foldable_constants(tmp_path):
    # A fresh BN's running_mean equals its bias (zeros): the TorchScript exporter deduplicates
    # them into Identity nodes, which export_onnx turns back into initializers.
    path = str(tmp_path / "fresh.onnx")
    export_onnx(zoo.create("conv1d"), (1, 4, 64), path)
    assert not [n for n in onnx.load(path).graph.node if n.op_type == "Identity"]
    assert bnfold.fold(path).report.folded_count == 3


def test_bn_without_running_stats_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(BnfoldError, match="track_running_stats"):
        export_onnx(model, (1, 3, 8, 8), str(tmp_path / "x.onnx"))


def test_wrong_input_shape_is_a_user_error(tmp_path):
    with pytest.raises(BnfoldError, match=r"fails on the example inputs \(x 1x5x32x32 float32\)"
                       r" \(RuntimeError: Given groups=1.*expected input\[1, 5, 32, 32\] to have 3 "
                       r"channels.*give inputs that fit forward\(\) with --input-shape"):
        export_onnx(zoo.create("resnet18"), (1, 5, 32, 32), str(tmp_path / "x.onnx"))
    assert not os.path.exists(tmp_path / "x.onnx")


def test_checkpoint_round_trip_and_wrapped_state_dict(tmp_path):
    source = zoo.randomize_batchnorm(zoo.create("mobilenetv2"), seed=3)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for path in (plain, wrapped):
            loaded = zoo.create("mobilenetv2", str(path))
            assert not loaded.training
            assert torch.equal(loaded(x), source(x))


def test_paper_mlp_checkpoint_sets_input_width_and_arm(tmp_path):
    from bnfold.pytorch.zoo.nets import PaperMLP

    path = tmp_path / "mnist.pt"
    torch.save(PaperMLP(in_features=784, batchnorm=False).state_dict(), path)
    model = zoo.create("paper-mlp", str(path))
    assert model.in_features == 784 and count_bn_modules(model) == 0
    assert zoo.model_input_shape("paper-mlp", model) == (1, 784)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"not a zip or pickle"), "is not a PyTorch checkpoint"),
        (lambda p: torch.save([torch.zeros(1)], p), "not a state_dict"),
        (lambda p: torch.save({"fc.weight": torch.zeros(10, 64)}, p), "missing stem.0.weight"),
    ],
    ids=["missing", "corrupt", "not-a-dict", "wrong-keys"],
)
def test_bad_checkpoints_raise_user_errors(tmp_path, setup, message):
    path = tmp_path / "bad.pt"
    setup(path)
    with pytest.raises(BnfoldError, match=message) as info:
        zoo.create("resnet18", str(path))
    assert "\n" not in str(info.value)


def test_checkpoint_with_wrong_shapes_names_them(tmp_path):
    state = zoo.create("conv1d").state_dict()
    state["fc.weight"] = torch.zeros(3, 32)
    path = tmp_path / "shapes.pt"
    torch.save(state, path)
    with pytest.raises(BnfoldError, match=r"fc.weight \(3, 32\) vs \(10, 32\)"):
        zoo.create("conv1d", str(path))


def test_unexpected_keys_are_listed(tmp_path):
    state = zoo.create("conv1d").state_dict()
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(BnfoldError, match="unexpected extra.weight"):
        zoo.create("conv1d", str(path))


def test_module_factory_specs(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).train()
        def not_a_model():
            return 42
        value = 3
    """))
    monkeypatch.chdir(tmp_path)  # like the CLI: the working folder is searched too
    model = zoo.create("my_nets:build")
    assert isinstance(model, torch.nn.Module) and not model.training
    with pytest.raises(BnfoldError, match="not a torch.nn.Module"):
        zoo.create("my_nets:not_a_model")
    with pytest.raises(BnfoldError, match="no callable 'value'"):
        zoo.create("my_nets:value")
    with pytest.raises(BnfoldError, match="cannot import 'no_such_module_xyz'"):
        zoo.create("no_such_module_xyz:build")
    with pytest.raises(BnfoldError, match="unknown model"):
        zoo.create("resnet-9000")
    with pytest.raises(BnfoldError, match="module:factory"):
        zoo.create(":build")
    with pytest.raises(BnfoldError, match="--input-shape"):
        zoo.default_input_shape("my_nets:build")


def test_torchvision_spec_without_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(BnfoldError, match="needs torchvision"):
            zoo.create("torchvision:resnet18")
    else:
        assert count_bn_modules(zoo.create("torchvision:resnet18")) == 20


def test_importing_the_torch_side_does_not_import_torch():
    code = (
        "import sys, bnfold, bnfold.cli.torch_commands, bnfold.pytorch.zoo, bnfold.pytorch.export, bnfold.pytorch.train, "
        "bnfold.pytorch.train.data, bnfold.pytorch.train.paper, bnfold.pytorch.train.loop, bnfold.pytorch.train.recalibrate; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Branchy(torch.nn.Module):
    """Takes a Python branch on its input's values: the trace records one path only."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x * 2 if float(x.sum()) > 0 else x * -3)


class _Cancelling(torch.nn.Module):
    """Two near-equal channels of ~1e4 subtracted: its float32 output is ~3e-3 of its scale
    away from float64, far over export's 1e-4 parity bound between float32 runs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(16, 8, 3, 3, generator=g) * 1e4
        self.conv = torch.nn.Conv2d(8, 32, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([w, w * (1 + 1e-4 * torch.randn(w.shape, generator=g))]))
        self.bn = torch.nn.BatchNorm2d(16)

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h[:, :16] - h[:, 16:])


def test_export_that_took_a_branch_is_refused_with_the_float64_evidence(tmp_path):
    with pytest.raises(BnfoldError) as caught:
        for seed in range(8):  # some seed makes the examples and the parity inputs disagree
            export_onnx(_Branchy().eval(), [(2, 4)], tmp_path / "b.onnx", seed=seed)
    message = str(caught.value)
    assert "differs from torch" in message and "make it traceable" in message
    assert "against the model in float64, torch's float32 output is" in message


def test_float64_verdict_accepts_an_export_as_exact_as_torch_and_refuses_one_further():
    from bnfold.pytorch.export_float64 import float64_verdict

    model = _Cancelling().eval()
    x = torch.randn(1, 8, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y32 = model(x)
        y64 = copy.deepcopy(model).double()(x.double())
    own = (y32.double() - y64).abs().max().item() / y64.abs().max().item()
    assert own > 1e-5  # the model amplifies float32 rounding (the export check allows 1e-4)
    mirrored = (2 * y64 - y32.double()).numpy()  # as far from float64 as torch, other side
    accepted, said = float64_verdict(torch, model, [([x], [y32], [mirrored])], 1e-4)
    assert accepted and "as close to float64 as torch is" in said
    wrong = y32.double().numpy() + 50 * (y32.double() - y64).abs().max().item()
    accepted, said = float64_verdict(torch, model, [([x], [y32], [wrong])], 1e-4)
    assert not accepted and said.startswith("against the model in float64")


class _DataDependentCount(torch.nn.Module):
    """Splits what a mask keeps: the count depends on the values, the trace fixes it."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(16)

    def forward(self, x):
        kept = self.bn(x)
        kept = kept[kept > 0]
        first, rest = torch.split(kept, [1, int(kept.shape[0]) - 1])
        return first + rest.sum()


def test_export_whose_sizes_depend_on_values_says_so(tmp_path):
    with pytest.raises(BnfoldError, match="runs the export on the inputs it was traced with but "
                                          "not on fresh random ones") as caught:
        export_onnx(_DataDependentCount().eval(), [(2, 16)], tmp_path / "d.onnx")
    assert "sizes in the forward depend on the input's values" in str(caught.value)
    assert not (tmp_path / "d.onnx").exists()
