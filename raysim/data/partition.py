"""Seeded partitioners that split a label array into per-client index sets.

Every function is pure: all randomness comes from the explicit ``rng`` argument, so a
partition is a deterministic function of (labels, arguments, seed). Each client receives a
sorted ``int64`` array of indices into ``labels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raysim.config import WITHIN_DOMAIN_KINDS

__all__ = [
    "PARTITION_KINDS",
    "WITHIN_DOMAIN_KINDS",
    "ClientSplit",
    "LabelCounts",
    "Partition",
    "long_tail_indices",
    "make_partition",
    "partition_dirichlet",
    "partition_dirichlet_equal",
    "partition_domains",
    "partition_iid",
    "partition_quantity",
    "partition_shards",
]

PARTITION_KINDS: tuple[str, ...] = (
    "iid",
    "dirichlet",
    "shards",
    "quantity",
    "dirichlet_equal",
    "domains",
    "natural",
    "file",
)

# Redraw budget for rejection-sampled partitions before giving up with a user error.
_MAX_TRIES = 1000
# Fixed stream tag so partitioning never shares random draws with other uses of the run seed.
_PARTITION_STREAM_TAG = 0x9A27


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


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


def partition_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniform random split into near-equal sizes: the homogeneous baseline."""
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    perm = rng.permutation(len(y))
    return _finish(np.array_split(perm, num_clients))


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Label skew via per-class Dir(alpha) proportions (NIID-Bench), redrawn until non-tiny."""
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    _check_alpha(alpha)
    if num_clients * min_size > len(y):
        raise ValueError(
            f"cannot give {num_clients} clients at least min_size={min_size} samples each "
            f"from {len(y)} samples: lower num_clients or min_size"
        )
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


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pathological skew: every client holds exactly ``classes_per_client`` distinct classes.

    Classes are handed out least-used-first so each class is shared by about the same number
    of clients; a class's samples are then split evenly among its holders.
    """
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    num_classes = len(classes)
    k = classes_per_client
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


def partition_quantity(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Quantity skew: IID labels, but client sizes follow Dir(alpha) over clients."""
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    _check_alpha(alpha)
    if num_clients * min_size > len(y):
        raise ValueError(
            f"cannot give {num_clients} clients at least min_size={min_size} samples each "
            f"from {len(y)} samples: lower num_clients or min_size"
        )
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


def partition_dirichlet_equal(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Equal-size clients with Dirichlet-induced label skew (FedHPro / CReFF re-slicing).

    Samples are Dirichlet-split among groups of up to 10 auxiliary workers, the workers'
    lists are concatenated, and the result is cut into equal contiguous slices, so label
    skew survives while every client has the same number of samples (+-1).
    """
    y = _as_labels(labels)
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


def _as_domains(domains: np.ndarray, num_samples: int) -> np.ndarray:
    arr = _as_labels(domains)
    if len(arr) != num_samples:
        raise ValueError(f"domains has {len(arr)} entries but labels has {num_samples}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"domain ids must be >= 0, got {arr.min()}")
    return arr


def partition_domains(
    labels: np.ndarray,
    domains: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    within: str = "iid",
    alpha: float = 0.5,
    min_size: int = 2,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Feature skew: every client holds samples of a single domain.

    Client ``k`` gets the ``k % D``-th of the D domains present, so domains have equally many
    clients (+-1); each domain's samples are then split among its clients by ``within``
    ("iid", or "dirichlet" for label skew on top). Returns the client index sets and each
    client's domain id.
    """
    if within not in WITHIN_DOMAIN_KINDS:
        raise ValueError(
            f"unknown within-domain partition {within!r}; expected one of: "
            f"{', '.join(WITHIN_DOMAIN_KINDS)}"
        )
    y = _as_labels(labels)
    d = _as_domains(domains, len(y))
    _check_clients(num_clients, len(y))
    present = np.unique(d)
    if num_clients < len(present):
        raise ValueError(
            f"domains partition needs at least {len(present)} clients (one per domain), "
            f"got num_clients={num_clients}"
        )
    client_domains = present[np.arange(num_clients) % len(present)]
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for dom in present:
        members = np.flatnonzero(d == dom)
        clients = np.flatnonzero(client_domains == dom)
        if within == "iid":
            local = partition_iid(y[members], len(clients), rng)
        else:
            local = partition_dirichlet(y[members], len(clients), alpha, rng, min_size=min_size)
        # members is sorted, so mapped sorted local indices stay sorted.
        for client, idx in zip(clients, local):
            parts[client] = members[idx]
    return parts, client_domains.astype(np.int64)


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
class ClientSplit:
    """Client k's samples are `indices[offsets[k]:offsets[k + 1]]`, each client's sorted: one
    flat array for any number of clients (no Python object per client)."""

    offsets: np.ndarray  # (num_clients + 1,) int64
    indices: np.ndarray  # int64

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
                   client_domains=client_domains)

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
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_size: int = 2,
    long_tail_rho: float = 1.0,
    domains: np.ndarray | None = None,
    within: str = "iid",
    clients: np.ndarray | None = None,
    path: str | None = None,
    overlap: bool = False,
) -> Partition:
    """Build the partition the config asks for, from a seed alone (reproducible across runs).

    With ``long_tail_rho > 1`` the pool is first restricted to a long-tailed subset; the
    returned indices always point into the original ``labels`` array. ``domains`` (a domain id
    per sample) is required by kind "domains" and, for any kind, fills
    ``Partition.client_domains``. ``clients`` (a client id per sample, where the dataset has
    them) is what kind "natural" splits by; kind "file" reads ``path``.
    """
    from raysim.data.partitioners import PartitionRequest
    from raysim.registry import PARTITIONERS

    try:
        partitioner = PARTITIONERS[kind]
    except KeyError as error:
        raise ValueError(str(error)) from None
    y = _as_labels(labels)
    dom = None if domains is None else _as_domains(domains, len(y))
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    rng = np.random.default_rng([seed, _PARTITION_STREAM_TAG])

    if long_tail_rho < 1:
        raise ValueError(f"long_tail_rho must be >= 1 (1 disables it), got {long_tail_rho}")
    if long_tail_rho > 1:
        if kind in FIXED_KINDS:
            raise ValueError(f"kind {kind!r} takes the clients' samples as they are: "
                             "long_tail.rho applies only to partitions raysim draws")
        pool = long_tail_indices(y, long_tail_rho, rng)
    else:
        pool = np.arange(len(y), dtype=np.int64)
    sub = y[pool]

    parts = partitioner(PartitionRequest(
        labels=sub, domains=None if dom is None else dom[pool], num_classes=num_classes,
        num_clients=num_clients, rng=rng, alpha=alpha, classes_per_client=classes_per_client,
        min_size=min_size, within=within, clients=clients, path=path, overlap=overlap))
    split = parts if isinstance(parts, ClientSplit) else ClientSplit.from_lists(parts)
    # pool is sorted, so mapping sorted local indices keeps each client's indices sorted.
    split = ClientSplit(split.offsets, pool[split.indices])
    return Partition.of_split(split, y, num_classes, dom)


# Kinds whose clients are given (by the dataset, or by a file), not drawn.
FIXED_KINDS = ("natural", "file")
