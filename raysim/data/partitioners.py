"""The bundled partition kinds, each a plug-in registered under `raysim.partitioners` with the
frozen `Config` of its own keys (written beside `kind` under `data.partition`):

    data: {partition: {kind: dirichlet, alpha: 0.1, min_size: 2, num_clients: 50}}

A partitioner is a callable `partitioner(request) -> list of index arrays`, one per client
(or a `ClientSplit`, the same as flat arrays), indexing `request.labels` (the pool after the
global long tail); every sample it uses must go to exactly one client. Its keys arrive as
`request.params`. Randomness comes from `request.rng` only, so a seed gives one split, and a
partitioner is a deterministic function of (labels, its keys, seed). Each client receives a
sorted `int64` array of indices. A new kind with new keys is one function and its Config here
(or in any package), plus its entry point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from raysim.config import NoParams, require
from raysim.data.partition import ClientSplit, PartitionRequest, _as_labels
from raysim.data.partition_file import read_partition

# Redraw budget for rejection-sampled partitions before giving up with a user error.
_MAX_TRIES = 1000

Partitioner = TypeVar("Partitioner", bound=Callable)


def partitioner(config: type = NoParams, *, draws: bool = True
                ) -> Callable[[Partitioner], Partitioner]:
    """Declares a partitioner's own keys (`Config`) and whether it draws the clients
    (`draws=False`: it takes the clients the data or a file gives, so no long tail is drawn
    before it)."""

    def declare(function: Partitioner) -> Partitioner:
        function.Config = config  # type: ignore[attr-defined]
        function.draws = draws  # type: ignore[attr-defined]
        return function

    return declare


def _check_clients(num_clients: int, num_samples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(
            f"cannot split {num_samples} samples among {num_clients} clients: "
            "lower num_clients (every client needs at least one sample)"
        )


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be a positive finite number, got {alpha}")


def _check_min_size(num_clients: int, min_size: int, num_samples: int) -> None:
    if num_clients * min_size > num_samples:
        raise ValueError(
            f"cannot give {num_clients} clients at least min_size={min_size} samples each "
            f"from {num_samples} samples: lower num_clients or min_size"
        )


def _finish(parts: list[np.ndarray] | list[list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_fill(
    class_indices: list[np.ndarray],
    num_workers: int,
    alpha: float,
    cap: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One NIID-Bench style pass: split each class by Dir(alpha) proportions.

    Workers already holding ``>= cap`` samples get no share of later classes, which keeps
    sizes from running away under small alpha.
    """
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    sizes = np.zeros(num_workers, dtype=np.int64)
    for idx_c in class_indices:
        p = rng.dirichlet(np.full(num_workers, alpha))
        p = p * (sizes < cap)
        total = p.sum()
        if total <= 0:  # only possible once everything is assigned; nothing left to split
            p = np.full(num_workers, 1.0 / num_workers)
        else:
            p = p / total
        cuts = (np.cumsum(p) * len(idx_c)).astype(np.int64)[:-1]
        for w, piece in enumerate(np.split(idx_c, cuts)):
            buckets[w].append(piece)
            sizes[w] += len(piece)
    return [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]


# --------------------------------------------------------------------------- iid


@partitioner()
def iid(r: PartitionRequest) -> list[np.ndarray]:
    """Uniform random split into near-equal sizes: the homogeneous baseline."""
    y = _as_labels(r.labels)
    _check_clients(r.num_clients, len(y))
    perm = r.rng.permutation(len(y))
    return _finish(np.array_split(perm, r.num_clients))


# --------------------------------------------------------------------------- dirichlet


@dataclass(frozen=True)
class DirichletConfig:
    alpha: float = 0.5  # concentration over labels: small = few classes per client
    min_size: int = 2  # redraw until every client holds this many samples

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(self.min_size >= 1, "min_size", "must be >= 1")


