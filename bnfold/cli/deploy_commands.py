"""`bnfold build` and `bnfold bench`: parse, call the library, print.

Registered on the main group in bnfold/cli/__init__.py. Engine libraries (tensorrt, torch) are imported
only inside the commands, so `bnfold --help` stays cheap.
"""

from __future__ import annotations

import json
import os

import click

from bnfold.cli.common import console, parse_shapes, require_writable
from bnfold.deploy.engines import ENGINES
from bnfold.errors import BnfoldError


def _usage_error(param: str, func, value):
    try:
        return func(value)
    except BnfoldError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


@click.command("build")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file [MODEL.engine].")
@click.option("--shapes", "profiles", multiple=True, metavar="NAME:MIN/OPT/MAX",
              help="Optimisation profile for an input with dynamic dims, e.g. "
                   "input:1x3x224x224/8x3x224x224/32x3x224x224. Repeat per input.")
@click.option("--workspace", metavar="SIZE", help="Workspace memory limit, e.g. 1G or 512M.")
@click.option("--opt-level", type=click.IntRange(0, 5),
              help="Builder optimisation level 0-5 (TensorRT's default is 3).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="Timing cache file: read if it exists, written after the build.")
@click.option("--fp16", is_flag=True,
              help="fp16 engine (TRT 10: builder flag; TRT 11: model converted to fp16, I/O fp32).")
@click.option("--no-verify", is_flag=True,
              help="Skip running the engine against MODEL (ORT CPU) before writing it.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD..",
              help="Input shape to verify at (default: each profile's opt shape).")
def build_command(model, output, profiles, workspace, opt_level, timing_cache, fp16, no_verify,
                  shapes):
    """Build a TensorRT engine from MODEL (ONNX); report the precision the layers really got.

    The engine is verified against MODEL (ORT CPU, optimisation off) at the tolerance of the
    precision its layers got, and written only if equivalent (--no-verify skips the check).
    """
    from bnfold.deploy.build import BuildOptions, build, parse_profiles, parse_size

    options = BuildOptions(
        profiles=_usage_error("--shapes", parse_profiles, profiles),
        workspace_bytes=_usage_error("--workspace", parse_size, workspace) if workspace else None,
        opt_level=opt_level,
        timing_cache=timing_cache,
        fp16=fp16,
    )
    output = output or os.path.splitext(model)[0] + ".engine"
    report = build(model, output, options, verify=not no_verify,
                   verify_options={"shapes": parse_shapes(shapes)})
    if report.output:
        console.print(f"TensorRT {report.tensorrt_version}: wrote {report.output}")
    else:
        console.print(f"TensorRT {report.tensorrt_version}: built, [red]NOT written[/]: the "
                      f"engine is not equivalent to {model}")
    for p in report.profiles:
        console.print(f"  profile {p.name}: min {p.min} opt {p.opt} max {p.max}")
    if report.fp16_requested:
        console.print(f"  fp16 via {report.fp16_method}")
    if report.layer_precisions:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(report.layer_precisions.items()))
        console.print(f"  layer output precisions (engine inspector): {shown}")
    if report.timing_cache_saved:
        console.print(f"  timing cache saved to {timing_cache}")
    for note in report.notes:
        console.print(f"[yellow]warning:[/] {note}")
    if report.verification is not None:
        from bnfold.cli.report_view import render_verification

        console.print(f"verified against {model}:")
        render_verification(report.verification, console)
        if not report.verification["ok"]:
            console.print("inspect with `bnfold verify MODEL ENGINE --engine trt`, build without "
                          "--fp16, or write it anyway with --no-verify")
            raise SystemExit(1)


@click.command("bench")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--compare", multiple=True, type=click.Path(dir_okay=False),
              help="Another model to measure beside MODEL (repeatable). Without it, a MODEL "
                   "with BatchNormalization is compared with its folded version.")
@click.option("--engine", type=click.Choice(["auto", *ENGINES]), default="auto",
              show_default=True, help="auto: trt, else ort-cuda, else ort-cpu (openvino only "
                                      "when asked).")
