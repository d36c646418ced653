"""Sample BatchNorm networks (plain torch, no torchvision), small enough to train and export on CPU.

This module imports torch at the top: it is only ever imported from inside `bnfold.pytorch.zoo.create`,
so `import bnfold` stays torch-free.
"""

from __future__ import annotations

import torch
from torch import nn


class PaperMLP(nn.Module):
    """Ioffe & Szegedy 2015 §4.1: 3 fully connected hidden layers of 100 sigmoid units, 10 outputs.

    With `batchnorm`, each hidden layer is x = Wu (no bias: BN's β replaces it) → BN → sigmoid;
    without, x = Wu + b → sigmoid. Module names match between the two so the shared weights
    (`hidden.N.linear.weight`, `out.*`) can be copied from one arm to the other.
    """

    def __init__(self, in_features: int = 64, hidden: int = 100, classes: int = 10,
                 batchnorm: bool = True):
        super().__init__()
        self.in_features = in_features
        self.batchnorm = batchnorm
        layers = []
        width = in_features
        for _ in range(3):
            layers.append(_SigmoidLayer(width, hidden, batchnorm))
            width = hidden
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x)
        return self.out(x)

    def sigmoid_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input of each hidden layer's sigmoid (what the paper's Fig. 1(b,c) plots)."""
        found = []
        x = x.flatten(1)
        for layer in self.hidden:
            pre = layer.pre_activation(x)
            found.append(pre)
            x = torch.sigmoid(pre)
        return found


class _SigmoidLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, batchnorm: bool):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=not batchnorm)
        self.bn = nn.BatchNorm1d(n_out) if batchnorm else nn.Identity()

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.pre_activation(x))


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + skip)


class ResNet18(nn.Module):
    """ResNet-18 layout (stem, 4 stages × 2 basic blocks, 20 BNs) at a CPU-friendly width."""

    def __init__(self, width: int = 8, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, width, 3)
        blocks, c = [], width
        for stage, c_out in enumerate((width, width * 2, width * 4, width * 8)):
            for i in range(2):
                blocks.append(BasicBlock(c, c_out, 2 if stage > 0 and i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → BN → ReLU6 → 3×3 depthwise → BN → ReLU6 → 1×1 project → BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, c_out, 1)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = self.project(nn.functional.relu6(self.depthwise(y)))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
        )
        self.head = conv_bn(32, 64, 1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(nn.functional.relu6(self.stem(x)))
        x = nn.functional.relu6(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class ConvTransposeDecoder(nn.Module):
    """Latent 16×4×4 → image 3×16×16 through grouped ConvTranspose → BN → ReLU stages."""

    def __init__(self, latent: int = 16, out_channels: int = 3):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(latent, 16, 4, 2, 1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, 2, 1, groups=2, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.to_image = nn.Conv2d(8, out_channels, 3, 1, 1)

    def forward(self, z):
        x = torch.relu(self.bn1(self.up1(z)))
        x = torch.relu(self.bn2(self.up2(x)))
        return self.to_image(x)


class Conv1dNet(nn.Module):
    """A 1-D signal classifier: (Conv1d → BN → ReLU) × 3, global average pool, linear head."""

    def __init__(self, in_channels: int = 4, classes: int = 10):
        super().__init__()
        layers, c = [], in_channels
        for c_out, stride in ((16, 1), (32, 2), (32, 2)):
            layers += [nn.Conv1d(c, c_out, 5, stride, 2, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]
            c = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=2))


class PreActBlock(nn.Module):
    """He et al. 2016 pre-activation block: BN → ReLU → Conv, twice, plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


class PreActNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(width), PreActBlock(width))
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


# name -> (factory, input shape with batch 1)
SAMPLES = {
    "paper-mlp": (PaperMLP, (1, 64)),
    "resnet18": (ResNet18, (1, 3, 32, 32)),
    "mobilenetv2": (MobileNetV2, (1, 3, 32, 32)),
    "convtranspose-decoder": (ConvTransposeDecoder, (1, 16, 4, 4)),
    "conv1d": (Conv1dNet, (1, 4, 64)),
    "preact": (PreActNet, (1, 3, 16, 16)),
}
