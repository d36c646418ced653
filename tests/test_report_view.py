"""The fold table shows the op and graph columns only when they carry information."""

from __future__ import annotations

import io

from rich.console import Console

from bnfold.folding.report import FOLDED, KEPT, FoldEntry, FoldReport
from bnfold.cli.report_view import render_fold_report


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