@click.option("--model", "torch_spec", metavar="SPEC",
              help="torch engine: zoo name (resnet18, paper-mlp) or module:factory.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="torch engine: weights.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD..",
              help="Input shape for symbolic dims (default: batch 2, any other dim the first "
                   "size ONNX Runtime runs, as verify picks it). torch engine: one per forward "
                   "argument, by name.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False),
              help="A .npz file with one array per model input.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1),
              help="At least this many timed runs per model.")
@click.option("--min-time", default=1.0, show_default=True, type=click.FloatRange(0),
              help="And at least this many seconds per model.")
@click.option("--warmup-time", default=0.2, show_default=True, type=click.FloatRange(0),
              help="Warm-up seconds per model (at least 0.2 s and 10 runs).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (ORT intra-op / torch).")
@click.option("--include-transfers", is_flag=True, help="GPU: time host↔device copies too.")
@click.option("--cuda-graphs", is_flag=True, help="GPU: replay runs from a CUDA graph.")
@click.option("--torch-compile", is_flag=True, help="torch engine: torch.compile the modules.")
@click.option("--inference-precision", type=click.Choice(["f32", "f16", "bf16"]),
              help="openvino: inference precision hint (default f32); trt: f16 builds fp16.")
@click.option("--no-check", is_flag=True,
              help="Skip checking each model's outputs on the engine against the reference "
                   "(ORT CPU, optimisation off) before timing.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write statistics (ms) and raw samples as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a latency CDF plot (PNG; needs matplotlib).")
def bench_command(model, compare, engine, torch_spec, checkpoint, shapes, inputs_path, seed, runs,
                  min_time, warmup_time, threads, include_transfers, cuda_graphs, torch_compile,
                  inference_precision, no_check, json_path, plot_path):
    """Measure MODEL's latency beside its folded version (or --compare models), interleaved.

    Each model's outputs on the engine are first checked against MODEL run by ONNX Runtime on
    the CPU (optimisation off); one that fails is marked, gets no speed-up, and the command
    exits 1 after writing its results.
    """
    from bnfold.deploy.bench import bench_models, comparison_models
    from bnfold.cli.bench_view import plot, render
    from bnfold.deploy.engines import EngineOptions, best_available

    shape_map = parse_shapes(shapes)
    require_writable(json_path, "--json")
    require_writable(plot_path, "--plot")
    if engine == "auto":
        engine, why = best_available()
        console.print(f"engine: {engine} ({why})")
    options = EngineOptions(threads=threads, include_transfers=include_transfers,
                            cuda_graphs=cuda_graphs, torch_compile=torch_compile,
                            inference_precision=inference_precision)
    if engine == "torch":
        if model or compare:
            raise click.UsageError("--engine torch measures PyTorch modules: give --model "
                                   "SPEC instead of an ONNX file")
        if not torch_spec:
            raise click.UsageError("--engine torch needs --model SPEC (e.g. resnet18 or "
                                   "module:factory)")
        from bnfold.deploy.engines.torch_engine import torch_models

        models, feed, torch_notes = torch_models(torch_spec, checkpoint, shape_map, seed,
                                                 inputs_path)
        inputs = feed
    else:
        if torch_spec or checkpoint:
            raise click.UsageError("--model/--checkpoint are for --engine torch: give an ONNX "
                                   "MODEL")
        if not model:
            raise click.UsageError("give an ONNX MODEL to benchmark (or --engine torch --model "
                                   "SPEC)")
        models = comparison_models(model, tuple(compare))
        inputs = inputs_path
    result = bench_models(models, engine, inputs=inputs, shapes=shape_map, seed=seed, runs=runs,
                          min_time=min_time, warmup_time=warmup_time, options=options,
                          check=not no_check)
    if engine == "torch":
        result.notes += torch_notes
    elif len(models) == 1:
        result.notes.append(f"{os.path.basename(model)} has no BatchNormalization: nothing to "
                            f"fold, so it is timed alone (--compare OTHER.onnx to time others "
                            f"beside it)")
    render(result, console)
    if json_path:
        from bnfold.onnxio.staged_files import write_text_atomic

        write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        console.print(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        console.print(f"wrote {plot_path}")
    if result.failed_checks:
        raise SystemExit(1)
