"""Ioffe & Szegedy 2015, §4.1: the same sigmoid MLP trained with and without BatchNorm.

Both arms start from the same weights (the BN arm's Linear weights are copied into the no-BN
arm, whose extra biases start at zero), see the same mini-batches in the same order and use
the same optimiser. The paper names no optimiser or learning rate; we use plain SGD at
lr 0.5 with N(0, 0.1²) initial weights ("small random Gaussian values"), which keeps the no-BN
sigmoid net slow to start, as in the paper's Fig. 1(a).

Outputs in the run folder: curve.csv (step,arm,test_accuracy), curve.png (accuracy vs step,
and the 15/50/85th percentiles of one sigmoid input over training for each arm, as in
Fig. 1(b,c)) and paper-mlp-bn.pt (the BN arm's state_dict).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.onnxio.files import ensure_folder
from bnfold.pytorch.train.data import load_dataset, require_labels

ARMS = ("bn", "no_bn")
THRESHOLDS = (0.90, 0.95)
DEFAULT_STEPS = 5000
DEFAULT_BATCH_SIZE = 60
DEFAULT_LR = 0.5
INIT_STD = 0.1
PERCENTILES = (15, 50, 85)
TRACKED_UNIT = 0  # the one sigmoid (last hidden layer) whose input distribution is plotted
CLASSES = 10
OPTIMIZER = "plain SGD (no momentum, no weight decay)"


@dataclass
class PaperResult:
    out_dir: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    data: str
    optimizer: str
    # arm -> threshold -> first evaluated step at or above it (None: not reached)
    steps_to: dict[str, dict[float, int | None]]
    final_accuracy: dict[str, float]
    curve: list[tuple[int, str, float]]  # (step, arm, test accuracy)
    # arm -> list of (step, p15, p50, p85) of the tracked sigmoid input on the test set
    sigmoid_percentiles: dict[str, list[tuple[int, float, float, float]]] = field(default_factory=dict)
    wall_s: float = 0.0
    curve_csv: str = ""
    curve_png: str = ""
    checkpoint: str = ""


def run_paper_experiment(
    out_dir: str | os.PathLike,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data: str = "digits",
    seed: int = 0,
    lr: float = DEFAULT_LR,
    eval_every: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PaperResult:
    """Train both arms and write curve.csv, curve.png and paper-mlp-bn.pt into `out_dir`.

    `progress(arm, steps_done)` is called as training advances (the CLI draws a bar with it).
    """
    from bnfold.pytorch.zoo import require_torch

    torch = require_torch()
    _check_options(steps, batch_size, lr)
    dataset = load_dataset(data)
    require_labels(dataset, CLASSES)
    ensure_folder(out_dir)
    eval_every = eval_every or max(1, steps // 200)
    started = time.perf_counter()

    x_train = torch.from_numpy(dataset.x_train.reshape(len(dataset.x_train), -1))
    y_train = torch.from_numpy(dataset.y_train)
    x_test = torch.from_numpy(dataset.x_test.reshape(len(dataset.x_test), -1))
    y_test = torch.from_numpy(dataset.y_test)
    if batch_size > len(x_train):
        raise BnfoldError(
            f"--batch-size {batch_size} exceeds the {len(x_train)} training samples: use a smaller one"
        )
    models = _paired_models(torch, x_train.shape[1], seed)

    # 60×100 matrices gain nothing from intra-op threads, and on shared cores the thread
    # hand-offs made each step ~5× slower (measured): train single-threaded, then restore.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curve, percentiles = _train_arms(torch, models, x_train, y_train, x_test, y_test,
                                         steps, batch_size, lr, seed, eval_every, progress)
    finally:
        torch.set_num_threads(threads)

    result = PaperResult(
        out_dir=os.path.abspath(out_dir),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        data=dataset.describe(),
        optimizer=OPTIMIZER,
        steps_to={arm: _steps_to(curve, arm) for arm in ARMS},
        final_accuracy={arm: [a for s, r, a in curve if r == arm][-1] for arm in ARMS},
        curve=curve,
        sigmoid_percentiles=percentiles,
    )
    _write_outputs(result, models["bn"])
    result.wall_s = time.perf_counter() - started
    return result


def _train_arms(torch, models, x_train, y_train, x_test, y_test, steps, batch_size, lr, seed,
                eval_every, progress):
    """Train each arm in turn on the same batch sequence; evaluate every `eval_every` steps."""
    curve: list[tuple[int, str, float]] = []
    percentiles: dict[str, list] = {arm: [] for arm in ARMS}
    for arm in ARMS:
        model = models[arm]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        # Same batch order for both arms: the only difference is BatchNorm.
        batches = torch.Generator().manual_seed(seed + 1)

        def evaluate(step: int) -> None:
            accuracy, pcts = _evaluate(torch, model, x_test, y_test)
            curve.append((step, arm, accuracy))
            percentiles[arm].append((step, *pcts))

        evaluate(0)
        if progress is not None:
            progress(arm, 0)
        for step in range(1, steps + 1):
            model.train()
            index = torch.randint(0, len(x_train), (batch_size,), generator=batches)
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps:
                evaluate(step)
            if progress is not None and (step % 50 == 0 or step == steps):
                progress(arm, step)
        model.eval()
    return curve, percentiles


def _check_options(steps: int, batch_size: int, lr: float) -> None:
    if steps < 1:
        raise BnfoldError(f"--steps {steps}: train for at least 1 step")
    if batch_size < 2:
        raise BnfoldError(f"--batch-size {batch_size}: BatchNorm needs at least 2 samples per batch")
    if not (lr > 0 and np.isfinite(lr)):
        raise BnfoldError(f"--lr {lr}: give a positive learning rate, e.g. 0.5")


def _paired_models(torch, in_features: int, seed: int) -> dict:
    """Both arms with identical initial values for every weight they share."""
    from bnfold.pytorch.zoo.nets import PaperMLP

    torch.manual_seed(seed)
    with_bn = PaperMLP(in_features, batchnorm=True)
    without_bn = PaperMLP(in_features, batchnorm=False)
    init = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in with_bn.hidden:
            layer.linear.weight.normal_(0.0, INIT_STD, generator=init)
        with_bn.out.weight.normal_(0.0, INIT_STD, generator=init)
        with_bn.out.bias.zero_()
        for source, target in zip(with_bn.hidden, without_bn.hidden):
            target.linear.weight.copy_(source.linear.weight)
            target.linear.bias.zero_()
        without_bn.out.load_state_dict(with_bn.out.state_dict())
    return {"bn": with_bn, "no_bn": without_bn}


def _evaluate(torch, model, x_test, y_test) -> tuple[float, tuple[float, float, float]]:
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean().item()
        tracked = model.sigmoid_inputs(x_test)[-1][:, TRACKED_UNIT].double().numpy()
    p15, p50, p85 = (float(v) for v in np.percentile(tracked, PERCENTILES))
    return float(accuracy), (p15, p50, p85)


def _steps_to(curve, arm: str) -> dict[float, int | None]:
    reached: dict[float, int | None] = {}
    for threshold in THRESHOLDS:
        hits = [step for step, a, acc in curve if a == arm and acc >= threshold]
        reached[threshold] = hits[0] if hits else None
    return reached


def _write_outputs(result: PaperResult, bn_model) -> None:
    from bnfold.onnxio.staged_files import write_text_atomic
    from bnfold.pytorch.train.files import save_figure, save_state_dict

    lines = ["step,arm,test_accuracy"] + [f"{s},{arm},{acc:.6f}" for s, arm, acc in result.curve]
    result.curve_csv = os.path.join(result.out_dir, "curve.csv")
    write_text_atomic(result.curve_csv, "\n".join(lines) + "\n")
    result.curve_png = save_figure(plot_curves(result), os.path.join(result.out_dir, "curve.png"))
    result.checkpoint = save_state_dict(bn_model, os.path.join(result.out_dir, "paper-mlp-bn.pt"))


def plot_curves(result: PaperResult):
    """Fig. 1 of the paper: (a) test accuracy, (b, c) a sigmoid input's 15/50/85th percentiles."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BnfoldError("plotting needs matplotlib: pip install 'bnfold[torch]'") from None

    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    figure = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, *percentile_axes = figure.subplots(1, 3)
    colours = {"bn": "tab:blue", "no_bn": "tab:red"}
    labels = {"bn": "with BatchNorm", "no_bn": "without BatchNorm"}
    for arm in ARMS:
        steps = [s for s, a, _ in result.curve if a == arm]
        accuracy = [acc for _, a, acc in result.curve if a == arm]
        accuracy_axes.plot(steps, accuracy, color=colours[arm], label=labels[arm])
    accuracy_axes.set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy",
                      ylim=(max(0.0, min(acc for *_, acc in result.curve) - 0.02), 1.0))
    accuracy_axes.legend(loc="lower right")
    accuracy_axes.grid(alpha=0.3)
    low = min(p[1] for arm in ARMS for p in result.sigmoid_percentiles[arm])
    high = max(p[3] for arm in ARMS for p in result.sigmoid_percentiles[arm])
    for axes, arm, tag in zip(percentile_axes, ("no_bn", "bn"), ("(b)", "(c)")):
        rows = result.sigmoid_percentiles[arm]
        steps = [r[0] for r in rows]
        for column, pct, style in zip((1, 2, 3), PERCENTILES, (":", "-", ":")):
            axes.plot(steps, [r[column] for r in rows], style, color=colours[arm], label=f"{pct}th")
        axes.set(title=f"{tag} sigmoid input, {labels[arm]}", xlabel="training step",
                 ylim=(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9)))
        axes.legend(loc="upper right", title="percentile")
        axes.grid(alpha=0.3)
    percentile_axes[0].set_ylabel(f"input of sigmoid (layer 3, unit {TRACKED_UNIT})")
    figure.suptitle(
        f"BatchNorm paper §4.1 on {result.data}: SGD lr {result.lr:g}, batch {result.batch_size}, "
        f"seed {result.seed}"
    )
    return figure
