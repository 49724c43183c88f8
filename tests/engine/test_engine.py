"""The Ray engine, on a real local Ray: determinism, client state, failures, scheduling."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import in_one_process, run_rounds, small_config, without_timing

from raysim.config import ConfigError
from raysim.engine.cluster import fit_resources
from raysim.engine.evaluation import eval_batches, reduce_domain_eval, reduce_eval
from raysim.engine.simulation import balance
from raysim.run import prepare
from raysim.seeding import client_generator, sample_clients
from raysim.state_io import pack


@pytest.mark.slow
def test_one_run_whatever_the_backend_and_the_number_of_workers(ray_session, tmp_path):
    """MOON (client state: each client's previous model) on two Ray workers, and in this process
    on one worker and on two: the same metrics, weights and client states, bit for bit."""
    config = small_config(**{"algorithm.name": "moon"})
    on_ray = run_rounds(config, tmp_path / "ray")
    assert [r.round for r in on_ray[0]] == [1, 2, 3]
    assert "test_accuracy" in on_ray[0][-1].metrics
    assert sum(s is not None for s in on_ray[2]) >= 4  # the sampled clients kept a state
    for workers in (1, 2):
        results, weights, states = run_rounds(in_one_process(config), tmp_path / "local",
                                              num_workers=workers)
        assert without_timing(results) == without_timing(on_ray[0])
        assert all(torch.equal(weights[k], on_ray[1][k]) for k in on_ray[1])
        assert pack(states) == pack(on_ray[2])
    # and a different seed really changes the run
    other, _, _ = run_rounds(in_one_process(small_config(seed=4, **{"algorithm.name": "moon"})),
                             tmp_path / "seed4")
    assert without_timing(other) != without_timing(on_ray[0])


def test_local_backend_stops_a_run_with_too_few_clients_as_ray_does(tmp_path):
    config = small_config(**{"algorithm.name": "test_algorithms:FailsOnClientZero",
                             "resources.backend": "local", "rounds": 6,
                             "fault_tolerance.min_clients_fraction": 1.0})
    from raysim.engine.simulation import RunStopped

    with pytest.raises(RunStopped, match="client 0 is broken"):
        run_rounds(config, tmp_path)


@pytest.mark.slow
def test_client_state_persists_across_rounds_and_workers(tmp_path):
    # in one process, on two workers: across Ray processes, the test above
    config = small_config(**{"algorithm.name": "test_algorithms:Counting", "rounds": 4})
    results, _, states = run_rounds(in_one_process(config), tmp_path, num_workers=2)
    expected = [0] * 12
    for r in range(1, 5):
        for cid in sample_clients(config.seed, r, 12, 4):
            expected[cid] += 1
    assert [s or 0 for s in states] == expected
    assert max(expected) >= 2  # some client really came back


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "reason"), [("raise", "client 0 is broken"),
                                              ("nan", "non-finite values in 'classifier.bias'")])
def test_failing_client_is_dropped_with_its_reason(tmp_path, mode, reason):
    # in one process: drops on Ray are test_durable's failure records
    config = small_config(**{"algorithm.name": "test_algorithms:FailsOnClientZero",
                             "algorithm.mode": mode, "rounds": 6})
    results, weights, _ = run_rounds(in_one_process(config), tmp_path)
    dropped = [r for r in results if r.failures]
    sampled_zero = [r for r in range(1, 7) if 0 in sample_clients(config.seed, r, 12, 4)]
    assert [r.round for r in dropped] == sampled_zero and sampled_zero
    for r in dropped:
        assert reason in r.failures[0]
        assert r.metrics["clients_failed"] == 1 and r.metrics["clients_ok"] == 3
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_sampling_is_seeded_sorted_and_without_replacement():
    a = sample_clients(0, 1, 50, 10)
    assert a == sample_clients(0, 1, 50, 10)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= c < 50 for c in a)
    assert a != sample_clients(0, 2, 50, 10) and a != sample_clients(1, 1, 50, 10)


def test_client_generators_are_reproducible_and_distinct():
    draw = lambda *key: torch.rand(3, generator=client_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    assert not torch.equal(draw(0, 1, 5), draw(0, 2, 5))


def test_balance_assigns_largest_first_to_least_loaded_worker():
    sizes = [10, 50, 20, 40, 30, 5]
    groups = balance([0, 1, 2, 3, 4, 5], sizes, 2)
    assert sorted(c for g in groups for c in g) == [0, 1, 2, 3, 4, 5]
    assert groups == [[1, 2, 0], [3, 4, 5]]  # loads 80 / 75
    assert balance([3], sizes, 3) == [[3], [], []]


def test_reduce_eval_divides_sums_by_count():
    sums = [{"accuracy": 3.0, "loss": 1.5, "count": 4.0},
            {"accuracy": 1.0, "loss": 0.5, "count": 1.0}]
    assert reduce_eval(sums) == {"test_accuracy": 0.8, "test_loss": 0.4}


def test_fit_resources_falls_back_to_cpu_and_shrinks_the_pool():
    config = small_config(**{"resources.worker.num_gpus": 0.25, "resources.num_workers": 4})
    fitted, notes = fit_resources(config, {"CPU": 2.0})
    assert fitted.resources.worker.num_gpus == 0.0
    assert fitted.resources.num_workers == 2
    assert notes == ["the cluster reports no GPU: workers and server run on CPU",
                     "only 2 of resources.num_workers=4 fit"]
    packed, notes = fit_resources(config, {"CPU": 16.0, "GPU": 1.0})
    assert packed.resources.num_workers == 4 and notes == []  # four workers share one GPU
    with pytest.raises(ConfigError, match="one worker needs 4.0 CPU"):
        fit_resources(small_config(**{"resources.worker.num_cpus": 4}), {"CPU": 2.0})


def test_run_directory_holds_resolved_config_and_histograms(tmp_path):
    run = prepare(small_config(), tmp_path / "r")
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("name: test\n")
    assert run.task.partition.num_clients == 12
    histograms = pq.read_table(tmp_path / "r" / "label_histograms.parquet").to_pydict()
    per_client = np.bincount(histograms["client"], weights=histograms["count"], minlength=12)
    assert per_client.tolist() == run.task.partition.sizes.tolist()
    assert math.isclose(run.task.partition.sizes.sum(), 1347)
    info = run.task.info
    assert (info.num_classes, info.input_shape, info.feature_dim) == (10, (1, 8, 8), 128)


def test_eval_batches_are_fixed_and_never_straddle_domains():
    assert eval_batches(None, 300) == [(-1, [(0, 128), (128, 256), (256, 300)])]
    domains = np.array([0] * 130 + [1] * 5 + [2] * 3)
    groups = eval_batches(domains, len(domains))
    assert groups == [(0, [(0, 128), (128, 130)]), (1, [(130, 135)]), (2, [(135, 138)])]
    with pytest.raises(ValueError, match="contiguous"):
        eval_batches(np.array([0, 1, 0]), 3)


def test_domain_metrics_and_their_unweighted_mean():
    groups = [("a", [{"accuracy": 9.0, "count": 10.0}]),
              ("b", [{"accuracy": 1.0, "count": 2.0}, {"accuracy": 0.0, "count": 2.0}])]
    metrics = reduce_domain_eval(groups)
    assert metrics == {"test_accuracy/a": 0.9, "test_accuracy/b": 0.25,
                       "test_accuracy": pytest.approx(0.575)}
    assert reduce_domain_eval([("", [{"accuracy": 1.0, "count": 4.0}])]) == {
        "test_accuracy": 0.25}
