"""FINCH clustering: first-neighbour rule, recursion, planted clusters, edge cases, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from raysim.methods.finch import (
    FinchResult,
    cluster_means,
    finch,
    finch_cluster_means,
    first_neighbor_partition,
    first_neighbors,
)

METRICS = ["cosine", "euclidean"]


def _groups(labels: np.ndarray, index: np.ndarray | None = None) -> set[frozenset[int]]:
    """A partition as a set of index sets; `index[i]` renames point i (undoes a permutation)."""
    names = np.arange(len(labels)) if index is None else index
    return {frozenset(names[labels == c].tolist()) for c in np.unique(labels)}


def _is_canonical(labels: np.ndarray) -> bool:
    _, first = np.unique(labels, return_index=True)
    in_order_of_first_member = labels[np.sort(first)].tolist()
    return labels.dtype == np.int64 and in_order_of_first_member == list(range(len(first)))


def _planted(metric: str, seed: int = 0) -> tuple[np.ndarray, set[frozenset[int]]]:
    """3 groups × 6 points in 16-d, shuffled; each group is 3 tight pairs around its centre.

    The pair structure makes the outcome certain rather than seed-dependent: every point's first
    neighbour is its pair mate (9 clusters), then every pair mean's is a pair of its own group
    (3 clusters). With 6 unstructured points per group FINCH may legitimately jump past 3.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 if metric == "cosine" else 10.0
    centres = scale * np.eye(16)[:3]
    pair_offsets = 0.15 * scale * rng.standard_normal((9, 16)) / 4
    pair_centres = np.repeat(centres, 3, axis=0) + pair_offsets
    points = np.repeat(pair_centres, 2, axis=0) + 0.002 * scale * rng.standard_normal((18, 16))
    if metric == "cosine":
        points *= rng.uniform(0.5, 2.0, size=(18, 1))  # cosine must ignore the norms
    perm = rng.permutation(18)
    group_of_original = np.repeat(np.arange(3), 6)
    truth = _groups(group_of_original[perm])
    return points[perm], truth


@pytest.mark.parametrize("metric", METRICS)
def test_planted_clusters_are_recovered(metric: str) -> None:
    points, truth = _planted(metric)
    result = finch(points, metric)
    assert isinstance(result, FinchResult)
    assert 3 in result.num_clusters
    level = result.num_clusters.index(3)
    assert _groups(result.partitions[level]) == truth
    means = finch_cluster_means(points, metric, level=level)
    assert means.shape == (3, 16)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(5))
def test_levels_are_nested_and_first_level_respects_groups(metric: str, seed: int) -> None:
    # Unstructured noisy groups: the exact level counts vary, but well-separated groups are never
    # mixed by the first partition, levels only ever merge, and the recursion ends at 1 cluster.
    rng = np.random.default_rng(seed)
    scale = 1.0 if metric == "cosine" else 10.0
    points = np.repeat(scale * np.eye(16)[:3], 6, axis=0)
    points += 0.05 * scale * rng.standard_normal(points.shape)
    truth_labels = np.repeat(np.arange(3), 6)
    result = finch(points, metric)
    first = result.partitions[0]
    assert all(len(set(truth_labels[first == c])) == 1 for c in np.unique(first))
    assert result.num_clusters[-1] == 1
    assert list(result.num_clusters) == sorted(set(result.num_clusters), reverse=True)
    for fine, coarse, k in zip(result.partitions, result.partitions[1:], result.num_clusters[1:]):
        assert all(len(set(coarse[fine == c])) == 1 for c in np.unique(fine))
        assert _is_canonical(coarse) and coarse.max() + 1 == k


def test_single_point() -> None:
    result = finch(np.ones((1, 8)))
    assert result.num_clusters == (1,)
    assert len(result.partitions) == 1
    assert result.partitions[0].tolist() == [0] and result.partitions[0].dtype == np.int64
    np.testing.assert_array_equal(finch_cluster_means(np.ones((1, 8))), np.ones((1, 8)))
    assert first_neighbors(np.ones((1, 8))).tolist() == [0]


@pytest.mark.parametrize("metric", METRICS)
def test_two_points_form_one_cluster(metric: str) -> None:
    points = np.array([[1.0, 0.0], [0.0, 5.0]])
    assert first_neighbors(points, metric).tolist() == [1, 0]
    result = finch(points, metric)
    assert result.num_clusters == (1,)
    assert result.partitions[0].tolist() == [0, 0]


