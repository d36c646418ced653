"""Algorithm 2: recalibration replaces poor running averages with the data's population statistics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnfold.pytorch import zoo  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pytorch.train.recalibrate import recalibrate_batchnorm, sample_batches  # noqa: E402


def shifted_data(n=256, seed=0) -> np.ndarray:
    # Far from what the corrupted statistics claim: mean 2, std 3.
    return (2.0 + 3.0 * np.random.default_rng(seed).standard_normal((n, 4, 64))).astype(np.float32)


def corrupt(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(100.0)
    return model


def test_first_bn_gets_exactly_algorithm_2_statistics():
    torch.manual_seed(0)
    model = corrupt(zoo.create("conv1d"))
    x = shifted_data()
    batches = list(sample_batches(x, batches=6, batch_size=32, seed=1))
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        outs = [conv(b).double() for b in batches]  # the first BN's inputs
    # E[x] = mean of batch means; Var[x] = m/(m−1) · mean of batch variances, m = batch × length.
    expected_mean = torch.stack([o.mean(dim=(0, 2)) for o in outs]).mean(0)
    expected_var = torch.stack([o.var(dim=(0, 2), unbiased=True) for o in outs]).mean(0)

    result = recalibrate_batchnorm(model, batches)

    assert result.batches == 6 and result.bn_modules == 3
    assert not model.training
    np.testing.assert_allclose(bn.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.double(), expected_var, rtol=1e-5)
    # The biased (÷m) variance would differ by m/(m−1) = 2048/2047: just outside the tolerance.
    biased = torch.stack([o.var(dim=(0, 2), unbiased=False) for o in outs]).mean(0)
    assert not torch.allclose(bn.running_var.double(), biased, rtol=1e-5, atol=0)
    assert bn.momentum == 0.1  # restored after the cumulative average


def test_every_bn_normalises_the_data_after_recalibration():
    torch.manual_seed(0)
    model = corrupt(zoo.create("conv1d"))
    x = torch.from_numpy(shifted_data(seed=3))

    def normalised_stats():
        """Per BN: worst |mean| and |var − 1| of (x − running_mean)/sqrt(running_var + ε)."""
        found = []

        def hook(module, inputs, output):
            z = (inputs[0] - module.running_mean[None, :, None]) / torch.sqrt(
                module.running_var[None, :, None] + module.eps)
            found.append((z.mean(dim=(0, 2)).abs().max().item(),
                          (z.var(dim=(0, 2)) - 1).abs().max().item()))

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, torch.nn.BatchNorm1d)]
        with torch.no_grad():
            model.eval()(x)
        for h in handles:
            h.remove()
        return found

    before = normalised_stats()
    assert max(m for m, _ in before) > 0.3  # the corrupted stats are visibly wrong
    recalibrate_batchnorm(model, sample_batches(x.numpy(), batches=20, batch_size=64))
    after = normalised_stats()
    assert len(after) == 3
    for mean_error, var_error in after:
        assert mean_error < 0.1
        assert var_error < 0.15


def test_sample_batches_cover_the_data_without_replacement():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    batches = list(sample_batches(x, batches=2, batch_size=5, seed=0))
    seen = np.concatenate([b.numpy().ravel() for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(list(sample_batches(x, batches=7, batch_size=4))) == 7  # reshuffles past an epoch


def test_recalibration_user_errors():
    x = shifted_data(n=8)
    with pytest.raises(BnfoldError, match="at least 2 samples"):
        list(sample_batches(x, batches=1, batch_size=1))
    with pytest.raises(BnfoldError, match="exceeds the 8 samples"):
        list(sample_batches(x, batches=1, batch_size=9))
    with pytest.raises(BnfoldError, match="no BatchNorm"):
        recalibrate_batchnorm(torch.nn.Linear(2, 2), [torch.zeros(2, 2)])
    model = corrupt(zoo.create("conv1d"))
    with pytest.raises(BnfoldError, match="no batches"):
        recalibrate_batchnorm(model, [])
    assert float(model.features[1].running_mean[0]) == 5.0  # left as it was
