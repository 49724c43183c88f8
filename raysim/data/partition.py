"""Client partitions: which training samples each client holds, and the one entry point that
draws them (`make_partition`) with a registered partitioner (`raysim.data.partitioners`).

A partition is a deterministic function of (labels, partitioner keys, seed): all randomness
comes from one generator seeded from the run seed and a fixed stream tag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysim.config import PARTITIONER, config_class, parse_params
from raysim.registry import PARTITIONERS

__all__ = [
    "ClientSplit",
    "LabelCounts",
    "Partition",
    "PartitionRequest",
    "PersonalParts",
    "long_tail_indices",
    "make_partition",
]

# Fixed stream tag so partitioning never shares random draws with other uses of the run seed.
_PARTITION_STREAM_TAG = 0x9A27


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_domains(domains: np.ndarray, num_samples: int) -> np.ndarray:
    arr = _as_labels(domains)
    if len(arr) != num_samples:
        raise ValueError(f"domains has {len(arr)} entries but labels has {num_samples}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"domain ids must be >= 0, got {arr.min()}")
    return arr


@dataclass(frozen=True)
class PartitionRequest:
    """What a partitioner receives (see `raysim.data.partitioners`)."""

    labels: np.ndarray  # (N,) class of each sample in the pool
    domains: np.ndarray | None  # (N,) domain of each sample, where the dataset has domains
    num_classes: int
    num_clients: int
    rng: np.random.Generator
    params: Any = None  # the partitioner's own Config: data.partition's other keys
    clients: np.ndarray | None = None  # (N,) the client of each sample, where the data has one


def long_tail_indices(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a globally long-tailed subset with imbalance ratio ``rho`` (head/tail).

    Class ``c`` (in sorted label order, class 0 is the head) keeps
    ``int(n_max * rho ** (-c / (C - 1)))`` samples, where ``n_max`` is the smallest class
    count so the profile is exact even on slightly unbalanced datasets.
    """
    y = _as_labels(labels)
    if not (rho >= 1 and math.isfinite(rho)):
        raise ValueError(f"long-tail ratio rho must be a finite number >= 1, got {rho}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 0:
        return np.empty(0, dtype=np.int64)
    num_classes = len(classes)
    n_max = int(counts.min())
    kept: list[np.ndarray] = []
    for c, cls in enumerate(classes):
        if num_classes == 1:
            n_c = n_max
        else:
            n_c = int(n_max * rho ** (-c / (num_classes - 1)))
        idx_c = np.flatnonzero(y == cls)
        kept.append(rng.permutation(idx_c)[:n_c])
    return np.sort(np.concatenate(kept).astype(np.int64))


def offsets_of(sizes: np.ndarray) -> np.ndarray:
    """CSR offsets of consecutive clients of these sizes: (num_clients + 1,) int64."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def owners_of(offsets: np.ndarray) -> np.ndarray:
    """The client of each flat position, for CSR `offsets`."""
    sizes = np.diff(offsets)
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


@dataclass(frozen=True)
class LabelCounts:
    """Per-client label counts as sparse rows (client, label, count), sorted by client then
    label, with no zero counts: 10^6 clients holding a few classes each stay a few MB."""

    client: np.ndarray
    label: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, owner: np.ndarray, labels: np.ndarray, num_classes: int) -> LabelCounts:
        """The counts of samples with client `owner[i]` and label `labels[i]`."""
        keys, counts = np.unique(owner.astype(np.int64) * num_classes + labels,
                                 return_counts=True)
        return cls(keys // num_classes, keys % num_classes, counts.astype(np.int64))

    def dense(self, num_clients: int, num_classes: int) -> np.ndarray:
        out = np.zeros((num_clients, num_classes), dtype=np.int64)
        out[self.client, self.label] = self.count
        return out


@dataclass(frozen=True)
class PersonalParts:
    """Each client's own test (and validation) samples for personalised evaluation
    (`raysim.data.personal`), in `ClientSplit`'s flat layout: client k's test samples are
    `test_indices[test_offsets[k]:test_offsets[k + 1]]` (sorted), positions in the dataset
    split `test_source` ("train" for split: fraction, "test" for split: test_set); validation
    likewise ("train" or "val"; None without validation parts)."""

    test_source: str
    test_offsets: np.ndarray  # (num_clients + 1,) int64
    test_indices: np.ndarray  # int64
    val_source: str | None = None
    val_offsets: np.ndarray | None = None
    val_indices: np.ndarray | None = None

    @property
    def has_val(self) -> bool:
        return self.val_offsets is not None

    def test_of(self, client: int) -> np.ndarray:
        return self.test_indices[self.test_offsets[client]:self.test_offsets[client + 1]]

    def val_of(self, client: int) -> np.ndarray:
        if self.val_offsets is None or self.val_indices is None:
            raise ValueError("these personal parts have no validation parts")
        return self.val_indices[self.val_offsets[client]:self.val_offsets[client + 1]]


@dataclass(frozen=True)
class ClientSplit:
    """Client k's samples are `indices[offsets[k]:offsets[k + 1]]`, each client's sorted: one
    flat array for any number of clients (no Python object per client). A partition file may
    also give each client's test and validation parts (`personal`)."""

    offsets: np.ndarray  # (num_clients + 1,) int64
    indices: np.ndarray  # int64
    personal: PersonalParts | None = None

    @classmethod
    def from_lists(cls, parts: list[np.ndarray]) -> ClientSplit:
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        flat = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
        return cls(offsets_of(sizes), flat)

    @classmethod
    def from_owner(cls, owner: np.ndarray, num_clients: int) -> ClientSplit:
        """Sample i goes to client `owner[i]` (a sample may be listed once per client)."""
        order = np.argsort(owner, kind="stable")
        return cls(offsets_of(np.bincount(owner, minlength=num_clients)),
                   order.astype(np.int64))


@dataclass(frozen=True)
class Partition:
    """Which training samples each client holds, as flat arrays (`ClientSplit`'s layout), and
    their sparse label counts. For a dataset that generates each client's samples when it
    trains (`synthetic_fedprox`), only the sizes are known: `indices` and `label_counts` are
    None."""

    offsets: np.ndarray  # (num_clients + 1,) int64: client k's samples are [offsets[k], [k+1])
    indices: np.ndarray | None  # int64 positions in the training split; None: generated
    num_classes: int
    label_counts: LabelCounts | None = None
    # (num_clients,) int64 domain id per client (its majority domain unless the partition is
    # by domain); None when the dataset has no domains.
    client_domains: np.ndarray | None = None
    # each client's own test/validation parts (evaluation.personal; raysim.data.personal):
    # then offsets/indices are the clients' training parts
    personal: PersonalParts | None = None

    @property
    def sizes(self) -> np.ndarray:
        """Number of samples held by each client."""
        return np.diff(self.offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def generated(self) -> bool:
        return self.indices is None

    def indices_of(self, client: int) -> np.ndarray:
        if self.indices is None:
            raise ValueError("this dataset generates each client's samples: they have no "
                             "indices")
        return self.indices[self.offsets[client]:self.offsets[client + 1]]

    @property
    def client_indices(self) -> tuple[np.ndarray, ...]:
        """Every client's indices (views; a Python object per client: small partitions)."""
        return tuple(self.indices_of(k) for k in range(self.num_clients))

    @property
    def histograms(self) -> np.ndarray:
        """Dense (num_clients, num_classes) label counts (small partitions)."""
        if self.label_counts is None:
            raise ValueError("the labels of generated clients are known only once they train")
        return self.label_counts.dense(self.num_clients, self.num_classes)

    def owners(self) -> np.ndarray:
        """The client of each entry of `indices`."""
        return owners_of(self.offsets)

    @classmethod
    def of_split(cls, split: ClientSplit, labels: np.ndarray, num_classes: int,
                 domains: np.ndarray | None = None) -> Partition:
        """A partition of samples with these labels (and domains, one per sample)."""
        owner = owners_of(split.offsets)
        client_domains = None
        if domains is not None:
            # the majority domain of each client: cheap, and reports break results down by it
            per_domain = LabelCounts.of(owner, domains[split.indices], int(domains.max()) + 1)
            order = np.lexsort((-per_domain.count, per_domain.client))
            first = np.unique(per_domain.client[order], return_index=True)[1]
            client_domains = np.zeros(len(split.offsets) - 1, dtype=np.int64)
            client_domains[per_domain.client[order][first]] = per_domain.label[order][first]
        return cls(offsets=split.offsets, indices=split.indices, num_classes=num_classes,
                   label_counts=LabelCounts.of(owner, labels[split.indices], num_classes),
                   client_domains=client_domains, personal=split.personal)

    @classmethod
    def of_sizes(cls, sizes: np.ndarray, num_classes: int) -> Partition:
        """Clients of these sizes whose samples are generated when they train."""
        return cls(offsets=offsets_of(sizes), indices=None, num_classes=num_classes)


def make_partition(
    labels: np.ndarray,
    num_classes: int,
    *,
    kind: str,
    num_clients: int,
    seed: int,
    params: Any = None,
    long_tail_rho: float = 1.0,
    domains: np.ndarray | None = None,
    clients: np.ndarray | None = None,
) -> Partition:
    """The partition of the registered partitioner `kind`, from a seed alone (reproducible
    across runs). `params` is its Config, or a mapping of its keys (None: its defaults).

    With ``long_tail_rho > 1`` the pool is first restricted to a long-tailed subset; the
    returned indices always point into the original ``labels`` array. ``domains`` (a domain id
    per sample) is required by kind "domains" and, for any kind, fills
    ``Partition.client_domains``. ``clients`` (a client id per sample, where the dataset has
    them) is what kind "natural" splits by.
    """
    try:
        partitioner = PARTITIONERS[kind]
    except KeyError as error:
        raise ValueError(str(error)) from None
    if params is None or isinstance(params, dict):
        params = parse_params(config_class(partitioner), params or {}, "data.partition",
                              owner=f"{PARTITIONER} {kind!r}")
    y = _as_labels(labels)
    dom = None if domains is None else _as_domains(domains, len(y))
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    rng = np.random.default_rng([seed, _PARTITION_STREAM_TAG])

    if long_tail_rho < 1:
        raise ValueError(f"long_tail_rho must be >= 1 (1 disables it), got {long_tail_rho}")
    if long_tail_rho > 1:
        if not getattr(partitioner, "draws", True):
            raise ValueError(f"kind {kind!r} takes the clients' samples as they are: "
                             "long_tail.rho applies only to partitions raysim draws")
        pool = long_tail_indices(y, long_tail_rho, rng)
    else:
        pool = np.arange(len(y), dtype=np.int64)
    sub = y[pool]

    parts = partitioner(PartitionRequest(
        labels=sub, domains=None if dom is None else dom[pool], num_classes=num_classes,
        num_clients=num_clients, rng=rng, params=params, clients=clients))
    split = parts if isinstance(parts, ClientSplit) else ClientSplit.from_lists(parts)
    # pool is sorted, so mapping sorted local indices keeps each client's indices sorted. The
    # parts a file gives come only from partitioners that draw nothing (pool is every sample).
    split = ClientSplit(split.offsets, pool[split.indices], split.personal)
    return Partition.of_split(split, y, num_classes, dom)
