"""The `bnfold` command: parse options, call the library, print. No logic lives here.

This module holds the group and the ONNX commands (fold, verify, inspect, demo); `deploy_commands`
and `torch_commands` the others; `report_view` and `bench_view` the rich rendering; `common` the
console and the one place BnfoldError becomes a one-line message and exit 1.
"""

from __future__ import annotations

import json
import os

import click

from bnfold import __version__
from rich.markup import escape

from bnfold.cli.common import BnfoldGroup, console, parse_shapes
from bnfold.cli.deploy_commands import bench_command, build_command
from bnfold.deploy.engines import ENGINES
from bnfold.cli.torch_commands import export_command, recalibrate_command, train_command
from bnfold.errors import BnfoldError


@click.group(cls=BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def cli() -> None:
    """Fold BatchNormalization into neighbouring weights in ONNX models, verifiably."""


def _verify_options(f):
    f = click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")(f)
    f = click.option("--runs", default=1, show_default=True, help="Random input sets to try.")(f)
    f = click.option("--atol", type=float, help="Absolute tolerance (default by dtype).")(f)
    f = click.option(
        "--rtol", type=float, help="Tolerance relative to max|output| (fp32 default 1e-5)."
    )(f)
    f = click.option(
        "--shape",
        "shapes",
        multiple=True,
        metavar="NAME=DxD..",
        help="Concrete shape for an input with symbolic dims (verification: a symbolic batch "
             "is 1, other dims take the first size ONNX Runtime runs).",
    )(f)
    f = click.option(
        "--verify-timeout", "timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
        default=300.0, show_default=True,
        help="Seconds one model run may take during verification.",
    )(f)
    f = click.option(
        "--inputs",
        "inputs_path",
        type=click.Path(dir_okay=False),
        help="A .npz file with one array per model input.",
    )(f)
    return f


def _require_folder_of(path: str | None, option: str) -> None:
    """Check an output option's folder before any work, so nothing is half done."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise BnfoldError(f"{option} {path!r}: its folder does not exist; create it first")


def _write_json(path: str, data: dict) -> None:
    from bnfold.onnxio.files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")


@cli.command("fold")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output file [MODEL.folded.onnx].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime equivalence check.")
@click.option(
    "--lower-standalone", is_flag=True, help="Turn a BN with nothing to fold into into Mul+Add."
)
@click.option("--in-place", is_flag=True, help="Allow the output to overwrite the input.")
@click.option("--list", "list_all", is_flag=True,
              help="List every BatchNormalization, folded ones too (default: counts per rule "
                   "and every one kept).")
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME|all",
              help="Treat a graph input that has an initializer as a constant (IR >= 4), so it "
                   "can fold; 'all' for every such input.")
@_verify_options
def fold_command(model, output, report_path, no_verify, lower_standalone, in_place, list_all,
                 freeze_inputs, seed, runs, atol, rtol, shapes, inputs_path, timeout):
    """Fold every foldable BatchNormalization in MODEL and write the result."""
    from bnfold.folding.api import fold_file
    from bnfold.cli.report_view import render_fold_report, render_verification

    _require_folder_of(report_path, "--report")
    options = dict(seed=seed, runs=runs, atol=atol, rtol=rtol, shapes=parse_shapes(shapes),
                   inputs=inputs_path, timeout=timeout)
    freeze = "all" if "all" in freeze_inputs else list(freeze_inputs)
    result = fold_file(model, output, verify=not no_verify, lower_standalone=lower_standalone,
                       in_place=in_place, verify_options=options, freeze_inputs=freeze)
    render_fold_report(result.report, console, title=f"bnfold fold {os.path.basename(model)}",
                       full=list_all)
    if result.report.verification is not None:
        render_verification(result.report.verification, console)
    if report_path:
        _write_json(report_path, result.report.to_dict())
    if result.output_path is None:
        console.print("[red]verification failed: nothing was written[/] (inspect with "
                      "`bnfold verify`, or write anyway with --no-verify)")
        raise SystemExit(1)
    console.print(f"wrote {escape(result.output_path)}", soft_wrap=True)


@cli.command("verify")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result as JSON.")
@click.option("--ground-truth/--no-ground-truth", default=None,
              help="Compare with a float64 evaluation [auto: small models only].")
@click.option("--engine", type=click.Choice(list(ENGINES)),
              help="Run CANDIDATE on this engine (an .onnx; for trt also a built .engine; for "
                   "torch a model SPEC); REFERENCE stays ORT CPU, optimisation off.")
@click.option("--inference-precision", type=click.Choice(["f32", "f16", "bf16"]),
              help="Ask the engine for this precision (openvino hint, trt fp16 build); the "
                   "precision judged is the one the engine reports.")
@click.option("--tolerances", "tolerance_precision",
              type=click.Choice(["float32", "tf32", "float16", "bfloat16"]),
              help="Judge with this precision's tolerances instead of the engine's.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads of the candidate engine.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="--engine torch: weights for the model SPEC.")
@_verify_options
def verify_command(reference, candidate, json_path, ground_truth, engine, inference_precision,
                   tolerance_precision, threads, checkpoint, seed, runs, atol, rtol, shapes,
                   inputs_path, timeout):
    """Check that CANDIDATE computes what REFERENCE does (exit 0 if so, 1 if not).

    With --engine, CANDIDATE runs on that engine (what you deploy) and is judged with the
    tolerance of the precision the engine really computes in.
    """
    from bnfold.cli.report_view import render_verification
    from bnfold.verification.runs import verify

    _require_folder_of(json_path, "--json")
    if engine is None and (inference_precision or tolerance_precision or threads or checkpoint):
        raise click.UsageError("--inference-precision, --tolerances, --threads and --checkpoint "
                               "need --engine")
    engine_options = None
    if engine is not None:
        from bnfold.deploy.engines import EngineOptions

        engine_options = EngineOptions(threads=threads, inference_precision=inference_precision)
    result = verify(reference, candidate, inputs=inputs_path, seed=seed, runs=runs, atol=atol,
                    rtol=rtol, shapes=parse_shapes(shapes), ground_truth=ground_truth,
                    timeout=timeout, engine=engine, engine_options=engine_options,
                    tolerance_precision=tolerance_precision, torch_checkpoint=checkpoint)
    render_verification(result.to_dict(), console)
    if json_path:
        _write_json(json_path, result.to_dict())
    if not result.ok:
        raise SystemExit(1)


@cli.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME|all",
              help="As for fold: treat a graph input that has an initializer as a constant.")
def inspect_command(model, json_path, freeze_inputs):
    """List every BatchNormalization: what it would fold into, or why not. Writes no model."""
    from bnfold.folding.api import fold
    from bnfold.cli.report_view import render_fold_report

    _require_folder_of(json_path, "--json")
    freeze = "all" if "all" in freeze_inputs else list(freeze_inputs)
    result = fold(model, freeze_inputs=freeze)
    render_fold_report(result.report, console, title=f"bnfold inspect {os.path.basename(model)}")
    if json_path:
        _write_json(json_path, result.report.to_dict())


@cli.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False))
def demo_command(out_dir):
    """Run the whole job on a built-in sample model: build, fold, verify, report, bench."""
    from bnfold.demo import run_demo

    run_demo(out_dir, console)


# Command modules of their own; each imports its heavy library only inside its commands.
cli.add_command(export_command, "export")
cli.add_command(train_command, "train")
cli.add_command(recalibrate_command, "recalibrate")
cli.add_command(build_command, "build")
cli.add_command(bench_command, "bench")


def main() -> None:
    cli(prog_name="bnfold")


if __name__ == "__main__":
    main()
