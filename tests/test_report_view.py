"""The --list table shows the op and graph columns only when they carry information; the
default report is plain lines (no rich), styled as rich would style them."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from bnfold.cli.fold_summary import print_fold_report
from bnfold.cli.report_view import render_fold_report
from bnfold.folding.report import FOLDED, KEPT, LOWERED, FoldEntry, FoldReport


def _rendered(entries: list[FoldEntry]) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render_fold_report(FoldReport(entries=entries), console)
    return console.file.getvalue()


def _header(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if "status" in line)
    return [cell.strip() for cell in line.strip("┃│ ").split("┃")]


def test_plain_batchnorm_report_has_three_columns():
    text = _rendered([
        FoldEntry("bn1", "BatchNormalization", FOLDED, "main", "conv1", "conv-bn"),
        FoldEntry("bn2", "BatchNormalization", KEPT, "main", None, None, ["[x] is a graph input"]),
    ])
    assert _header(text) == ["node", "status", "into / why kept"]
    assert "conv1 (conv-bn)" in text
    assert "[x] is a graph input" in text  # the model's text is shown as is, not as markup


def test_mul_fold_and_subgraph_bring_their_columns():
    text = _rendered([
        FoldEntry("mul", "Mul", FOLDED, "main", "conv1", "conv-bn"),
        FoldEntry("bn", "BatchNormalization", FOLDED, "main/if/then_branch", "conv2", "conv-bn"),
    ])
    assert _header(text) == ["node", "op", "status", "into / why kept", "graph"]
    assert "main/if/then_branch" in text


def _all_folded_report() -> FoldReport:
    entries = [FoldEntry(f"bn{i}", "BatchNormalization", FOLDED, "main", f"conv{i}", "conv-bn")
               for i in range(3)]
    entries.append(FoldEntry("bn_gemm", "BatchNormalization", FOLDED, "main", "fc", "gemm-bn"))
    return FoldReport(entries=entries, nodes_before=12, nodes_after=8, params_before=12345,
                      params_after=12001, notes=["[x] froze input w (a note, not markup)"])


@pytest.mark.parametrize("env", [{}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": "1", "NO_COLOR": "1"},
                                 {"FORCE_COLOR": "1", "TERM": "dumb"}],
                         ids=["pipe", "force-color", "no-color", "dumb-terminal"])
def test_default_report_is_plain_lines_styled_as_rich_would(env, monkeypatch, capsys):
    for name in ("FORCE_COLOR", "NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    report, title = _all_folded_report(), "bnfold fold m[bold].onnx"
    print_fold_report(report, title=title)
    plain = capsys.readouterr().out
    assert "folded 4: conv-bn 3, gemm-bn 1" in plain and "[x] froze input w" in plain
    assert "m[bold].onnx" in plain  # the model's text, never markup
    assert "┃" not in plain and "kept" not in plain.split("BatchNormalization:")[0]
    assert ("\x1b[3m" in plain) == (env.get("FORCE_COLOR") == "1" and "TERM" not in env)
    assert ("\x1b[32m" in plain) == (env == {"FORCE_COLOR": "1"})


def test_default_report_lists_each_kept_and_lowered_batchnorm_in_full(capsys):
    report = _all_folded_report()
    long_name = "backbone.stage4.block12.branch_a.norm_with_a_very_long_identifying_suffix"
    report.entries += [
        FoldEntry(long_name, "BatchNormalization", KEPT, "main", None, None,
                  ["output also feeds Relu_3", "into conv9: padding"]),
        FoldEntry("bn_if", "BatchNormalization", KEPT, "main/If_0/then_branch", None, None,
                  ["is a graph input"]),
        FoldEntry("bn_low", "BatchNormalization", LOWERED, "main", "Mul+Add", "lower-bn",
                  ["no Conv beside it"]),
    ]
    print_fold_report(report, title="bnfold fold m.onnx")
    lines = capsys.readouterr().out.splitlines()
    assert "kept 2:" in lines and "lowered to Mul+Add 1:" in lines
    assert f"  {long_name}: output also feeds Relu_3; into conv9: padding" in lines
    assert "  main/If_0/then_branch: bn_if: is a graph input" in lines
    assert "  bn_low: no Conv beside it" in lines
    assert not any("┃" in line for line in lines)


def test_table_wraps_long_node_names_instead_of_cutting_their_tail():
    report = _all_folded_report()
    name = "functional_1_1/batch_normalization_5_1/batchnorm/mul_1"
    report.entries.append(FoldEntry(name, "Mul", FOLDED, "main", "conv1d", "conv-mul"))
    console = Console(width=60, record=True, color_system=None)
    render_fold_report(report, console)
    cells = [line.split("│")[1].strip() for line in console.export_text().splitlines()
             if line.count("│") > 3]
    assert name in "".join(cells) and "…" not in "".join(cells)


def test_list_draws_every_entry_as_a_table_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    report = _all_folded_report()
    print_fold_report(report, title="bnfold fold m.onnx", full=True)
    out = capsys.readouterr().out
    assert "┃" in out and out.count("conv-bn)") == 3 and "gemm-bn" in out


def test_list_piped_is_one_line_per_entry_with_names_whole(capsys, monkeypatch):
    # Piped, rich would draw the table 80 columns wide and wrap a long name anywhere in it.
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    report = _all_folded_report()
    long_name = "backbone/stage4/block12/branch_a/norm_with_a_very_long_identifying_suffix"
    report.entries += [
        FoldEntry("/stem/Add", "Add", FOLDED, "main", "/stem/conv", "merge-convs"),
        FoldEntry(long_name, "BatchNormalization", KEPT, "main", None, None,
                  ["no Conv/ConvTranspose/Gemm/MatMul beside it"]),
    ]
    print_fold_report(report, title="bnfold inspect m.onnx", full=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["bnfold inspect m.onnx", "folded 5: conv-bn 3, gemm-bn 1, merge-convs 1"]
    assert "  bn1 → conv1 (conv-bn)" in lines and "  bn_gemm → fc (gemm-bn)" in lines
    assert "  /stem/Add (Add) → /stem/conv (merge-convs)" in lines
    assert lines[lines.index("kept 1:") + 1] == (
        f"  {long_name}: no Conv/ConvTranspose/Gemm/MatMul beside it")
    assert lines[-1].startswith("BatchNormalization:") and not any("┃" in x for x in lines)
