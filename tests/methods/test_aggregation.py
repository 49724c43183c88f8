"""Exact weighted sums: the mean does not depend on the order or grouping of the updates, so
workers summing their own clients give the run the server summing every client gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_rounds, small_config, without_timing

from algorithms.fedavg import FedAvg
from raysim.methods.aggregation import MAX_VALUES, WeightSum, mean, weighted_average


class PerClientFedAvg(FedAvg):
    """FedAvg whose server receives every client's weights (no sums on the workers)."""

    weighted_mean = False


def _updates(count: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    rng = np.random.default_rng(seed)
    weights = [{"w": torch.from_numpy(rng.standard_normal((40, 7)).astype(np.float32)
                                      * np.float32(10.0 ** rng.uniform(-9, 4))),
                "steps": torch.tensor(int(rng.integers(0, 50)))} for _ in range(count)]
    return weights, [int(n) for n in rng.integers(1, 5000, count)]


def test_mean_is_the_float64_weighted_mean_rounded_to_float32() -> None:
    weights, counts = _updates(9)
    mean = weighted_average(weights, counts)
    exact = sum(w["w"].double() * n for w, n in zip(weights, counts)) / sum(counts)
    assert mean["w"].dtype == torch.float32
    np.testing.assert_allclose(mean["w"].numpy(), exact.numpy(), rtol=2**-23, atol=0)
    steps = sum(int(w["steps"]) * n for w, n in zip(weights, counts)) / sum(counts)
    assert int(mean["steps"]) == round(steps) and mean["steps"].dtype == torch.int64


def test_any_order_and_grouping_gives_the_same_bits() -> None:
    weights, counts = _updates(12, seed=1)
    reference = weighted_average(weights, counts)
    rng = np.random.default_rng(2)
    for _ in range(25):
        order = rng.permutation(12)
        cuts = np.sort(rng.choice(np.arange(1, 12), size=rng.integers(0, 5), replace=False))
        parts = []
        for group in np.split(order, cuts):
            part = WeightSum()
            for i in group:
                part.add(weights[i], counts[i])
            parts.append(part)
        total = WeightSum()
        for part in reversed(parts):
            total.merge(part)
        mean = total.mean()
        assert torch.equal(mean["w"], reference["w"])
        assert torch.equal(mean["steps"], reference["steps"])
    # plain float64 accumulation in two orders does differ somewhere: the test can fail
    forward = sum(w["w"].double() * n for w, n in zip(weights, counts))
    backward = sum(w["w"].double() * n for w, n in zip(weights[::-1], counts[::-1]))
    assert not torch.equal(forward, backward)


def test_adding_many_at_once_is_adding_them_one_by_one() -> None:
    """`add_many` (a client group's uploads in vectorised passes) holds exactly what adding
    each update in turn holds: across magnitudes 10^-9..10^4, integer buffers, a change of
    tensors mid-list and updates too large to stack more than one at a time."""
    weights, counts = _updates(10, seed=5)
    for k, w in enumerate(weights):  # a scalar parameter too (a temperature, a gate)
        w["scale"] = torch.tensor(0.1 * k - 0.3)
    other = [{"v": torch.ones(3, 2) * 0.5}] * 2  # other tensors: a pass of their own
    large = [{"w": torch.from_numpy(np.random.default_rng(k).standard_normal(2**21 + 1)
                                    .astype(np.float32))} for k in range(3)]
    for updates, ns in [(weights, counts), (weights[:4] + other + weights[4:],
                                           counts[:4] + [7, 9] + counts[4:]), (large, [3, 1, 2])]:
        one_by_one = WeightSum()
        for w, n in zip(updates, ns):
            one_by_one.add(w, n)
        at_once = WeightSum().add_many(updates, ns)
        assert (at_once.count, at_once.samples) == (one_by_one.count, one_by_one.samples)
        for name in one_by_one.bins:
            assert np.array_equal(at_once.total(name), one_by_one.total(name))
        for name, total in one_by_one.integers.items():
            assert np.array_equal(at_once.integers[name], total)
        mean, reference = at_once.mean(), one_by_one.mean()
        assert mean.keys() == reference.keys()
        assert all(torch.equal(mean[k], reference[k]) for k in reference)


def test_the_unweighted_mean_counts_every_update_once_exactly() -> None:
    weights, counts = _updates(7, seed=3)
    plain = mean(weights)
    exact = sum(w["w"].double() for w in weights) / len(weights)
    np.testing.assert_allclose(plain["w"].numpy(), exact.numpy(), rtol=2**-23, atol=0)
    assert torch.equal(mean(weights[::-1])["w"], plain["w"])  # any order, the same bits
    assert torch.equal(plain["w"], weighted_average(weights, [5] * len(weights))["w"])
    assert not torch.equal(plain["w"], weighted_average(weights, counts)["w"])
    assert int(plain["steps"]) == round(sum(int(w["steps"]) for w in weights) / len(weights))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="cannot average zero updates"):
        WeightSum().mean()
    with pytest.raises(ValueError, match="non-finite values in 'w'"):
        WeightSum().add({"w": torch.tensor([1.0, float("nan")])}, 3)
    full = WeightSum()
    full.count = MAX_VALUES
    with pytest.raises(ValueError, match="at most"):
        full.add({"w": torch.ones(2)}, 1)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_sums_on_workers_give_the_per_client_run(tmp_path, workers) -> None:
    """The same run with the server receiving every client's weights, and with each of 1, 2
    and 3 workers sending one sum: identical metrics and weights."""
    local = {"resources.backend": "local", "rounds": 3}
    per_client, w_ref, _ = run_rounds(
        small_config(**local, **{"algorithm.name": "test_aggregation:PerClientFedAvg"}),
        tmp_path / "ref", num_workers=1)
    summed, w_sum, _ = run_rounds(small_config(**local), tmp_path / "sum", num_workers=workers)
    assert without_timing(summed) == without_timing(per_client)
    assert all(torch.equal(w_sum[k], w_ref[k]) for k in w_ref)


@pytest.mark.slow
def test_sums_on_ray_workers_give_the_per_client_run(ray_session, tmp_path) -> None:
    per_client, w_ref, _ = run_rounds(
        small_config(**{"algorithm.name": "test_aggregation:PerClientFedAvg",
                        "resources.backend": "local"}), tmp_path / "ref", num_workers=1)
    summed, w_sum, _ = run_rounds(small_config(), tmp_path / "ray", num_workers=2)
    assert without_timing(summed) == without_timing(per_client)
    assert all(torch.equal(w_sum[k], w_ref[k]) for k in w_ref)
