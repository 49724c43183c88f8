"""`data.dataset: domains`: one multi-domain classification set from several datasets, each a
domain (`data.domains: [{name, dataset, root, ...}]`), e.g. the Digits benchmark from MNIST,
USPS, SVHN and SynthDigits files. Every domain keeps its dataset's own train/test split, is
brought to one image shape (`data.domain_shape: [C, H, W]`, needed where the datasets differ:
bilinear resizing with antialiasing; a gray image repeated over three channels, a colour one
reduced to its luminance for one), and may be subsampled (`train_size`, `test_size`: a seeded
draw, the same in every run). The `domains` partition and the per-domain test metrics then work
as on `digits_domains`."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysim.config import DATASET, plugin_params, require
from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetRequest,
    DatasetSpec,
    channel_stats,
)
from raysim.registry import DATASETS

LUMINANCE = np.array([0.299, 0.587, 0.114])
_SUBSAMPLE_STREAM = 0xD0  # the data-side stream of each domain's subsample


def as_uint8(x: np.ndarray, scale: float) -> np.ndarray:
    """Stored pixels on [0, scale] (digits: 16, images: 255) as uint8 on [0, 255]."""
    if x.dtype == np.uint8 and scale == 255.0:
        return x
    return np.rint(np.clip(x.astype(np.float64) / scale, 0, 1) * 255).astype(np.uint8)


def to_shape(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C, H, W) uint8 images as (N, *shape)."""
    channels, height, width = shape
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, channels, axis=1)
        elif channels == 1:
            x = np.rint(np.tensordot(x.astype(np.float64), LUMINANCE[:x.shape[1]], ([1], [0]))
                        )[:, None].astype(np.uint8)
        else:
            raise DatasetFormatError(f"cannot bring {x.shape[1]}-channel images to {channels}")
    if x.shape[2:] == (height, width):
        return np.ascontiguousarray(x)
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)).float(),
                            size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8).numpy()


def subsample(split: ArraySplit, size: int | None, domain: str, part: str) -> ArraySplit:
    if size is None or size >= len(split.y):
        return split
    rng = np.random.default_rng([_SUBSAMPLE_STREAM, zlib.crc32(f"{domain}/{part}".encode())])
    keep = np.sort(rng.choice(len(split.y), size, replace=False))
    return ArraySplit(split.x[keep], split.y[keep])


@dataclass(frozen=True)
class DomainSource:
    """One domain of `data.dataset: domains`: a single-domain dataset read from its own root,
    optionally subsampled (a seeded draw of its train / test split); that dataset's own keys
    sit beside these."""

    name: str = ""
    dataset: str = ""
    params: Any = plugin_params(DATASET, "dataset")
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "every domain needs a name (its metrics' suffix)")
        require(self.dataset != "domains", "dataset", "a domain cannot be a `domains` dataset")
        require(DATASETS[self.dataset].task == "classification", "dataset",
                f"{self.dataset} is not a classification dataset")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be >= 1 (got {value})")


@dataclass(frozen=True)
class DomainsConfig:
    """The keys of `domains` (under `data`): its domains, and the image shape [C, H, W] they
    are brought to (needed where they differ)."""

    domains: tuple[DomainSource, ...] = ()
    domain_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        require(bool(self.domains), "domains", "list the domains, e.g. [{name: mnist, dataset: "
                "mnist, root: data/mnist}, {name: usps, dataset: usps, root: data/usps}]")
        names = [d.name for d in self.domains]
        twice = next((n for n in names if names.count(n) > 1), None)
        require(twice is None, "domains", f"two domains are named {twice!r}")
        shape = self.domain_shape
        require(shape is None or (len(shape) == 3 and all(v >= 1 for v in shape)),
                "domain_shape", f"expected [channels, height, width] (got {list(shape or ())})")


def source_request(request: DatasetRequest, source: DomainSource) -> DatasetRequest:
    """The request a domain's own dataset is read with."""
    return dataclasses.replace(request, dataset=source.dataset, params=source.params,
                               root=source.root, download=source.download, val_fraction=None)


def load_domains(request: DatasetRequest) -> Dataset:
    own = request.params
    loaded = []
    for source in own.domains:
        dataset = DATASETS[source.dataset].load(source_request(request, source))
        if dataset.spec.domains or dataset.train is None:
            raise DatasetFormatError(f"domain {source.name!r}: dataset {source.dataset!r} has "
                                     "domains of its own (or no training split); a domain must "
                                     "be a single-domain dataset")
        loaded.append((source, dataset))
    classes = {source.name: ds.spec.num_classes for source, ds in loaded}
    first, num_classes = next(iter(classes.items()))
    other = next(((name, n) for name, n in classes.items() if n != num_classes), None)
    if other is not None:
        raise DatasetFormatError(f"domain {first!r} has {num_classes} classes but domain "
                                 f"{other[0]!r} has {other[1]}; every domain must hold the "
                                 "same classes")
    shapes = {source.name: tuple(ds.spec.input_shape) for source, ds in loaded}
    if own.domain_shape is not None:
        shape = tuple(own.domain_shape)
    elif len(set(shapes.values())) == 1:
        shape = next(iter(shapes.values()))
    else:
        seen = ", ".join(f"{'×'.join(map(str, s))} ({name})" for name, s in shapes.items())
        raise DatasetFormatError(f"the domains' images differ ({seen}); declare a common "
                                 "shape, e.g. data.domain_shape: [3, 32, 32]")
    splits: dict[str, list[ArraySplit]] = {"train": [], "test": []}
    for domain_id, (source, dataset) in enumerate(loaded):
        for part, size in (("train", source.train_size), ("test", source.test_size)):
            split = subsample(getattr(dataset, part), size, source.name, part)
            x = to_shape(as_uint8(split.x, dataset.spec.scale), shape)
            splits[part].append(ArraySplit(x, split.y,
                                           np.full(len(split.y), domain_id, np.int64)))
    train, test = (ArraySplit(*(np.concatenate([getattr(s, f) for s in splits[part]])
                                for f in ("x", "y", "domain"))) for part in ("train", "test"))
    mean, std = channel_stats(train.x, 255.0)
    spec = DatasetSpec("domains", num_classes, shape, mean, std, 255.0, None,
                       domains=tuple(source.name for source, _ in loaded))
    return Dataset(spec=spec, train=train, test=test)


class DomainsDataset:
    """The plug-in (`raysim.datasets` entry point `domains`)."""

    task = "classification"
    Config = DomainsConfig

    def check(self, request: DatasetRequest) -> None:
        for i, source in enumerate(request.params.domains):
            try:
                DATASETS[source.dataset].check(source_request(request, source))
            except DatasetNotFoundError as error:
                raise DatasetNotFoundError(f"data.domains[{i}] ({source.name}): {error}") \
                    from None

    def load(self, request: DatasetRequest) -> Dataset:
        return load_domains(request)


domains = DomainsDataset()
