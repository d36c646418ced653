"""`import bnfold` and `bnfold --help` stay light: no torch, tensorrt, openvino, onnxruntime,
graphsurgeon or matplotlib, whatever command modules get registered. And what the fold path
loads lazily (the API behind `import bnfold`, verification, the other commands' modules, rich)
stays lazy: `bnfold fold --no-verify` is meant to cost what a file copy does. Each check runs in
a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "tensorrt", "openvino", "onnxruntime", "onnx_graphsurgeon", "matplotlib")

# Prints the modules in sys.modules under the given packages as JSON, after running `body`.
PROBE = textwrap.dedent("""
    import json, sys
    {body}
    packages = {packages!r}
    loaded = sorted(m for m in sys.modules
                    if any(m == p or m.startswith(p + ".") for p in packages))
    print("LOADED=" + json.dumps(loaded))
""")


def loaded_modules(body: str, packages: tuple[str, ...], *args: str) -> list[str]:
    code = PROBE.format(body=textwrap.dedent(body).strip(), packages=packages)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("LOADED=")]
    return json.loads(line[len("LOADED="):])


def loaded_heavy(body: str) -> list[str]:
    return loaded_modules(body, HEAVY)


HELP_ALL = """
import bnfold, bnfold.cli
from click.testing import CliRunner
runner = CliRunner()
names = bnfold.cli.cli.list_commands(None)
assert len(names) == 9 and "fold" in names and "export" in names, names
for args in [["--help"]] + [[name, "--help"] for name in names]:
    result = runner.invoke(bnfold.cli.cli, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "Usage:" in result.output, (args, result.output)
"""

# What the console script does: bnfold.__main__ → cli.main(), including anything main() registers.
MAIN_HELP = """
import runpy
sys.argv = ["bnfold", "--help"]
try:
    runpy.run_module("bnfold", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_import_bnfold_is_light():
    loaded = loaded_heavy("import bnfold, bnfold.cli")
    assert loaded == [], f"`import bnfold, bnfold.cli` imported {loaded}"


def test_help_of_every_command_is_light():
    loaded = loaded_heavy(HELP_ALL)
    assert loaded == [], f"`bnfold [COMMAND] --help` imported {loaded}"


def test_console_entry_help_is_light():
    loaded = loaded_heavy(MAIN_HELP)
    assert loaded == [], f"`python -m bnfold --help` imported {loaded}"


def test_probe_sees_a_heavy_import():
    # Control: the probe must notice a heavy module, or the tests above prove nothing.
    assert "onnxruntime" in loaded_heavy("import bnfold\nimport onnxruntime")


def test_verify_loads_onnxruntime_only_when_run():
    body = """
    import bnfold
    from bnfold.sample_model import build_sample_model
    m = build_sample_model()
    assert "onnxruntime" not in sys.modules
    assert bnfold.verify(m, m).ok
    """
    assert "onnxruntime" in loaded_heavy(body)


def test_bnfold_verify_stays_the_function_after_its_module_is_imported():
    # fold_file imports bnfold.verification.runs lazily; that must never replace bnfold.verify (the
    # function) on the package, as happened once when the module shared the function's name.
    body = """
    import bnfold
    import bnfold.verification.runs
    assert callable(bnfold.verify), bnfold.verify
    """
    assert loaded_heavy(body) == []


def test_probe_sees_openvino():
    # Control for the openvino entry: the probe notices it when it is really imported.
    import importlib.util

    import pytest

    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install bnfold[openvino])")
    assert "openvino" in loaded_heavy("import bnfold\nimport openvino")


def test_engine_registry_and_verify_help_load_no_engine_library():
    body = """
    import bnfold.deploy.engines, bnfold.verification.on_engine, bnfold.deploy.engines.openvino
    from click.testing import CliRunner
    import bnfold.cli
    assert CliRunner().invoke(bnfold.cli.cli, ["verify", "--help"]).exit_code == 0
    """
    loaded = [m for m in loaded_heavy(body) if not m.startswith("onnxruntime")]
    assert loaded == [], loaded


def test_every_module_of_every_package_imports_light():
    # Every module outside bnfold.pytorch, imported: none pulls in torch, tensorrt, openvino
    # or matplotlib (they load inside the functions that need them). bnfold.pytorch is the one
    # place allowed to (its sample networks subclass torch.nn.Module), and only its package
    # __init__ and export modules are light.
    body = """
    import importlib, pkgutil, bnfold
    names = [m.name for m in pkgutil.walk_packages(bnfold.__path__, "bnfold.")]
    assert {"bnfold.onnxio.files", "bnfold.verification.runs", "bnfold.deploy.bench",
            "bnfold.pytorch.export", "bnfold.cli.report_view"} <= set(names), names
    for name in names:
        if name != "bnfold.__main__" and (not name.startswith("bnfold.pytorch.")
                                          or name in ("bnfold.pytorch.export",)):
            importlib.import_module(name)
    """
    loaded = [m for m in loaded_heavy(body) if m.split(".")[0] != "onnxruntime"]
    assert loaded == [], f"importing every bnfold module imported {loaded}"


# What `bnfold fold MODEL -o OUT --no-verify` does not need, and so must not import.
NOT_FOR_FOLD = ("bnfold.verification", "bnfold.deploy", "bnfold.pytorch",
                "bnfold.cli.torch_commands", "bnfold.cli.deploy_commands",
                "bnfold.cli.verify_commands", "bnfold.cli.report_view", "rich", *HEAVY)


def _all_folding_model(path) -> None:
    """Conv -> BatchNormalization: everything folds, so the report is lines, not a table."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), name)
              for name in ("scale", "bias", "mean", "var")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"],
                          name="bn")],
        "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(path))


# The console script's path: `bnfold fold IN -o OUT --no-verify [MORE]`, from the probe's argv.
FOLD_NO_VERIFY = """
import runpy
sys.argv = ["bnfold", "fold", sys.argv[1], "-o", sys.argv[2], "--no-verify", *sys.argv[3:]]
try:
    runpy.run_module("bnfold", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "bnfold.folding.api" in sys.modules  # the probe sees what the fold did load
"""


def test_fold_no_verify_loads_only_the_fold(tmp_path):
    _all_folding_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    loaded = loaded_modules(FOLD_NO_VERIFY, NOT_FOR_FOLD, str(tmp_path / "m.onnx"), str(out))
    assert out.exists()
    assert loaded == [], f"`bnfold fold --no-verify` imported {loaded}"


def test_kept_batchnorms_print_without_rich_and_list_draws_the_table(tmp_path, monkeypatch):
    # A kept BN is a plain line; --list piped is plain lines too, and on a terminal (FORCE_COLOR
    # stands in for one) a table, which loads rich through the same path.
    import onnx

    from bnfold.sample_model import build_sample_model  # preact_bn is kept

    onnx.save(build_sample_model(), str(tmp_path / "m.onnx"))
    args = (str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"))
    watched = ("rich.table", "bnfold.verification")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert loaded_modules(FOLD_NO_VERIFY, watched, *args) == []
    assert loaded_modules(FOLD_NO_VERIFY, watched, *args, "--list") == []
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert loaded_modules(FOLD_NO_VERIFY, watched, *args, "--list") == ["rich.table"]


def test_import_bnfold_and_its_cli_load_no_library():
    # The API behind `import bnfold` loads on first use; the group loads no command module.
    packages = ("onnx", "numpy", "rich", "bnfold.folding", "bnfold.verification",
                "bnfold.deploy", "bnfold.cli.onnx_commands", "bnfold.cli.torch_commands")
    loaded = loaded_modules("import bnfold, bnfold.cli", packages)
    assert loaded == [], f"`import bnfold, bnfold.cli` imported {loaded}"


def test_lazy_public_names_are_the_library_objects():
    body = """
    import bnfold
    from bnfold import verify, VerifyResult
    import bnfold.verification.runs as runs
    import bnfold.folding.api as api
    from bnfold.folding.report import FoldReport
    assert verify is runs.verify and VerifyResult is runs.VerifyResult
    assert bnfold.fold is api.fold and bnfold.fold_file is api.fold_file
    assert bnfold.FoldResult is api.FoldResult and bnfold.FoldReport is FoldReport
    assert all(callable(getattr(bnfold, name)) for name in bnfold.__all__)
    assert set(bnfold.__all__) <= set(dir(bnfold))
    try:
        bnfold.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("bnfold.no_such_name did not raise AttributeError")
    """
    assert loaded_heavy(body) == []
