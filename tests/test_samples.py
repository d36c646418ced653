"""Each sample script runs end to end at a tiny budget (a fresh process, as a user would run it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


def run_sample(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, os.path.join(SAMPLES, script), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_paper_experiment_sample(tmp_path):
    out = run_sample("paper_experiment.py", "--steps", "30", "--out", str(tmp_path))
    assert "folded 3 of 3 BatchNorms, kept 0; verified: True" in out
    for name in ("curve.csv", "curve.png", "paper-mlp-bn.pt", "paper-mlp-bn.onnx",
                 "paper-mlp-bn.folded.onnx"):
        assert (tmp_path / name).is_file(), name


def test_own_model_sample(tmp_path):
    out = run_sample("own_model.py", "--steps", "5", "--out", str(tmp_path))
    assert "3/3 BatchNorms kept" in out
    assert "folded 3 of 3 BatchNorms; verified: True" in out
    assert (tmp_path / "tiny.folded.onnx").is_file()
