"""The fold report's lines of text, and the default report, printed without rich.

By default `bnfold fold` prints what a user must read: the title, the folds counted per rule,
every kept or lowered BN on one line with its reason in full (names are never cut), the notes
and the summary. That is plain lines, printed with click: importing rich and drawing a table
cost ~50 ms, more than folding a 30 MB model (DenseNet-121 keeps 59 BNs). `--list` and
`bnfold inspect` show every entry: on a terminal as a table drawn with rich
(bnfold.cli.report_view), around the same lines; piped (a file, grep, a CI log), one line per
entry, since a table 80 columns wide would wrap long node names in the middle. Styles are rich's
(same text, styled on a terminal only, with its reading of NO_COLOR, FORCE_COLOR, TERM=dumb).
"""

from __future__ import annotations

import os
import sys

import click

from bnfold.folding.report import FOLDED, KEPT, LOWERED, FoldEntry, FoldReport

# The rich styles the lines use, as click.style arguments.
_CLICK_STYLES = {"italic": {"italic": True}, "dim": {"dim": True}, "green": {"fg": "green"},
                 "red": {"fg": "red"}, "yellow": {"fg": "yellow"}}


def fold_counts_line(report: FoldReport, pointer: bool = True) -> str:
    """'folded 52: conv-bn 50, gemm-bn 2 (every entry: ...)', rules by count."""
    by_rule: dict[str, int] = {}
    for entry in report.folded:
        by_rule[entry.rule or "?"] = by_rule.get(entry.rule or "?", 0) + 1
    counts = ", ".join(f"{rule} {count}" for rule, count in sorted(by_rule.items(),
                                                                    key=lambda i: -i[1]))
    text = f"folded {len(report.folded)}" + (f": {counts}" if counts else "")
    return text + (" (every entry: --list or --report)" if pointer else "")


def folded_lines(report: FoldReport) -> list[tuple[str, str | None]]:
    """The counts, then one line per fold ('  name → into (rule)')."""
    lines: list[tuple[str, str | None]] = [(fold_counts_line(report, pointer=False), "green")]
    lines.extend((f"  {_place(e)} → {e.into} ({e.rule})", None)
                 for e in report.entries if e.status == FOLDED)
    return lines


def summary_lines(report: FoldReport) -> list[tuple[str, str | None]]:
    """The notes (dim) and the one-line summary: (text, rich style or None)."""
    # The counts come straight from the report: to_dict() would copy every entry first.
    summary = (f"BatchNormalization: {report.batchnorm_count}  folded: {report.folded_count}  "
               f"lowered: {len(report.lowered)}  kept: {report.kept_count}   "
               f"{_affine_counts(report)}"
               f"nodes: {report.nodes_before} → {report.nodes_after}   "
               f"parameters: {report.params_before:,} → {report.params_after:,}")
    return [*((note, "dim") for note in report.notes), (summary, None)]


def _affine_counts(report: FoldReport) -> str:
    """'Mul/Add folded: 32  kept: 62   ' for a model whose BNs are written out (tf2onnx), so
    the summary does not read 'folded: 0' after 32 folds; empty when there are none."""
    folded = len(report.folded) - report.folded_count - report.merged_count
    kept = len(report.kept) - report.kept_count
    if not (folded or kept):
        return ""
    return f"Mul/Add folded: {folded}  kept: {kept}   "


def unfolded_lines(report: FoldReport) -> list[tuple[str, str | None]]:
    """'kept 2:' then one line per kept BN ('  name: reason; reason'), the same for lowered.
    A kept Mul/Add (a frozen BN) is listed with its op, and the heading counts the kinds."""
    lines: list[tuple[str, str | None]] = []
    for status, heading, style in ((KEPT, "kept", "red"), (LOWERED, "lowered to Mul+Add", "yellow")):
        entries = [e for e in report.entries if e.status == status]
        if entries:
            affine = sum(1 for e in entries if e.op_type != "BatchNormalization")
            kinds = (f" ({len(entries) - affine} BatchNormalization, {affine} Mul/Add)"
                     if affine else "")
            lines.append((f"{heading} {len(entries)}{kinds}:", style))
            lines.extend((f"  {_place(e)}: {'; '.join(e.reasons) or '-'}", None) for e in entries)
    return lines


def _place(entry: FoldEntry) -> str:
    where = "" if entry.graph == "main" else f"{entry.graph}: "
    op = "" if entry.op_type == "BatchNormalization" else f" ({entry.op_type})"
    return f"{where}{entry.node}{op}"


def print_fold_report(report: FoldReport, title: str, full: bool = False) -> None:
    """The report on stdout: plain lines by default; with `full`, every entry, in a rich table
    on a terminal and one line each when piped."""
    if full and _terminal():
        from bnfold.cli.common import console
        from bnfold.cli.report_view import render_fold_report

        render_fold_report(report, console, title=title)
        return
    folded = folded_lines(report) if full else [(fold_counts_line(report), "green")]
    for text, style in [(title, "italic"), *folded, *unfolded_lines(report),
                        *summary_lines(report)]:
        echo(text, style)


def _terminal() -> bool:
    """Whether rich would draw for a terminal: stdout is one, or FORCE_COLOR says to act so."""
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


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
