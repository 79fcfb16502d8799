"""Classifiers for 32x32 inputs: AlexNet-like, VGG-like, the CIFAR ResNets of He et al.
(option-A identity shortcuts, 16/32/64 channels) and a CIFAR ResNet-18 (3x3 stem).

Every model takes ``batchnorm`` (on/off; off means conv bias and no normalization)
and, where the design has dropout, ``dropout``. Layer names of the He et al. ResNets
match akamaster/pytorch_resnet_cifar10, so its published weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def _conv3x3(cin: int, cout: int, stride: int = 1, batchnorm: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batchnorm)


def _init(model: nn.Module, batchnorm: bool = True) -> None:
    """Kaiming-normal weights, zero biases. Without BatchNorm, residual blocks start as
    identities (last conv zeroed, as Fixup / zero-init-residual do), else the sum of
    unnormalized branches explodes with depth."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if not batchnorm:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.conv2.weight)


class ShortcutA(nn.Module):
    """He et al. option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. ``shortcut``: 'A' (identity/pad)
    or 'B' (1x1 conv projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, batchnorm)
        self.bn1 = _norm(cout, batchnorm)
        self.conv2 = _conv3x3(cout, cout, 1, batchnorm)
        self.bn2 = _norm(cout, batchnorm)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.shortcut = ShortcutA(cout - cin)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=not batchnorm),
                    _norm(cout, batchnorm),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, section 4.2): 3 stages of n blocks."""

    def __init__(self, n: int, num_classes: int = 10, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16, 1, batchnorm)
        self.bn1 = _norm(16, batchnorm)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, "A", batchnorm))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        _init(self, batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem without max-pool, 4 stages of 2 blocks
    (64-512 channels), projection shortcuts."""

    def __init__(self, num_classes: int = 10, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64, 1, batchnorm)
        self.bn1 = _norm(64, batchnorm)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(
                    BasicBlock(cin, cout, stride, "B", batchnorm),
                    BasicBlock(cout, cout, 1, "B", batchnorm),
                )
            )
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)
        _init(self, batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))


VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class CifarVGG(nn.Module):
    """VGG-11/16 for 32x32 inputs: 3x3 convs (+BN) and 5 max-pools down to 1x1x512,
    then a dropout-Linear(512)-ReLU classifier twice and the output layer."""

    def __init__(
        self, depth: str, num_classes: int = 10, batchnorm: bool = True, dropout: float = 0.5
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    _conv3x3(cin, int(v), 1, batchnorm),
                    _norm(int(v), batchnorm),
                    nn.ReLU(inplace=True),
                ]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class CifarAlexNet(nn.Module):
    """AlexNet-like CNN for 32x32 inputs: five convs (5x5, 5x5, three 3x3) with three
    max-pools to 4x4x256, then dropout-Linear(1024)-ReLU twice and the output layer."""

    def __init__(self, num_classes: int = 10, batchnorm: bool = True, dropout: float = 0.5) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batchnorm),
                _norm(cout, batchnorm),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *conv(3, 64, 5),
            nn.MaxPool2d(2),
            *conv(64, 192, 5),
            nn.MaxPool2d(2),
            *conv(192, 384, 3),
            *conv(384, 256, 3),
            *conv(256, 256, 3),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 4 * 4, 1024),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(1024, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
