"""`bench --engine torch` on users' models (tests/user_models.py): fuse exactly or not at all."""

from __future__ import annotations

import json

import numpy as np

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import user_models  # noqa: E402

from bnfold.cli.common import BnfoldGroup  # noqa: E402
from bnfold.cli.deploy_commands import bench_command  # noqa: E402
from bnfold.deploy.engines.torch_engine import fuse_bn, split_call, torch_models  # noqa: E402
from bnfold.pytorch.zoo.prepare import flatten_outputs  # noqa: E402

FAST = ["--runs", "5", "--min-time", "0", "--warmup-time", "0", "--threads", "1"]

# factory -> (shapes, pairs fused, skipped reasons), by hand from tests/user_models.py.
CASES = {
    # one Conv called twice, each call with its own BN: one fused copy per call site
    "shared_conv": ({"x": (2, 4, 6, 6)}, ["conv+bn1", "conv+bn2"], []),
    # Linear over the last axis of (N, C, L), C == L: BatchNorm1d's axis is not the features
    "linear_over_channels": ({"x": (2, 6, 6)}, [], [
        "fc→bn: the Linear's output is 3-D (2, 6, 6): BN normalises axis 1, the Linear's "
        "features are the last axis"]),
    # Conv1d on an unbatched (C, L), C_out == L: BatchNorm1d normalises L, not the channels
    "unbatched_conv1d": ({"x": (1, 3, 6, 6)}, ["stem+stem_bn"], [
        "head→head_bn: the Conv1d's output is 2-D (6, 6) (an unbatched input): BatchNorm1d "
        "normalises axis 1, the Conv1d's channels are axis 0"]),
    "detector": ({"x": (2, 3, 8, 8)}, ["stem.0+stem.1", "head.0+head.1", "up+up_bn"], []),
    "spectral_norm_conv": ({"input": (2, 3, 8, 8)}, ["0+1", "3+4"], []),
    "two_inputs": ({"image": (2, 3, 8, 8), "side": (2, 5)}, ["conv+bn", "fc+fc_bn", "conv+bn"], []),
    "token_conv": ("npz", ["conv+bn"], []),  # int64 ids: only an .npz carries the dtype
    "aux_head": ({"x": (2, 3, 6, 6)}, ["conv+bn", "conv+bn"], []),  # Conv→BN→BN: a chain
    "data_parallel": ({"input": (2, 3, 8, 8)}, ["0+1", "3+4"], []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fusion_is_exact_or_skipped_with_its_reason(name, tmp_path):
    shapes, fused, skipped = CASES[name]
    npz = None
    if shapes == "npz":
        rng = np.random.default_rng(0)
        npz, shapes = tmp_path / "inputs.npz", None
        np.savez(npz, ids=rng.integers(0, 30, (2, 7)), mask=rng.random((2, 7)).astype(np.float32))
    models, feed, notes = torch_models(f"user_models:{name}", None, shapes, seed=0,
                                       inputs_path=npz)
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    args, keywords = split_call(models[0][1], tensors)
    user_model = getattr(user_models, name)()  # the user's own, unprepared module
    with torch.no_grad():
        expected = flatten_outputs(user_model(*tensors.values()))
    if fused:
        assert [label for label, _ in models] == ["original", f"fused ({len(fused)} BN)"]
        fusion = fuse_bn(models[0][1], list(tensors.values()))
        assert fusion.fused == fused and fusion.skipped == skipped
        with torch.no_grad():
            got = flatten_outputs(models[1][1](*args, **keywords))
        assert len(got) == len(expected)
        for (_, e), (_, g) in zip(expected, got):
            e, g = e.double(), g.double()
            assert float((e - g).abs().max()) <= 1e-5 * float(e.abs().max())
    else:
        assert [label for label, _ in models] == [f"user_models:{name}"]
        assert notes == [f"not fused: {reason}" for reason in skipped] + [
            "nothing fused: the model has no Conv/ConvTranspose/Linear→BatchNorm pair that fuses "
            "exactly; timing the original alone"]


def test_fusing_across_the_wrong_axis_would_have_been_caught():
    # The reason above is real: torch's own Linear+BN fuser on this pair changes the output.
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    model = user_models.linear_over_channels()
    x = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = fuse_linear_bn_eval(model.fc, model.bn)(x)
        assert float((wrong - model(x)).abs().max()) > 0.1 * float(model(x).abs().max())


def test_conv1d_pairs_without_a_shape_are_skipped_as_possibly_unbatched():
    fusion = fuse_bn(user_models.unbatched_conv1d())  # no example input: no shapes
    assert fusion.fused == ["stem+stem_bn"]  # BatchNorm2d takes 4-D only: batched for sure
    assert fusion.skipped == ["head→head_bn: the Conv1d's output shape is unknown (no example "
                              "input): on an unbatched input BatchNorm1d would normalise another "
                              "axis than its channels"]


def _bench(*args):
    group = BnfoldGroup(name="bnfold")
    group.add_command(bench_command)
    return CliRunner().invoke(group, ["bench", "--engine", "torch", *map(str, args), *FAST])


def test_bench_cli_times_users_models_and_says_why_nothing_fused(tmp_path):
    out = tmp_path / "b.json"
    result = _bench("--model", "user_models:two_inputs", "--shape", "image=2x3x8x8",
                    "--shape", "side=2x5", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [m["label"] for m in data["models"]] == ["original", "fused (3 BN)"]
    assert data["settings"]["input_shapes"] == {"image": [2, 3, 8, 8], "side": [2, 5]}

    result = _bench("--model", "user_models:functional_bn", "--shape", "x=2x3x6x6")
    assert result.exit_code == 0, result.output
    assert ("nothing fused: the model has no Conv/ConvTranspose/Linear→BatchNorm pair that "
            "fuses exactly (no such pair at all); timing the original alone") in " ".join(
                result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--model", "user_models:two_inputs", "--shape", "image=2x3x8x8"],
     "error: forward() needs argument 'side', which was not given: add an input for it "
     "(--shape side=DxD..., or an array named side in --inputs)"),
    (["--model", "user_models:shared_conv", "--shape", "x=2x3x6x6"],
     "error: the model fails on the example inputs (x 2x3x6x6 float32) (RuntimeError: Given "
     "groups=1, weight of size [4, 4, 3, 3], expected input[2, 3, 6, 6] to have 4 channels, but "
     "got 3 channels instead): give inputs that fit forward() with --shape NAME=DxD... (one per "
     "forward argument, float) or --inputs file.npz (any dtype, e.g. int64 token ids)"),
])
def test_bench_cli_refusals_are_one_line(args, message, capfd):
    result = _bench(*args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == message
    assert capfd.readouterr().out == ""
