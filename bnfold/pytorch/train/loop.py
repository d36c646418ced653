"""A small generic training loop for the sample networks (SGD with momentum, fixed step budget).

Integer y → cross-entropy on class scores; float y shaped like the output → mean squared error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.onnxio.files import ensure_folder
from bnfold.pytorch.train.data import load_dataset

DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.05
MOMENTUM = 0.9


@dataclass
class TrainResult:
    model_name: str
    checkpoint: str
    steps: int
    final_loss: float
    metric_name: str  # "test_accuracy" or "test_mse"
    metric: float


@dataclass
class TrainingJob:
    """Everything checked and built before the first step (so a CLI can refuse before any work)."""

    name: str
    model: object
    dataset: object
    loss_fn: object
    steps: int
    batch_size: int
    lr: float
    seed: int


def prepare_training(
    name: str,
    data: str,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
) -> TrainingJob:
    """Check the options, load `data`, build the sample or `module:factory` model `name`, and
    check that the data fits it; raises BnfoldError before any training."""
    from bnfold.pytorch.zoo import SAMPLE_NAMES, create, require_torch

    torch = require_torch()
    if name not in SAMPLE_NAMES and ":" not in name:
        raise BnfoldError(f"unknown sample {name!r}: choose one of paper, {', '.join(SAMPLE_NAMES)} "
                          "or module:factory")
    if steps < 1 or batch_size < 2 or not lr > 0:
        raise BnfoldError("use --steps ≥ 1, --batch-size ≥ 2 and a positive --lr")
    dataset = load_dataset(data)
    torch.manual_seed(seed)
    model = create(name)
    if name == "paper-mlp" and dataset.x_train[0].size != model.in_features:
        from bnfold.pytorch.zoo.nets import PaperMLP

        model = PaperMLP(in_features=int(dataset.x_train[0].size))
    if batch_size > len(dataset.x_train):
        raise BnfoldError(f"--batch-size {batch_size} exceeds the {len(dataset.x_train)} "
                          "training samples")
    x, y = torch.from_numpy(dataset.x_train[:2]), torch.from_numpy(dataset.y_train[:2])
    loss_fn = _loss_for(torch, model, dataset, x, y)
    return TrainingJob(name, model, dataset, loss_fn, steps, batch_size, lr, seed)


def train_sample(
    name: str,
    data: str,
    out_dir: str | os.PathLike,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the sample (or module:factory) network `name` on the .npz `data`; writes
    OUT_DIR/NAME.pt (state_dict; `module:factory` becomes module.factory.pt)."""
    job = prepare_training(name, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return run_training(job, out_dir, progress)


def run_training(job: TrainingJob, out_dir: str | os.PathLike,
                 progress: Callable[[int], None] | None = None) -> TrainResult:
    from bnfold.pytorch.train.files import save_state_dict
    from bnfold.pytorch.zoo import file_stem, require_torch

    torch = require_torch()
    model, dataset, loss_fn = job.model, job.dataset, job.loss_fn
    x_train, y_train = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    x_test, y_test = torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)
    optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=MOMENTUM)
    order = torch.Generator().manual_seed(job.seed + 1)
    loss = torch.tensor(float("nan"))
    for step in range(1, job.steps + 1):
        model.train()
        index = torch.randint(0, len(x_train), (job.batch_size,), generator=order)
        loss = loss_fn(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step)
    model.eval()
    if not torch.isfinite(loss):
        raise BnfoldError(f"training diverged (loss {loss.item()}): lower --lr")
    with torch.no_grad():
        output = model(x_test)
        if dataset.is_classification:
            metric_name, metric = "test_accuracy", (output.argmax(1) == y_test).double().mean().item()
        else:
            metric_name, metric = "test_mse", torch.nn.functional.mse_loss(output, y_test).item()
    ensure_folder(out_dir)
    path = save_state_dict(model, os.path.join(out_dir, f"{file_stem(job.name)}.pt"))
    return TrainResult(job.name, path, job.steps, float(loss.item()), metric_name, float(metric))


def forward_failure(exc: Exception, x, where: str, feeds: str, fix: str) -> BnfoldError:
    """One line for a model that failed on the one input training/recalibration feeds it:
    a TypeError means forward() wants more arguments, a RuntimeError that the data do not fit."""
    if isinstance(exc, TypeError):
        return BnfoldError(
            f"{where}the model's forward does not take one input ({exc}): {feeds}; wrap the "
            f"model so forward(x) is all it needs"
        )
    first = (str(exc).splitlines() or ["error"])[0][:160]
    return BnfoldError(
        f"{where}samples of shape {tuple(x.shape[1:])} do not fit the model ({first}): {fix}"
    )


def _loss_for(torch, model, dataset, x, y):
    """Pick the loss and check the data fits the model, with a message that says how it does not."""
    model.train()
    try:
        with torch.no_grad():
            output = model(x)
    except (TypeError, RuntimeError) as exc:
        raise forward_failure(
            exc, x, f"{dataset.name}: ", "training feeds x_train alone",
            "reshape (or cast, if it names a dtype) x_train/x_test to the model's input",
        ) from None
    if dataset.is_classification:
        classes = output.shape[1] if output.dim() == 2 else 0
        labels = np.concatenate([dataset.y_train.ravel(), dataset.y_test.ravel()])
        if output.dim() != 2 or dataset.y_train.ndim != 1 or labels.max() >= classes or labels.min() < 0:
            raise BnfoldError(
                f"{dataset.name}: labels must be 1-D in 0..{classes - 1} for this model's output "
                f"{tuple(output.shape[1:])}: check y_train and y_test"
            )
        return torch.nn.functional.cross_entropy
    if tuple(y.shape[1:]) != tuple(output.shape[1:]):
        raise BnfoldError(
            f"{dataset.name}: float targets of shape {tuple(y.shape[1:])} do not match the model "
            f"output {tuple(output.shape[1:])}: give integer labels or targets shaped like the output"
        )
    return torch.nn.functional.mse_loss
