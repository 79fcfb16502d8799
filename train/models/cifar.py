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

from serve.backend.errors import UsageError


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


VGG_CFG: dict[str, list[int | str]] = {
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


# GoogLeNet (Szegedy et al. 2015, Table 1): per Inception module the widths
# (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_V1 = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
INCEPTION_KINDS = ("reduced", "naive")


def _conv_bn_relu(cin: int, cout: int, k: int, batchnorm: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batchnorm),
        _norm(cout, batchnorm),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """One Inception (v1) module: parallel 1x1, 3x3, 5x5 convolutions and a 3x3 max-pool
    (stride 1), concatenated along channels.

    ``reduced`` (the paper's Figure 2b): 1x1 reductions before the 3x3 and 5x5 convs and a
    1x1 projection after the pool; output ``n1 + n3 + n5 + pool_proj`` channels.
    ``naive`` (Figure 2a): the same branch widths without reductions, and the pool passes
    all ``cin`` channels through, so the output (``n1 + n3 + n5 + cin``) grows with every
    module - the paper's "computational blow up"."""

    def __init__(
        self,
        cin: int,
        widths: tuple[int, int, int, int, int, int],
        kind: str = "reduced",
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if kind not in INCEPTION_KINDS:
            raise UsageError(f"inception must be one of {INCEPTION_KINDS}, got {kind!r}")
        n1, r3, n3, r5, n5, pp = widths
        self.kind = kind
        self.branch1 = _conv_bn_relu(cin, n1, 1, batchnorm)
        if kind == "reduced":
            self.branch3 = nn.Sequential(
                _conv_bn_relu(cin, r3, 1, batchnorm), _conv_bn_relu(r3, n3, 3, batchnorm)
            )
            self.branch5 = nn.Sequential(
                _conv_bn_relu(cin, r5, 1, batchnorm), _conv_bn_relu(r5, n5, 5, batchnorm)
            )
            self.pool: nn.Module = nn.Sequential(
                nn.MaxPool2d(3, stride=1, padding=1), _conv_bn_relu(cin, pp, 1, batchnorm)
            )
            self.out_channels = n1 + n3 + n5 + pp
        else:
            self.branch3 = _conv_bn_relu(cin, n3, 3, batchnorm)
            self.branch5 = _conv_bn_relu(cin, n5, 5, batchnorm)
            self.pool = nn.MaxPool2d(3, stride=1, padding=1)
            self.out_channels = n1 + n3 + n5 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.pool(x)], 1)


class AuxClassifier(nn.Module):
    """The paper's auxiliary classifier for 16x16 maps: average-pool to 4x4, 1x1 conv to
    128 (+BN), ReLU, FC 1024, ReLU, dropout 0.7, FC to the classes."""

    def __init__(
        self, cin: int, num_classes: int, batchnorm: bool, conv: int = 128, hidden: int = 1024
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = _conv_bn_relu(cin, conv, 1, batchnorm)
        self.fc1 = nn.Linear(conv * 4 * 4, hidden)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class CifarGoogLeNet(nn.Module):
    """GoogLeNet (Inception v1, 22 layers with parameters) for 32x32 inputs.

    The paper's stem (7x7/2 conv, max-pool, 1x1, 3x3, max-pool: 224 -> 28 px) becomes
    3x3 conv 64, 1x1 conv 64, 3x3 conv 192 at full resolution with no early max-pools;
    then 3a, 3b (32 px), max-pool, 4a-4e (16 px), max-pool, 5a, 5b (8 px), global average
    pool, dropout (0.4) and the linear classifier. ``aux``: the two auxiliary classifiers
    on 4a and 4d; in training mode the forward then returns ``(logits, aux1, aux2)``
    (weighted into the loss by ``aux_weight``), in eval mode the logits alone, and
    :meth:`drop_aux` removes them for export. ``width`` scales every channel count (1: the
    paper's; smaller for quick wiring tests)."""

    def __init__(
        self,
        num_classes: int = 10,
        batchnorm: bool = True,
        dropout: float = 0.4,
        inception: str = "reduced",
        aux: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < width <= 4:
            raise UsageError(f"width must be in (0, 4], got {width}")

        def w(n: int) -> int:
            return max(1, round(n * width))

        self.stem = nn.Sequential(
            _conv_bn_relu(3, w(64), 3, batchnorm),
            _conv_bn_relu(w(64), w(64), 1, batchnorm),
            _conv_bn_relu(w(64), w(192), 3, batchnorm),
        )
        cin = w(192)
        stages: dict[str, Inception] = {}
        for name, widths in INCEPTION_V1.items():
            scaled = tuple(w(n) for n in widths)
            stages[name] = Inception(cin, scaled, inception, batchnorm)  # type: ignore[arg-type]
            cin = stages[name].out_channels
        self.inception3 = nn.Sequential(stages["3a"], stages["3b"])
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = stages["4a"]
        self.inception4bcd = nn.Sequential(stages["4b"], stages["4c"], stages["4d"])
        self.inception4e = stages["4e"]
        self.pool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5 = nn.Sequential(stages["5a"], stages["5b"])
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(cin, num_classes)
        self.aux1: AuxClassifier | None = None
        self.aux2: AuxClassifier | None = None
        if aux:
            for i, at in ((1, "4a"), (2, "4d")):
                head = AuxClassifier(
                    stages[at].out_channels, num_classes, batchnorm, w(128), w(1024)
                )
                setattr(self, f"aux{i}", head)
        _init(self)

    def drop_aux(self) -> None:
        """Remove the auxiliary classifiers (export: the graph has one output)."""
        self.aux1 = self.aux2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.pool3(self.inception3(self.stem(x)))
        a = self.inception4a(x)
        d = self.inception4bcd(a)
        x = self.inception5(self.pool4(self.inception4e(d)))
        logits = self.linear(self.dropout(torch.flatten(x.mean(dim=(2, 3)), 1)))
        if self.training and self.aux1 is not None and self.aux2 is not None:
            return logits, self.aux1(a), self.aux2(d)
        return logits
