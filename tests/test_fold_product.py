"""Large folded weights are computed as they are written (bnfold.folding.product): the values,
the checks' minimum and maximum and every written byte equal the eager computation's."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold
import bnfold.folding.math
import bnfold.folding.product
import bnfold.onnxio.deferred
import bnfold.onnxio.files
from bnfold.errors import BnfoldError
from bnfold.folding.math import scaled
from bnfold.folding.product import WeightProduct
from bnfold.onnxio.files import load_model_deferred

from golden import assert_same_outputs, bn_node, bn_params, count_ops, model, rng, tensor

SPECIALS = (np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38, 1e-45)


@st.composite
def weight_and_factors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = r.normal(0, 1, shape).astype(np.float32)
    if draw(st.booleans()):  # a few special values anywhere
        flat = weight.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(SPECIALS))
    per_axis = [draw(st.booleans()) for _ in shape]
    factor_shape = tuple(n if keep else 1 for n, keep in zip(shape, per_axis))
    factors = r.normal(0, 2, factor_shape)
    if draw(st.booleans()):
        factors.reshape(-1)[0] = draw(st.sampled_from((0.0, -0.0, 1e300, -1e-300)))
    return weight, factors


@settings(max_examples=300, deadline=None)
@given(weight_and_factors(), st.integers(1, 64))
def test_product_equals_the_eager_product_bit_for_bit(case, chunk_bytes):
    weight, factors = case
    product = WeightProduct(weight, factors)
    with np.errstate(all="ignore"):
        eager = scaled(weight, factors, np.float32)
        assert np.asarray(product).tobytes() == eager.tobytes()
        assert b"".join(bytes(c) for c in product.chunks(chunk_bytes)) == eager.tobytes()
        # the writer thread's way: each chunk in a buffer of its own, possibly oversized
        taken = product.chunks(chunk_bytes, take=lambda n: np.empty(n + 3, np.uint8))
        assert b"".join(bytes(c) for c in taken) == eager.tobytes()
        assert product.tobytes() == eager.tobytes()
        for ours, theirs in ((product.min(), eager.min()), (product.max(), eager.max())):
            assert type(ours) is type(theirs)
            assert np.isnan(ours) == np.isnan(theirs)
            assert np.isnan(ours) or ours == theirs


def test_reshape_keeps_the_values_in_c_order():
    weight = rng().normal(size=(4, 3, 2)).astype(np.float32)
    factors = rng(1).normal(size=(4, 1, 2))
    product = WeightProduct(weight, factors).reshape((2, 12))
    assert product.shape == (2, 12) and product.ndim == 2 and product.nbytes == 96
    assert np.array_equal(np.asarray(product), scaled(weight, factors, np.float32).reshape(2, 12))
    assert product.astype(np.float32, copy=False) is product
    assert np.array_equal(product.astype(np.float64), np.asarray(product).astype(np.float64))


def test_factors_that_widen_the_weight_are_refused():
    with pytest.raises(ValueError):
        WeightProduct(np.ones((1, 3), np.float32), np.ones((2, 3)))


def test_only_large_float32_weights_are_left_uncomputed():
    big = np.ones((512, 512), np.float32)  # 1 MiB
    assert isinstance(bnfold.folding.math.folded_weight(big, np.ones((512, 1)), np.float32),
                      WeightProduct)
    small = bnfold.folding.math.folded_weight(big[:100], np.ones((100, 1)), np.float32)
    assert isinstance(small, np.ndarray)
    wide = bnfold.folding.math.folded_weight(big, np.ones((512, 1)), np.float64)  # fp16 models
    assert isinstance(wide, np.ndarray) and wide.dtype == np.float64


# ---- whole models: every rule that scales a weight, with weights of 1 MiB and more ----------

def _conv_bn(bias: bool):
    w = tensor("W", rng(2).normal(0, 0.1, (256, 128, 3, 3)))
    inputs = ["X", "W"] + (["B"] if bias else [])
    extra = [tensor("B", rng(3).normal(0, 0.1, 256))] if bias else []
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1]), bn_node("c", "Y")]
    return model(nodes, [("X", [1, 128, 4, 4])], [("Y", None)], [w, *extra, *bn_params("bn", 256)])


def _convtranspose_bn():
    w = tensor("W", rng(2).normal(0, 0.1, (256, 128, 3, 3)))
    nodes = [helper.make_node("ConvTranspose", ["X", "W"], ["c"], group=2), bn_node("c", "Y")]
    return model(nodes, [("X", [1, 256, 3, 3])], [("Y", None)], [w, *bn_params("bn", 256)])


def _gemm_bn(trans_b: int):
    shape = (512, 1024) if trans_b else (1024, 512)
    b = tensor("Bm", rng(2).normal(0, 0.1, shape))
    c = tensor("C", rng(3).normal(0, 0.1, 512))
    nodes = [helper.make_node("Gemm", ["X", "Bm", "C"], ["g"], transB=trans_b), bn_node("g", "Y")]
    return model(nodes, [("X", [2, 1024])], [("Y", None)], [b, c, *bn_params("bn", 512)])


def _matmul_bn():
    b = tensor("Bm", rng(2).normal(0, 0.1, (1024, 512)))
    nodes = [helper.make_node("MatMul", ["X", "Bm"], ["m"]), bn_node("m", "Y")]
    return model(nodes, [("X", [2, 1024])], [("Y", None)], [b, *bn_params("bn", 512)])


def _bn_conv():
    w = tensor("W", rng(2).normal(0, 0.1, (256, 128, 3, 3)))
    nodes = [bn_node("X", "n"), helper.make_node("Conv", ["n", "W"], ["Y"])]
    return model(nodes, [("X", [1, 128, 5, 5])], [("Y", None)], [w, *bn_params("bn", 128)])


def _bn_gemm():
    b = tensor("Bm", rng(2).normal(0, 0.1, (512, 1024)))
    nodes = [bn_node("X", "n"), helper.make_node("Gemm", ["n", "Bm"], ["Y"], transB=1)]
    return model(nodes, [("X", [2, 1024])], [("Y", None)], [b, *bn_params("bn", 1024)])


def _shared_weight():
    """Two Convs read one weight: each fold writes a new initializer, the shared one stays."""
    w = tensor("W", rng(2).normal(0, 0.1, (256, 128, 3, 3)))
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c1"]), bn_node("c1", "Y1", "bn1", "bn1"),
        helper.make_node("Conv", ["X", "W"], ["c2"]), bn_node("c2", "Y2", "bn2", "bn2"),
    ]
    return model(nodes, [("X", [1, 128, 3, 3])], [("Y1", None), ("Y2", None)],
                 [w, *bn_params("bn1", 256), *bn_params("bn2", 256, seed=5)])


def _two_bns():
    """Conv → BN → BN: the second fold reads back the first one's uncomputed weight."""
    w = tensor("W", rng(2).normal(0, 0.1, (256, 128, 3, 3)))
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"]), bn_node("c", "m", "bn1", "bn1"),
             bn_node("m", "Y", "bn2", "bn2")]
    return model(nodes, [("X", [1, 128, 3, 3])], [("Y", None)],
                 [w, *bn_params("bn1", 256), *bn_params("bn2", 256, seed=5)])


