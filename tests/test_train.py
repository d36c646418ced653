"""The paper experiment at a tiny budget: files are well formed and the claim's direction holds."""

from __future__ import annotations

import csv
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from bnfold.pytorch import zoo  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pytorch.train.data import load_dataset  # noqa: E402
from bnfold.pytorch.train.loop import train_sample  # noqa: E402
from bnfold.pytorch.train.paper import run_paper_experiment  # noqa: E402

STEPS = 60


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    return run_paper_experiment(str(out), steps=STEPS, eval_every=10), out


def test_curve_csv_has_exact_columns_and_both_arms(paper_run):
    result, out = paper_run
    with open(out / "curve.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "arm", "test_accuracy"]
    body = rows[1:]
    assert {r[1] for r in body} == {"bn", "no_bn"}
    for arm in ("bn", "no_bn"):
        steps = [int(r[0]) for r in body if r[1] == arm]
        assert steps == list(range(0, STEPS + 1, 10))
    assert all(0.0 <= float(r[2]) <= 1.0 for r in body)
    assert len(body) == len(result.curve)


def test_curve_png_is_a_real_png(paper_run):
    _, out = paper_run
    data = (out / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 300  # three panels side by side
    from matplotlib.image import imread

    pixels = imread(str(out / "curve.png"))
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something is drawn, not a blank canvas


def test_checkpoint_loads_into_paper_mlp(paper_run):
    result, _ = paper_run
    model = zoo.create("paper-mlp", result.checkpoint)
    data = load_dataset("digits")
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean()
    assert accuracy == pytest.approx(result.final_accuracy["bn"], abs=1e-9)


def test_bn_learns_faster_even_in_60_steps(paper_run):
    result, _ = paper_run
    # Measured with the defaults (lr 0.5, N(0, 0.1²) init): BN passes 90% within ~30 steps
    # while the sigmoid net without BN is still at chance.
    assert result.steps_to["bn"][0.90] is not None
    assert result.steps_to["no_bn"][0.90] is None
    assert result.final_accuracy["bn"] > result.final_accuracy["no_bn"] + 0.3
    assert set(result.sigmoid_percentiles) == {"bn", "no_bn"}
    for rows in result.sigmoid_percentiles.values():
        assert all(p15 <= p50 <= p85 for _, p15, p50, p85 in rows)


def test_both_arms_start_from_the_same_weights():
    from bnfold.pytorch.train.paper import _paired_models

    models = _paired_models(torch, 64, seed=5)
    bn, plain = models["bn"].state_dict(), models["no_bn"].state_dict()
    shared = [k for k in bn if k in plain]
    assert len(shared) == 5  # three hidden weights, output weight and bias
    assert all(torch.equal(bn[k], plain[k]) for k in shared)
    x = torch.randn(8, 64)
    # Same init for the same seed, different for another.
    assert torch.equal(_paired_models(torch, 64, seed=5)["bn"].eval()(x), models["bn"].eval()(x))
    assert not torch.equal(_paired_models(torch, 64, seed=6)["bn"].eval()(x), models["bn"].eval()(x))


def test_npz_data_for_the_paper_run(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.random((120, 784)), y_train=rng.integers(0, 10, 120),
             x_test=rng.random((30, 784)), y_test=rng.integers(0, 10, 30))
    result = run_paper_experiment(str(tmp_path / "out"), steps=4, data=str(path))
    assert zoo.create("paper-mlp", result.checkpoint).in_features == 784


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((4, 2))}, "lacks y_train, x_test, y_test"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 2)),
          "y_test": np.zeros(2, int)}, "4 samples but y_train has 3"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 3)),
          "y_test": np.zeros(2, int)}, "make them the same shape"),
        ({"x_train": np.full((4, 2), np.nan), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 2)),
          "y_test": np.zeros(2, int)}, "NaN"),
    ],
    ids=["missing-keys", "length-mismatch", "shape-mismatch", "nan"],
)
def test_bad_npz_files_are_user_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BnfoldError, match=message):
        load_dataset(str(path))


def test_labels_out_of_range_and_unreadable_files(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, x_train=np.zeros((70, 64)), y_train=np.full(70, 12), x_test=np.zeros((5, 64)),
             y_test=np.zeros(5, int))
    with pytest.raises(BnfoldError, match="labels in 0..9"):
        run_paper_experiment(str(tmp_path / "o"), steps=1, data=str(path))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BnfoldError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(BnfoldError, match="does not exist"):
        load_dataset(str(tmp_path / "none.npz"))
    with pytest.raises(BnfoldError, match="at least 2 samples"):
        run_paper_experiment(str(tmp_path / "o"), steps=1, batch_size=1)


@pytest.mark.parametrize("name, x_shape, y_kind", [
    ("conv1d", (4, 64), "labels"),
    ("convtranspose-decoder", (16, 4, 4), "images"),
])
def test_generic_loop_writes_a_loadable_checkpoint(tmp_path, name, x_shape, y_kind):
    rng = np.random.default_rng(0)

    def targets(n):
        return rng.integers(0, 10, n) if y_kind == "labels" else rng.random((n, 3, 16, 16)).astype(np.float32)

    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.standard_normal((40, *x_shape)), y_train=targets(40),
             x_test=rng.standard_normal((8, *x_shape)), y_test=targets(8))
    result = train_sample(name, str(path), str(tmp_path / "out"), steps=5, batch_size=8)
    assert result.checkpoint.endswith(f"{name}.pt")
    assert result.metric_name == ("test_accuracy" if y_kind == "labels" else "test_mse")
    before = zoo.create(name).state_dict()
    loaded = zoo.create(name, result.checkpoint).state_dict()
    # Training moved the BN statistics away from their initial values.
    bn_key = next(k for k in loaded if k.endswith("running_mean"))
    assert not torch.equal(before[bn_key], loaded[bn_key])


def test_generic_loop_rejects_data_that_does_not_fit(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((10, 7, 64)), y_train=np.zeros(10, int),
             x_test=np.zeros((2, 7, 64)), y_test=np.zeros(2, int))
    with pytest.raises(BnfoldError, match="do not fit the model"):
        train_sample("conv1d", str(path), str(tmp_path / "o"), steps=1, batch_size=4)
