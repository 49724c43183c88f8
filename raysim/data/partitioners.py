"""The bundled partition kinds as plug-ins (registered under `raysim.partitioners`).

A partitioner is a callable `partitioner(request) -> list of index arrays`, one per client
(or a `ClientSplit`, the same as flat arrays), indexing `request.labels` (the pool after the
global long tail); every sample it uses must go to exactly one client. Randomness comes from
`request.rng` only, so a seed gives one split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.data import partition as p
from raysim.data.partition import ClientSplit


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
    clients: np.ndarray | None = None  # (N,) the client of each sample, where the data has one
    path: str | None = None  # kind file: the partition file
    overlap: bool = False  # kind file: a sample may belong to several clients


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


def natural(r: PartitionRequest) -> ClientSplit:
    """The dataset's own clients: the client id each sample carries."""
    if r.clients is None:
        raise ValueError("partition kind 'natural' needs a dataset whose samples carry a "
                         "client id (e.g. synthetic_fedprox); this one has none: choose "
                         "another kind, or a partition file (kind: file)")
    found = int(r.clients.max()) + 1 if len(r.clients) else 0
    if found != r.num_clients:
        raise ValueError(f"the dataset's samples belong to {found} clients, but "
                         f"num_clients={r.num_clients}: set data.partition.num_clients: {found}")
    split = ClientSplit.from_owner(r.clients, found)
    empty = np.flatnonzero(np.diff(split.offsets) == 0)
    if len(empty):
        raise ValueError(f"client {int(empty[0])} of the dataset has no training samples")
    return split


def file(r: PartitionRequest) -> ClientSplit:
    """The client → sample table of a partition file (`raysim.data.partition_file`)."""
    from raysim.data.partition_file import read_partition

    return read_partition(r.path, len(r.labels), r.num_clients, overlap=r.overlap)
