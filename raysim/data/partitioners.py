"""The bundled partition kinds as plug-ins (registered under `raysim.partitioners`).

A partitioner is a callable `partitioner(request) -> list of index arrays`, one per client,
indexing `request.labels` (the pool after the global long tail); every sample it uses must go
to exactly one client. Randomness comes from `request.rng` only, so a seed gives one split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.data import partition as p


@dataclass(frozen=True)
class PartitionRequest:
    labels: np.ndarray  # (N,) class of each sample in the pool
    domains: np.ndarray | None  # (N,) domain of each sample, where the dataset has domains
    num_classes: int
    num_clients: int
    rng: np.random.Generator
    alpha: float  # data.partition.* keys
    classes_per_client: int
    min_size: int
    within: str


def iid(r: PartitionRequest) -> list[np.ndarray]:
    return p.partition_iid(r.labels, r.num_clients, r.rng)


def dirichlet(r: PartitionRequest) -> list[np.ndarray]:
    return p.partition_dirichlet(r.labels, r.num_clients, r.alpha, r.rng, min_size=r.min_size)


def shards(r: PartitionRequest) -> list[np.ndarray]:
    return p.partition_shards(r.labels, r.num_clients, r.classes_per_client, r.rng)


def quantity(r: PartitionRequest) -> list[np.ndarray]:
    return p.partition_quantity(r.labels, r.num_clients, r.alpha, r.rng, min_size=r.min_size)


def dirichlet_equal(r: PartitionRequest) -> list[np.ndarray]:
    return p.partition_dirichlet_equal(r.labels, r.num_clients, r.alpha, r.rng)


def domains(r: PartitionRequest) -> list[np.ndarray]:
    if r.domains is None:
        raise ValueError("partition kind 'domains' needs a dataset with domains, e.g. "
                         "digits_domains")
    parts, _ = p.partition_domains(r.labels, r.domains, r.num_clients, r.rng, within=r.within,
                                   alpha=r.alpha, min_size=r.min_size)
    return parts
