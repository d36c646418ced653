"""Users' factories as they have them: with arguments (literals in the spec, never evaluated)
and in a .py file rather than an importable module."""

from __future__ import annotations

import textwrap

import pytest
from test_cli_torch import assert_user_error, cli, invoke  # noqa: F401 (cli: a fixture)

torch = pytest.importorskip("torch")

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pytorch import zoo  # noqa: E402
from bnfold.pytorch.zoo.factory import parse_factory_spec  # noqa: E402

NETS = textwrap.dedent("""
    import torch.nn as nn
    from blocks import block  # a neighbour of this file, as `python nets.py` would find it

    def build(width, *, depth=1, head=None):
        layers = [block(3, width)] + [block(width, width) for _ in range(depth - 1)]
        if head:
            layers.append(nn.Conv2d(width, head["classes"], 1))
        return nn.Sequential(*layers)

    class Net(nn.Sequential):
        def __init__(self, width):
            super().__init__(block(3, width))

        @classmethod
        def wide(cls, factor):
            return cls(4 * factor)
""")
BLOCKS = textwrap.dedent("""
    import torch.nn as nn

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
""")


@pytest.fixture()
def nets_file(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "nets.py").write_text(NETS)
    (folder / "blocks.py").write_text(BLOCKS)
    return folder / "nets.py"


def _bns(model) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_literal_arguments_reach_the_factory(nets_file):
    model = zoo.create(f"{nets_file}:build(8, depth=3, head={{'classes': 5}})")
    assert [bn.num_features for bn in _bns(model)] == [8, 8, 8]
    assert list(model.modules())[-1].out_channels == 5
    assert not model.training


def test_a_class_or_its_classmethod_is_a_factory(nets_file):
    assert [bn.num_features for bn in _bns(zoo.create(f"{nets_file}:Net(3)"))] == [3]
    assert [bn.num_features for bn in _bns(zoo.create(f"{nets_file}:Net.wide(2)"))] == [8]
    with pytest.raises(BnfoldError, match="has no callable 'Net.narrow'"):
        zoo.create(f"{nets_file}:Net.narrow(2)")


def test_spec_parsing_keeps_colons_inside_arguments():
    parsed = parse_factory_spec("pkg.mod:make('a:b', sizes=(1, 2), opts={'k': None})")
    assert (parsed.module, parsed.factory) == ("pkg.mod", "make")
    assert parsed.args == ("a:b",) and parsed.kwargs == {"sizes": (1, 2), "opts": {"k": None}}
    assert zoo.file_stem("pkg.mod:make('a:b', sizes=(1, 2))") == "pkg.mod.make_a_b_sizes=_1_2"
    assert zoo.file_stem("pkg.mod:make") == "pkg.mod.make"
    assert zoo.file_stem("resnet18") == "resnet18"


@pytest.mark.parametrize("arguments", ["(__import__('os').getcwd())", "(*[1])", "(**{'a': 1})",
                                       "(width=x)", "(8", "(8).foo", "(8\x00)",
                                       "(" + "[" * 5000 + "]" * 5000 + ")"])
def test_arguments_are_literals_only(nets_file, arguments):
    with pytest.raises(BnfoldError, match="cannot read the arguments of .*Python literals"):
        zoo.create(f"{nets_file}:build{arguments}")


def test_factory_argument_errors_say_what_it_takes(nets_file):
    with pytest.raises(BnfoldError, match=r"needs arguments \(width\): give them in the spec"):
        zoo.create(f"{nets_file}:build")
    with pytest.raises(BnfoldError, match=r"unexpected keyword argument 'colour'.*"
                                          r"build\(width, \*, depth=1, head=None\) takes"):
        zoo.create(f"{nets_file}:build(8, colour=1)")
    with pytest.raises(BnfoldError, match=r"build\(-1\) raised RuntimeError: .*fix the factory"):
        zoo.create(f"{nets_file}:build(-1)")
    with pytest.raises(BnfoldError, match="is not a file: check the path"):
        zoo.create(f"{nets_file.parent / 'missing.py'}:build(8)")


def test_export_and_train_with_a_factory_call(cli, nets_file, tmp_path):
    import numpy as np
    import onnx

    spec = f"{nets_file}:build(6, depth=2)"
    out = tmp_path / "m.onnx"
    result = invoke(cli, "export", "--model", spec, "--input-shape", "1x3x8x8", "-o", out)
    assert result.exit_code == 0, result.output
    assert [n.op_type for n in onnx.load(out).graph.node].count("BatchNormalization") == 2

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.standard_normal((16, 3, 8, 8)), y_train=rng.standard_normal(
        (16, 6, 8, 8)), x_test=rng.standard_normal((4, 3, 8, 8)),
        y_test=rng.standard_normal((4, 6, 8, 8)))
    result = invoke(cli, "train", spec, "--data", data, "--out", tmp_path, "--steps", "1",
                    "--batch-size", "4")
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "nets.build_6_depth=2.pt"
    assert checkpoint.is_file()
    zoo.create(spec, str(checkpoint))  # loads back strictly


def test_cli_error_for_a_non_literal_argument_is_one_line(cli, nets_file, tmp_path):
    result = invoke(cli, "export", "--model", f"{nets_file}:build(open('x'))", "--input-shape",
                    "1x3x8x8", "-o", tmp_path / "m.onnx")
    assert_user_error(result, "cannot read the arguments of")
    assert not (tmp_path / "m.onnx").exists()