@partitioner(DirichletConfig)
def dirichlet(r: PartitionRequest) -> list[np.ndarray]:
    """Label skew via per-class Dir(alpha) proportions (NIID-Bench), redrawn until non-tiny."""
    alpha, min_size, num_clients, rng = r.params.alpha, r.params.min_size, r.num_clients, r.rng
    y = _as_labels(r.labels)
    _check_clients(num_clients, len(y))
    _check_alpha(alpha)
    _check_min_size(num_clients, min_size, len(y))
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    cap = len(y) / num_clients
    for _ in range(_MAX_TRIES):
        shuffled = [rng.permutation(idx) for idx in by_class]
        parts = _dirichlet_fill(shuffled, num_clients, alpha, cap, rng)
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"Dirichlet partition (alpha={alpha}) could not give all {num_clients} clients at least "
        f"min_size={min_size} samples after {_MAX_TRIES} draws: lower num_clients or raise alpha"
    )


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardsConfig:
    classes_per_client: int = 2  # exactly this many classes per client

    def __post_init__(self) -> None:
        require(self.classes_per_client >= 1, "classes_per_client", "must be >= 1")


@partitioner(ShardsConfig)
def shards(r: PartitionRequest) -> list[np.ndarray]:
    """Pathological skew: every client holds exactly ``classes_per_client`` distinct classes.

    Classes are handed out least-used-first so each class is shared by about the same number
    of clients; a class's samples are then split evenly among its holders.
    """
    num_clients, k, rng = r.num_clients, r.params.classes_per_client, r.rng
    y = _as_labels(r.labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    num_classes = len(classes)
    if k < 1:
        raise ValueError(f"classes_per_client must be >= 1, got {k}")
    if k > num_classes:
        raise ValueError(
            f"classes_per_client={k} exceeds the number of classes present ({num_classes}): "
            "lower classes_per_client"
        )
    if num_clients * k < num_classes:
        raise ValueError(
            f"num_clients * classes_per_client = {num_clients * k} < {num_classes} classes, so "
            "some classes would belong to no client: raise num_clients or classes_per_client"
        )

    usage = np.zeros(num_classes, dtype=np.int64)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        order = np.lexsort((rng.random(num_classes), usage))
        for pos in order[:k]:
            holders[pos].append(client)
            usage[pos] += 1

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for pos, cls in enumerate(classes):
        idx_c = np.flatnonzero(y == cls)
        owners = holders[pos]
        if len(owners) > len(idx_c):
            raise ValueError(
                f"class {int(cls)} has {len(idx_c)} samples but would be split among "
                f"{len(owners)} clients: lower num_clients or classes_per_client"
            )
        pieces = np.array_split(rng.permutation(idx_c), len(owners))
        for owner, piece in zip(owners, pieces, strict=True):
            parts[owner].append(piece)
    return _finish([np.concatenate(p) for p in parts])


# --------------------------------------------------------------------------- n_way_k_shot


@dataclass(frozen=True)
class NWayKShotConfig:
    """FedProto's client setting (Tan et al. 2022, §5.1): client k holds n_k classes with
    about `shots` samples of each, n_k uniform in [ways − ways_stdev, ways + ways_stdev]."""

    ways: int = 4
    ways_stdev: int = 1
    shots: int = 30
    shots_stdev: int = 0  # each client's shots uniform in [shots − stdev, shots + stdev]

    def __post_init__(self) -> None:
        require(self.ways >= 1, "ways", "must be >= 1")
        require(0 <= self.ways_stdev < self.ways, "ways_stdev", "must be in [0, ways)")
        require(self.shots >= 1, "shots", "must be >= 1")
        require(0 <= self.shots_stdev < self.shots, "shots_stdev", "must be in [0, shots)")


@partitioner(NWayKShotConfig)
def n_way_k_shot(r: PartitionRequest) -> list[np.ndarray]:
    """n_k classes per client (least-used classes first, ties broken at random, so every class
    has about the same number of holders), k_k samples of each, no sample held twice. Samples
    left over stay unused, as in FedProto's setting."""
    p, rng = r.params, r.rng
    y = _as_labels(r.labels)
    _check_clients(r.num_clients, len(y))
    classes = np.unique(y)
    ways = rng.integers(max(1, p.ways - p.ways_stdev),
                        min(len(classes), p.ways + p.ways_stdev) + 1, r.num_clients)
    shots = rng.integers(p.shots - p.shots_stdev, p.shots + p.shots_stdev + 1, r.num_clients)
    usage = np.zeros(len(classes), dtype=np.int64)
    wanted = np.zeros(len(classes), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in classes]
    for client in range(r.num_clients):
        for pos in np.lexsort((rng.random(len(classes)), usage))[:ways[client]]:
            holders[pos].append(client)
            usage[pos] += 1
            wanted[pos] += shots[client]
    parts: list[list[np.ndarray]] = [[] for _ in range(r.num_clients)]
    for pos, cls in enumerate(classes):
        pool = rng.permutation(np.flatnonzero(y == cls))
        if wanted[pos] > len(pool):
            raise ValueError(
                f"n_way_k_shot: class {int(cls)} has {len(pool)} samples but its "
                f"{len(holders[pos])} clients want {int(wanted[pos])}: lower shots or "
                "num_clients")
        start = 0
        for owner in holders[pos]:
            parts[owner].append(pool[start:start + shots[owner]])
            start += shots[owner]
    return _finish([np.concatenate(p) for p in parts])


# --------------------------------------------------------------------------- quantity


@dataclass(frozen=True)
class QuantityConfig:
    alpha: float = 0.5  # concentration over client sizes: small = very unequal sizes
    min_size: int = 2  # redraw until every client holds this many samples

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(self.min_size >= 1, "min_size", "must be >= 1")


@partitioner(QuantityConfig)
def quantity(r: PartitionRequest) -> list[np.ndarray]:
    """Quantity skew: IID labels, but client sizes follow Dir(alpha) over clients."""
    alpha, min_size, num_clients, rng = r.params.alpha, r.params.min_size, r.num_clients, r.rng
    y = _as_labels(r.labels)
    _check_clients(num_clients, len(y))
    _check_alpha(alpha)
    _check_min_size(num_clients, min_size, len(y))
    perm = rng.permutation(len(y))
    for _ in range(_MAX_TRIES):
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p) * len(y)).astype(np.int64)[:-1]
        parts = np.split(perm, cuts)
        if min(len(part) for part in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"quantity-skew partition (alpha={alpha}) could not give all {num_clients} clients at "
        f"least min_size={min_size} samples after {_MAX_TRIES} draws: "
        "lower num_clients or raise alpha"
    )


