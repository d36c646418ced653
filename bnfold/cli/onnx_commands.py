"""`bnfold fold`, `bnfold inspect` and `bnfold demo`: parse, call the library, print.

Registered lazily on the main group (bnfold/cli/__init__.py). `fold --no-verify` is meant to
cost what a file copy does, so nothing heavy is imported here: the library loads inside the
commands, and a report without a table is printed without rich (bnfold.cli.fold_summary).
"""

from __future__ import annotations

import os

import click

from bnfold.cli.common import (
    VERIFY_PARAMETERS,
    given_options,
    parse_shapes,
    require_writable,
    verify_options,
    write_json,
)


@click.command("fold")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output file [MODEL.folded.onnx].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime equivalence check.")
@click.option(
    "--lower-standalone", is_flag=True, help="Turn a BN with nothing to fold into into Mul+Add."
)
@click.option("--in-place", is_flag=True,
              help="Replace MODEL with the folded model (also what lets -o name MODEL).")
@click.option("--list", "list_all", is_flag=True,
              help="List every BatchNormalization, folded ones too (default: counts per rule "
                   "and every one kept).")
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME|all",
              help="Treat a graph input that has an initializer as a constant (IR >= 4), so it "
                   "can fold; 'all' for every such input.")
@verify_options
def fold_command(model, output, report_path, no_verify, lower_standalone, in_place, list_all,
                 freeze_inputs, seed, runs, atol, rtol, shapes, inputs_path, timeout):
    """Fold every foldable BatchNormalization in MODEL and write the result."""
    from bnfold.cli.fold_summary import echo, print_fold_report
    from bnfold.folding.api import fold_file

    require_writable(report_path, "--report")
    if no_verify:
        ignored = given_options(click.get_current_context(), VERIFY_PARAMETERS)
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)} set the verification, which "
                                   f"--no-verify skips: drop one or the other")
    options = dict(seed=seed, runs=runs, atol=atol, rtol=rtol, shapes=parse_shapes(shapes),
                   inputs=inputs_path, timeout=timeout)
    freeze = "all" if "all" in freeze_inputs else list(freeze_inputs)
    result = fold_file(model, output, verify=not no_verify, lower_standalone=lower_standalone,
                       in_place=in_place, verify_options=options, freeze_inputs=freeze)
    if report_path:  # before printing: a reader that closes stdout early (| head) loses no file
        write_json(report_path, result.report.to_dict())
    print_fold_report(result.report, title=f"bnfold fold {os.path.basename(model)}",
                      full=list_all)
    if result.report.verification is not None:
        from bnfold.cli.common import console
        from bnfold.cli.report_view import render_verification

        render_verification(result.report.verification, console)
    if result.output_path is None:  # only after a verification, which printed with rich
        from bnfold.cli.common import console

        console.print("[red]verification failed: nothing was written[/] (write anyway with "
                      "--no-verify, then `bnfold verify MODEL OUTPUT --locate` names the first "
                      "tensor that differs)")
        raise SystemExit(1)
    echo(wrote_line(result))


def wrote_line(result) -> str:
    """`wrote OUT`, naming the external data file written beside it (ship both) and the input's
    data files an in-place fold left unread."""
    line = f"wrote {result.output_path}"
    if len(result.written) > 1:
        line += f" and its external data {os.path.basename(result.written[1])} (keep them together)"
    if result.unused_data:
        names = ", ".join(os.path.basename(path) for path in result.unused_data)
        line += (f"; {names}, which the input read its weights from, is no longer read by it: "
                 f"delete it if no other model uses it")
    return line


@click.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME|all",
              help="As for fold: treat a graph input that has an initializer as a constant.")
def inspect_command(model, json_path, freeze_inputs):
    """List every BatchNormalization: what it would fold into, or why not. Writes no model."""
    from bnfold.cli.fold_summary import print_fold_report
    from bnfold.folding.api import fold

    require_writable(json_path, "--json")
    freeze = "all" if "all" in freeze_inputs else list(freeze_inputs)
    result = fold(model, freeze_inputs=freeze)
    print_fold_report(result.report, title=f"bnfold inspect {os.path.basename(model)}",
                      full=True)
    if json_path:
        write_json(json_path, result.report.to_dict())


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False))
def demo_command(out_dir):
    """Run the whole job on a built-in sample model: build, fold, verify, report, bench."""
    from bnfold.cli.common import console
    from bnfold.demo import run_demo

    run_demo(out_dir, console)
