"""Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), as used by CReFF and FedHPro
to augment the real samples whose gradients are matched.

`siamese_augment` follows the reference `ParamAugment` in its 'S' mode: one op family of the
strategy is drawn per call, and a single parameter draw is shared by every image of the batch
(the "Siamese" part: a class batch sees one transform). Every op is differentiable in `x`.

Unlike the reference, which reseeds the global torch RNG from the wall clock on every call,
all draws come from the caller's generator: the global RNG is never touched, so runs repeat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"

# the reference ParamAugment settings
FLIP_PROB = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_PAD_RATIO = 0.125
CUTOUT_RATIO = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


def _uniform(generator: torch.Generator) -> float:
    return torch.rand(1, generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _affine(x: Tensor, matrix: list[list[float]]) -> Tensor:
    theta = torch.tensor(matrix, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def color(x: Tensor, generator: torch.Generator) -> Tensor:
    """Brightness, saturation and contrast, each with its own shared draw (reference order)."""
    x = x + (_uniform(generator) - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)  # a no-op for one channel, as in the reference
    x = (x - mean) * (_uniform(generator) * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(generator) + CONTRAST) + mean


def crop(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translation by up to 12.5 % of the side per axis, with zero fill."""
    h, w = x.shape[2:]
    sh, sw = int(h * CROP_PAD_RATIO + 0.5), int(w * CROP_PAD_RATIO + 0.5)
    dy, dx = _randint(-sh, sh + 1, generator), _randint(-sw, sw + 1, generator)
    padded = F.pad(x, (sw, sw, sh, sh))
    return padded[:, :, sh + dy : sh + dy + h, sw + dx : sw + dx + w]


def cutout(x: Tensor, generator: torch.Generator) -> Tensor:
    """Zeroes one (side/2)² square whose centre may sit anywhere (clipped at the border)."""
    h, w = x.shape[2:]
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = _randint(0, h + (1 - ch % 2), generator)
    cx = _randint(0, w + (1 - cw % 2), generator)
    top, left = max(cy - ch // 2, 0), max(cx - cw // 2, 0)
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    mask[top : min(cy - ch // 2 + ch, h), left : min(cx - cw // 2 + cw, w)] = 0
    return x * mask


def flip(x: Tensor, generator: torch.Generator) -> Tensor:
    return x.flip(3) if _uniform(generator) < FLIP_PROB else x


def scale(x: Tensor, generator: torch.Generator) -> Tensor:
    """Independent x/y zoom factors in [1/1.2, 1.2] (bilinear, zero padding)."""
    low = 1.0 / SCALE_RATIO
    sx = _uniform(generator) * (SCALE_RATIO - low) + low
    sy = _uniform(generator) * (SCALE_RATIO - low) + low
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def rotate(x: Tensor, generator: torch.Generator) -> Tensor:
    """Rotation by an angle in ±15° (bilinear, zero padding)."""
    angle = (_uniform(generator) - 0.5) * 2 * ROTATE_DEGREES / 180 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(x, [[cos, -sin, 0.0], [sin, cos, 0.0]])


AUGMENTATIONS = {
    "color": color, "crop": crop, "cutout": cutout, "flip": flip, "scale": scale,
    "rotate": rotate,
}


def siamese_augment(
    x: Tensor, generator: torch.Generator, strategy: str = DEFAULT_STRATEGY
) -> Tensor:
    """One op family of `strategy` ('_'-separated names of AUGMENTATIONS), drawn from
    `generator`, applied with one parameter draw to all images of `x` (B, C, H, W)."""
    families = strategy.split("_")
    unknown = [f for f in families if f not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from "
                         f"{', '.join(AUGMENTATIONS)}")
    family = families[_randint(0, len(families), generator)]
    return AUGMENTATIONS[family](x, generator).contiguous()
