"""Invariants of the seeded partitioners: coverage, determinism, skew and error messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.datasets import load_digits

from raysim.config import ConfigError, NoParams, config_class, require
from raysim.data import Partition, PartitionRequest, long_tail_indices, make_partition
from raysim.data.partitioners import partitioner
from raysim.registry import PARTITIONERS

BUNDLED_KINDS = ("iid", "dirichlet", "shards", "n_way_k_shot", "quantity", "dirichlet_equal",
                 "domains", "natural", "file")
SUBSET_KINDS = ("n_way_k_shot",)  # use k samples of each of a client's classes, not all
DRAWN_KINDS = [kind for kind in BUNDLED_KINDS if PARTITIONERS[kind].draws]

NUM_CLASSES = 10


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # Slightly unbalanced classes so long-tail n_max (the smallest class) is meaningful.
    return _labels([300, 310, 295, 305, 320, 290, 300, 315, 300, 280])


@pytest.fixture(scope="module")
def big_labels() -> np.ndarray:
    return _labels([1000] * NUM_CLASSES, seed=1)


def _tv(hist: np.ndarray, global_dist: np.ndarray) -> np.ndarray:
    dist = hist / hist.sum(axis=1, keepdims=True)
    return 0.5 * np.abs(dist - global_dist).sum(axis=1)


def _expected_long_tail_counts(labels: np.ndarray, rho: float) -> np.ndarray:
    counts = np.bincount(labels)
    n_max = counts.min()
    c_total = len(counts)
    return np.array([int(n_max * rho ** (-c / (c_total - 1))) for c in range(c_total)])


def _domains(n: int, num_domains: int = 4, seed: int = 0) -> np.ndarray:
    """Domain ids independent of the labels, every domain about equally common."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_domains)


# each kind's keys of the partitions `_make` draws
KEYS = {"dirichlet": {"alpha": 0.5}, "quantity": {"alpha": 0.5}, "dirichlet_equal": {"alpha": 0.5},
        "domains": {"alpha": 0.5}, "shards": {"classes_per_client": 3},
        "n_way_k_shot": {"shots": 5}}


def _make(labels: np.ndarray, kind: str, seed: int, rho: float = 1.0) -> Partition:
    return make_partition(
        labels,
        NUM_CLASSES,
        kind=kind,
        num_clients=12,
        seed=seed,
        params=KEYS.get(kind),
        long_tail_rho=rho,
        domains=_domains(len(labels)) if kind == "domains" else None,
    )


def split(kind: str, labels: np.ndarray, num_clients: int, rng: np.random.Generator,
          domains: np.ndarray | None = None, **keys) -> list[np.ndarray]:
    """The registered partitioner `kind` called directly, with its keys `keys`."""
    function = PARTITIONERS[kind]
    params = config_class(function)(**keys)
    return function(PartitionRequest(labels=labels, domains=domains, num_classes=NUM_CLASSES,
                                     num_clients=num_clients, rng=rng, params=params))


@pytest.mark.parametrize("rho", [1.0, 10.0])
@pytest.mark.parametrize("kind", DRAWN_KINDS)
def test_every_sample_in_exactly_one_client(labels: np.ndarray, kind: str, rho: float) -> None:
    part = _make(labels, kind, seed=3, rho=rho)
    assert part.num_clients == 12
    assert part.num_classes == NUM_CLASSES
    for idx in part.client_indices:
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0), "indices must be sorted and unique within a client"
    flat = np.concatenate(part.client_indices)
    assert len(np.unique(flat)) == len(flat), "a sample is held by two clients"
    if kind in SUBSET_KINDS:  # leaves samples unused by design
        assert set(flat.tolist()) <= set(range(len(labels)))
    elif rho == 1.0:
        np.testing.assert_array_equal(np.sort(flat), np.arange(len(labels)))
    else:
        # The pool is the long-tailed subset: the class profile follows the formula exactly.
        counts = np.bincount(labels[flat], minlength=NUM_CLASSES)
        np.testing.assert_array_equal(counts, _expected_long_tail_counts(labels, rho))


