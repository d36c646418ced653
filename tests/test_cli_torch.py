"""export / train / recalibrate through click, on a throwaway BnfoldGroup (error translation included)."""

from __future__ import annotations

import os
import sys

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from bnfold.pytorch import zoo  # noqa: E402
from bnfold.cli.common import BnfoldGroup  # noqa: E402
from bnfold.cli import cli as bnfold_cli  # noqa: E402
from bnfold.cli.torch_commands import export_command, recalibrate_command, train_command  # noqa: E402


@pytest.fixture
def cli():
    @click.group(cls=BnfoldGroup)
    def group():
        pass

    for command in (export_command, train_command, recalibrate_command):
        group.add_command(command)
    return group


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, fragment: str):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and fragment in message
    assert len(message.splitlines()) == 1, message


def test_export_happy_path(cli, tmp_path):
    out = tmp_path / "r.onnx"
    result = invoke(cli, "export", "--model", "resnet18", "-o", out, "--dynamic-batch")
    assert result.exit_code == 0, result.output
    assert "20 modules → 20 ONNX BatchNormalization nodes" in result.output
    assert "max abs error" in result.output
    model = onnx.load(str(out))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 20
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_export_with_checkpoint_and_shape(cli, tmp_path):
    checkpoint = tmp_path / "c.pt"
    torch.save(zoo.randomize_batchnorm(zoo.create("resnet18")).state_dict(), checkpoint)
    out = tmp_path / "r.onnx"
    result = invoke(cli, "export", "--model", "resnet18", "--checkpoint", checkpoint,
                    "--input-shape", "2x3x24x24", "--opset", "13", "-o", out)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 24, 24]
    assert model.opset_import[0].version == 13


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "resnet18", "--checkpoint", "missing.pt"], "does not exist"),
        (["--model", "no_such_mod_q:build"], "cannot import 'no_such_mod_q'"),
        (["--model", "bnfold.errors:BnfoldError"], "not a torch.nn.Module"),
        (["--model", "resnet18", "--input-shape", "1x7x32x32"],
         "fails on the example inputs (x 1x7x32x32 float32)"),
        (["--model", "bnfold.pytorch.zoo.nets:ResNet18"], "pass one with --input-shape"),
    ],
)
def test_export_user_errors_are_one_line(cli, tmp_path, args, fragment):
    assert_user_error(invoke(cli, "export", *args, "-o", tmp_path / "x.onnx"), fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_export_wrong_checkpoint_lists_keys(cli, tmp_path):
    checkpoint = tmp_path / "c.pt"
    torch.save(zoo.create("conv1d").state_dict(), checkpoint)
    result = invoke(cli, "export", "--model", "resnet18", "--checkpoint", checkpoint, "-o", tmp_path / "x.onnx")
    assert_user_error(result, "missing stem.0.weight")


@pytest.mark.parametrize("args", [
    ["export", "--model", "resnet18"],  # no -o
    ["export", "--model", "resnet18", "--input-shape", "1xax3", "-o", "x.onnx"],
    ["train"],
])
def test_usage_errors_exit_2(cli, args):
    assert invoke(cli, *args).exit_code == 2


def test_train_paper_tiny(cli, tmp_path):
    result = invoke(cli, "train", "paper", "--steps", "20", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "lr 0.5" in result.output and "plain SGD" in result.output
    assert "final test accuracy" in result.output
    for name in ("curve.csv", "curve.png", "paper-mlp-bn.pt"):
        assert (tmp_path / "p" / name).is_file()


def test_train_sample_needs_npz(cli, tmp_path):
    assert_user_error(invoke(cli, "train", "conv1d", "--out", tmp_path), "needs --data file.npz")
    assert_user_error(invoke(cli, "train", "alexnet", "--data", "x.npz", "--out", tmp_path),
                      "unknown sample 'alexnet'")
    assert_user_error(invoke(cli, "train", "conv1d", "--data", tmp_path / "x.npz", "--out", tmp_path),
                      "does not exist")


def test_train_sample_and_recalibrate(cli, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=3 + rng.standard_normal((64, 4, 64)), y_train=rng.integers(0, 10, 64),
             x_test=rng.standard_normal((8, 4, 64)), y_test=rng.integers(0, 10, 8))
    result = invoke(cli, "train", "conv1d", "--data", data, "--out", tmp_path, "--steps", "3",
                    "--batch-size", "8")
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "conv1d.pt"
    assert checkpoint.is_file()

    out = tmp_path / "recal.pt"
    result = invoke(cli, "recalibrate", "--model", "conv1d", "--checkpoint", checkpoint,
                    "--data", data, "--batches", "4", "--batch-size", "16", "-o", out)
    assert result.exit_code == 0, result.output
    assert "recalibrated 3 BatchNorm layers over 4 batches of 16" in result.output
    before = zoo.create("conv1d", str(checkpoint)).features[1].running_mean
    after = zoo.create("conv1d", str(out)).features[1].running_mean
    assert not torch.allclose(before, after)

    assert_user_error(invoke(cli, "recalibrate", "--model", "conv1d", "--checkpoint", checkpoint,
                             "--data", data, "-o", checkpoint), "is the input checkpoint")
    assert_user_error(invoke(cli, "recalibrate", "--model", "resnet18", "--checkpoint", out,
                             "--data", data, "-o", tmp_path / "y.pt"), "does not fit the model")


def test_export_cli_named_integer_inputs_dynamic_dims_and_output_names(cli, tmp_path):
    out = tmp_path / "t.onnx"
    result = invoke(cli, "export", "--model", "user_models:token_conv",
                    "--input-shape", "ids:batch=2xlength=7:int64", "--input-shape", "mask:2x7",
                    "--dynamic", "mask:0=batch", "--dynamic", "mask:1=length",
                    "--output-name", "h", "--output-name", "mean", "--output-name", "last",
                    "-o", out)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "inputs ids 2x7, mask 2x7; ids 2x7, mask 2x7; ids 4x14, mask 4x14" in output
    assert ("inputs ids:batch=2xlength=7:int64, mask:batch=2xlength=7:float32 → outputs h, "
            "mean, last") in output
    graph = onnx.load(str(out)).graph
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input] == [["batch", "length"], ["batch", "length"]]
    assert [o.name for o in graph.output] == ["h", "mean", "last"]


def test_export_cli_example_inputs_from_npz(cli, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "x.npz"
    np.savez(npz, ids=rng.integers(0, 30, (1, 5)), mask=np.ones((1, 5), np.float32))
    result = invoke(cli, "export", "--model", "user_models:token_conv", "--inputs", npz,
                    "-o", tmp_path / "t.onnx")
    assert result.exit_code == 0, result.output
    assert "ids:1x5:int64, mask:1x5:float32" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--model", "user_models:uses_vdot", "--input-shape", "1x3x6x6"],
     "torch's ONNX exporter (TorchScript, opset 17) has no ONNX form for aten::vdot: replace it "
     "in the model with supported operations, or register one with "
     "torch.onnx.register_custom_op_symbolic"),
    (["--model", "user_models:baked_reshape", "--input-shape", "1x3x6x6", "--dynamic-batch"],
     "the model does not run with batch=2 instead of 1 (RuntimeError: mat1 and mat2 shapes "
     "cannot be multiplied (1x128 and 64x5))"),
    (["--model", "user_models:two_inputs", "--input-shape", "2x3x8x8"],
     "forward() needs argument 'side', which was not given: add an input for it (--input-shape "
     "side:DIMS[:DTYPE], or an array named side in --inputs)"),
    (["--model", "user_models:with_width", "--input-shape", "1x3x8x8"],
     "user_models:with_width needs arguments (width): give them in the spec, e.g. "
     "user_models:with_width(width=...) (literals), or add a factory that takes none"),
    (["--model", "user_models:conv_bn", "--input-shape", "1x3x8x8:float16"],
     "the model fails on the example inputs (input 1x3x8x8 float16) (RuntimeError: Input type "
     "(c10::Half) and bias type (float) should be the same)"),
    (["--model", "user_models:conv_bn", "--input-shape", "1x3x8x8", "--inputs", "x.npz"],
     "give --input-shape or --inputs, not both: the .npz fixes the shapes"),
])
def test_export_failures_are_one_line_with_nothing_on_stdout(cli, tmp_path, capfd, args, message):
    result = invoke(cli, "export", *args, "-o", tmp_path / "x.onnx")
    assert_user_error(result, message)
    assert result.stdout == ""
    captured = capfd.readouterr()  # what torch's C++ side would print bypasses sys.stdout
    assert captured.out == "" and "Traceback" not in captured.err
    assert not (tmp_path / "x.onnx").exists()


