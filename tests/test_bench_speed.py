"""tools/bench_speed.py runs end to end on tiny inputs and prints every section of issue #12."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import onnx

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def test_one_run_prints_every_ratio(tmp_path):
    sys.path.insert(0, str(TOOLS))
    try:
        import onnx_models
    finally:
        sys.path.remove(str(TOOLS))
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(onnx_models.build("mobilenetv2", seed=0, width=0.125, resolution=32),
              str(models / "tiny.onnx"))
    # --copy-from-mb 0: the tiny model stands in for the 100 MB ones of section (c).
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "bench_speed.py"), "--models", str(models), "--sizes", "20",
         "--repeat", "1", "--copy-from-mb", "0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(TOOLS.parent), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for section in ("(a) graph size", "(b) the CNN set", "(c) models of 100 MB", "peak RSS"):
        assert section in out, out
    (chain,) = [line for line in out.splitlines() if line.startswith("60 ")]  # 20 triples
    model, copy = [line for line in out.splitlines() if line.startswith("tiny ")]  # (b), (c)
    # Ratios with their min-max: over the floor, of the CLI (and for chains the bare Python
    # fold's, tools/bare_fold.py); then the RSS ratios.
    assert chain.count("x (") == 4 and model.count("x (") == 3 and copy.count("x (") == 1
    assert chain.count("x") == 6 and model.count("x") == 5, (chain, model)
    assert "geomean" in out and "cli/(cp + import onnx)" in out
    assert "bnfold from " + str(TOOLS.parent / "bnfold") in out  # the checkout under test ran