@pytest.mark.parametrize("kind", DRAWN_KINDS)
def test_histograms_and_sizes_match_indices(labels: np.ndarray, kind: str) -> None:
    part = _make(labels, kind, seed=5, rho=4.0)
    assert part.histograms.shape == (part.num_clients, NUM_CLASSES)
    assert part.histograms.dtype == np.int64
    for hist, idx in zip(part.histograms, part.client_indices, strict=True):
        np.testing.assert_array_equal(hist, np.bincount(labels[idx], minlength=NUM_CLASSES))
    np.testing.assert_array_equal(part.sizes, [len(i) for i in part.client_indices])
    assert part.sizes.dtype == np.int64
    np.testing.assert_array_equal(part.sizes, part.histograms.sum(axis=1))


@pytest.mark.parametrize("kind", DRAWN_KINDS)
def test_seed_determinism(labels: np.ndarray, kind: str) -> None:
    a = _make(labels, kind, seed=7)
    b = _make(labels, kind, seed=7)
    c = _make(labels, kind, seed=8)
    for x, y in zip(a.client_indices, b.client_indices, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(
        not np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices, strict=True)
    )


@pytest.mark.parametrize("kind", DRAWN_KINDS)
def test_partitioners_do_not_modify_labels(labels: np.ndarray, kind: str) -> None:
    before = labels.copy()
    _make(labels, kind, seed=1, rho=3.0)
    np.testing.assert_array_equal(labels, before)


def test_raw_partitioners_share_the_rng_contract(labels: np.ndarray) -> None:
    calls = [
        lambda r: split("iid", labels, 7, r),
        lambda r: split("dirichlet", labels, 7, r, alpha=0.3),
        lambda r: split("shards", labels, 7, r, classes_per_client=2),
        lambda r: split("quantity", labels, 7, r, alpha=1.0),
        lambda r: split("dirichlet_equal", labels, 7, r, alpha=0.3),
    ]
    for call in calls:
        first = call(np.random.default_rng(11))
        second = call(np.random.default_rng(11))
        assert len(first) == 7
        for x, y in zip(first, second, strict=True):
            np.testing.assert_array_equal(x, y)
        assert sum(len(p) for p in first) == len(labels)


# --- shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_clients", "k"), [(10, 2), (7, 3), (20, 1), (13, 10)])
def test_shards_exactly_k_classes_and_balanced_usage(
    labels: np.ndarray, num_clients: int, k: int
) -> None:
    parts = split("shards", labels, num_clients, np.random.default_rng(0), classes_per_client=k)
    usage = np.zeros(NUM_CLASSES, dtype=int)
    for idx in parts:
        present = np.unique(labels[idx])
        assert len(present) == k
        usage[present] += 1
    assert usage.max() - usage.min() <= 1
    assert sum(len(p) for p in parts) == len(labels)
    # Each class is split evenly among its holders.
    for c in range(NUM_CLASSES):
        shares = [np.sum(labels[idx] == c) for idx in parts if np.any(labels[idx] == c)]
        assert max(shares) - min(shares) <= 1


def test_shards_errors(labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"classes_per_client=11 exceeds .* \(10\)"):
        split("shards", labels, 5, rng, classes_per_client=11)
    with pytest.raises(ValueError, match="some classes would belong to no client"):
        split("shards", labels, 4, rng, classes_per_client=2)
    tiny = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2 has a single sample
    with pytest.raises(ValueError, match=r"class 2 has 1 samples but would be split among 2"):
        split("shards", tiny, 3, rng, classes_per_client=2)


# --- n_way_k_shot ----------------------------------------------------------------------------


