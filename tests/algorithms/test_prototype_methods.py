"""MOON, FedProto, FPL and FedTGP: losses against hand-computed values, server steps, and short
end-to-end runs on a real local Ray."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config

from algorithms.fedproto import FedProto, PrototypeUpdate, aggregate_prototypes, prototype_alignment
from algorithms.fedtgp import FedTGP, adaptive_margin, margin_contrastive_loss
from algorithms.fpl import cluster_contrastive_loss
from algorithms.moon import model_contrastive_loss
from raysim.algorithm import ServerContext, TaskInfo
from raysim.config import ConfigError, TrainConfig
from raysim.engine.simulation import Simulation
from raysim.methods.prototypes import class_means, cluster_prototypes
from raysim.run import prepare
from raysim.run.validate import config_from_dict


def update(prototypes, counts):
    return PrototypeUpdate(weights={}, num_samples=int(sum(counts)),
                           prototypes=torch.as_tensor(prototypes, dtype=torch.float32),
                           counts=torch.tensor(counts))


# ------------------------------------------------------------------ MOON


def test_moon_contrastive_loss_by_hand():
    z, z_glob, z_prev = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor(
        [[0.0, 3.0]])
    # cos(z, z_glob) = 1, cos(z, z_prev) = 0, τ = 0.5 → −log(e² / (e² + e⁰)) = log(1 + e^−2)
    loss = model_contrastive_loss(z, z_glob, z_prev, tau=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # when the previous model equals the global one the term is the constant log 2
    assert model_contrastive_loss(z, z_glob, z_glob, 0.5).item() == pytest.approx(math.log(2))


# ------------------------------------------------------------------ FedProto


def test_class_means_are_masked_means():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    means, counts = class_means(features, torch.tensor([0, 0, 2]), 3)
    assert torch.equal(counts, torch.tensor([2, 0, 1]))
    assert torch.allclose(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))


def test_fedproto_server_prototypes_are_per_class_means_of_what_clients_sent():
    a = update([[1.0, 0.0], [0.0, 0.0], [4.0, 4.0]], [3, 0, 1])
    b = update([[3.0, 2.0], [5.0, 5.0], [0.0, 0.0]], [1, 2, 0])
    weighted, present = aggregate_prototypes([a, b], weighted=True)
    assert torch.equal(present, torch.tensor([True, True, True]))
    # class 0: (3·[1,0] + 1·[3,2]) / 4; class 1 only from b; class 2 only from a
    assert torch.allclose(weighted, torch.tensor([[1.5, 0.5], [5.0, 5.0], [4.0, 4.0]]))
    uniform, _ = aggregate_prototypes([a, b], weighted=False)
    assert torch.allclose(uniform[0], torch.tensor([2.0, 1.0]))
    _, absent = aggregate_prototypes([update([[1.0, 1.0], [0.0, 0.0]], [2, 0])])
    assert torch.equal(absent, torch.tensor([True, False]))


def test_fedproto_alignment_by_hand():
    features = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    prototypes = torch.tensor([[0.0, 1.0], [9.0, 9.0]])
    # sample 0 (class 0): squared error 1 + 0; sample 1 (class 1) has no prototype: adds 0
    value = prototype_alignment(features, torch.tensor([0, 1]), prototypes,
                                torch.tensor([True, False]))
    assert value.item() == pytest.approx(1.0 / 4)  # mean over B·d = 4 elements


def test_fedproto_nearest_prototype_inference():
    info = TaskInfo(2, (1, 2, 2), 2, TrainConfig())
    algo = FedProto(FedProto.Config(inference="prototype"), info)

    class Identity(torch.nn.Module):
        def forward(self, x):
            from raysim.nn.models import ModelOutput

            return ModelOutput(x, -x)  # logits would predict the wrong class

    from algorithms.fedproto import PrototypeBroadcast

    broadcast = PrototypeBroadcast({}, torch.tensor([[0.0, 0.0], [5.0, 5.0]]),
                                   torch.tensor([True, True]))
    x, y = torch.tensor([[0.1, 0.2], [4.0, 6.0]]), torch.tensor([0, 1])
    assert algo.evaluate_batch(Identity(), broadcast, x, y)["accuracy"] == 2


# ------------------------------------------------------------------ FPL


def test_fpl_cluster_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    clusters = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    loss = cluster_contrastive_loss(z, torch.tensor([0, 1]), clusters, labels, tau=1.0)
    lse = math.log(math.e + 1 + math.exp(-1))  # cosines 1, 0, −1
    assert loss[0].item() == pytest.approx(lse - 1, rel=1e-6)  # one positive
    assert loss[1].item() == pytest.approx(lse - math.log(1 + math.exp(-1)), rel=1e-6)  # two


def test_fpl_server_clusters_each_class_and_handles_a_class_held_by_one_client():
    # class 0: four clients in two tight pairs (FINCH keeps 2 clusters); class 1: one client
    protos = [[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.99, 0.1, 0.0], [0.0, 0.0, 0.0]],
              [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[0.1, 0.0, 0.99], [0.0, 1.0, 1.0]]]
    counts = [[5, 0], [5, 0], [5, 0], [5, 3]]
    clusters, labels, unbiased, present = cluster_prototypes(
        [torch.tensor(p) for p in protos], [torch.tensor(c) for c in counts], 2)
    assert labels.tolist() == [0, 0, 1]
    assert torch.allclose(clusters[0], torch.tensor([0.995, 0.05, 0.0]))
    assert torch.allclose(clusters[1], torch.tensor([0.05, 0.0, 0.995]))
    assert torch.allclose(unbiased[0], clusters[:2].mean(0))
    assert torch.allclose(unbiased[1], torch.tensor([0.0, 1.0, 1.0]))
    assert present.tolist() == [True, True]


# ------------------------------------------------------------------ FedTGP


def test_fedtgp_margin_and_loss_by_hand():
    q = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert adaptive_margin(q, 100.0) == pytest.approx(4.0)  # max over classes of nearest gap
    assert adaptive_margin(q, 2.0) == 2.0
    assert adaptive_margin(q[:1], 7.0) == 7.0
    loss = margin_contrastive_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]),
                                   torch.tensor([[1.0, 0.0], [3.0, 0.0]]), margin=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)


def test_fedtgp_server_step_lowers_its_loss_and_keeps_its_generator():
    info = TaskInfo(3, (1, 8, 8), 4, TrainConfig(lr=0.05, batch_size=4))
    algo = FedTGP(FedTGP.Config(server_epochs=30), info)
    g = torch.Generator().manual_seed(0)
    updates = [update(torch.randn(3, 4, generator=g) + 3 * torch.eye(3, 4), [2, 2, 2])
               for _ in range(5)]
    state = algo.init_server(torch.nn.Linear(1, 1))
    ctx = ServerContext(1, torch.Generator().manual_seed(1), torch.device("cpu"))
    first = algo.server_round(ctx, state, updates)
    assert first.metrics["tgp_loss_last"] < 0.8 * first.metrics["tgp_loss_first"]
    assert first.prototypes.shape == (3, 4) and first.present.all()
    kept = {k: v.clone() for k, v in first.generator.items()}
    second = algo.server_round(ServerContext(2, torch.Generator().manual_seed(2),
                                             torch.device("cpu")), first, updates)
    # the state is data: round 2 trains a copy, round 1's state stays as it was (so a round can
    # run again from it), and F and its optimiser state are there for a checkpoint
    assert all(torch.equal(kept[k], first.generator[k]) for k in kept)
    assert not torch.equal(second.generator["fc.weight"], first.generator["fc.weight"])
    assert second.generator_optimizer["param_groups"][0]["lr"] == 0.05
    # trained further, not re-initialised: round 2 starts about where round 1 stopped
    assert second.metrics["tgp_loss_first"] < 0.8 * first.metrics["tgp_loss_first"]


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(("raw", "message"), [
    ({"algorithm": {"name": "fedproto", "lam": 0}}, "algorithm.lam: must be > 0"),
    ({"algorithm": {"name": "fpl", "tau": -0.1}}, "algorithm.tau: must be > 0"),
    ({"algorithm": {"name": "moon", "tau": 0}}, "algorithm.tau: must be > 0"),
    ({"algorithm": {"name": "moon", "mu": 0}}, "algorithm.mu: must be > 0"),
    ({"algorithm": {"name": "fedtgp", "lam": -1}}, "algorithm.lam: must be > 0"),
    ({"algorithm": {"name": "fedproto", "inference": "knn"}}, "algorithm.inference: choose"),
    ({"algorithm": {"name": "fpl"}, "model": {"name": "logreg"}},
     "algorithm.name: fpl works on the model's features, but model 'logreg' has no feature head"),
])
def test_prototype_method_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_baselines_still_run_on_a_model_without_features(tmp_path):
    config = small_config(**{"model.name": "logreg", "algorithm.name": "fedprox", "rounds": 1,
                             "resources.backend": "local"})
    (result,), _ = run(config, tmp_path)
    assert result.metrics["clients_ok"] == 4 and math.isfinite(result.metrics["train_loss"])


# ------------------------------------------------------------------ end to end


def run(config, tmp_path, num_workers=2):
    simulation = Simulation(config, prepare(config, tmp_path).task, num_workers=num_workers)
    simulation.start()
    try:
        return list(simulation.rounds()), simulation
    finally:
        simulation.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moon", "fedproto", "fpl", "fedtgp"])
def test_each_method_learns_above_chance(tmp_path, name):
    # in one process: the backends give the same bits (test_engine, test_fedhpro)
    config = small_config(**{"algorithm.name": name, "rounds": 4, "train.local_epochs": 2,
                             "diagnostics.anchors": True, "resources.backend": "local"})
    results, _ = run(config, tmp_path)
    metrics = results[-1].metrics
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1
    assert metrics["clients_failed"] == 0
    has_anchors = name != "moon"  # the global anchors of the prototype methods are diagnosed
    assert ("anchor_cosine" in metrics) == has_anchors
    assert ("anchor_self_accuracy" in metrics) == has_anchors


@pytest.mark.slow
def test_moon_previous_model_follows_the_client_across_workers(ray_session, tmp_path):
    import ray

    config = small_config(**{"algorithm.name": "test_algorithms:RecordingMOON", "rounds": 5})
    simulation = Simulation(config, prepare(config, tmp_path).task, num_workers=2)
    simulation.start()
    try:
        list(simulation.rounds())
        states = ray.get(simulation.server.states_for.remote(list(range(12))))
    finally:
        simulation.shutdown()
    moved = 0
    for state in filter(None, states):
        history = state["history"]
        assert history[0][2] is None  # first participation: no previous model yet
        for before, after in zip(history, history[1:]):
            assert after[2] == before[3]  # the model it was given = the one it produced last
            moved += after[1] != before[1]
    assert moved > 0  # some client really resumed on the other worker


@pytest.mark.slow
def test_digits_domains_reports_each_domain_and_their_mean(tmp_path):
    raw = {"rounds": 1, "clients_per_round": 4, "logging": {"progress": False},
           "resources": {"backend": "local"},
           "data": {"dataset": "digits_domains",
                    "partition": {"kind": "domains", "num_clients": 8, "within": "dirichlet"}},
           "train": {"local_epochs": 1}}
    results, _ = run(config_from_dict(raw), tmp_path)
    metrics = results[-1].metrics
    domains = ["mnist", "usps", "svhn", "syn"]
    per_domain = [metrics[f"test_accuracy/{d}"] for d in domains]
    assert metrics["test_accuracy"] == pytest.approx(sum(per_domain) / 4)
    assert all(0 <= a <= 1 for a in per_domain)
