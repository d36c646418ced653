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
import bnfold.onnxio.deferred
import bnfold.onnxio.files
from bnfold.errors import BnfoldError
from bnfold.onnxio.files import load_model, load_model_deferred, save_model
from bnfold.onnxio.deferred import DEFER_MIN_BYTES
from bnfold.onnxio.stream import read_model, write_model
from bnfold.sample_model import build_sample_model


@pytest.fixture(autouse=True)
def defer_every_file(monkeypatch):
    """Files under DIRECT_PARSE_MAX_BYTES are parsed whole; these tests' models are small, so
    defer theirs as a large model's would be."""
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 0)


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


def test_small_file_is_parsed_whole_and_equals_the_deferred_parse(sample_path, monkeypatch):
    deferred_model, deferred, _ = load_model_deferred(sample_path)
    assert len(deferred) > 0
    deferred.materialize(deferred_model.graph)
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES",
                        os.path.getsize(sample_path) + 1)
    model, direct, _ = load_model_deferred(sample_path)
    assert len(direct) == 0
    direct.close()
    assert model == deferred_model


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


@pytest.mark.parametrize("second", ["raw", "float_data"])
def test_duplicate_initializer_names_are_refused(tmp_path, second):
    """Which of two same-named weights a fold should use is undefined (the checker rejects the
    model, ORT keeps the last): refused at load, for every command."""
    m = build_sample_model()
    m.graph.initializer.append(numpy_helper.from_array(np.full(2048, 1.0, np.float32), "twin"))
    twin = onnx.helper.make_tensor("twin", onnx.TensorProto.FLOAT, [2], [5.0, 6.0])
    if second == "raw":
        twin = numpy_helper.from_array(np.full(2048, 2.0, np.float32), "twin")
    m.graph.initializer.append(twin)
    path = tmp_path / "twins.onnx"
    path.write_bytes(m.SerializeToString())
    for call in (load_model, bnfold.fold, lambda p: bnfold.fold_file(p, verify=False)):
        with pytest.raises(BnfoldError, match="'twin' is defined more than once"):
            call(path)
    assert os.listdir(tmp_path) == ["twins.onnx"]


def test_external_bytes_win_over_raw_data_left_in_the_tensor(tmp_path):
    m = build_sample_model()
    weight = next(t for t in m.graph.initializer if t.name == "preact_conv.weight")
    real = numpy_helper.to_array(weight)
    (tmp_path / "w.bin").write_bytes(real.tobytes())
    weight.raw_data = np.zeros_like(real).tobytes()  # a decoy onnx and ORT would ignore
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("length", str(real.nbytes))):
        weight.external_data.add(key=key, value=value)
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    loaded = {t.name: numpy_helper.to_array(t) for t in load_model(path).graph.initializer}
    np.testing.assert_array_equal(loaded["preact_conv.weight"], real)
    folded = bnfold.fold(path).model
    kept = {t.name: t for t in folded.graph.initializer}["preact_conv.weight"]
    np.testing.assert_array_equal(numpy_helper.to_array(kept), real)


