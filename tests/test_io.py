"""bnfold.onnxio.files on untrusted files: every bad file is a BnfoldError that says what to do, nothing is
written on failure, and external data round-trips without touching the caller's model or the input.
"""

from __future__ import annotations

import errno
import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import bnfold.onnxio.files
from bnfold.errors import BnfoldError
from bnfold.onnxio.files import load_model, load_model_info, save_model
from bnfold.sample_model import build_sample_model

# A conv weight the fold has to read (stem_conv → stem_bn folds), stored externally (1728 bytes).
EXTERNAL_TENSOR = "stem_conv.weight"


def sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder` (hidden staging folders included) with its hash."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder) + "/"] = "dir"
        for name in files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, folder)] = "link" if os.path.islink(full) else sha256(full)
    return found


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def external_names(path) -> set[str]:
    """Tensors the file itself keeps outside (read without following external data)."""
    raw = onnx.load(os.fspath(path), load_external_data=False)
    return {t.name for t in raw.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


@pytest.fixture
def external_model(tmp_path):
    """The sample model saved in tmp_path/model/m.onnx with its tensors in m.onnx.data."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    assert save_model(build_sample_model(), path, external_data=True)
    assert EXTERNAL_TENSOR in external_names(path)
    return path


def rewrite_location(path, **entries: str) -> None:
    """Change EXTERNAL_TENSOR's external_data entries (location/offset/length) in the file."""
    raw = onnx.load(os.fspath(path), load_external_data=False)
    (tensor,) = [t for t in raw.graph.initializer if t.name == EXTERNAL_TENSOR]
    for entry in tensor.external_data:
        if entry.key in entries:
            entry.value = entries[entry.key]
    path.write_bytes(raw.SerializeToString())


# --- external data that must not be read -------------------------------------------------------


def _dotdot(path):
    # A real data file sits one level up, so only the confinement can stop the read.
    (path.parent.parent / "m.onnx.data").write_bytes((path.parent / "m.onnx.data").read_bytes())
    rewrite_location(path, location="../m.onnx.data")


def _absolute(path):
    # The absolute path names the model's own, valid data file: still refused.
    rewrite_location(path, location=str(path.parent / "m.onnx.data"))


def _symlink_out(path):
    outside = path.parent.parent / "elsewhere"
    outside.mkdir()
    (outside / "real.data").write_bytes((path.parent / "m.onnx.data").read_bytes())
    os.symlink(outside / "real.data", path.parent / "link.data")
    rewrite_location(path, location="link.data")


def _missing(path):
    os.unlink(path.parent / "m.onnx.data")


def _truncated(path):
    data = path.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])  # stem_conv.weight needs bytes 0..1728


def _non_numeric_offset(path):
    rewrite_location(path, offset="12abc")


BAD_EXTERNAL = {
    "dotdot": (_dotdot, "outside the model's folder", "move the data file beside the model"),
    "absolute": (_absolute, "absolute path", "move the data file beside the model"),
    "symlink": (_symlink_out, "symlink", "copy the data file beside the model"),
    "missing": (_missing, "missing", "keep it beside"),
    "truncated": (_truncated, "truncated", "does not belong to this model"),
    "non_numeric_offset": (_non_numeric_offset, "non-numeric", "re-export the model"),
}


@pytest.mark.parametrize("case", list(BAD_EXTERNAL))
def test_bad_external_data_is_refused_and_nothing_written(external_model, case):
    damage, what, advice = BAD_EXTERNAL[case]
    damage(external_model)
    before = snapshot(external_model.parent.parent)

    for load in (load_model, lambda p: load_model_info(p)[0]):
        with pytest.raises(BnfoldError) as caught:
            load(external_model)
        message = str(caught.value)
        assert what in message and advice in message, message
        assert EXTERNAL_TENSOR in message or "m.onnx" in message, message

    with pytest.raises(BnfoldError, match=what):
        bnfold.fold_file(external_model, verify=False)
    assert snapshot(external_model.parent.parent) == before


def test_absolute_location_is_refused_even_if_onnx_would_read_it(external_model):
    # Control for the "absolute" case: the file it names is real and complete.
    target = external_model.parent / "m.onnx.data"
    rewrite_location(external_model, location=str(target))
    assert target.is_file() and target.stat().st_size >= 1728
    with pytest.raises(BnfoldError, match="absolute path"):
        load_model(external_model)


# --- files that are not ONNX models ------------------------------------------------------------


def _garbage(folder):
    path = folder / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path, "not a valid ONNX model|not an ONNX model", "re-export"


def _text(folder):
    path = folder / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    return path, "not a valid ONNX model|not an ONNX model", "re-export"


def _empty(folder):
    path = folder / "empty.onnx"
    path.write_bytes(b"")
    return path, "is empty", "re-export"


def _directory(folder):
    path = folder / "dir.onnx"
    path.mkdir()
    return path, "is a folder", "give the .onnx file inside it"


def _missing_file(folder):
    return folder / "absent.onnx", "does not exist", "check the path"


NOT_A_MODEL = {"garbage": _garbage, "text": _text, "empty": _empty, "directory": _directory,
               "missing": _missing_file}


@pytest.mark.parametrize("case", list(NOT_A_MODEL))
def test_not_a_model_is_refused_and_nothing_written(tmp_path, case):
    path, what, advice = NOT_A_MODEL[case](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(BnfoldError, match=what) as caught:
        load_model_info(path)
    assert advice in str(caught.value)
    with pytest.raises(BnfoldError, match=what):
        bnfold.fold_file(path, tmp_path / "out.onnx", verify=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_never_escape_as_another_exception(tmp_path, seed):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(64 + 997 * seed))
    with pytest.raises(BnfoldError):
        load_model(path)


def test_raw_data_shorter_than_dims_loads_but_fold_names_the_tensor(tmp_path):
    model = build_sample_model()
    (tensor,) = [t for t in model.graph.initializer if t.name == EXTERNAL_TENSOR]
    tensor.raw_data = tensor.raw_data[:-8]  # two float32 values short of [16, 3, 3, 3]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())

    loaded = load_model(path)  # loading does not parse tensor values
    assert len(next(t for t in loaded.graph.initializer if t.name == EXTERNAL_TENSOR).raw_data) == 1720
    before = snapshot(tmp_path)
    with pytest.raises(BnfoldError, match="stem_conv.weight") as caught:
        bnfold.fold(path)
    assert "re-export" in str(caught.value)
    with pytest.raises(BnfoldError, match="stem_conv.weight"):
        bnfold.fold_file(path, verify=False)
    assert snapshot(tmp_path) == before


# --- round trips -------------------------------------------------------------------------------


def test_external_data_round_trip_gives_identical_tensors(tmp_path):
    model = build_sample_model()
    path = tmp_path / "m.onnx"
    assert save_model(model, path, external_data=True) == [str(path), f"{path}.data"]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert len(external_names(path)) == 5  # the five weights of 1 KiB or more

    loaded, data_files = load_model_info(path)
    assert data_files == {os.path.realpath(tmp_path / "m.onnx.data")}
    assert not [t.name for t in bnfold.onnxio.files.iter_tensors(loaded)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    want, got = arrays(model), arrays(loaded)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and np.array_equal(want[name], got[name]), name
    onnx.checker.check_model(loaded)


def test_plain_save_round_trip_has_no_data_file(tmp_path):
    model = build_sample_model()
    path = tmp_path / "m.onnx"
    assert save_model(model, path) == [str(path)]
    assert os.listdir(tmp_path) == ["m.onnx"]
    loaded, data_files = load_model_info(path)
    assert not data_files
    assert loaded.SerializeToString() == model.SerializeToString()


def test_large_model_switches_to_external_data_automatically(tmp_path, monkeypatch):
    model = build_sample_model()
    monkeypatch.setattr(bnfold.onnxio.files, "_PROTOBUF_LIMIT", 1000)
    path = tmp_path / "big.onnx"
    assert save_model(model, path) == [str(path), f"{path}.data"]
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert EXTERNAL_TENSOR in external_names(path)
    assert all(np.array_equal(a, arrays(load_model(path))[n]) for n, a in arrays(model).items())
    # external_data=False overrides the automatic switch
    assert save_model(model, tmp_path / "forced.onnx", external_data=False)
    assert not (tmp_path / "forced.onnx.data").exists()
    assert not external_names(tmp_path / "forced.onnx")


def test_external_save_leaves_callers_tensors_in_memory(tmp_path):
    model = build_sample_model()
    want = {t.name: t.raw_data for t in model.graph.initializer}
    save_model(model, tmp_path / "m.onnx", external_data=True)
    for tensor in model.graph.initializer:
        assert tensor.data_location != onnx.TensorProto.EXTERNAL, tensor.name
        assert not tensor.external_data, tensor.name
        assert tensor.raw_data == want[tensor.name], tensor.name
    onnx.checker.check_model(model)


def test_external_save_leaves_callers_model_byte_identical(tmp_path):
    # Restoring data_location=DEFAULT on tensors that never had it set changed the bytes.
    model = build_sample_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert model == build_sample_model()


@pytest.mark.parametrize("external", [False, True])
def test_rejected_save_leaves_nothing(tmp_path, external):
    seen = []

    def accept(staged: str) -> bool:
        # The staged file is complete and loadable when accept sees it.
        seen.append(arrays(load_model(staged)))
        return False

    model = build_sample_model()
    assert save_model(model, tmp_path / "m.onnx", external_data=external, accept=accept) == []
    assert len(seen) == 1 and np.array_equal(seen[0]["fc.weight"], arrays(model)["fc.weight"])
    assert snapshot(tmp_path) == {}


def test_accept_raising_leaves_nothing(tmp_path):
    def accept(staged: str) -> bool:
        raise BnfoldError("verification could not run: fix it")

    with pytest.raises(BnfoldError, match="verification could not run"):
        save_model(build_sample_model(), tmp_path / "m.onnx", external_data=True, accept=accept)
    assert snapshot(tmp_path) == {}


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    assert save_model(build_sample_model(), path)
    assert load_model(path).graph.name == "bnfold_sample"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_into_missing_folder_is_refused(tmp_path):
    with pytest.raises(BnfoldError, match="does not exist: create it first"):
        save_model(build_sample_model(), tmp_path / "nope" / "m.onnx")
    assert snapshot(tmp_path) == {}


def test_save_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(BnfoldError, match="is a folder"):
        save_model(build_sample_model(), tmp_path / "out.onnx")
    assert snapshot(tmp_path) == {"out.onnx/": "dir"}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes through permission bits (see the read-only folder test)")
def test_save_into_unwritable_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(BnfoldError, match="permission denied"):
            save_model(build_sample_model(), locked / "m.onnx")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


def test_save_into_folder_that_refuses_new_files_is_refused(tmp_path, monkeypatch):
    # os.access passes but creating the staging folder fails (read-only mount, root on /proc,
    # full disk): once a raw OSError escaped from tempfile.mkdtemp.
    def read_only_mkdtemp(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bnfold.onnxio.files.tempfile, "mkdtemp", read_only_mkdtemp)
    with pytest.raises(BnfoldError, match="Read-only file system"):
        save_model(build_sample_model(), tmp_path / "m.onnx")


# --- fold_file with external data --------------------------------------------------------------


def test_fold_file_keeps_external_data_and_leaves_input_untouched(external_model):
    folder = external_model.parent
    data = folder / "m.onnx.data"
    hashes = {external_model: sha256(external_model), data: sha256(data)}

    result = bnfold.fold_file(external_model)
    out = folder / "m.folded.onnx"
    assert result.output_path == str(out)
    assert result.report.folded_count == 6 and result.report.verification["ok"] is True
    assert sorted(os.listdir(folder)) == ["m.folded.onnx", "m.folded.onnx.data", "m.onnx",
                                          "m.onnx.data"]
    assert external_names(out), "the folded model should keep its weights in external data"
    folded, data_files = load_model_info(out)
    assert data_files
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    onnx.checker.check_model(folded)
    assert bnfold.verify(external_model, out).ok  # fold_file imported the bnfold.verification.runs module
    assert {p: sha256(p) for p in hashes} == hashes


def test_fold_file_of_plain_model_writes_no_data_file(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(build_sample_model(), path)
    result = bnfold.fold_file(path, verify=False)
    assert result.output_path == str(tmp_path / "m.folded.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.folded.onnx", "m.onnx"]


def test_fold_file_never_overwrites_the_inputs_data_file(tmp_path):
    # a.onnx keeps its weights in b.onnx.data; folding into b.onnx must not clobber them.
    path = tmp_path / "a.onnx"
    save_model(build_sample_model(), path, external_data=True)
    os.rename(tmp_path / "a.onnx.data", tmp_path / "b.onnx.data")
    raw = onnx.load(os.fspath(path), load_external_data=False)
    for tensor in raw.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "b.onnx.data"
    path.write_bytes(raw.SerializeToString())
    data_hash = sha256(tmp_path / "b.onnx.data")
    try:
        bnfold.fold_file(path, tmp_path / "b.onnx", verify=False)
    except BnfoldError as exc:  # refusing is a fine answer, if it writes nothing
        assert "b.onnx.data" in str(exc)
        assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx.data"]
    assert sha256(tmp_path / "b.onnx.data") == data_hash
    load_model(path)


@pytest.mark.parametrize("in_place", [False, True])
def test_output_onto_the_inputs_own_data_file_is_refused(tmp_path, in_place):
    model_path = tmp_path / "m.onnx"
    onnx.save(build_sample_model(), os.fspath(model_path), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    data_hash = sha256(tmp_path / "weights.bin")
    with pytest.raises(BnfoldError, match="external data file"):
        bnfold.fold_file(model_path, tmp_path / "weights.bin", verify=False, in_place=in_place)
    assert sha256(tmp_path / "weights.bin") == data_hash
    assert not (tmp_path / "weights.bin.data").exists()
    load_model(model_path)