# --------------------------------------------------------------------------- dirichlet_equal


@dataclass(frozen=True)
class DirichletEqualConfig:
    alpha: float = 0.5  # concentration over labels

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")


@partitioner(DirichletEqualConfig)
def dirichlet_equal(r: PartitionRequest) -> list[np.ndarray]:
    """Equal-size clients with Dirichlet-induced label skew (FedHPro / CReFF re-slicing).

    Samples are Dirichlet-split among groups of up to 10 auxiliary workers, the workers'
    lists are concatenated, and the result is cut into equal contiguous slices, so label
    skew survives while every client has the same number of samples (+-1).
    """
    alpha, num_clients, rng = r.params.alpha, r.num_clients, r.rng
    y = _as_labels(r.labels)
    n = len(y)
    _check_clients(num_clients, n)
    _check_alpha(alpha)
    aux = 10
    num_chunks = math.ceil(num_clients / aux)
    order = rng.permutation(n)  # shuffled (index, label) pairs

    flat: list[np.ndarray] = []
    start = 0
    for chunk in range(num_chunks):
        last = chunk == num_chunks - 1
        n_w = num_clients - aux * (num_chunks - 1) if last else aux
        stop = n if last else start + int(aux / num_clients * n)
        chunk_idx = order[start:stop]
        start = stop
        size = len(chunk_idx)
        chunk_labels = y[chunk_idx]
        class_indices = [chunk_idx[chunk_labels == c] for c in np.unique(chunk_labels)]
        need = int(0.5 * size / n_w)
        for _ in range(_MAX_TRIES):
            workers = _dirichlet_fill(class_indices, n_w, alpha, size / n_w, rng)
            if min(len(w) for w in workers) >= need:
                break
        else:
            raise ValueError(
                f"equal-size Dirichlet partition (alpha={alpha}) could not give each auxiliary "
                f"worker at least {need} samples after {_MAX_TRIES} draws: "
                "lower num_clients or raise alpha"
            )
        flat.extend(workers)

    pool = np.concatenate(flat)
    return _finish(np.array_split(pool, num_clients))


