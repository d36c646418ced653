"""The `bnfold` command (fold, verify, inspect): exit codes, files written or not, and user errors
as one `error:` line with no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import cli
from bnfold.onnxio.files import load_model, save_model
from bnfold.sample_model import build_sample_model

BN_NAMES = ["stem_bn", "dw_bn", "pw_bn", "pre_bn", "preact_bn", "up_bn", "head_bn"]
OUTPUT = "head_bn.out"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def count_bn(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in load_model(path).graph.node)


def bnfold(*args: str):
    return CliRunner().invoke(cli, [os.fspath(a) for a in args], prog_name="bnfold")


def assert_user_error(result, *parts: str, code: int = 1) -> None:
    """Exit `code`, one `error:` line on stderr naming `parts`, and no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    # Anything but SystemExit here is an exception that escaped (a traceback for the user).
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    if code == 1:
        assert err.startswith("error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, err


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "M.onnx"
    save_model(build_sample_model(), path)
    return path


# --- fold --------------------------------------------------------------------------------------


def test_fold_writes_beside_input_and_reports(model_path):
    result = bnfold("fold", model_path)
    assert result.exit_code == 0, result.output
    out = model_path.parent / "M.folded.onnx"
    assert sorted(os.listdir(model_path.parent)) == ["M.folded.onnx", "M.onnx"]
    # by default: counts per rule, and the kept BN with its reason
    assert "folded 6: conv-bn 3, bn-conv 1, convtranspose-bn 1, gemm-bn 1" in result.stdout
    assert "preact_bn" in result.stdout and "stem_bn" not in result.stdout
    assert "folded: 6" in result.stdout and "kept: 1" in result.stdout
    assert "equivalent" in result.stdout and "NOT equivalent" not in result.stdout
    assert f"wrote {out}" in result.stdout.replace("\n", "")
    assert count_bn(out) == 1
    onnx.checker.check_model(load_model(out))


def test_fold_list_shows_every_bn_and_long_paths_stay_on_one_line(model_path, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 6)
    deep.mkdir()
    out = deep / "model-with-a-long-name.folded.onnx"
    result = bnfold("fold", model_path, "--list", "-o", out)
    assert result.exit_code == 0, result.output
    for name in BN_NAMES:
        assert name in result.stdout
    assert f"wrote {out}\n" in result.stdout  # never wrapped, so it can be copied


def test_fold_output_and_json_report(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "R.json"
    result = bnfold("fold", model_path, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert out.is_file() and not (tmp_path / "M.folded.onnx").exists()
    data = json.loads(report.read_text())
    assert data["summary"] == {"batchnorm": 7, "folded": 6, "lowered": 0, "kept": 1,
                               "mul_add_folded": 0, "mul_add_kept": 0, "convs_merged": 0}
    (kept,) = [e for e in data["entries"] if e["status"] == "kept"]
    assert kept["node"] == "preact_bn" and kept["reasons"] and all(kept["reasons"])
    folded = {e["node"] for e in data["entries"] if e["status"] == "folded"}
    assert folded == set(BN_NAMES) - {"preact_bn"}
    assert data["verification"]["ok"] is True
    assert [o["name"] for o in data["verification"]["outputs"]] == [OUTPUT]


def test_fold_refuses_to_overwrite_input_without_in_place(model_path):
    before = sha256(model_path)
    result = bnfold("fold", model_path, "-o", model_path)
    assert_user_error(result, "--in-place")
    assert sha256(model_path) == before
    assert os.listdir(model_path.parent) == ["M.onnx"]


def test_fold_in_place(model_path, tmp_path):
    original = tmp_path / "original.onnx"
    original.write_bytes(model_path.read_bytes())
    result = bnfold("fold", model_path, "-o", model_path, "--in-place")
    assert result.exit_code == 0, result.output
    assert count_bn(model_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["M.onnx", "original.onnx"]
    assert bnfold("verify", original, model_path).exit_code == 0


def test_fold_in_place_alone_replaces_the_input(model_path, tmp_path):
    result = bnfold("fold", model_path, "--in-place", "--no-verify")
    assert result.exit_code == 0, result.output
    assert count_bn(model_path) == 1 and os.listdir(tmp_path) == ["M.onnx"]
    assert f"wrote {model_path}\n" in result.stdout


def test_fold_names_the_data_file_it_writes_and_the_one_it_leaves_unread(tmp_path):
    # an exporter's layout: the weights in weights.bin, not the M.onnx.data bnfold writes
    model = build_sample_model()
    onnx.save(model, tmp_path / "M.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    out = tmp_path / "out" / "F.onnx"
    out.parent.mkdir()
    result = bnfold("fold", tmp_path / "M.onnx", "-o", out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert f"wrote {out} and its external data F.onnx.data (keep them together)\n" in (
        result.stdout)
    assert sorted(os.listdir(out.parent)) == ["F.onnx", "F.onnx.data"]

    result = bnfold("fold", tmp_path / "M.onnx", "--in-place", "--no-verify")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["M.onnx", "M.onnx.data", "out", "weights.bin"]
    assert ("M.onnx.data (keep them together); weights.bin, which the input read its weights "
            "from, is no longer read by it: delete it if no other model uses it") in result.stdout
    os.remove(tmp_path / "weights.bin")  # as the message says: the folded model stands alone
    assert count_bn(tmp_path / "M.onnx") == 1


def test_fold_checks_its_report_path_before_writing_the_model(model_path, tmp_path, monkeypatch):
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # a read-only folder, even for root
        if dir is not None and os.path.samefile(dir, locked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    result = bnfold("fold", model_path, "--report", locked / "R.json")
    assert_user_error(result, "--report", "cannot write in", "Permission denied")
    assert sorted(os.listdir(tmp_path)) == ["M.onnx", "locked"]  # no folded model either


def test_reports_get_the_permissions_of_a_new_file(model_path, tmp_path):
    mask = os.umask(0o022)
    try:
        report = tmp_path / "R.json"
        assert bnfold("fold", model_path, "--no-verify", "--report", report).exit_code == 0
        assert report.stat().st_mode & 0o777 == 0o644
        os.chmod(report, 0o640)  # replacing a file keeps its mode
        assert bnfold("inspect", model_path, "--json", report).exit_code == 0
        assert report.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)


@pytest.mark.parametrize("args, named", [
    (["--verify", "fold", "--no-verify", "--runs", "3"], "--runs"),
    (["--verify", "fold", "--no-verify", "--seed", "0", "--shape", "x=1x3x8x8"],
     "--shape, --seed"),
    (["--verify", "fold", "--no-verify", "--inputs", "x.npz"], "--inputs"),
    (["verify", "--runs", "0"], "--runs"),
    (["verify", "--atol", "-1"], "--atol"),
    (["verify", "--rtol", "-1e-5"], "--rtol"),
])
def test_bad_usage_exits_2_before_any_work(model_path, args, named):
    if args[0] == "--verify":  # fold with options --no-verify would silently ignore
        args = [args[1], model_path, *args[2:]]
    else:
        args = [args[0], model_path, model_path, *args[1:]]
    result = bnfold(*args)
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output
    assert os.listdir(model_path.parent) == ["M.onnx"]


def test_fold_no_verify(model_path, tmp_path):
    report = tmp_path / "R.json"
    result = bnfold("fold", model_path, "--no-verify", "--report", report)
    assert result.exit_code == 0, result.output
    assert "equivalent" not in result.stdout
    assert json.loads(report.read_text())["verification"] is None
    assert count_bn(tmp_path / "M.folded.onnx") == 1


def test_fold_verification_failure_writes_nothing(model_path, tmp_path):
    report = tmp_path / "R.json"
    result = bnfold("fold", model_path, "--rtol", "0", "--atol", "0", "--report", report)
    assert result.exit_code == 1, result.output
    assert "NOT equivalent" in result.stdout and "nothing was written" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["M.onnx", "R.json"]  # no output, no staging folder
    verification = json.loads(report.read_text())["verification"]
    assert verification["ok"] is False and verification["outputs"][0]["max_abs_error"] > 0


def test_fold_lower_standalone(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "R.json"
    result = bnfold("fold", model_path, "-o", out, "--lower-standalone", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["summary"]["lowered"] == 1 and data["summary"]["kept"] == 0
    assert {e["node"]: e["status"] for e in data["entries"]}["preact_bn"] == "lowered"
    assert count_bn(out) == 0
    assert data["verification"]["ok"] is True


def _garbage(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return [path], "not a valid ONNX model"


def _missing(tmp_path):
    return [tmp_path / "absent.onnx"], "does not exist"


def _directory(tmp_path):
    (tmp_path / "folder.onnx").mkdir()
    return [tmp_path / "folder.onnx"], "is a folder"


def _output_in_missing_folder(tmp_path):
    save_model(build_sample_model(), tmp_path / "M.onnx")
    return [tmp_path / "M.onnx", "-o", tmp_path / "nope" / "out.onnx"], "does not exist"


BAD_FOLDS = {"garbage": _garbage, "missing": _missing, "directory": _directory,
             "output_in_missing_folder": _output_in_missing_folder}


@pytest.mark.parametrize("case", list(BAD_FOLDS))
def test_fold_user_errors(tmp_path, case):
    args, message = BAD_FOLDS[case](tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert_user_error(bnfold("fold", *args), message)
    assert sorted(os.listdir(tmp_path)) == before


def test_fold_missing_input_with_existing_output(tmp_path):
    # A stale output must not turn the same-file check into a FileNotFoundError traceback.
    (tmp_path / "absent.folded.onnx").write_bytes(b"stale")
    assert_user_error(bnfold("fold", tmp_path / "absent.onnx"), "does not exist")


@pytest.mark.parametrize("name", ["m[/].onnx", "m[bold].onnx"])
def test_error_message_keeps_brackets_in_paths(tmp_path, name):
    # Unescaped, rich reads '[/]' as markup (MarkupError traceback) and drops '[bold]'.
    assert_user_error(bnfold("fold", tmp_path / name), name, "does not exist")


def test_fold_output_names_keep_brackets(tmp_path):
    save_model(build_sample_model(), tmp_path / "m[bold].onnx")
    result = bnfold("fold", tmp_path / "m[bold].onnx", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m[bold].folded.onnx").is_file()
    assert "bnfold fold m[bold].onnx" in result.stdout
    assert "m[bold].folded.onnx" in result.stdout.replace("\n", "")


def test_bad_shape_text_is_usage_error(model_path):
    result = bnfold("fold", model_path, "--shape", "input=1xfoo")
    assert_user_error(result, "--shape", code=2)
    assert "input=1xfoo" in result.stderr
    assert os.listdir(model_path.parent) == ["M.onnx"]


def test_shape_for_unknown_input_is_refused(model_path):
    result = bnfold("fold", model_path, "--shape", "image=1x3x32x32")
    assert_user_error(result, "image", "input")
    assert os.listdir(model_path.parent) == ["M.onnx"]


def test_shape_sets_the_verification_batch(model_path, tmp_path):
    report = tmp_path / "R.json"
    result = bnfold("fold", model_path, "--shape", "input=5x3x32x32", "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["verification"]["ok"] is True


# --- verify ------------------------------------------------------------------------------------


@pytest.fixture
def folded_path(model_path):
    out = model_path.parent / "F.onnx"
    assert bnfold("fold", model_path, "-o", out, "--no-verify").exit_code == 0
    return out


def test_verify_model_and_its_fold(model_path, folded_path, tmp_path):
    out_json = tmp_path / "v.json"
    result = bnfold("verify", model_path, folded_path, "--json", out_json)
    assert result.exit_code == 0, result.output
    assert OUTPUT in result.stdout and "NOT equivalent" not in result.stdout
    data = json.loads(out_json.read_text())
    assert data["ok"] is True and data["runs"] == 1
    (metrics,) = data["outputs"]
    assert metrics["name"] == OUTPUT and 0 <= metrics["max_abs_error"] <= metrics["tolerance"]
    assert metrics["cosine"] > 0.999999


def test_verify_perturbed_weights_fails(model_path, tmp_path):
    model = build_sample_model()
    (fc,) = [t for t in model.graph.initializer if t.name == "fc.weight"]
    fc.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc) * np.float32(1.01), fc.name))
    perturbed = tmp_path / "P.onnx"
    save_model(model, perturbed)
    out_json = tmp_path / "v.json"
    result = bnfold("verify", model_path, perturbed, "--json", out_json)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and result.stderr == ""
    assert OUTPUT in result.stdout and "NOT equivalent" in result.stdout
    (metrics,) = json.loads(out_json.read_text())["outputs"]
    assert metrics["ok"] is False and metrics["max_abs_error"] > metrics["tolerance"]


def test_verify_with_npz_inputs(model_path, folded_path, tmp_path):
    npz = tmp_path / "data.npz"
    np.savez(npz, input=np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32))
    result = bnfold("verify", model_path, folded_path, "--inputs", npz)
    assert result.exit_code == 0, result.output
    assert "equivalent" in result.stdout and "NOT equivalent" not in result.stdout


def test_verify_npz_missing_an_input(model_path, folded_path, tmp_path):
    npz = tmp_path / "data.npz"
    np.savez(npz, image=np.zeros((2, 3, 32, 32), np.float32))
    assert_user_error(bnfold("verify", model_path, folded_path, "--inputs", npz),
                      "lacks", "input", "image")


def _int_input_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Relu", ["f"], ["y"])],
        "ints",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "ints.onnx"
    save_model(model, path)
    return path


def test_verify_int_input_is_generated_and_string_input_needs_inputs(tmp_path):
    path = _int_input_model(tmp_path)
    assert bnfold("verify", path, path).exit_code == 0
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["y"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [2])],
    )
    strings = tmp_path / "strings.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=8), strings)
    assert_user_error(bnfold("verify", strings, strings), "text", "STRING", "--inputs")
    # with real data the int model verifies too
    npz = tmp_path / "ids.npz"
    np.savez(npz, ids=np.arange(6, dtype=np.int64).reshape(2, 3) - 3)
    assert bnfold("verify", path, path, "--inputs", npz).exit_code == 0


# --- inspect, help, subprocess -----------------------------------------------------------------


def test_inspect_lists_every_bn_and_writes_nothing(model_path, tmp_path):
    before = sha256(model_path)
    out_json = tmp_path / "i.json"
    result = bnfold("inspect", model_path, "--json", out_json)
    assert result.exit_code == 0, result.output
    for name in BN_NAMES:
        assert name in result.stdout
    assert "folded: 6" in result.stdout and "kept: 1" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["M.onnx", "i.json"]
    assert sha256(model_path) == before
    assert json.loads(out_json.read_text())["summary"]["batchnorm"] == 7


def test_inspect_garbage_is_user_error(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\xff" * 100)
    assert_user_error(bnfold("inspect", tmp_path / "g.onnx"), "g.onnx")


@pytest.mark.parametrize("args", [["--help"], ["fold", "--help"], ["verify", "--help"],
                                  ["inspect", "--help"]])
def test_help(args):
    result = bnfold(*args)
    assert result.exit_code == 0, result.output
    assert "Usage: bnfold" in result.stdout
    if args[0] == "fold":
        assert "--in-place" in result.stdout and "--lower-standalone" in result.stdout


def test_unknown_option_is_usage_error(model_path):
    result = bnfold("fold", model_path, "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.stderr


def run_module(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(os.fspath, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_user_errors_have_no_traceback(tmp_path):
    (tmp_path / "g.onnx").write_bytes(np.random.default_rng(1).bytes(512))
    for args, part in [(["fold", "absent.onnx"], "does not exist"),
                       (["verify", "g.onnx", "g.onnx"], "not a valid ONNX model")]:
        proc = run_module(*args, cwd=tmp_path)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and part in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["g.onnx"]


def test_subprocess_mistyped_command_is_usage_error_with_a_suggestion(tmp_path):
    # In a fresh process no command module is loaded yet: the suggestion must still be found
    # (click suggests from 8.4 on).
    suggests = hasattr(click.exceptions, "NoSuchCommand")
    for typo, meant in [("folt", "fold"), ("expotr", "export")]:
        proc = run_module(typo, cwd=tmp_path)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert f"No such command '{typo}'." in proc.stderr, proc.stderr
        assert (f"Did you mean '{meant}'?" in proc.stderr) == suggests, proc.stderr


def test_subprocess_fold_succeeds(model_path):
    proc = run_module("fold", "M.onnx", cwd=model_path.parent)
    assert proc.returncode == 0, proc.stderr
    assert "equivalent" in proc.stdout and proc.stderr == ""
    assert (model_path.parent / "M.folded.onnx").is_file()


def test_report_in_a_missing_folder_fails_before_writing_the_model(model_path, tmp_path):
    result = bnfold("fold", model_path, "--report", tmp_path / "absent" / "r.json")
    assert_user_error(result, "--report", "does not exist")
    assert not (tmp_path / "m.folded.onnx").exists() and not list(tmp_path.glob("*.folded.onnx"))


def test_report_json_is_written_even_when_stdout_is_closed_early(model_path, tmp_path):
    # `bnfold fold M --report r.json | head -1`: the report file comes before the printing.
    report = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfold", "fold", str(model_path), "-o", str(tmp_path / "o.onnx"),
         "--no-verify", "--report", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    proc.wait(timeout=120)
    assert json.loads(report.read_text())["summary"]["folded"] == 6
    assert (tmp_path / "o.onnx").exists()