MODELS = {
    "conv-bn": lambda: _conv_bn(True),
    "conv-bn-no-bias": lambda: _conv_bn(False),
    "convtranspose-bn": _convtranspose_bn,
    "gemm-bn-transB": lambda: _gemm_bn(1),
    "gemm-bn": lambda: _gemm_bn(0),
    "matmul-bn": _matmul_bn,
    "bn-conv": _bn_conv,
    "bn-gemm": _bn_gemm,
    "shared-weight": _shared_weight,
    "two-bns": _two_bns,
}


def _counted(patch) -> list:
    """Patch math's WeightProduct to record each one made; returns the record."""
    made = []

    class Counted(WeightProduct):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    patch.setattr(bnfold.folding.math, "WeightProduct", Counted)
    return made


def _fold_bytes(source, out, monkeypatch, lazy: bool) -> bytes:
    with monkeypatch.context() as patch:
        made = _counted(patch)
        if not lazy:
            patch.setattr(bnfold.folding.math, "LAZY_MIN_BYTES", 2**62)
        bnfold.fold_file(source, out, verify=False)
    assert bool(made) == lazy  # the path under test was the one taken
    return out.read_bytes()


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "deferred+streamed"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_file_is_the_eager_fold_byte_for_byte(name, streamed, tmp_path, monkeypatch):
    if streamed:  # a small file is parsed and serialised whole; these go the large-model way
        monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)
        monkeypatch.setattr(bnfold.onnxio.files, "SERIALIZE_WHOLE_MAX_BYTES", 0)
    original = MODELS[name]()
    source = tmp_path / "m.onnx"
    onnx.save(original, source)
    lazy = _fold_bytes(source, tmp_path / "lazy.onnx", monkeypatch, lazy=True)
    eager = _fold_bytes(source, tmp_path / "eager.onnx", monkeypatch, lazy=False)
    assert lazy == eager
    folded = onnx.load_from_string(lazy)
    assert count_ops(folded, "BatchNormalization") == 0
    feed = {i.name: rng(9).normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in original.graph.input}
    assert_same_outputs(original, folded, feed)


