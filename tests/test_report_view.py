"""The fold table shows the op and graph columns only when they carry information, and a
report without a table, printed without rich, looks as rich draws it."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from bnfold.cli.fold_summary import print_fold_report
from bnfold.cli.report_view import render_fold_report
from bnfold.folding.report import FOLDED, KEPT, FoldEntry, FoldReport


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
def test_report_printed_without_rich_is_what_rich_draws(env, monkeypatch, capsys):
    # `bnfold fold` prints a table-less report with click (rich's import costs more than the
    # printing): byte for byte what rich draws, styles included, in each environment.
    for name in ("FORCE_COLOR", "NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    report, title = _all_folded_report(), "bnfold fold m[bold].onnx"
    print_fold_report(report, title=title)
    plain = capsys.readouterr().out
    render_fold_report(report, Console(highlight=False, file=sys.stdout), title=title, full=False)
    drawn = capsys.readouterr().out
    assert plain == drawn
    assert "folded 4: conv-bn 3, gemm-bn 1" in plain and "[x] froze input w" in plain
    assert ("\x1b[3m" in plain) == (env.get("FORCE_COLOR") == "1" and "TERM" not in env)
    assert ("\x1b[32m" in plain) == (env == {"FORCE_COLOR": "1"})


def test_report_with_a_kept_batchnorm_is_drawn_by_rich(capsys):
    report = _all_folded_report()
    report.entries.append(FoldEntry("pre", "BatchNormalization", KEPT, "main", None, None,
                                    ["output also feeds Relu_3"]))
    print_fold_report(report, title="bnfold fold m.onnx")
    out = capsys.readouterr().out
    assert "┃" in out and "output also feeds Relu_3" in out and "kept: 1" in out
