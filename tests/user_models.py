"""Small modules shaped like the ones users write (not bnfold's samples), for export and bench.

Each factory takes no arguments, returns an eval-mode model with seeded, non-trivial BN
statistics, and is importable as `user_models:NAME` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.pytorch.zoo import randomize_batchnorm


def _ready(model, seed=0):
    torch.manual_seed(seed)
    for module in model.modules():  # fresh default init is seeded above, then BN randomised
        if hasattr(module, "reset_parameters") and not list(module.children()):
            module.reset_parameters()
    return randomize_batchnorm(model, seed=seed).eval()


class TwoInputs(nn.Module):
    """An image and a side vector; returns a dict."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.fc_bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, image, side):
        pooled = F.relu(self.bn(self.conv(image))).mean((2, 3))
        return {"score": pooled + self.fc_bn(self.fc(side)), "map": self.bn(self.conv(image))}


class TokenConv(nn.Module):
    """Token ids (int64) into an Embedding, a Conv1d+BN over the sequence, nested outputs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.conv, self.bn = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)

    def forward(self, ids, mask):
        h = self.bn(self.conv(self.embed(ids).transpose(1, 2))) * mask.unsqueeze(1)
        return h, (h.mean(2), {"last": h[:, :, -1]})


class SharedConv(nn.Module):
    """One Conv module called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(F.relu(self.bn1(self.conv(x)))))


class LinearOverChannels(nn.Module):
    """Linear on (N, C, L) with C == L, then BatchNorm1d(C): BN's channel axis is not the
    Linear's feature axis, so the two must not be fused."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


class AuxHead(nn.Module):
    """A training-only auxiliary head with its own BN (unused in eval) and a BN called twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.bn(y)  # the same BN module a second time
        if self.training:
            return y, self.aux(y)
        return y


class FunctionalBN(nn.Module):
    """BatchNorm through F.batch_norm on the module's own buffers, no BN module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        generator = torch.Generator().manual_seed(5)
        self.register_buffer("mean", 0.3 * torch.randn(4, generator=generator))
        self.register_buffer("var", 0.5 + torch.rand(4, generator=generator))
        self.gamma = nn.Parameter(0.5 + torch.rand(4, generator=generator))
        self.beta = nn.Parameter(0.2 * torch.randn(4, generator=generator))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta,
                            training=False, eps=1e-5)


class IntKeyedHeads(nn.Module):
    """Returns {0: logits, 1: {0: aux, "map": features}}: int dict keys, as detection heads
    indexed by level often are (the tracer cannot take them as they are)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.aux, self.aux_bn = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        features = self.bn(self.conv(x))
        return {1: {0: self.aux_bn(self.aux(features)), "map": features},
                0: features.mean((2, 3))}


class StatisticsInForward(nn.Module):
    """F.batch_norm on statistics built inside forward: "constant" ones from torch.tensor
    (exported as Constant nodes), "computed" ones from buffers (var = exp(log_var), exported
    as an Exp), "input" ones from the input itself (exported as reductions of it)."""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        generator = torch.Generator().manual_seed(6)
        self.register_buffer("mean", 0.3 * torch.randn(4, generator=generator))
        self.register_buffer("log_var", 0.5 * torch.randn(4, generator=generator))

    def forward(self, x):
        y = self.conv(x)
        if self.source == "constant":
            mean, var = torch.tensor([0.1, -0.2, 0.3, 0.05]), torch.tensor([0.9, 1.5, 0.6, 2.0])
        elif self.source == "computed":
            mean, var = 2 * self.mean, self.log_var.exp()
        else:
            mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
        return F.batch_norm(y, mean, var, training=False, eps=1e-5)


class UnbatchedConv1d(nn.Module):
    """A batched Conv2d+BN stem, then a Conv1d+BatchNorm1d head on one unbatched (C, L)
    sequence with C_out == L: BatchNorm1d reads the 2-D output as (N, C) and normalises L, so
    fusing it into the Conv1d's channels would be wrong although the sizes agree."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head, self.head_bn = nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)

    def forward(self, x):
        features = self.stem_bn(self.stem(x))
        sequence = features[0].flatten(1)[:, :6]  # (4, 6): the first sample, unbatched
        return features, self.head_bn(self.head(sequence))


class Detector(nn.Module):
    """Fully convolutional, any H/W; returns a tuple with a nested tuple."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.stem(x)
        boxes = self.head(y)
        return boxes, (self.up_bn(self.up(y)), boxes.flatten(2).mean(2))


class BakedReshape(nn.Module):
    """reshape(1, -1) bakes batch 1 in: a dynamic batch cannot work."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).reshape(1, -1))


class NeedsMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)

    def forward(self, x, mask, scale=1.0):
        return self.bn(self.conv(x)) * mask * scale


class UsesVdot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * torch.vdot(y.flatten(), y.flatten())


def conv_bn(parametrize: str | None = None):
    """Conv → BN → ReLU → Conv → BN, with the first conv's weight parametrized."""
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))
    net = _ready(net)
    if parametrize == "weight_norm":
        nn.utils.parametrizations.weight_norm(net[0])
    elif parametrize == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(net[0])
        net.train()
        with torch.no_grad():  # a few power iterations so u, v are not their initial guess
            for _ in range(3):
                net(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)))
        randomize_batchnorm(net, seed=1)
    elif parametrize == "old_weight_norm":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(net[0])
    return net.eval()


def two_inputs():
    return _ready(TwoInputs())


def token_conv():
    return _ready(TokenConv())


def shared_conv():
    return _ready(SharedConv())


def linear_over_channels():
    return _ready(LinearOverChannels())


def aux_head():
    return _ready(AuxHead())


def functional_bn():
    return _ready(FunctionalBN())


def int_keyed_heads():
    return _ready(IntKeyedHeads())


def constant_statistics():
    return _ready(StatisticsInForward("constant"))


def computed_statistics():
    return _ready(StatisticsInForward("computed"))


def input_statistics():
    return _ready(StatisticsInForward("input"))


def unbatched_conv1d():
    return _ready(UnbatchedConv1d())


def detector():
    return _ready(Detector())


def baked_reshape():
    return _ready(BakedReshape())


def needs_mask():
    return _ready(NeedsMask())


def uses_vdot():
    return _ready(UsesVdot())


def weight_norm_conv():
    return conv_bn("weight_norm")


def spectral_norm_conv():
    return conv_bn("spectral_norm")


def old_weight_norm_conv():
    return conv_bn("old_weight_norm")


def data_parallel():
    return nn.DataParallel(conv_bn())


def float64_conv():
    return conv_bn().double()


def with_width(width):
    """A factory that needs an argument (refused: factories are called with none)."""
    return conv_bn()


class TokenOnly(nn.Module):
    """Token ids only (for recalibration from an .npz of integer ids)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.conv, self.bn = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)

    def forward(self, ids):
        return self.bn(self.conv(self.embed(ids).transpose(1, 2))).mean(2)


def token_only():
    return _ready(TokenOnly())


def classifier():
    """A small image classifier (4 classes) for `bnfold train module:factory`."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    return _ready(net)