def test_one_data_file_per_tensor_never_holds_more_than_the_cap_open(tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.onnxio.deferred, "MAX_OPEN_FILES", 2)
    m = build_sample_model()
    onnx.save(m, os.fspath(tmp_path / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    assert len(os.listdir(tmp_path)) > 10
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result = bnfold.fold_file(tmp_path / "m.onnx", out, verify=False)
    expected = bnfold.fold(build_sample_model()).model  # onnx.save emptied m's tensors
    for written in (load_model(out), result.model):  # the file, and the model read back on demand
        assert [t.name for t in written.graph.initializer] == [
            t.name for t in expected.graph.initializer
        ]
        for got, want in zip(written.graph.initializer, expected.graph.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


def test_unknown_tensor_fields_survive_the_deferred_path(tmp_path):
    """A field from a newer ONNX on a large tensor: not deferred, written back as it was."""
    from bnfold.onnxio.stream import varint

    m = build_sample_model()
    index = next(i for i, t in enumerate(m.graph.initializer) if t.name == "preact_conv.weight")
    raw = m.graph.initializer[index].SerializeToString() + varint(99 << 3) + varint(1)
    m.graph.initializer[index].CopyFrom(onnx.TensorProto.FromString(raw))
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    out = tmp_path / "o.onnx"
    bnfold.fold_file(path, out, verify=False)
    assert out.read_bytes() == bnfold.fold(m).model.SerializeToString()
    assert raw in out.read_bytes()


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


def test_model_proto_without_its_external_data_is_a_clear_error(tmp_path):
    m = build_sample_model()
    onnx.save(m, os.fspath(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0)
    bare = onnx.load(os.fspath(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(BnfoldError, match="external file that was not loaded"):
        bnfold.fold(bare)


@pytest.mark.parametrize("case", ["offset past the end", "output data over the input"])
def test_external_data_edge_cases_are_refused(tmp_path, case):
    folder = tmp_path / "m"
    folder.mkdir()
    if case == "offset past the end":
        m = build_sample_model()
        weight = next(t for t in m.graph.initializer if t.name == "preact_conv.weight")
        (folder / "x.bin").write_bytes(b"\0" * 64)
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="x.bin")
        weight.external_data.add(key="offset", value="4096")
        path = folder / "m.onnx"
        path.write_bytes(m.SerializeToString())
        with pytest.raises(BnfoldError, match="reads bytes 4096"):
            bnfold.fold_file(path, folder / "o.onnx", verify=False)
    else:  # the input is named like the output's data file: writing it would destroy the input
        path = folder / "model.data"
        save_model(build_sample_model(), path, external_data=True)
        with pytest.raises(BnfoldError, match="over the input"):
            bnfold.fold_file(path, folder / "model", verify=False)
    before = sorted(os.listdir(folder))
    assert all(not name.startswith(".bnfold") for name in before)


@pytest.mark.parametrize("case", ["unknown data type", "negative dims", "name not UTF-8"])
def test_malformed_tensors_are_user_errors(tmp_path, case):
    m = build_sample_model()
    scale = next(t for t in m.graph.initializer if t.name == "stem_bn.scale")
    data = m.SerializeToString()
    if case == "unknown data type":
        scale.data_type = 999
        data = m.SerializeToString()
    elif case == "negative dims":
        scale.dims[0] = -scale.dims[0]
        data = m.SerializeToString()
    else:  # protobuf hands invalid UTF-8 back as bytes
        data = data.replace(b"stem_bn.scale", b"stem_bn.sca\xffe")
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(BnfoldError):
        bnfold.fold_file(path, tmp_path / "o.onnx", verify=False)
    assert os.listdir(tmp_path) == ["bad.onnx"]


@pytest.mark.parametrize("text", [b"stem_relu.out", b"\x1a\x09stem_relu"],
                         ids=["tensor-name", "node-name"])
def test_node_names_not_utf8_are_refused_by_fold_and_by_load(tmp_path, text):
    # fold_file leaves the nodes' names to NodeTable (one read of every node); load_model checks
    # them itself: both refuse with one line.
    data = build_sample_model().SerializeToString()
    assert data.count(text) >= 1
    broken = text[:-3] + b"\xff" + text[-2:]
    path = tmp_path / "bad.onnx"
    path.write_bytes(data.replace(text, broken))
    with pytest.raises(BnfoldError, match="not valid UTF-8"):
        bnfold.fold_file(path, tmp_path / "o.onnx", verify=False)
    with pytest.raises(BnfoldError, match="not valid UTF-8"):
        load_model(path)
    assert os.listdir(tmp_path) == ["bad.onnx"]


@pytest.mark.parametrize("weights", ["raw", "float_data", "unknown field"])
def test_whole_and_streamed_saves_write_the_same_bytes(tmp_path, monkeypatch, weights):
    """A small model with nothing deferred is serialised in one call (serialize_whole); the
    streaming writer must write the very same file, folded values included, also where the
    replaced weight held typed data or a field from a newer ONNX (kept, as protobuf keeps it)."""
    m = build_sample_model()
    for index, tensor in enumerate(m.graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT or weights == "raw":
            continue
        if weights == "float_data":
            values = numpy_helper.to_array(tensor)
            replacement = onnx.helper.make_tensor(
                tensor.name, onnx.TensorProto.FLOAT, values.shape, values.ravel())
        else:  # field 20, varint 7: unknown to this onnx
            replacement = onnx.TensorProto.FromString(tensor.SerializeToString() + b"\xa0\x01\x07")
        m.graph.initializer[index].CopyFrom(replacement)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 2**30)  # defer nothing
    written = {}
    for way, limit in (("streamed", -1), ("whole", 2**30)):
        monkeypatch.setattr(bnfold.onnxio.files, "SERIALIZE_WHOLE_MAX_BYTES", limit)
        result = bnfold.fold_file(path, tmp_path / f"{way}.onnx", verify=False)
        assert result.report.folded_count > 0
        written[way] = (tmp_path / f"{way}.onnx").read_bytes()
    assert written["whole"] == written["streamed"]
    assert written["whole"] == _eager_fold_bytes(path)


def test_short_raw_data_in_a_small_model_is_refused_before_writing(tmp_path, monkeypatch):
    """Parsed whole (nothing deferred), a weight holding fewer bytes than its dims need is still
    refused by bnfold itself: onnx.checker before 1.2x does not compare them."""
    monkeypatch.setattr(bnfold.onnxio.files, "DIRECT_PARSE_MAX_BYTES", 2**30)
    m = build_sample_model()
    m.graph.initializer.append(onnx.TensorProto(
        name="short", data_type=onnx.TensorProto.FLOAT, dims=[8, 2000],
        raw_data=np.zeros(5000, np.float32).tobytes()))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out = tmp_path / "out.onnx"
    with pytest.raises(BnfoldError, match="'short' holds 20000 bytes but its dims"):
        bnfold.fold_file(path, out, verify=False)
    assert not out.exists()
