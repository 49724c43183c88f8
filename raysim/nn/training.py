"""Local-training building blocks shared by all algorithms: batches of one client's data,
input preprocessing and augmentation, optimisers, and the evaluation loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysim.config import TrainConfig
from raysim.data import DatasetSpec


class Preprocess:
    """Stored samples (uint8 images or raw digits) → normalised float model input.

    Runs per batch on the worker's device, so datasets stay compact in memory; the optional
    augmentation (`crop_flip`: 4-pixel-padded random crop + horizontal flip, per sample) draws
    from the client's generator, never from the global RNG.
    """

    def __init__(self, spec: DatasetSpec, device: torch.device) -> None:
        channels = len(spec.mean)
        self.scale = float(spec.scale)
        self.mean = torch.tensor(spec.mean, device=device).view(1, channels, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, channels, 1, 1)
        self.augment = spec.augment
        # steps that leave every value as it is (÷1, −(+0), ÷1) are skipped: same bits, less
        # work (subtracting −0 turns a −0 into +0: kept)
        self._steps: list[tuple[Any, float | Tensor]] = []
        if self.scale != 1.0:
            self._steps.append((torch.Tensor.div_, self.scale))
        if (self.mean != 0).any() or self.mean.signbit().any():
            self._steps.append((torch.Tensor.sub_, self.mean))
        if (self.std != 1).any():
            self._steps.append((torch.Tensor.div_, self.std))

    def _widens(self, x: Tensor) -> bool:
        """Whether the statistics (1, C, 1, 1) broadcast `x` to another shape (fewer
        dimensions, or one channel against C), where it cannot be normalised in place."""
        channels = self.mean.shape[1]
        return x.dim() < self.mean.dim() or (channels != 1 and x.shape[-3] != channels)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(x / scale − mean) / std as float32, on a copy of `x`, normalised in place: a new
        tensor per step would cost more than the arithmetic on a group's stacked batches."""
        if self._widens(x):
            x = (x.float() / self.scale - self.mean) / self.std
        else:
            x = x.to(torch.float32, copy=True)
            for step, operand in self._steps:
                step(x, operand)
        if generator is not None and self.augment == "crop_flip":
            x = random_crop_flip(x, generator)
        return x

    def batch(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """A stored (images, labels) batch → model input and int64 targets. Masks (B, H, W)
        are augmented together with their images (`rot_flip`)."""
        y = y.long()
        if generator is not None and self.augment == "rot_flip":
            return random_rot_flip(self(x), y, generator)
        return self(x, generator), y


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Per-sample random crop (zero padding) and horizontal flip, vectorised over the batch."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_rot_flip(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per sample: rotate image and mask by k·90° (k uniform in 0..3), then with p = 3/4 flip
    them vertically, horizontally or both (the prostate-MRI augmentation of the FedBCS code,
    whose k ∈ {0..4} counts the identity twice). Square inputs only."""
    b = len(x)
    turns = torch.randint(0, 4, (b,), generator=generator).tolist()
    flips = torch.randint(0, 4, (b,), generator=generator).tolist()  # 0: none, 1..3: which
    xs, ys = [], []
    for i in range(b):
        xi, yi = torch.rot90(x[i], turns[i], (-2, -1)), torch.rot90(y[i], turns[i], (-2, -1))
        dims = {0: (), 1: (-2,), 2: (-1,), 3: (-2, -1)}[flips[i]]
        if dims:
            xi, yi = xi.flip(dims), yi.flip(dims)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


class ClientData:
    """One client's view of the worker's dataset: an index set into tensors loaded once."""

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, preprocess: Preprocess) -> None:
        self.x, self.y, self.indices, self.preprocess = x, y, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor:
        return self.y[self.indices]

    def batches(
        self, batch_size: int, generator: torch.Generator, *, augment: bool = True
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch. A trailing batch of one sample is dropped: BatchNorm cannot
        train on it, and it would make a model's behaviour depend on the client size mod B."""
        order = torch.randperm(len(self.indices), generator=generator).to(self.indices.device)
        for start in range(0, len(order), batch_size):
            chunk = self.indices[order[start : start + batch_size]]
            if len(chunk) < 2 and len(order) > 1:
                continue
            yield self.preprocess.batch(self.x[chunk], self.y[chunk],
                                        generator if augment else None)

    def steps_per_epoch(self, batch_size: int) -> int:
        """How many batches `batches` yields (a trailing batch of one sample is skipped)."""
        return int(steps_per_epoch(np.array([len(self)]), batch_size)[0])

    def ordered_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """All samples in index order, no augmentation: for passes that only read the model
        (local prototypes, statistics)."""
        for start in range(0, len(self.indices), batch_size):
            chunk = self.indices[start : start + batch_size]
            yield self.preprocess.batch(self.x[chunk], self.y[chunk])


def steps_per_epoch(sizes: np.ndarray, batch_size: int) -> np.ndarray:
    """Optimizer steps per local epoch of clients of these sizes (a trailing batch of one
    sample is skipped)."""
    return sizes // batch_size + (sizes % batch_size >= 2)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
