"""Domains held out of training (`data.test_domains`), for domain-generalisation studies: their
samples never reach a client, and their test samples form the `unseen` split, reported apart
from the training domains' as `test_<metric>/unseen/<domain>` (and their mean,
`test_<metric>/unseen`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from raysim.data.datasets import ArraySplit, Dataset

UNSEEN = "unseen"  # the split's name, and the part of the metric names that marks it


class DomainSelectionError(ValueError):
    """`data.test_domains` / `data.train_domains` name domains the dataset cannot split so."""


def _keep(split: ArraySplit | None, ids: Sequence[int]) -> ArraySplit | None:
    if split is None:
        return None
    mask = np.isin(split.domain, np.asarray(ids, dtype=np.int64))
    return ArraySplit(split.x[mask], split.y[mask], split.domain[mask],
                      None if split.client is None else split.client[mask])


def hold_out_domains(dataset: Dataset, test_domains: Sequence[str],
                     train_domains: Sequence[str] | None = None) -> Dataset:
    """`dataset` training on `train_domains` (default: every domain not in `test_domains`),
    with the test samples of `test_domains` as its `unseen` split."""
    names = dataset.spec.domains
    if not test_domains and train_domains is None:
        return dataset
    if not names or dataset.train is None or dataset.train.domain is None:
        raise DomainSelectionError(f"dataset {dataset.spec.name!r} has no domains to hold out; "
                                   "use a multi-domain dataset (digits_domains, domains, "
                                   "image_folder)")
    for key, chosen in (("test_domains", test_domains), ("train_domains", train_domains or [])):
        unknown = [d for d in chosen if d not in names]
        if unknown:
            raise DomainSelectionError(f"{key}: {unknown[0]!r} is not a domain of "
                                       f"{dataset.spec.name}; its domains: {', '.join(names)}")
    both = sorted(set(test_domains) & set(train_domains or []))
    if both:
        raise DomainSelectionError(f"test_domains: {both[0]!r} is also a training domain "
                                   "(train_domains); a held-out domain must not train")
    train = [d for d in (train_domains or names) if d not in test_domains]
    if not train:
        raise DomainSelectionError("test_domains: every domain is held out; keep at least one "
                                   "for training")
    train_ids = [names.index(d) for d in train]
    test_ids = [names.index(d) for d in test_domains]
    return dataclasses.replace(
        dataset, train=_keep(dataset.train, train_ids), val=_keep(dataset.val, train_ids),
        test=_keep(dataset.test, train_ids),
        unseen=_keep(dataset.test, test_ids) if test_ids else None)