# --------------------------------------------------------------------------- domains

# How the `domains` partition splits one domain's samples among that domain's clients.
WITHIN_DOMAIN_KINDS: tuple[str, ...] = ("iid", "dirichlet")


@dataclass(frozen=True)
class DomainSplitConfig:
    within: str = "iid"  # how each domain's samples are split among its clients
    alpha: float = 0.5  # within: dirichlet: concentration over labels
    min_size: int = 2  # within: dirichlet: samples every client holds at least

    def __post_init__(self) -> None:
        require(self.within in WITHIN_DOMAIN_KINDS, "within",
                f"choose one of {', '.join(WITHIN_DOMAIN_KINDS)}")
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(self.min_size >= 1, "min_size", "must be >= 1")


@partitioner(DomainSplitConfig)
def domains(r: PartitionRequest) -> list[np.ndarray]:
    """Feature skew: every client holds samples of a single domain.

    Client ``k`` gets the ``k % D``-th of the D domains present, so domains have equally many
    clients (+-1); each domain's samples are then split among its clients by ``within``
    ("iid", or "dirichlet" for label skew on top).
    """
    if r.domains is None:
        raise ValueError("partition kind 'domains' needs a dataset with domains, e.g. "
                         "digits_domains")
    within, num_clients = r.params.within, r.num_clients
    if within not in WITHIN_DOMAIN_KINDS:
        raise ValueError(
            f"unknown within-domain partition {within!r}; expected one of: "
            f"{', '.join(WITHIN_DOMAIN_KINDS)}"
        )
    y = _as_labels(r.labels)
    d = _as_labels(r.domains)
    _check_clients(num_clients, len(y))
    present = np.unique(d)
    if num_clients < len(present):
        raise ValueError(
            f"domains partition needs at least {len(present)} clients (one per domain), "
            f"got num_clients={num_clients}"
        )
    client_domains = present[np.arange(num_clients) % len(present)]
    split_domain = iid if within == "iid" else dirichlet
    split_params = NoParams() if within == "iid" else DirichletConfig(r.params.alpha,
                                                                      r.params.min_size)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for dom in present:
        members = np.flatnonzero(d == dom)
        clients = np.flatnonzero(client_domains == dom)
        local = split_domain(dataclasses.replace(
            r, labels=y[members], domains=None, num_clients=len(clients), params=split_params))
        # members is sorted, so mapped sorted local indices stay sorted.
        for client, idx in zip(clients, local):
            parts[client] = members[idx]
    return parts


# --------------------------------------------------------------------------- given clients


@partitioner(draws=False)
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


@dataclass(frozen=True)
class FileConfig:
    path: str | None = None  # a Parquet table client → sample (raysim.data.partition_file)
    overlap: bool = False  # clients may share samples

    def __post_init__(self) -> None:
        require(self.path is not None, "path",
                "kind 'file' reads a partition file: set data.partition.path (write one with "
                "`raysim partition CONFIG --out FILE`)")


@partitioner(FileConfig, draws=False)
def file(r: PartitionRequest) -> ClientSplit:
    """The client → sample table of a partition file (`raysim.data.partition_file`)."""
    return read_partition(r.params.path, len(r.labels), r.num_clients,
                          overlap=r.params.overlap)
