"""The fold report's lines of text, and the report printed without rich when it has no table.

`bnfold fold` on a model where everything folds prints three lines (title, what folded, the
summary). Importing rich to print them would cost ~20 ms, 5-10% of folding a 14 MB model, so
they are printed with click; a report with a table (a BN kept, or --list) goes to rich
(bnfold.cli.report_view), which prints the same lines around its table. Either way the lines
look the same: same text and styles, styled on a terminal only, with rich's reading of NO_COLOR,
FORCE_COLOR and TERM=dumb.
"""

from __future__ import annotations

import os

import click

from bnfold.folding.report import FOLDED, FoldReport

# The rich styles the lines use, as click.style arguments.
_CLICK_STYLES = {"italic": {"italic": True}, "dim": {"dim": True}, "green": {"fg": "green"}}


def fold_counts_line(report: FoldReport) -> str:
    """'folded 52: conv-bn 50, gemm-bn 2 (every entry: ...)', rules by count."""
    by_rule: dict[str, int] = {}
    for entry in report.folded:
        by_rule[entry.rule or "?"] = by_rule.get(entry.rule or "?", 0) + 1
    counts = ", ".join(f"{rule} {count}" for rule, count in sorted(by_rule.items(),
                                                                    key=lambda i: -i[1]))
    text = f"folded {len(report.folded)}" + (f": {counts}" if counts else "")
    return text + " (every entry: --list or --report)"


def summary_lines(report: FoldReport) -> list[tuple[str, str | None]]:
    """The notes (dim) and the one-line summary: (text, rich style or None)."""
    # The counts come straight from the report: to_dict() would copy every entry first.
    summary = (f"BatchNormalization: {report.batchnorm_count}  folded: {report.folded_count}  "
               f"lowered: {len(report.lowered)}  kept: {len(report.kept)}   "
               f"nodes: {report.nodes_before} → {report.nodes_after}   "
               f"parameters: {report.params_before:,} → {report.params_after:,}")
    return [*((note, "dim") for note in report.notes), (summary, None)]


def print_fold_report(report: FoldReport, title: str, full: bool = False) -> None:
    """The report on stdout as `render_fold_report` draws it; rich only if it has a table."""
    if full or any(e.status != FOLDED for e in report.entries):
        from bnfold.cli.common import console
        from bnfold.cli.report_view import render_fold_report

        render_fold_report(report, console, title=title, full=full)
        return
    for text, style in [(title, "italic"), (fold_counts_line(report), "green"),
                        *summary_lines(report)]:
        echo(text, style)


def echo(text: str, style: str | None = None) -> None:
    """One line on stdout, styled as rich would style it."""
    click.echo(_styled(text, style), color=_color())


def _styled(text: str, style: str | None) -> str:
    arguments = _CLICK_STYLES[style] if style else {}
    if os.environ.get("NO_COLOR"):  # as in rich: colours go, italic and dim stay
        arguments = {k: v for k, v in arguments.items() if k != "fg"}
    return click.style(text, **arguments) if arguments else text


def _color() -> bool | None:
    """rich's choice: no styles on a dumb terminal, styles when FORCE_COLOR is set, else None
    (click styles a terminal only)."""
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return False
    return True if os.environ.get("FORCE_COLOR") else None