def test_n_way_k_shot_ways_shots_and_no_sample_twice(labels: np.ndarray) -> None:
    parts = split("n_way_k_shot", labels, 12, np.random.default_rng(0), ways=4, ways_stdev=1,
                  shots=5, shots_stdev=2)
    used = np.concatenate(parts)
    assert len(np.unique(used)) == len(used)  # no sample held by two clients
    ways = [len(np.unique(labels[idx])) for idx in parts]
    assert set(ways) <= {3, 4, 5} and len(set(ways)) > 1  # n_k varies around `ways`
    for idx in parts:
        per_class = np.bincount(labels[idx])
        shots = set(per_class[per_class > 0].tolist())
        assert len(shots) == 1 and 3 <= shots.pop() <= 7  # one k_k per client, every class
    again = split("n_way_k_shot", labels, 12, np.random.default_rng(0), ways=4, ways_stdev=1,
                  shots=5, shots_stdev=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_n_way_k_shot_too_many_shots(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"n_way_k_shot: class \d+ has \d+ samples but its "
                                         r"\d+ clients want \d+: lower shots or num_clients"):
        split("n_way_k_shot", labels, 40, np.random.default_rng(0), ways=5, shots=500)


# --- long tail -------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [1.0, 2.0, 10.0, 100.0])
def test_long_tail_counts_synthetic(labels: np.ndarray, rho: float) -> None:
    kept = long_tail_indices(labels, rho, np.random.default_rng(0))
    assert kept.dtype == np.int64
    assert np.all(np.diff(kept) > 0)
    counts = np.bincount(labels[kept], minlength=NUM_CLASSES)
    np.testing.assert_array_equal(counts, _expected_long_tail_counts(labels, rho))
    if rho == 1.0:
        assert np.all(counts == np.bincount(labels).min())


@pytest.mark.parametrize("rho", [10.0, 50.0])
def test_long_tail_counts_digits(rho: float) -> None:
    y = load_digits().target.astype(np.int64)
    kept = long_tail_indices(y, rho, np.random.default_rng(1))
    counts = np.bincount(y[kept], minlength=10)
    expected = _expected_long_tail_counts(y, rho)
    np.testing.assert_array_equal(counts, expected)
    assert counts[0] == np.bincount(y).min()
    assert counts[-1] == int(np.bincount(y).min() / rho)


def test_long_tail_is_seeded(labels: np.ndarray) -> None:
    a = long_tail_indices(labels, 10.0, np.random.default_rng(0))
    b = long_tail_indices(labels, 10.0, np.random.default_rng(0))
    c = long_tail_indices(labels, 10.0, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_long_tail_rejects_rho_below_one(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="rho must be a finite number >= 1"):
        long_tail_indices(labels, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="long_tail_rho must be >= 1"):
        make_partition(labels, 10, kind="iid", num_clients=3, seed=0, long_tail_rho=0.9)


# --- Dirichlet label skew --------------------------------------------------------------------


def test_dirichlet_alpha_controls_skew(big_labels: np.ndarray) -> None:
    global_dist = np.bincount(big_labels) / len(big_labels)
    near_iid = make_partition(
        big_labels, NUM_CLASSES, kind="dirichlet", num_clients=20, seed=0,
        params={"alpha": 1000.0}
    )
    tv_iid = _tv(near_iid.histograms, global_dist)
    assert tv_iid.max() < 0.15
    skewed = make_partition(
        big_labels, NUM_CLASSES, kind="dirichlet", num_clients=20, seed=0,
        params={"alpha": 0.05}
    )
    tv_skew = _tv(skewed.histograms, global_dist)
    assert tv_skew.mean() > 0.5
    assert tv_skew.mean() > 4 * tv_iid.mean()
    assert skewed.sizes.min() >= 2


def test_dirichlet_respects_min_size(labels: np.ndarray) -> None:
    parts = split("dirichlet", labels, 10, np.random.default_rng(0), alpha=0.1, min_size=50)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_impossible_request_message() -> None:
    y = _labels([20] * 10)
    with pytest.raises(ValueError, match="lower num_clients or raise alpha"):
        split("dirichlet", y, 50, np.random.default_rng(0), alpha=0.01, min_size=2)
    with pytest.raises(ValueError, match="min_size=5 samples each from 200 samples"):
        split("dirichlet", y, 50, np.random.default_rng(0), alpha=1.0, min_size=5)
    with pytest.raises(ConfigError, match=r"^data.partition.alpha: must be > 0 \(got 0.0\)$"):
        make_partition(y, NUM_CLASSES, kind="dirichlet", num_clients=5, seed=0,
                       params={"alpha": 0.0})


# --- equal-size Dirichlet ----------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [7, 10, 15, 25])
def test_dirichlet_equal_sizes_differ_by_at_most_one(
    big_labels: np.ndarray, num_clients: int
) -> None:
    parts = split("dirichlet_equal", big_labels, num_clients, np.random.default_rng(2),
                  alpha=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == len(big_labels)
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(big_labels)))


def test_dirichlet_equal_small_alpha_is_skewed(big_labels: np.ndarray) -> None:
    part = make_partition(
        big_labels, NUM_CLASSES, kind="dirichlet_equal", num_clients=20, seed=0,
        params={"alpha": 0.1}
    )
    top2_share = np.sort(part.histograms, axis=1)[:, -2:].sum(axis=1) / part.sizes
    assert np.mean(top2_share > 0.6) > 0.5, "most clients should be dominated by few classes"
    iid = make_partition(big_labels, NUM_CLASSES, kind="iid", num_clients=20, seed=0)
    iid_top2 = np.sort(iid.histograms, axis=1)[:, -2:].sum(axis=1) / iid.sizes
    assert top2_share.mean() > iid_top2.mean() + 0.3


# --- quantity skew -----------------------------------------------------------------------------


def test_quantity_sizes_vary_but_labels_stay_iid(big_labels: np.ndarray) -> None:
    part = make_partition(
        big_labels, NUM_CLASSES, kind="quantity", num_clients=20, seed=0,
        params={"alpha": 0.5}
    )
    assert part.sizes.max() / part.sizes.min() > 2
    assert part.sizes.min() >= 2
    global_dist = np.bincount(big_labels) / len(big_labels)
    tv = _tv(part.histograms, global_dist)
    large = part.sizes >= 200
    assert large.sum() >= 5
    assert tv[large].max() < 0.15
    assert np.average(tv, weights=part.sizes) < 0.1


def test_quantity_impossible_request_message() -> None:
    y = _labels([100] * 10)
    with pytest.raises(ValueError, match="lower num_clients or raise alpha"):
        split("quantity", y, 100, np.random.default_rng(0), alpha=0.01, min_size=5)


# --- generic errors ----------------------------------------------------------------------------


def test_more_clients_than_samples() -> None:
    y = np.array([0, 1, 0, 1, 2])
    for call in (
        lambda: split("iid", y, 6, np.random.default_rng(0)),
        lambda: split("dirichlet_equal", y, 6, np.random.default_rng(0), alpha=0.5),
    ):
        with pytest.raises(ValueError, match="cannot split 5 samples among 6 clients"):
            call()


def test_unknown_kind_lists_choices(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown partition kind 'pathological'") as info:
        make_partition(labels, NUM_CLASSES, kind="pathological", num_clients=3, seed=0)
    for kind in BUNDLED_KINDS:
        assert kind in str(info.value)


def test_labels_out_of_range(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        make_partition(labels, 5, kind="iid", num_clients=3, seed=0)


def test_partition_stream_is_independent_of_plain_seed(labels: np.ndarray) -> None:
    # The partition must not coincide with draws from an untagged generator on the same seed.
    part = make_partition(labels, NUM_CLASSES, kind="iid", num_clients=4, seed=0)
    plain = split("iid", labels, 4, np.random.default_rng(0))
    assert not all(np.array_equal(a, b) for a, b in zip(part.client_indices, plain, strict=True))


# --- domains (feature skew) --------------------------------------------------------------------


@pytest.mark.parametrize("within", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_clients", [4, 10, 13])
def test_domains_clients_hold_one_domain_each(
    labels: np.ndarray, num_clients: int, within: str
) -> None:
    domains = _domains(len(labels))
    part = make_partition(labels, NUM_CLASSES, kind="domains", num_clients=num_clients,
                          seed=0, domains=domains, params={"within": within, "alpha": 0.5})
    parts, client_domains = part.client_indices, part.client_domains
    assert len(parts) == num_clients
    assert client_domains.dtype == np.int64
    np.testing.assert_array_equal(client_domains, np.arange(num_clients) % 4)
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(labels)))
    for idx, dom in zip(parts, client_domains):
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
        assert np.all(domains[idx] == dom)
    per_domain = np.bincount(client_domains, minlength=4)
    assert per_domain.max() - per_domain.min() <= 1


def test_domains_uses_the_domain_ids_present(labels: np.ndarray) -> None:
    domains = np.array([3, 7, 9])[_domains(len(labels), num_domains=3)]
    parts = split("domains", labels, 5, np.random.default_rng(1), domains=domains)
    client_domains = np.array([np.unique(domains[idx]).item() for idx in parts])
    np.testing.assert_array_equal(client_domains, [3, 7, 9, 3, 7])
    for idx, dom in zip(parts, client_domains):
        assert np.all(domains[idx] == dom)


def test_make_partition_domains_with_long_tail(labels: np.ndarray) -> None:
    domains = _domains(len(labels))
    part = make_partition(
        labels,
        NUM_CLASSES,
        kind="domains",
        num_clients=9,
        seed=2,
        domains=domains,
        long_tail_rho=10.0,
        params={"within": "dirichlet", "alpha": 1.0},
    )
    assert part.client_domains is not None
    np.testing.assert_array_equal(part.client_domains, np.arange(9) % 4)
    for idx, dom in zip(part.client_indices, part.client_domains):
        assert np.all(domains[idx] == dom)
    flat = np.concatenate(part.client_indices)
    counts = np.bincount(labels[flat], minlength=NUM_CLASSES)
    np.testing.assert_array_equal(counts, _expected_long_tail_counts(labels, 10.0))


def test_dirichlet_within_domains_is_label_skewed(big_labels: np.ndarray) -> None:
    domains = _domains(len(big_labels))
    global_dist = np.bincount(big_labels) / len(big_labels)

    def mean_tv(within: str) -> float:
        part = make_partition(
            big_labels,
            NUM_CLASSES,
            kind="domains",
            num_clients=20,
            seed=0,
            domains=domains,
            params={"within": within, "alpha": 0.05},
        )
        return float(_tv(part.histograms, global_dist).mean())

    tv_iid, tv_skew = mean_tv("iid"), mean_tv("dirichlet")
    assert tv_iid < 0.1
    assert tv_skew > 0.4
    assert tv_skew > 4 * tv_iid


def test_other_kinds_record_majority_domain(labels: np.ndarray) -> None:
    assert _make(labels, "shards", seed=0).client_domains is None
    # Domains tied to labels, so shard clients (3 classes each) are dominated by one domain.
    domains = labels % 4
    part = make_partition(
        labels, NUM_CLASSES, kind="shards", num_clients=12, seed=0, domains=domains
    )
    assert part.client_domains is not None and part.client_domains.dtype == np.int64
    expected = [np.bincount(domains[idx]).argmax() for idx in part.client_indices]
    np.testing.assert_array_equal(part.client_domains, expected)


def test_domains_errors(labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    domains = _domains(len(labels))
    with pytest.raises(ValueError, match="needs at least 4 clients"):
        split("domains", labels, 3, rng, domains=domains)
    with pytest.raises(ValueError, match="needs a dataset with domains, e.g. digits_domains"):
        make_partition(labels, NUM_CLASSES, kind="domains", num_clients=8, seed=0)
    with pytest.raises(ConfigError, match=r"data.partition.within: choose one of iid, dirichlet"):
        make_partition(labels, NUM_CLASSES, kind="domains", num_clients=8, seed=0,
                       domains=domains, params={"within": "shards"})
    with pytest.raises(ValueError, match="domains has 5 entries but labels has"):
        make_partition(labels, NUM_CLASSES, kind="iid", num_clients=8, seed=0, domains=domains[:5])


# --- a partitioner with a key of its own -------------------------------------------------------


@dataclass(frozen=True)
class EveryKthConfig:
    k: int = 2  # client c holds every k-th sample from offset c

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", "must be >= 1")


@partitioner(EveryKthConfig, draws=False)
def every_kth(r: PartitionRequest) -> list[np.ndarray]:
    """A partition kind with a new key, declared in one place (here, found by import path)."""
    return [np.arange(c, len(r.labels), r.params.k) for c in range(r.num_clients)]


def test_a_new_partitioner_with_a_new_key_is_one_function_and_its_config(labels) -> None:
    from raysim.run.validate import config_from_dict
    from raysim.task import build_task

    kind = "test_partition:every_kth"
    raw = {"data": {"partition": {"kind": kind, "k": 3, "num_clients": 3}},
           "clients_per_round": 3}
    config = config_from_dict(raw)
    assert config.data.partition.params == EveryKthConfig(k=3)
    part = build_task(config).partition
    assert [len(idx) for idx in part.client_indices] == [len(part.indices) // 3] * 3
    np.testing.assert_array_equal(part.client_indices[1][:3], [1, 4, 7])
    with pytest.raises(ConfigError, match=r"^data.partition.k: must be >= 1$"):
        config_from_dict(raw, ["data.partition.k=0"])
    with pytest.raises(ConfigError, match="unknown key 'data.partition.alpha' for partition "
                                          f"kind '{kind}'; valid keys here: kind, num_clients, "
                                          "k"):
        config_from_dict(raw, ["data.partition.alpha=0.5"])
    with pytest.raises(ValueError, match="takes the clients' samples as they are"):
        make_partition(labels, NUM_CLASSES, kind=kind, num_clients=3, seed=0, long_tail_rho=2)


def test_a_partitioner_without_a_config_has_no_keys(labels) -> None:
    assert config_class(PARTITIONERS["iid"]) is NoParams
    assert PARTITIONERS["natural"].draws is False and PARTITIONERS["file"].draws is False
