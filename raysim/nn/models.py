"""Models. Every classifier returns `ModelOutput(features, logits)` and names its last layer
`classifier`, so prototype methods can read features and the classifier weights uniformly.
Segmentation models return `SegmentationOutput(logits, encoder, decoder)`: per-pixel logits plus
the named multi-level feature maps that multi-level prototype methods read."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from raysim.config import require
from raysim.registry import MODELS


@dataclass(frozen=True)
class WidthConfig:
    """`model.width`, for models with a base width (channels or hidden units)."""

    width: int | None = None  # None: the model's own default

    def __post_init__(self) -> None:
        require(self.width is None or self.width >= 1, "width", "must be >= 1")


class ModelOutput(NamedTuple):
    features: Tensor | None  # (B, feature_dim), the input of `classifier`; None: no feature head
    logits: Tensor  # (B, num_classes)


class SegmentationOutput(NamedTuple):
    logits: Tensor  # (B, num_classes, H, W)
    encoder: tuple[Tensor, ...]  # encoder stages, finest (H) first
    decoder: tuple[Tensor, ...]  # decoder stages, finest (H) first


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input (the convex model of the FedProx
    paper). It has no feature head, so prototype methods cannot run on it."""

    has_feature_head = False
    task = "classification"
    width_argument = None  # the keyword `model.width` sets; None: no width

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.feature_dim = None
        self.classifier = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        return ModelOutput(None, self.classifier(x.flatten(1)))


class MLP(nn.Module):
    """flatten → linear `width` → ReLU → linear width/2 → ReLU (the features) → classifier: a
    small non-convex model for vector data (synthetic_fedprox) with a feature head, so the
    prototype methods run on it too."""

    has_feature_head = True
    task = "classification"
    width_argument = "width"
    Config = WidthConfig

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 width: int = 128) -> None:
        super().__init__()
        self.feature_dim = max(1, width // 2)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
            nn.Linear(width, self.feature_dim), nn.ReLU())
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        features = self.encoder(x)
        return ModelOutput(features, self.classifier(features))


class SmallCNN(nn.Module):
    """conv3×3 32 → ReLU → conv3×3 64 → ReLU → avg-pool 4×4 → linear 128 → ReLU → classifier.

    Small enough that framework overhead shows on the quickstart workload; the same network is
    used when comparing against other simulators. On inputs of 16 pixels or more a 2×2 max-pool
    follows the first ReLU, so 32×32 images cost ~4× less (8×8 digits are unaffected).
    """

    has_feature_head = True
    task = "classification"
    width_argument = None  # the keyword `model.width` sets; None: no width

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
    task = "classification"
    width_argument = "nf"
    Config = WidthConfig

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


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """[Conv3×3 (no bias) → BN → ReLU] ×2. BN has neither affine parameters nor running
    statistics, as in the FedBCS/HarmoFL U-Net: it always normalises with the current batch's
    statistics (test time included) and leaves nothing but conv weights to aggregate."""
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers += [
            nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """2-D U-Net of the FedBCS spec (§4.1): widths w·(1, 2, 4, 8) over four max-pooled encoder
    stages, a 16w bottleneck, transposed-conv up-sampling with concatenated skips and a 1×1 head.
    w = 32 is the official network (7,757,186 parameters for 3 → 2 channels).

    `recalibrate[i]` runs on encoder stage i's output before it is used anywhere (next stage,
    skip connection, features); it is the identity unless a method installs a module there
    (FedBCS's style recalibration after stages 2–4). Input sides must be multiples of 16.
    """

    has_feature_head = False
    width_argument = "width"
    Config = WidthConfig
    task = "segmentation"

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.encoder_channels = tuple(widths)
        self.decoder_channels = tuple(widths)
        ins = [input_shape[0], *widths[:-1]]
        self.encoders = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, widths))
        self.recalibrate = nn.ModuleList(nn.Identity() for _ in widths)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_block(widths[-1], 2 * widths[-1])
        ups = [2 * widths[-1], *widths[:0:-1]]  # 16w, 8w, 4w, 2w
        self.upconvs = nn.ModuleList(nn.ConvTranspose2d(u, o, 2, stride=2)
                                     for u, o in zip(ups, widths[::-1]))
        self.decoders = nn.ModuleList(conv_block(2 * o, o) for o in widths[::-1])
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> SegmentationOutput:
        encoder = []
        for i, (block, recalibrate) in enumerate(zip(self.encoders, self.recalibrate)):
            x = recalibrate(block(x if i == 0 else self.pool(x)))
            encoder.append(x)
        x = self.bottleneck(self.pool(x))
        decoder = []
        for up, block, skip in zip(self.upconvs, self.decoders, reversed(encoder)):
            x = block(torch.cat([up(x), skip], 1))
            decoder.append(x)
        return SegmentationOutput(self.head(x), tuple(encoder), tuple(reversed(decoder)))



class WideCNN(nn.Module):
    """`SmallCNN`'s depth at `width`/2·`width` channels (default 64/128, twice SmallCNN's):
    conv3×3 w → ReLU → conv3×3 2w → ReLU → avg-pool 4×4 → linear 256 → ReLU → classifier, with
    SmallCNN's 2×2 max-pool after the first ReLU on inputs of 16 pixels or more. A wider member
    of the heterogeneous groups (`raysim.nn.heterogeneous`)."""

    has_feature_head = True
    task = "classification"
    width_argument = "width"
    Config = WidthConfig

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 width: int = 64) -> None:
        super().__init__()
        self.feature_dim = 256
        downsample = [nn.MaxPool2d(2)] if min(input_shape[1:]) >= 16 else []
        self.encoder = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), *downsample,
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, self.feature_dim), nn.ReLU(),
        )
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        features = self.encoder(x)
        return ModelOutput(features, self.classifier(features))


class DeepCNN(nn.Module):
    """Four conv3×3 layers (`width`, `width`, 2·`width`, 2·`width`; default 32/32/64/64), each
    followed by ReLU, with a 2×2 max-pool after the second and after the fourth (each only while
    the side is at least 4: 28×28 → 14 → 7, 8×8 → 4 → 2) → avg-pool 2×2 → linear 128 → ReLU →
    classifier. A deeper member of the heterogeneous groups (`raysim.nn.heterogeneous`)."""

    has_feature_head = True
    task = "classification"
    width_argument = "width"
    Config = WidthConfig

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 width: int = 32) -> None:
        super().__init__()
        self.feature_dim = 128
        side = min(input_shape[1:])
        layers: list[nn.Module] = []
        channels = [input_shape[0], width, width, 2 * width, 2 * width]
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            if i % 2 == 1 and side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.encoder = nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 2 * 2, self.feature_dim), nn.ReLU(),
        )
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        features = self.encoder(x)
        return ModelOutput(features, self.classifier(features))


def model_task(name: str) -> str:
    return MODELS[name].task


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, params: Any = None
) -> nn.Module:
    """The registered model `name` (`raysim.models` entry points: cnn, cnn_wide, cnn_deep,
    resnet10, logreg, mlp, unet, and plug-ins) with its own keys `params` (its Config; None: the
    defaults), passed to `cls(input_shape, num_classes, **keys)` as keywords, those set to None
    left out; `width` goes to the keyword a model's `width_argument` names."""
    cls = MODELS[name]
    keys = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}
    renamed = {"width": getattr(cls, "width_argument", None) or "width"}
    kwargs = {renamed.get(key, key): value for key, value in keys.items() if value is not None}
    return cls(tuple(input_shape), num_classes, **kwargs)