def test_factory_help_says_how_to_give_arguments(cli):
    result = invoke(cli, "export", "--help")
    assert ("module:factory or file.py:factory (a function that returns the nn.Module; literal "
            "arguments in the spec: \"timm:create_model('resnet18', num_classes=10)\")"
            in " ".join(result.output.split()))


def test_train_factory_with_data_writes_a_checkpoint(cli, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.standard_normal((32, 3, 8, 8)), y_train=rng.integers(0, 4, 32),
             x_test=rng.standard_normal((8, 3, 8, 8)), y_test=rng.integers(0, 4, 8))
    result = invoke(cli, "train", "user_models:classifier", "--data", data, "--out", tmp_path,
                    "--steps", "2", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "user_models.classifier.pt"
    assert checkpoint.is_file()
    zoo.create("user_models:classifier", str(checkpoint))  # loads back strictly


def test_train_refuses_before_any_work(cli, tmp_path):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.standard_normal((8, 5)), y_train=rng.integers(0, 2, 8),
             x_test=rng.standard_normal((4, 5)), y_test=rng.integers(0, 2, 4))
    for args, fragment in [
        (["user_models:classifier", "--out", tmp_path], "needs --data file.npz"),
        (["no_such_mod_q:build", "--data", data, "--out", tmp_path],
         "cannot import 'no_such_mod_q'"),
        (["user_models:classifier", "--data", data, "--out", tmp_path, "--batch-size", "4"],
         "samples of shape (5,) do not fit the model"),
    ]:
        result = invoke(cli, "train", *args)
        assert_user_error(result, fragment)
        assert "train " not in result.stdout  # no progress bar was drawn


