"""`bnfold verify`: parse, call the library, print.

Apart from `fold` because its --engine choice needs the engine registry (bnfold.deploy.engines),
which `fold` never does; registered lazily on the main group (bnfold/cli/__init__.py).
"""

from __future__ import annotations

import os

import click

from bnfold.cli.common import (
    given_options,
    parse_shapes,
    require_writable,
    verify_options,
    write_json,
)
from bnfold.deploy.engines import ENGINES


@click.command("verify")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path(), required=False)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result as JSON.")
@click.option("--ground-truth/--no-ground-truth", default=None,
              help="Compare with a float64 evaluation, with no size or time limit [auto: up "
                   "to 64M weights, 5,000 nodes, 5 s].")
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
@click.option("--locate", is_flag=True,
              help="If they differ, mark every tensor both models compute as an output and name "
                   "the first that differs (a group of 256 MiB of tensors at a time).")
@click.option("--repro", type=click.Path(file_okay=False),
              help="With --locate (implied): write the smallest piece of CANDIDATE that still "
                   "differs, its inputs and the reference's output to this new folder, for a bug "
                   "report.")
@verify_options
def verify_command(reference, candidate, json_path, ground_truth, engine, inference_precision,
                   tolerance_precision, threads, checkpoint, locate, repro, seed, runs, atol,
                   rtol, shapes, inputs_path, timeout):
    """Check that CANDIDATE computes what REFERENCE does (exit 0 if so, 1 if not).

    With --engine, CANDIDATE runs on that engine (what you deploy) and is judged with the
    tolerance of the precision the engine really computes in.

    REFERENCE may be an ONNX test-case folder (model.onnx and test_data_set_N/ of input_K.pb,
    output_K.pb, as onnx's backend tests, the old model zoo and --repro write them): CANDIDATE,
    its model.onnx unless given, then runs on the stored inputs and is judged against the stored
    outputs (rtol 1e-3, atol 1e-7 as onnx's test runner, unless --rtol/--atol).
    """
    from bnfold.cli.common import console
    from bnfold.cli.report_view import render_verification
    from bnfold.verification.runs import verify

    require_writable(json_path, "--json")
    if candidate is None and not os.path.isdir(reference):
        raise click.UsageError("missing CANDIDATE: only an ONNX test-case folder (model.onnx, "
                               "test_data_set_N/) is verified alone")
    if os.path.isdir(reference) and (locate or repro or given_options(
            click.get_current_context(), ("inputs_path", "shapes", "runs", "seed"))):
        from bnfold.verification.test_case import CASE_OPTIONS_REFUSED

        raise click.UsageError(CASE_OPTIONS_REFUSED)
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
                    tolerance_precision=tolerance_precision, torch_checkpoint=checkpoint,
                    locate=locate, repro=repro)
    render_verification(result.to_dict(), console)
    if json_path:
        write_json(json_path, result.to_dict())
    if not result.ok:
        # --locate needs ORT on both models: not for a test case or a float64-only check
        if not (locate or repro or result.test_case or result.evaluator != "onnxruntime"):
            console.print("[dim]rerun with --locate to name the first tensor that differs[/]")
        raise SystemExit(1)
