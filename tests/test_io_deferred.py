"""Deferred initializer data: large tensors stay in their files until read, and whatever path the
bytes take (pread, copy_file_range, the read/write fallback, external data) the output is the
same as folding a fully loaded model."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.errors import BnfoldError
from bnfold.io import load_model, load_model_deferred, save_model
from bnfold.io_deferred import DEFER_MIN_BYTES
from bnfold.io_stream import read_model, write_model
from bnfold.sample_model import build_sample_model


@pytest.fixture
def sample_path(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(build_sample_model(), path)
    return path


def _eager_fold_bytes(path) -> bytes:
    return bnfold.fold(load_model(path)).model.SerializeToString()


def test_reader_leaves_large_raw_data_out_and_says_where_it_is():
    m = build_sample_model()
    big = numpy_helper.from_array(np.arange(5000, dtype=np.float32), "big")
    big.doc_string = "after raw_data"
    m.graph.initializer.append(big)
    data = m.SerializeToString()
    spans: dict[str, tuple[int, int]] = {}
    parsed = read_model(memoryview(data), spans=spans, defer_min_bytes=DEFER_MIN_BYTES)
    sizes = {t.name: len(t.raw_data) for t in m.graph.initializer}
    assert set(spans) == {name for name, size in sizes.items() if size >= DEFER_MIN_BYTES}
    assert "big" in spans
    for tensor in parsed.graph.initializer:
        if tensor.name in spans:
            assert not tensor.HasField("raw_data")
            offset, length = spans[tensor.name]
            tensor.raw_data = data[offset:offset + length]
    assert parsed == onnx.ModelProto.FromString(data)


def test_deferred_load_holds_only_headers(tmp_path):
    m = build_sample_model()
    m.graph.initializer.append(numpy_helper.from_array(np.ones(2**22, np.float32), "unused"))
    path = tmp_path / "big.onnx"
    save_model(m, path)
    model, deferred, data_files = load_model_deferred(path)
    assert data_files == set()
    assert "unused" in deferred and deferred.nbytes("unused") == 2**24
    assert model.ByteSize() < 100_000  # the 16 MiB tensor is not in the proto
    buffer = io.BytesIO()
    write_model(model, buffer, deferred=deferred)
    assert buffer.getvalue() == m.SerializeToString()
    deferred.close()


@pytest.mark.parametrize("copy", ["copy_file_range", "refused", "absent", "no pread (Windows)"])
def test_fold_file_output_is_byte_identical_to_folding_a_loaded_model(
    sample_path, tmp_path, monkeypatch, copy
):
    if copy == "refused":
        def refuse(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
        monkeypatch.delattr(os, "pread")
    out = tmp_path / "out.onnx"
    result = bnfold.fold_file(sample_path, out, verify=False)
    assert out.read_bytes() == _eager_fold_bytes(sample_path)
    assert result.model.SerializeToString() == out.read_bytes()


def test_fold_result_model_is_complete_after_fold_file(sample_path, tmp_path):
    result = bnfold.fold_file(sample_path, tmp_path / "out.onnx", verify=False)
    folded = result.model
    for tensor in folded.graph.initializer:
        values = numpy_helper.to_array(tensor)
        assert values.size == int(np.prod(tensor.dims)), tensor.name
    onnx.checker.check_model(folded)
    assert folded.SerializeToString() == _eager_fold_bytes(sample_path)


def test_external_data_model_folds_like_a_loaded_one(tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    save_model(build_sample_model(), path, external_data=True)
    expected = bnfold.fold(load_model(path)).model
    out = folder / "out.onnx"
    bnfold.fold_file(path, out, verify=False)
    assert os.path.exists(folder / "out.onnx.data")
    written = load_model(out)
    assert [t.name for t in written.graph.initializer] == [
        t.name for t in expected.graph.initializer
    ]
    for got, want in zip(written.graph.initializer, expected.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


def test_in_place_fold_reads_the_input_it_is_replacing(sample_path, tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copy(sample_path, copy)
    expected = _eager_fold_bytes(copy)
    result = bnfold.fold_file(sample_path, sample_path, verify=False, in_place=True)
    assert sample_path.read_bytes() == expected
    assert result.model.SerializeToString() == expected  # read from the replaced file's inode


def test_input_truncated_after_loading_is_a_clear_error(sample_path):
    model, deferred, _ = load_model_deferred(sample_path)
    name = next(t.name for t in model.graph.initializer if t.name in deferred)
    os.truncate(sample_path, 100)
    with pytest.raises(BnfoldError, match="ends early"):
        deferred.read(name)
    deferred.close()


def test_duplicate_initializer_names_keep_each_ones_bytes(tmp_path):
    """Only the first of two same-named tensors is deferred; both are written back as they were."""
    m = build_sample_model()
    for value in (1.0, 2.0):
        m.graph.initializer.append(numpy_helper.from_array(np.full(2048, value, np.float32), "twin"))
    path = tmp_path / "twins.onnx"
    path.write_bytes(m.SerializeToString())
    model, deferred, _ = load_model_deferred(path)
    buffer = io.BytesIO()
    write_model(model, buffer, deferred=deferred)
    assert buffer.getvalue() == m.SerializeToString()
    deferred.materialize(model.graph)
    assert model == m


def _open_descriptors_to(path) -> int:
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == real
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_kept_results_hold_no_descriptors(sample_path, tmp_path):
    results = [bnfold.fold(sample_path), bnfold.fold_file(sample_path, tmp_path / "o.onnx",
                                                           verify=False)]
    assert _open_descriptors_to(sample_path) == 0
    for result in results:  # the model is still there on demand, read through a reopened file
        assert result.model.SerializeToString() == _eager_fold_bytes(sample_path)
    assert _open_descriptors_to(sample_path) == 0


def test_model_of_an_input_changed_since_folding_is_refused(sample_path):
    result = bnfold.fold(sample_path)
    data = sample_path.read_bytes()
    sample_path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) + b"\0")
    for _ in range(2):  # asked again, it still refuses rather than hand out a half-read model
        with pytest.raises(BnfoldError, match="changed after bnfold read the model"):
            result.model


def test_model_of_an_input_deleted_since_folding_is_refused(sample_path):
    result = bnfold.fold(sample_path)
    os.remove(sample_path)
    with pytest.raises(BnfoldError, match="cannot reopen"):
        result.model