def test_external_data_output_writes_the_eager_bytes(tmp_path, monkeypatch):
    original = _conv_bn(True)
    source = tmp_path / "m.onnx"
    onnx.save(_conv_bn(True), source, save_as_external_data=True, location="m.data",
              size_threshold=1024)  # onnx.save moves the saved proto's data out: a copy
    folded = {}
    for lazy in (True, False):
        out = tmp_path / f"{lazy}" / "f.onnx"
        out.parent.mkdir()
        _fold_bytes(source, out, monkeypatch, lazy)
        folded[lazy] = (out.read_bytes(), (out.parent / "f.onnx.data").read_bytes())
    assert folded[True] == folded[False]
    assert_same_outputs(original, onnx.load(tmp_path / "True" / "f.onnx"),
                        {"X": rng(9).normal(size=(1, 128, 4, 4)).astype(np.float32)})


def test_fold_result_model_computes_the_values(tmp_path, monkeypatch):
    """The in-memory model of a fold (no file written) holds the computed weight."""
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)
    original = _conv_bn(False)
    source = tmp_path / "m.onnx"
    onnx.save(original, source)
    folded = bnfold.fold_file(source, tmp_path / "f.onnx", verify=False).model
    assert folded.SerializeToString() == (tmp_path / "f.onnx").read_bytes()
    assert folded.SerializeToString() == bnfold.fold(original).model.SerializeToString()


def test_large_weights_are_read_through_a_map_only_where_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)
    source = tmp_path / "m.onnx"
    onnx.save(_conv_bn(True), source)
    for map_files, backing in ((True, mmap.mmap), (False, bytes)):
        model_, deferred, _ = load_model_deferred(source, map_files=map_files)
        view = deferred.view("W")
        assert isinstance(view.obj, backing)
        assert view.readonly and view.nbytes == 256 * 128 * 9 * 4
        assert bytes(view) == deferred.read("W")
        del view
        deferred.close()


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_mapped_file_that_changes_is_refused(tmp_path, monkeypatch, change):
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)
    source = tmp_path / "m.onnx"
    onnx.save(_conv_bn(True), source)
    model_, deferred, _ = load_model_deferred(source, map_files=True)
    first = deferred.view("W")
    _change(source, change)
    with pytest.raises(BnfoldError, match="changed or was truncated"):
        deferred.check_unchanged()
    with pytest.raises(BnfoldError, match="changed or was truncated"):
        deferred.view("W")
    del first
    deferred.close()


def _change(path, how: str) -> None:
    """Change `path` in place (same inode), as another process writing it would."""
    with open(path, "r+b") as handle:
        if how == "truncate":
            handle.truncate(4096)
        else:
            handle.seek(-64, 2)
            handle.write(bytes(64))


