"""`bnfold demo` runs the whole job and leaves verified, folded models and reports behind."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import cli


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("torch", reason="the demo's PyTorch section needs bnfold[torch]")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    sample = json.loads((tmp_path / "sample.folded.report.json").read_text())
    assert sample["summary"] == {"batchnorm": 7, "folded": 6, "lowered": 0, "kept": 1,
                               "mul_add_folded": 0, "mul_add_kept": 0, "convs_merged": 0}
    assert sample["verification"]["ok"]
    exported = json.loads((tmp_path / "resnet18.folded.report.json").read_text())
    assert exported["summary"]["folded"] == exported["summary"]["batchnorm"] == 20
    folded = onnx.load(str(tmp_path / "resnet18.folded.onnx"))
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [m["label"] for m in bench["models"]] == ["original", "folded"]
    assert all(m["runs"] >= 200 and m["p50"] > 0 for m in bench["models"])
    assert all(m["outputs_ok"] for m in bench["models"])
    cross = json.loads((tmp_path / "verify-engine.json").read_text())
    assert cross["ok"] and cross["engine"]["name"] in ("openvino", "ort-cpu", "ort-cuda", "trt")
    assert "what is deployed" in result.output