def test_empty_input_raises() -> None:
    with pytest.raises(ValueError, match="zero points"):
        finch(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="zero points"):
        finch_cluster_means(np.zeros((0, 4)))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        finch(np.ones((3, 2)), metric="manhattan")
    with pytest.raises(ValueError, match="2-D"):
        finch(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        finch(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(IndexError, match="out of range"):
        finch_cluster_means(np.ones((1, 3)), level=1)


def test_first_partition_on_hand_made_1d_example() -> None:
    # Gaps: 0 -1- 1 -2- 3 -7- 10 -1- 11 -9- 20 -4- 24 -3- 27.
    # κ by hand: 0→1, 1→0, 3→1, 10→11, 11→10, 20→24, 24→27, 27→24.
    points = np.array([0.0, 1.0, 3.0, 10.0, 11.0, 20.0, 24.0, 27.0])[:, None]
    assert first_neighbors(points, "euclidean").tolist() == [1, 0, 1, 4, 3, 6, 7, 6]
    # Point 2 (x=3) joins {0, 1} via j = κ_i; point 5 (x=20) joins {6, 7} the same way,
    # while 5 and 7 are linked by κ_5 = κ_7 = 6 although neither is the other's neighbour.
    labels = first_neighbor_partition(points, "euclidean")
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # Means 4/3, 10.5, 23.67: the two outer ones both pick 10.5, so everything merges next.
    result = finch(points, "euclidean")
    assert result.num_clusters == (3, 1)
    assert result.partitions[1].tolist() == [0] * 8


def test_nearest_neighbour_ties_go_to_lowest_index() -> None:
    points = np.array([[0.0], [1.0], [2.0]])  # x=1 is equidistant from 0 and 2
    assert first_neighbors(points, "euclidean").tolist() == [1, 0, 1]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(6))
def test_first_partition_matches_explicit_adjacency(metric: str, seed: int) -> None:
    # Reference: build A with all three rules literally and let scipy find its components.
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    points = rng.standard_normal((n, 5))
    kappa = first_neighbors(points, metric)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    adjacency = (j == kappa[i]) | (kappa[j] == i) | (kappa[i] == kappa[j])
    _, reference = connected_components(coo_matrix(adjacency), directed=False)
    labels = first_neighbor_partition(points, metric)
    assert _groups(labels) == _groups(reference)
    assert _is_canonical(labels)


def test_cluster_means_hand_computed() -> None:
    points = np.array([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0], [4.0, 2.0], [1.0, 1.0]])
    labels = np.array([0, 0, 1, 0, 2])
    expected = np.array([[2.0, 2.0], [10.0, 10.0], [1.0, 1.0]])
    np.testing.assert_allclose(cluster_means(points, labels), expected)
    # float32 in → float32 out, so the rows can go straight back into a float32 model.
    assert cluster_means(points.astype(np.float32), labels).dtype == np.float32
    with pytest.raises(ValueError, match="no empty cluster"):
        cluster_means(points, np.array([0, 0, 2, 0, 2]))
    with pytest.raises(ValueError, match="shape"):
        cluster_means(points, np.array([0, 1]))


@pytest.mark.parametrize("level", [0, 1, -1])
def test_finch_cluster_means_shape_matches_level(level: int) -> None:
    points, _ = _planted("cosine", seed=3)
    result = finch(points)
    means = finch_cluster_means(points, level=level)
    assert means.shape == (result.num_clusters[level], points.shape[1])
    np.testing.assert_allclose(means, cluster_means(points, result.partitions[level]))


def test_identical_points_and_zero_vectors_give_no_nan() -> None:
    same = np.tile(np.array([[0.3, -1.2, 2.0]]), (5, 1))
    result = finch(same)
    assert result.num_clusters == (1,)
    np.testing.assert_allclose(finch_cluster_means(same), same[:1])

    points = np.array(
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    )
    for metric in METRICS:
        result = finch(points, metric)
        for labels, k in zip(result.partitions, result.num_clusters):
            assert _is_canonical(labels) and labels.max() + 1 == k
            assert np.all(np.isfinite(cluster_means(points, labels)))
        assert np.all(np.isfinite(finch_cluster_means(points, metric)))


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_and_permutation_equivariant(metric: str) -> None:
    rng = np.random.default_rng(7)
    points = rng.standard_normal((30, 12))
    a, b = finch(points, metric), finch(points.copy(), metric)
    assert a.num_clusters == b.num_clusters
    for pa, pb in zip(a.partitions, b.partitions):
        np.testing.assert_array_equal(pa, pb)
        assert _is_canonical(pa)

    perm = rng.permutation(30)
    c = finch(points[perm], metric)
    assert c.num_clusters == a.num_clusters
    for pa, pc in zip(a.partitions, c.partitions):
        assert _groups(pc, index=perm) == _groups(pa)


def test_accepts_torch_tensors() -> None:
    points, truth = _planted("cosine", seed=1)
    tensor = torch.tensor(points, dtype=torch.float32, requires_grad=True)
    result = finch(tensor)
    reference = finch(points.astype(np.float32))
    assert result.num_clusters == reference.num_clusters
    assert _groups(result.partitions[result.num_clusters.index(3)]) == truth
    means = finch_cluster_means(tensor, level=0)
    assert isinstance(means, np.ndarray) and means.dtype == np.float32
    np.testing.assert_allclose(
        means, cluster_means(points.astype(np.float32), result.partitions[0]), rtol=1e-6
    )


def test_default_level_is_the_coarsest_partition_with_more_than_one_cluster() -> None:
    # planted pairs inside groups give 9 → 3 → 1; FPL/FedBCS keep the 3 group means
    points, truth = _planted("cosine")
    assert finch(points).num_clusters == (9, 3, 1)
    means = finch_cluster_means(points)
    assert means.shape == (3, 16)
    level = finch(points).partitions[1]
    np.testing.assert_allclose(means, cluster_means(points, level))
    # a class held by one client keeps its single prototype
    np.testing.assert_allclose(finch_cluster_means(np.ones((1, 4))), np.ones((1, 4)))
