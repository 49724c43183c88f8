"""Synthetic(α, β): each client generated from (seed, client id), the paper's heterogeneity,
and runs on it where the workers generate the sampled clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_rounds, without_timing

from raysim.config import ConfigError
from raysim.data.synthetic_fedprox import CLASSES, FEATURES, FedProxClients
from raysim.engine.worker import ClientWorker
from raysim.run import prepare
from raysim.run.validate import config_from_dict
from raysim.task import build_task


def synthetic_config(**overrides):
    raw = {
        "name": "synthetic", "seed": 1, "rounds": 3, "clients_per_round": 5,
        "data": {"dataset": "synthetic_fedprox",
                 "partition": {"kind": "natural", "num_clients": 1000},
                 "size_sigma": 0.5, "test_clients": 20, "test_per_client": 20},
        "model": {"name": "logreg"},
        "train": {"local_epochs": 1, "batch_size": 10, "lr": 0.05},
        "resources": {"num_workers": 2, "worker": {"num_cpus": 1}},
        "logging": {"progress": False},
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])


def test_a_client_is_the_same_whoever_generates_it_and_however_many_there_are() -> None:
    few = FedProxClients.build(10, alpha=0.5, beta=0.5, seed=3)
    many = FedProxClients.build(100_000, alpha=0.5, beta=0.5, seed=3)
    np.testing.assert_array_equal(few.sizes, many.sizes[:10])
    for k in (0, 7, 9):
        x, y = few.client(k)
        x2, y2 = many.client(k)
        assert x.shape == (few.sizes[k], 1, 1, FEATURES) and x.dtype == np.float32
        assert y.dtype == np.int64 and 0 <= y.min() and y.max() < CLASSES
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(few.client(1)[0][:5], few.client(2)[0][:5])
    other = FedProxClients.build(10, alpha=0.5, beta=0.5, seed=4)
    assert not np.array_equal(other.client(0)[0][:5], few.client(0)[0][:5])


@pytest.mark.parametrize("iid", [False, True])
def test_clients_generated_together_are_the_clients_generated_alone(iid) -> None:
    clients = FedProxClients.build(1000, alpha=0.5, beta=0.5, iid=iid, seed=3)
    ids = [999, 0, 41, 42]
    for k, (x, y) in zip(ids, clients.many(ids), strict=True):
        alone_x, alone_y = clients.client(k)
        np.testing.assert_array_equal(x, alone_x)
        np.testing.assert_array_equal(y, alone_y)
        assert x.dtype == np.float32 and x.shape == (clients.sizes[k], 1, 1, FEATURES)
        # both are the definition: x = v_k + z·√Σ from the client's own stream, y = argmax
        model, n = clients.model(k), int(clients.sizes[k])
        z = np.random.default_rng([3, 0x53, k]).standard_normal((n, FEATURES))
        defined = model.input_mean + z * np.sqrt(np.arange(1, FEATURES + 1.0) ** -1.2)
        np.testing.assert_array_equal(x.reshape(n, FEATURES), defined.astype(np.float32))
        np.testing.assert_array_equal(y, np.argmax(defined @ model.weight + model.bias, 1))


def test_a_workers_group_gets_each_generated_clients_own_samples() -> None:
    task = build_task(synthetic_config())
    worker = ClientWorker(synthetic_config(), task.dataset,
                          (task.partition.offsets, task.partition.indices), task.info)
    ids = [3, 17, 400, 999]
    for k, data in zip(ids, worker.client_datas(ids), strict=True):
        alone = worker.client_data(k)
        assert torch.equal(data.x, alone.x) and torch.equal(data.y, alone.y)
        assert data.indices.tolist() == list(range(task.partition.sizes[k]))


def test_sizes_follow_the_papers_lognormal() -> None:
    sizes = FedProxClients.build(50_000, 1.0, 1.0).sizes
    assert sizes.min() >= 50
    # ⌊LogNormal(4, 2)⌋ + 50: the median is e^4 + 50 ≈ 104.6
    assert 98 <= np.median(sizes) <= 112
    fixed = FedProxClients.build(100, 1.0, 1.0, size_sigma=0.0).sizes
    assert set(fixed.tolist()) == {int(np.exp(4.0)) + 50}


def _spread(clients: FedProxClients, ids: range) -> tuple[float, float]:
    """How far apart the clients' optimal models and input means are: the std over clients
    of each one's mean weight and of each one's mean input."""
    models = [clients.model(k) for k in ids]
    return (float(np.std([m.weight.mean() for m in models])),
            float(np.std([m.input_mean.mean() for m in models])))


def test_larger_alpha_and_beta_spread_the_clients_further() -> None:
    ids = range(300)
    model_spread = [_spread(FedProxClients.build(300, a, 0.0), ids)[0] for a in (0.0, 0.5, 1.0)]
    input_spread = [_spread(FedProxClients.build(300, 0.0, b), ids)[1] for b in (0.0, 0.5, 1.0)]
    assert model_spread[0] < model_spread[1] < model_spread[2]
    assert input_spread[0] < input_spread[1] < input_spread[2]
    # α moves the models, not the inputs; β the inputs, not the models
    assert abs(_spread(FedProxClients.build(300, 1.0, 0.0), ids)[1] - input_spread[0]) < 0.05
    # and the labels follow: clients of Synthetic(1, 1) disagree on a shared input far more
    x = np.random.default_rng(0).standard_normal((500, FEATURES))

    def disagreement(clients):
        labels = [np.argmax(x @ m.weight + m.bias, 1) for m in map(clients.model, range(20))]
        return np.mean([np.mean(labels[i] != labels[0]) for i in range(1, 20)])

    iid = FedProxClients.build(20, 1.0, 1.0, iid=True)
    assert disagreement(iid) == 0.0
    assert disagreement(FedProxClients.build(20, 1.0, 1.0)) > 0.5


def test_iid_clients_share_one_model_and_zero_input_means() -> None:
    clients = FedProxClients.build(5, 1.0, 1.0, iid=True)
    a, b = clients.model(0), clients.model(4)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert not a.input_mean.any()


def test_a_million_registered_clients_cost_only_their_sizes(tmp_path) -> None:
    run = prepare(synthetic_config(**{"data.partition.num_clients": 1_000_000}), tmp_path)
    partition = run.task.partition
    assert partition.num_clients == 1_000_000 and partition.generated
    assert partition.offsets.nbytes == 8 * 1_000_001
    assert run.task.dataset.train is None
    assert len(run.task.dataset.test) == 20 * 20
    assert not (tmp_path / "label_histograms.parquet").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"data.alpha": -1}, "data.alpha: must be >= 0 (got -1.0)"),
    ({"data.beta": -0.5}, "data.beta: must be >= 0 (got -0.5)"),
    ({"data.synthetic_fedprox.beta": 0.5}, "data.synthetic_fedprox.beta: moved to data.beta"),
    ({"data.partition.alpha": 0.5}, "unknown key 'data.partition.alpha' for partition kind "
                                    "'natural'; valid keys here: kind, num_clients"),
    ({"data.partition.kind": "dirichlet"},
     "data.partition.kind: synthetic_fedprox generates each client's own samples: set "
     "data.partition.kind: natural"),
    ({"data.partition.num_clients": 0}, "data.partition.num_clients: must be >= 1"),
])
def test_bad_synthetic_configs_get_one_line(override, message) -> None:
    with pytest.raises(ConfigError) as error:
        synthetic_config(**override)
    assert str(error.value) == message


@pytest.mark.slow
def test_generated_clients_train_the_same_on_ray_workers_as_locally(ray_session, tmp_path):
    local, w_local, _ = run_rounds(synthetic_config(**{"resources.backend": "local"}),
                                   tmp_path / "local", num_workers=1)
    on_ray, w_ray, _ = run_rounds(synthetic_config(), tmp_path / "ray")
    assert without_timing(local) == without_timing(on_ray)
    assert all(torch.equal(w_local[k], w_ray[k]) for k in w_ray)
    assert 0.0 <= on_ray[-1].metrics["test_accuracy"] <= 1.0
    assert on_ray[-1].metrics["samples"] > 0


def test_prototype_methods_run_on_the_mlp(tmp_path) -> None:
    config = synthetic_config(**{"resources.backend": "local", "model.name": "mlp",
                                 "algorithm.name": "fedproto", "rounds": 2})
    results, _, _ = run_rounds(config, tmp_path)
    assert np.isfinite(results[-1].metrics["test_accuracy"])
    with pytest.raises(ConfigError, match="has no feature head"):
        synthetic_config(**{"algorithm.name": "fedproto"})
