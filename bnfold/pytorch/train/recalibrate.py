"""Re-estimate BatchNorm population statistics (Ioffe & Szegedy 2015, Algorithm 2, steps 8–10).

For each BN input x, over N mini-batches B of size m:
    E[x]   = E_B[μ_B]
    Var[x] = m/(m−1) · E_B[σ²_B]        (unbiased; for conv BN, m counts batch × spatial)
i.e. a plain average over batches, not the exponential moving average used in training. Use it
when a model's running averages are poor (too-high momentum, a short fine-tune, a data shift)
before folding them into the weights, where they become permanent.

Implementation: every BN is put in training mode with `momentum=None` (PyTorch's cumulative
average) after its statistics are reset, so downstream BNs see the training-mode network
N_BN^tr, as in Algorithm 2; every other module stays in eval mode (no dropout); no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from bnfold.errors import BnfoldError


@dataclass
class RecalibrationResult:
    bn_modules: int
    batches: int
    batch_size: int
    # BN name -> (mean |Δ running_mean|, mean |Δ running_var|) over its channels
    changes: dict[str, tuple[float, float]]


def recalibrate_batchnorm(model, batches: Iterable) -> RecalibrationResult:
    """Replace every BN's running statistics with Algorithm 2's estimate over `batches` (tensors).

    The model is updated in place and returned to eval mode. Each batch needs ≥ 2 samples.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from bnfold.pytorch.zoo import require_torch

    torch = require_torch()
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not norms:
        raise BnfoldError("the model has no BatchNorm layers: there is nothing to recalibrate")
    for name, m in norms:
        if not m.track_running_stats or m.running_mean is None:
            raise BnfoldError(
                f"BatchNorm {name!r} keeps no running statistics (track_running_stats=False): "
                "it cannot be recalibrated or folded"
            )
    before = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in norms}
    momenta = {name: m.momentum for name, m in norms}
    count, size = 0, 0
    model.eval()
    try:
        for _, m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: each batch weighs 1/N
            m.train()
        with torch.no_grad():
            for batch in batches:
                if batch.shape[0] < 2:
                    raise BnfoldError(
                        "a recalibration batch has fewer than 2 samples: use --batch-size 2 or more"
                    )
                model(batch)
                count += 1
                size = max(size, int(batch.shape[0]))
    finally:
        for name, m in norms:
            m.momentum = momenta[name]
        model.eval()
    if count == 0:
        for name, m in norms:  # leave the model as it was
            m.running_mean.copy_(before[name][0])
            m.running_var.copy_(before[name][1])
        raise BnfoldError("no batches were given: pass a data file with samples in it")
    changes = {
        name: (
            float((m.running_mean - before[name][0]).abs().mean()),
            float((m.running_var - before[name][1]).abs().mean()),
        )
        for name, m in norms
    }
    return RecalibrationResult(len(norms), count, size, changes)


def sample_batches(x: np.ndarray, batches: int, batch_size: int, seed: int = 0):
    """`batches` tensors of `batch_size` rows drawn without replacement (reshuffled each epoch)."""
    import torch

    if batch_size < 2:
        raise BnfoldError(f"--batch-size {batch_size}: BN statistics need at least 2 samples per batch")
    if batches < 1:
        raise BnfoldError(f"--batches {batches}: use at least 1")
    if batch_size > len(x):
        raise BnfoldError(f"--batch-size {batch_size} exceeds the {len(x)} samples: use a smaller one")
    rng = np.random.default_rng(seed)
    order, position = rng.permutation(len(x)), 0
    for _ in range(batches):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(x)), 0
        yield torch.from_numpy(np.ascontiguousarray(x[order[position:position + batch_size]]))
        position += batch_size