# In a child: reading a mapped page past a file's new end is SIGBUS, which would take pytest down.
_FOLD_WHILE_CHANGED = """
import sys
import bnfold, bnfold.folding.api as api
from bnfold.errors import BnfoldError
sys.path.insert(0, sys.argv[4])
from test_fold_product import _change
save = api.save_model

def changed_first(*args, **kwargs):
    _change(sys.argv[1], sys.argv[3])
    return save(*args, **kwargs)

api.save_model = changed_first
try:
    bnfold.fold_file(sys.argv[1], sys.argv[2], verify=False)
except BnfoldError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_fold_file_refuses_an_input_changed_before_it_is_written(tmp_path, change):
    source, output = tmp_path / "m.onnx", tmp_path / "out" / "f.onnx"
    output.parent.mkdir()
    # Over 8 MiB: loaded deferred, so the 9 MiB weight is read through a map.
    w = tensor("W", rng(2).normal(0, 0.1, (1024, 256, 3, 3)))
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"]), bn_node("c", "Y")]
    onnx.save(model(nodes, [("X", [1, 256, 3, 3])], [("Y", None)], [w, *bn_params("bn", 1024)]),
              source)
    done = subprocess.run([sys.executable, "-c", _FOLD_WHILE_CHANGED, str(source), str(output),
                           change, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "changed or was truncated" in done.stdout
    assert os.listdir(output.parent) == []  # no output, no staging folder


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_fold_file_holds_no_maps_or_files_once_it_returns(tmp_path, monkeypatch):
    """One data file per tensor: at most MAX_MAPPED_FILES maps while folding, none after."""
    source = tmp_path / "m.onnx"
    onnx.save(_twelve_pairs(), source, save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=2**20)  # onnx.save moves the saved proto's data out: a fresh one
    maps = []
    real_map = bnfold.onnxio.deferred._map
    monkeypatch.setattr(bnfold.onnxio.deferred, "_map",
                        lambda handle: maps.append(real_map(handle)) or maps[-1])
    before = _open_descriptors()
    result = bnfold.fold_file(source, tmp_path / "f.onnx", verify=False)
    assert 0 < len(maps) <= bnfold.onnxio.deferred.MAX_MAPPED_FILES
    del maps[:]
    assert _open_descriptors() == before
    assert result.report.folded_count == 12
    assert_same_outputs(_twelve_pairs(), result.model, _feed(_twelve_pairs()))
    assert _open_descriptors() == before


def _twelve_pairs():
    nodes, inits = [], []
    for i in range(12):
        nodes += [helper.make_node("Conv", [f"x{i}", f"W{i}"], [f"c{i}"], name=f"conv{i}"),
                  bn_node(f"c{i}", f"x{i + 1}", prefix=f"bn{i}", name=f"bn{i}")]
        inits += [tensor(f"W{i}", rng(i).normal(0, 0.05, (512, 512, 1, 1))),
                  *bn_params(f"bn{i}", 512)]
    return model(nodes, [("x0", [1, 512, 2, 2])], [("x12", None)], inits)


def _feed(original) -> dict:
    return {i.name: rng(9).normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in original.graph.input}


def test_fold_of_a_path_keeps_no_map_of_it(tmp_path, monkeypatch):
    """fold(path) hands back a result that may be read much later: its large weights are
    read, never mapped, so a file changed meanwhile is refused on reopen, not read."""
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)
    monkeypatch.setattr(bnfold.onnxio.deferred, "_map", lambda handle: pytest.fail("mapped"))
    source = tmp_path / "m.onnx"
    onnx.save(_conv_bn(True), source)
    result = bnfold.fold(source)
    assert result.report.folded_count == 1
    assert_same_outputs(_conv_bn(True), result.model, _feed(_conv_bn(True)))


def test_float16_weights_are_computed_eagerly(tmp_path, monkeypatch):
    """fp16 range checks need every value: no product is left uncomputed for them."""
    original = _conv_bn(True)
    for stored in original.graph.initializer:
        values = onnx.numpy_helper.to_array(stored).astype(np.float16)
        stored.CopyFrom(onnx.numpy_helper.from_array(values, stored.name))
    for value in (*original.graph.input, *original.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    made = _counted(monkeypatch)
    result = bnfold.fold(original)
    assert len(result.report.folded) == 1 and not made


@pytest.mark.parametrize("special", [None, np.nan, np.inf, -3e38])
def test_source_bounds_are_the_weights_own(special):
    weight = rng().normal(size=(6, 5, 3)).astype(np.float32)
    if special is not None:
        weight[2, 1, 0] = special
    product = WeightProduct(weight, rng(1).normal(size=(6, 1, 1)))
    with np.errstate(all="ignore"):
        bounds = product.source_bounds(weight)
    assert bounds.dtype == weight.dtype
    for ours, theirs in ((bounds.min(), weight.min()), (bounds.max(), weight.max())):
        assert np.isnan(ours) == np.isnan(theirs) and (np.isnan(ours) or ours == theirs)
    assert product.source_bounds(weight.copy()) is None  # other memory: not known to be it
    assert product.source_bounds(weight[:3]) is None
