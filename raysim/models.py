"""Models. Every classifier returns `ModelOutput(features, logits)` and names its last layer
`classifier`, so prototype methods can read features and the classifier weights uniformly."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class ModelOutput(NamedTuple):
    features: Tensor | None  # (B, feature_dim), the input of `classifier`; None: no feature head
    logits: Tensor  # (B, num_classes)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input (the convex model of the FedProx
    paper). It has no feature head, so prototype methods cannot run on it."""

    has_feature_head = False

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.feature_dim = None
        self.classifier = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        return ModelOutput(None, self.classifier(x.flatten(1)))


class SmallCNN(nn.Module):
    """conv3×3 32 → ReLU → conv3×3 64 → ReLU → avg-pool 4×4 → linear 128 → ReLU → classifier.

    Small enough that framework overhead shows on the quickstart workload; the same network is
    used when comparing against other simulators. On inputs of 16 pixels or more a 2×2 max-pool
    follows the first ReLU, so 32×32 images cost ~4× less (8×8 digits are unaffected).
    """

    has_feature_head = True

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, feature_dim: int = 128
    ) -> None:
        super().__init__()
        in_channels = input_shape[0]
        self.feature_dim = feature_dim
        downsample = [nn.MaxPool2d(2)] if min(input_shape[1:]) >= 16 else []
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            *downsample,
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        features = self.encoder(x)
        return ModelOutput(features, self.classifier(features))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet10(nn.Module):
    """CIFAR-style ResNet10 of the FedHPro code (spec §5): BasicBlock ×[1,1,1,1], widths
    nf·(1,2,4,8) = 32/64/128/256, 3×3 stride-1 stem without max-pool, global average pool →
    256-d feature → Linear `classifier`. The official file also builds an unused `encoder` MLP
    (256→256→512) that only inflates the state dict; it is left out here."""

    has_feature_head = True

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, nf: int = 32) -> None:
        super().__init__()
        in_channels = input_shape[0]
        self.feature_dim = 8 * nf
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        widths = [nf, 2 * nf, 4 * nf, 8 * nf]
        strides = [1, 2, 2, 2]
        blocks, in_planes = [], nf
        for planes, stride in zip(widths, strides):
            blocks.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        features = self.pool(out).flatten(1)
        return ModelOutput(features, self.classifier(features))


MODELS = {"cnn": SmallCNN, "resnet10": ResNet10, "logreg": LogisticRegression}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes)
