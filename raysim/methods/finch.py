"""FINCH: parameter-free clustering from first-neighbour relations (Sarfraz et al., CVPR 2019).

Prototype-based FL servers (FPL, FedBCS) cluster the per-class prototypes uploaded by clients
and keep the cluster means. Those inputs are tiny (1 to ~100 vectors), so everything here is
plain numpy in float64 with O(n²) distance matrices, and fully deterministic: nearest-neighbour
ties go to the lowest index and labels are numbered by each cluster's lowest-index member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("cosine", "euclidean")
# Norm floor for cosine: a zero vector becomes "orthogonal to everything" instead of NaN.
_EPS = 1e-12


@dataclass(frozen=True)
class FinchResult:
    """Every FINCH partition of the input points, finest first.

    `partitions[l]` holds (n,) int64 canonical labels 0..k_l-1 over the ORIGINAL points;
    `num_clusters[l]` is k_l, strictly decreasing across levels.
    """

    partitions: tuple[np.ndarray, ...]
    num_clusters: tuple[int, ...]


def _as_points(points: Any) -> np.ndarray:
    """Validate and convert to a (n, d) float64 array; torch tensors are detached to CPU first."""
    if hasattr(points, "detach"):
        points = np.asarray(points.detach().cpu())
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"points must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("cannot cluster zero points (points has shape (0, d))")
    if not np.all(np.isfinite(x)):
        raise ValueError("points contain NaN or infinite values")
    return x


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _distances(x: np.ndarray, metric: str) -> np.ndarray:
    """(n, n) pairwise distances, exactly symmetric so i↔j ties resolve identically."""
    if metric == "cosine":
        norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        u = x / norms
        sim = u @ u.T
        # BLAS need not return a bit-symmetric Gram matrix; symmetrise before tie-breaking.
        return 1.0 - 0.5 * (sim + sim.T)
    # Row-by-row differences rather than the |a|²+|b|²-2ab expansion: exact zeros for
    # duplicates and no cancellation error; n is small, so the Python loop is cheap.
    d = np.empty((x.shape[0], x.shape[0]))
    for i in range(x.shape[0]):
        d[i] = np.sqrt(np.sum((x - x[i]) ** 2, axis=1))
    return d


def first_neighbors(points: Any, metric: str = "cosine") -> np.ndarray:
    """κ: for each point the index of its nearest *other* point (ties → lowest index).

    A single point has no other point and is its own first neighbour.
    """
    _check_metric(metric)
    x = _as_points(points)
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    d = _distances(x, metric)
    np.fill_diagonal(d, np.inf)
    return np.argmin(d, axis=1).astype(np.int64)  # argmin returns the first minimum


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 in order of their lowest-index member."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _components(kappa: np.ndarray) -> np.ndarray:
    """Connected components of the FINCH adjacency, as canonical labels.

    A(i, j) = 1 iff j = κ_i, κ_j = i or κ_i = κ_j. The first two are the undirected edge
    i–κ_i; the third adds nothing to connectivity (i and j already reach each other via κ_i),
    so union-find over the n edges i–κ_i yields exactly the components of A.
    """
    parent = np.arange(len(kappa))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for i, j in enumerate(kappa.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return _canonical(np.array([find(i) for i in range(len(kappa))], dtype=np.int64))


def first_neighbor_partition(points: Any, metric: str = "cosine") -> np.ndarray:
    """The first FINCH partition: connected components of the first-neighbour graph."""
    return _components(first_neighbors(points, metric))


def cluster_means(points: Any, labels: Any) -> np.ndarray:
    """(k, d) means of the points in each cluster, row c for label c.

    Labels must be exactly 0..k-1 with none empty. Accumulated in float64 and returned in the
    input's floating dtype (float64 for integer input) so callers can hand rows straight back
    to their model's prototypes.
    """
    raw = np.asarray(points.detach().cpu()) if hasattr(points, "detach") else np.asarray(points)
    x = _as_points(raw)
    lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if lab.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
        raise ValueError("labels must be non-negative integers")
    counts = np.bincount(lab)
    if np.any(counts == 0):
        raise ValueError(f"labels must cover 0..{len(counts) - 1} with no empty cluster")
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, lab, x)
    means = sums / counts[:, None]
    out_dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64
    return means.astype(out_dtype)


def finch(points: Any, metric: str = "cosine") -> FinchResult:
    """All FINCH partitions, from the first-neighbour partition up to the coarsest.

    Each step replaces every cluster by the mean of its original points, links the means by
    first neighbours and merges components. It stops once one cluster remains (or, as a guard,
    if a step merges nothing; with ≥ 2 clusters every node gains an edge, so each step at least
    halves the count).
    """
    _check_metric(metric)
    x = _as_points(points)
    labels = first_neighbor_partition(x, metric)
    partitions = [labels]
    k = int(labels.max()) + 1
    while k > 1:
        merged = first_neighbor_partition(cluster_means(x, labels), metric)
        k_next = int(merged.max()) + 1
        if k_next == k:
            break
        # Already canonical: cluster c's lowest member rises with c, and `merged` numbers
        # groups of clusters by their lowest cluster.
        labels = merged[labels]
        partitions.append(labels)
        k = k_next
    return FinchResult(
        partitions=tuple(partitions),
        num_clusters=tuple(int(p.max()) + 1 for p in partitions),
    )


def finch_cluster_means(
    points: Any, metric: str = "cosine", level: int | None = None
) -> np.ndarray:
    """Means of the clusters of one FINCH partition, as the FPL and FedBCS servers use them.

    `level=None` (default) follows their official code: FINCH there drops its final
    single-cluster partition, and the servers take the coarsest partition left (`c[:, -1]`),
    so a class keeps several prototypes whenever its clients disagree, and one only when the
    first partition is already a single cluster. An integer indexes `FinchResult.partitions`
    (negative counts from the coarsest).
    """
    result = finch(points, metric)
    depth = len(result.partitions)
    if level is None:
        level = depth - 2 if depth > 1 else 0
    if not -depth <= level < depth:
        raise IndexError(f"level {level} out of range: FINCH produced {depth} partition(s)")
    return cluster_means(points, result.partitions[level])
