"""The PyTorch-side commands: export, train, recalibrate. Parse, call the library, print.

torch is imported inside the command bodies only (through the library), so importing this
module and `bnfold --help` stay torch-free. bnfold/cli/__init__.py registers these on the main group.
"""

from __future__ import annotations

import os

import click

from bnfold.cli.common import console
from bnfold.errors import BnfoldError

PAPER_TARGET = "paper"


def parse_input_shape(text: str):
    """'1x3x224x224', 'ids:2x16:int64' or 'batch=1x3xheight=64xwidth=64' -> InputSpec."""
    from bnfold.pytorch.export_inputs import parse_input_spec

    try:
        return parse_input_spec(text)
    except BnfoldError as exc:
        raise click.BadParameter(str(exc)) from None


def _input_shape_option(ctx, param, values):
    return [parse_input_shape(v) for v in values]


def _dynamic_option(ctx, param, values):
    from bnfold.pytorch.export_inputs import parse_dynamic

    try:
        return tuple(parse_dynamic(v) for v in values)
    except BnfoldError as exc:
        raise click.BadParameter(str(exc)) from None


MODEL_HELP = ("A sample (bnfold.pytorch.zoo), module:factory or file.py:factory (a function that "
              "returns the nn.Module; literal arguments in the spec: "
              "\"timm:create_model('resnet18', num_classes=10)\"), or torchvision:NAME.")


@click.command("export")
@click.option("--model", "spec", required=True, metavar="NAME|module:factory", help=MODEL_HELP)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="A state_dict .pt to load.")
@click.option("--input-shape", "input_specs", multiple=True, callback=_input_shape_option,
              metavar="[NAME:]DIMS[:DTYPE]",
              help="One per forward argument, in order or by name: 1x3x224x224, ids:2x16:int64; "
                   "NAME=SIZE dims stay symbolic (batch=1x3xheight=64xwidth=64) "
                   "[the sample's default; dtype: the model's].")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False),
              help="A .npz with one example array per forward argument (by name, or arr_0, "
                   "arr_1, ... in order): fixes shapes and dtypes.")
@click.option("--dynamic", "dynamic", multiple=True, callback=_dynamic_option,
              metavar="[INPUT:]AXIS[=NAME]",
              help="Keep this dim symbolic (repeatable), e.g. 2=height or ids:1=length.")
@click.option("--dynamic-batch", is_flag=True, help="Make dim 0 of every input symbolic.")
@click.option("--output-name", "output_names", multiple=True,
              help="Name the outputs (repeat once per output) [dict keys, else output_0, ...].")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.onnx")
def export_command(spec, checkpoint, input_specs, inputs_path, dynamic, dynamic_batch,
                   output_names, opset, output):
    """Export a PyTorch model to ONNX with every BatchNorm kept, and check it against torch."""
    from bnfold.pytorch.export import export_onnx
    from bnfold.pytorch.zoo import create, model_input_shape

    if input_specs and inputs_path:
        raise BnfoldError("give --input-shape or --inputs, not both: the .npz fixes the shapes")
    notes: list[str] = []
    model = create(spec, checkpoint, notes=notes)
    inputs = inputs_path or input_specs or model_input_shape(spec, model)
    result = export_onnx(model, inputs, output, opset=opset, dynamic_batch=dynamic_batch,
                         dynamic=dynamic, output_names=list(output_names) or None)
    for note in notes + result.notes:
        console.print(f"note: {note}", markup=False)
    counted = (f"{result.bn_modules} modules" if result.bn_calls == result.bn_modules else
               f"{result.bn_calls} calls in the eval forward ({result.bn_modules} modules)")
    console.print(f"BatchNorm: {counted} → {result.bn_nodes} ONNX BatchNormalization nodes "
                  "(all kept, inference mode)")
    shapes = "; ".join(", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in run.items())
                       for run in result.checked_shapes)
    console.print(
        f"parity torch vs ONNX Runtime (optimisation off): max abs error {result.max_abs_error:.3g} "
        f"({result.max_rel_error:.2g} of output scale), inputs {shapes}", markup=False)
    console.print(f"inputs {', '.join(s.describe() for s in result.inputs)} → outputs "
                  f"{', '.join(result.output_names)}", markup=False)
    console.print(f"wrote {result.path}", markup=False)


@click.command("train")
@click.argument("target", metavar="paper|NAME|module:factory")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--data", default=None, help="'digits' (sklearn 8×8, paper only) or a .npz file "
              "with x_train, y_train, x_test, y_test.  [paper: digits]")
@click.option("--steps", type=click.IntRange(1),
              help="Training steps.  [paper: 5000, others: 200]")
@click.option("--batch-size", type=click.IntRange(1),
              help="Mini-batch size.  [paper: 60, others: 32]")
@click.option("--lr", type=click.FloatRange(0, min_open=True),
              help="Learning rate.  [paper: 0.5 plain SGD, others: 0.05 SGD+momentum]")
@click.option("--seed", default=0, show_default=True, type=int)
def train_command(target, out_dir, data, steps, batch_size, lr, seed):
    """Train a sample network; `paper` reproduces the BN paper §4.1 (BN vs no BN).

    `bnfold train paper --out DIR` trains Ioffe & Szegedy 2015's sigmoid MLP with and without
    BatchNorm; `bnfold train NAME --data file.npz --out DIR` trains a sample (or module:factory,
    with literal arguments if it takes any) and writes DIR/NAME.pt (module.factory.pt).
    """
    if target == PAPER_TARGET:
        _train_paper(out_dir, data or "digits", steps, batch_size, lr, seed)
    else:
        _train_sample(target, out_dir, data, steps, batch_size, lr, seed)