def test_recalibrate_keeps_integer_inputs(cli, tmp_path):
    from bnfold.pytorch.train.files import save_state_dict

    checkpoint = tmp_path / "t.pt"
    save_state_dict(zoo.create("user_models:token_only"), checkpoint)
    data = tmp_path / "ids.npz"
    np.savez(data, x_train=np.random.default_rng(0).integers(0, 30, (64, 7)))
    result = invoke(cli, "recalibrate", "--model", "user_models:token_only", "--checkpoint",
                    checkpoint, "--data", data, "--batches", "2", "--batch-size", "16",
                    "-o", tmp_path / "r.pt")
    assert result.exit_code == 0, result.output
    assert "recalibrated 1 BatchNorm layers over 2 batches of 16" in result.output


def importable(folder, monkeypatch, module: str, source: str) -> None:
    """Write `folder/<module>.py` and make it importable afresh (`module` may be `pkg/__init__`)."""
    (folder / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module.split("/")[0], raising=False)


def test_a_torchvision_that_does_not_match_torch_is_one_line(tmp_path, monkeypatch):
    # What a torchvision built for another torch does at import.
    (tmp_path / "torchvision").mkdir()
    importable(tmp_path, monkeypatch, "torchvision/__init__",
               "raise RuntimeError('operator torchvision::nms does not exist')\n")
    result = CliRunner().invoke(bnfold_cli, ["export", "--model", "torchvision:resnet18", "-o",
                                      str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "does not match torch" in result.output and "Traceback" not in result.output


def test_a_user_module_that_raises_at_import_is_one_line(tmp_path, monkeypatch):
    importable(tmp_path, monkeypatch, "brokennet", "raise ValueError('bad config')\n")
    result = CliRunner().invoke(bnfold_cli, ["export", "--model", "brokennet:build", "-o",
                                      str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "importing 'brokennet' failed (ValueError: bad config)" in result.output


USER_MODULE = '''
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, mask=None):
        y = self.bn(self.conv(x))
        return y if mask is None else y * mask

def boom():
    raise ValueError("factory exploded")

def compiled():
    return torch.compile(Net().eval())

def masked():
    return Net().eval()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    importable(tmp_path, monkeypatch, "reviewnets", USER_MODULE)
    return tmp_path


def test_a_factory_that_raises_is_one_line(user_module):
    result = CliRunner().invoke(bnfold_cli, ["export", "--model", "reviewnets:boom",
                                             "--input-shape", "1x3x8x8", "-o",
                                             str(user_module / "m.onnx")])
    assert result.exit_code == 1
    assert "reviewnets:boom() raised ValueError: factory exploded" in result.output
    assert "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")
def test_torch_compiled_factory_is_unwrapped_for_export(user_module):
    out = user_module / "m.onnx"
    result = CliRunner().invoke(bnfold_cli, ["export", "--model", "reviewnets:compiled",
                                             "--input-shape", "x:1x3x8x8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "OptimizedModule" in result.output
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 1


def test_torch_bench_on_a_forward_with_an_optional_argument_is_one_line(user_module):
    # Without `mask`, fx traces `mask is None` the other way and the fused module fails when
    # run: one line that says so, not a traceback.
    result = CliRunner().invoke(bnfold_cli, ["bench", "--engine", "torch", "--model",
                                             "reviewnets:masked", "--shape", "x=1x3x8x8",
                                             "--min-time", "0.01"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "torch.fx could not trace its forward" in result.output


DEFAULTS_MODULE = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale: float = 2.0, flag: bool = False):
        return self.bn(self.conv(x)) * scale

class KwOnly(Net):
    def forward(self, x, *, scale=2.0):
        return self.bn(self.conv(x)) * scale

def build():
    return Net().eval()

def kwonly():
    return KwOnly().eval()
'''


@pytest.mark.parametrize("factory", ["build", "kwonly"])
def test_forward_with_default_or_keyword_only_arguments_exports(tmp_path, monkeypatch, factory):
    importable(tmp_path, monkeypatch, "defaultnets", DEFAULTS_MODULE)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(bnfold_cli, ["export", "--model", f"defaultnets:{factory}",
                                             "--input-shape", "1x3x8x8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["x"]
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 1


LAZY_MODULE = '''
import torch.nn as nn

def lazy():
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()

def plain():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
'''


@pytest.mark.parametrize("args,text", [
    (["--model", "lazynets:lazy"], "uninitialised Lazy* parameters: run one forward"),
    (["--model", "lazynets:plain", "--opset", "99"], "writes opsets up to"),
])
def test_lazy_modules_and_too_new_opsets_name_the_cause(tmp_path, monkeypatch, args, text):
    importable(tmp_path, monkeypatch, "lazynets", LAZY_MODULE)
    result = CliRunner().invoke(bnfold_cli, ["export", *args, "--input-shape", "1x3x8x8",
                                             "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and text in result.output, result.output


@pytest.mark.parametrize("args, named", [
    (["train", "paper", "--steps", "0"], "--steps"),
    (["train", "paper", "--lr", "0"], "--lr"),
    (["recalibrate", "resnet18", "--checkpoint", "c.pt", "-o", "o.pt", "--batches", "0"],
     "--batches"),
])
def test_counts_below_one_are_bad_usage(cli, tmp_path, args, named):
    if args[0] == "train":
        args = [*args, "--out", tmp_path / "run"]
    result = invoke(cli, *args)
    assert result.exit_code == 2 and named in result.output, result.output
    assert os.listdir(tmp_path) == []  # refused before any output or folder
