"""Rich rendering of fold reports (every entry, as a table) and verification results
(display only, no logic). The default fold report is plain lines (bnfold.cli.fold_summary)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bnfold.cli.fold_summary import summary_lines
from bnfold.folding.report import FOLDED, LOWERED, FoldReport

_STATUS_STYLE = {FOLDED: "green", LOWERED: "yellow"}


def render_fold_report(report: FoldReport, console: Console, title: str = "bnfold") -> None:
    """Every entry of the report as a table, then the notes and the summary."""
    entries = report.entries
    # The op and graph columns only appear when they say something (a Mul/Add fold, a BN inside
    # a subgraph): a 100-BN report stays readable, and renders in half the time.
    show_op = any(e.op_type != "BatchNormalization" for e in entries)
    show_graph = any(e.graph != "main" for e in entries)
    table = Table(title=escape(title) or None, title_justify="left", show_lines=False)
    # Exporters put what tells BNs apart at the end ("…/batch_normalization_5_1/batchnorm/mul"):
    # a long name wraps rather than losing its tail to an ellipsis.
    table.add_column("node", overflow="fold")
    if show_op:
        table.add_column("op")
    table.add_column("status")
    table.add_column("into / why kept", overflow="fold")
    if show_graph:
        table.add_column("graph", style="dim")
    for entry in entries:
        style = _STATUS_STYLE.get(entry.status, "red")
        detail = f"{entry.into} ({entry.rule})" if entry.into else "; ".join(entry.reasons)
        # Node names and reasons are the model's text, not markup: plain Text, never parsed.
        cells = [Text(entry.node)]
        if show_op:
            cells.append(Text(entry.op_type))
        cells += [Text(entry.status, style=style), Text(detail)]
        if show_graph:
            cells.append(Text(entry.graph))
        table.add_row(*cells)
    if not entries:
        table.add_row("-", "-", "no BatchNormalization or foldable Mul/Add found")
    console.print(table)
    _print_summary(report, console)


def _print_summary(report: FoldReport, console: Console) -> None:
    for text, style in summary_lines(report):
        console.print(Text(text, style=style or ""), soft_wrap=True)


def render_verification(result: dict, console: Console) -> None:
    """`result` is VerifyResult.to_dict() (what reports carry)."""
    engine = result.get("engine")
    case = result.get("test_case")
    title = "verification (ONNX Runtime, graph optimisation off)"
    if result.get("evaluator", "onnxruntime") != "onnxruntime":
        title = f"verification ({result['evaluator']})"
    if engine:
        title = (f"verification: candidate on {engine['name']} ({engine['precision']}) vs "
                 f"reference on ONNX Runtime CPU, graph optimisation off")
    if case:
        where = (f"{engine['name']} ({engine['precision']})" if engine else
                 "ONNX Runtime CPU, graph optimisation off")
        own = os.path.abspath(case["candidate"]) == os.path.abspath(case["model"])
        which = "the case's model.onnx" if own else "the candidate"
        title = f"verification: {which} on {where} vs the case's stored outputs"
        console.print(Text(f"test case {case['folder']}: {len(case['data_sets'])} data set(s)"
                           + ("" if own else f"; candidate {case['candidate']}"), style="dim"),
                      soft_wrap=True)
    table = Table(title=escape(title), title_justify="left")
    for column in ("output", "max abs err", "max rel err", "cosine", "tolerance", "ok"):
        table.add_column(column, justify="right" if column != "output" else "left")
    for out in result["outputs"]:
        ok = "[green]yes[/]" if out["ok"] else "[red]NO[/]"
        table.add_row(
            escape(out["name"]),
            f"{out['max_abs_error']:.3g}",
            f"{out['max_rel_error']:.3g}",
            f"{out['cosine']:.9f}",
            f"{out['tolerance']:.3g}",
            ok,
        )
    console.print(table)
    for out in result["outputs"]:
        if out.get("note"):
            console.print(Text(f"{out['name']}: {out['note']}", style="dim"))
    sites = result.get("sites") or []
    if sites:
        failed = [s for s in sites if not s["ok"]]
        worst = max(sites, key=lambda s: s["max_rel_error"])
        console.print(Text(
            f"fold sites: {len(sites)} compared, {len(failed)} not equivalent; worst max rel err "
            f"{worst['max_rel_error']:.3g} at {worst['name']}",
            style="red" if failed else "dim"))
        for site in failed[:10]:
            console.print(Text(f"  {site['name']}: max abs err {site['max_abs_error']:.3g} > "
                               f"{site['tolerance']:.3g} {site['note']}", style="red"))
    for note in result.get("notes", ()):
        console.print(Text(note, style="dim"))
    _print_located(result.get("located"), console)
    if engine:
        _print_engine_precision(engine, console, tolerance=not case)
    if case:
        console.print(Text(f"tolerance: rtol {case['rtol']:.3g} (scale-relative), atol "
                           f"{case['atol']:.3g}: from {case['tolerance_from']}"), soft_wrap=True)
    truth = result.get("ground_truth")
    labels = (("stored", "candidate") if case else ("reference", "candidate") if engine
              else ("original", "folded"))
    if truth:
        for name, errors in truth.items():
            if "reference_abs_error" in errors:
                console.print(
                    f"float64 ground truth, {escape(name)}: {labels[0]} "
                    f"{errors['reference_abs_error']:.3g}, {labels[1]} "
                    f"{errors['candidate_abs_error']:.3g} (absolute error: its values reach "
                    f"only {errors['scale']:.3g}, too small for a scale-relative figure; the "
                    f"absolute tolerance is {errors['atol']:.3g})")
                continue
            console.print(
                f"float64 ground truth, {escape(name)}: {labels[0]} "
                f"{errors['reference_rel_error']:.3g}, {labels[1]} "
                f"{errors['candidate_rel_error']:.3g} (scale-relative error)"
            )
    elif result.get("ground_truth_skipped"):
        console.print(f"[dim]float64 ground truth skipped: {escape(result['ground_truth_skipped'])}[/]")
    verdict = "[green]equivalent[/]" if result["ok"] else "[red]NOT equivalent[/]"
    if case:
        console.print(f"{verdict} over the {result['runs']} stored input set(s)")
    else:
        console.print(f"{verdict} over {result['runs']} input set(s), seed {result['seed']}")


def _print_located(located: dict | None, console: Console, shown: int = 5) -> None:
    """The tensors after the first that differ (the note already names the first), in the
    reference's node order, with their scale-relative errors: where the error grows."""
    if not located or len(located["listed"]) < 2:
        return
    later = located["listed"][1:shown + 1]
    console.print(Text("then: " + ", ".join(
        f"{m['name']} " + (f"{m['max_rel_error']:.3g}" if m["max_rel_error"] != float("inf")
                           else f"({m['note']})") for m in later)
                       + (" …" if len(located["listed"]) > shown + 1 else ""),
                       style="dim"), soft_wrap=True)


def _print_engine_precision(engine: dict, console: Console, tolerance: bool = True) -> None:
    """Which precision the engine computes in, where that was read, and which tolerance ran."""
    layers = engine.get("layer_precisions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(layers.items()))
    console.print(Text(f"engine precision: {engine['precision']} (from {engine['precision_source']})"
                       + (f"; layers: {shown}" if shown else ""), style="dim"), soft_wrap=True)
    if not tolerance:
        return
    if engine.get("explicit_tolerance"):
        how = "given with --rtol/--atol"
    else:
        how = f"{engine['tolerance_precision']} tolerances, from {engine['tolerance_from']}"
    console.print(Text(f"tolerance: rtol {engine['rtol']:.3g} (scale-relative), atol "
                       f"{engine['atol']:.3g}: {how}"), soft_wrap=True)