def _train_paper(out_dir, data, steps, batch_size, lr, seed):
    from bnfold.pytorch.train import paper

    steps = paper.DEFAULT_STEPS if steps is None else steps
    batch_size = paper.DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    lr = paper.DEFAULT_LR if lr is None else lr
    console.print(
        f"paper-mlp (3×100 sigmoid, BN before each sigmoid) vs the same net without BN: "
        f"{paper.OPTIMIZER}, lr {lr:g}, batch {batch_size}, {steps} steps, seed {seed}, "
        f"N(0, {paper.INIT_STD:g}²) init shared by both arms"
    )
    with _progress() as bar:
        tasks = {arm: bar.add_task(f"train {arm}", total=steps, start=False) for arm in paper.ARMS}

        def advance(arm: str, done: int) -> None:
            bar.start_task(tasks[arm])  # a no-op once started: each arm times its own run
            bar.update(tasks[arm], completed=done)

        result = paper.run_paper_experiment(
            out_dir, steps=steps, batch_size=batch_size, data=data, seed=seed, lr=lr,
            progress=advance,
        )
    console.print(f"data: {result.data}")
    for arm in paper.ARMS:
        reached = ", ".join(
            f"{int(t * 100)}% at step {s}" if s is not None else f"{int(t * 100)}% not reached"
            for t, s in result.steps_to[arm].items()
        )
        console.print(f"  {arm:>5}: {reached}; final test accuracy {result.final_accuracy[arm]:.4f}")
    console.print(f"wrote {result.curve_csv}, {result.curve_png}, {result.checkpoint} "
                  f"({result.wall_s:.1f} s)")


def _train_sample(name, out_dir, data, steps, batch_size, lr, seed):
    from bnfold.pytorch.train import loop
    from bnfold.pytorch.zoo import SAMPLE_NAMES

    if name not in SAMPLE_NAMES and ":" not in name:
        raise BnfoldError(
            f"unknown sample {name!r}: train 'paper', one of {', '.join(SAMPLE_NAMES)}, "
            "or module:factory"
        )

    if data is None or (data == "digits" and name != "paper-mlp"):
        raise BnfoldError(f"training {name} needs --data file.npz (x_train, y_train, x_test, y_test)")
    # Everything that can be refused is refused here, before the progress bar is drawn.
    job = loop.prepare_training(
        name, data, steps=loop.DEFAULT_STEPS if steps is None else steps,
        batch_size=loop.DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
        lr=loop.DEFAULT_LR if lr is None else lr, seed=seed,
    )
    with _progress() as bar:
        task = bar.add_task(f"train {name}", total=job.steps)
        result = loop.run_training(job, out_dir,
                                   progress=lambda done: bar.update(task, completed=done))
    console.print(f"{name}: {result.steps} steps, final loss {result.final_loss:.4g}, "
                  f"{result.metric_name} {result.metric:.4g}", markup=False)
    console.print(f"wrote {result.checkpoint}", markup=False)


@click.command("recalibrate")
@click.option("--model", "spec", required=True, metavar="NAME|module:factory", help=MODEL_HELP)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A state_dict .pt.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="A .npz with x_train (or x): samples shaped like the model input (integer "
                   "arrays, e.g. token ids, stay integer).")
@click.option("--batches", default=100, show_default=True, type=click.IntRange(1),
              help="Mini-batches to average.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the batch sampling.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.pt")
def recalibrate_command(spec, checkpoint, data, batches, batch_size, seed, output):
    """Re-estimate BatchNorm population statistics (BN paper, Algorithm 2) before folding."""
    from bnfold.pytorch.train.data import load_inputs
    from bnfold.pytorch.train.files import save_state_dict
    from bnfold.pytorch.train.recalibrate import recalibrate_batchnorm, sample_batches
    from bnfold.pytorch.zoo import create

    if os.path.abspath(output) == os.path.abspath(checkpoint):
        raise BnfoldError(f"output {output!r} is the input checkpoint: choose another -o")
    notes: list[str] = []
    model = create(spec, checkpoint, notes=notes)
    for note in notes:
        console.print(f"note: {note}", markup=False)
    x = load_inputs(data, float_dtype=_float_dtype(model))
    try:
        result = recalibrate_batchnorm(model, sample_batches(x, batches, batch_size, seed))
    except (TypeError, RuntimeError) as exc:
        from bnfold.pytorch.train.loop import forward_failure

        raise forward_failure(exc, x, "", "recalibration feeds the arrays of --data alone",
                              "reshape the data") from None
    console.print(f"recalibrated {result.bn_modules} BatchNorm layers over {result.batches} "
                  f"batches of {result.batch_size} (mean, unbiased variance)")
    largest = sorted(result.changes.items(), key=lambda kv: -kv[1][0])[:3]
    for name, (d_mean, d_var) in largest:
        console.print(f"  {name}: mean |Δ running_mean| {d_mean:.4g}, |Δ running_var| {d_var:.4g}")
    console.print(f"wrote {save_state_dict(model, output)}")


def _float_dtype(model) -> str:
    """The model's floating dtype (float samples are cast to it; integer ones are kept)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return str(tensor.dtype).replace("torch.", "")
    return "float32"


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)
