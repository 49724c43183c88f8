"""The personalised methods (Local, FedAvg+FT, FedPer, LG-FedAvg, FedRep, FedGH and FedProto /
FedTGP in their own protocol): each one's distinctive step on a tiny model against values
computed here, then one short personalised run per method on the local backend."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.fedavg_ft import FedAvgFT
from algorithms.fedgh import FedGH, train_header
from algorithms.fedper import FedPer
from algorithms.fedproto_personal import FedProtoPersonal
from algorithms.fedrep import FedRep
from algorithms.fedtgp_personal import FedTGPPersonal
from algorithms.lg_fedavg import LGFedAvg
from algorithms.local import Local
from raysim.algorithm import (
    Broadcast,
    ClientContext,
    LocalRound,
    ServerContext,
    TaskInfo,
    copy_weights,
)
from raysim.config import ConfigError, TrainConfig
from raysim.nn.models import ModelOutput
from raysim.nn.training import ClientData, make_optimizer

CPU = torch.device("cpu")
BODY = {"body.weight", "body.bias"}
HEAD = {"classifier.weight", "classifier.bias"}


class Tiny(nn.Module):
    """A body (Linear 2→3, ReLU: the features) and a `classifier` head (Linear 3→2)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Linear(2, 3)
            self.classifier = nn.Linear(3, 2)

    def forward(self, x):
        features = F.relu(self.body(x))
        return ModelOutput(features, self.classifier(features))


class AsStored:
    def batch(self, x, y, generator=None):
        return x, y


def client_data(n: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return ClientData(x, y, torch.arange(n), AsStored())


def task(**train) -> TaskInfo:
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "batch_size": 4,
                "local_epochs": 1, **train}
    return TaskInfo(2, (1, 1, 2), 3, TrainConfig(**settings))


def context(info: TaskInfo, initial=None, seed: int = 0) -> ClientContext:
    return ClientContext(0, 1, torch.Generator().manual_seed(seed), CPU, info.train,
                         initial_weights=initial)


def server_context() -> ServerContext:
    return ServerContext(1, torch.Generator().manual_seed(5), CPU)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ Local


def test_local_uploads_nothing_but_counts_and_keeps_its_whole_model():
    info = task()
    algo, model, initial = Local(task=info), Tiny(seed=1), copy_weights(Tiny(seed=2))
    state = algo.init_server(model)
    assert state.weights == {}
    update = algo.client_update(context(info, initial), model, algo.broadcast(state),
                                client_data(), None)
    assert update.weights == {} and update.num_samples == 10
    assert update.state.keys() == {"personal"}
    kept = update.state["personal"]
    assert same(kept, copy_weights(model))  # the trained model, all of it
    assert not same(kept, initial)
    # the server learns nothing and sends nothing
    assert algo.server_round(server_context(), state, [update, update]).weights == {}
    # the next round starts from what the client kept, not from the initial weights
    step = LocalRound(context(info, initial), Tiny(seed=3), Broadcast({}), client_data(),
                      update.state)
    algo.load_weights(step)
    assert same(copy_weights(step.model), kept)


def test_a_personal_model_starts_from_its_architectures_initial_weights():
    info = task()
    initial = copy_weights(Tiny(seed=2))
    step = LocalRound(context(info, initial), Tiny(seed=3), Broadcast({}), client_data(), None)
    Local(task=info).load_weights(step)
    assert same(copy_weights(step.model), initial)


# ------------------------------------------------------------------ FedPer and LG-FedAvg


@pytest.mark.parametrize(("method", "shared", "kept"), [(FedPer, BODY, HEAD),
                                                         (LGFedAvg, HEAD, BODY)])
def test_only_the_shared_part_is_sent_and_averaged_and_the_rest_stays(method, shared, kept):
    info = task()
    algo = method(task=info)
    state = algo.init_server(Tiny(seed=0))
    assert state.weights.keys() == shared
    updates, models = [], []
    for k, n in enumerate([10, 6]):
        model = Tiny(seed=0)
        data = client_data(n)
        update = algo.client_update(context(info, copy_weights(Tiny(seed=10 + k)), seed=k),
                                    model, algo.broadcast(state), data, None)
        assert update.weights.keys() == shared and update.num_samples == n
        assert update.state["personal"].keys() == kept
        assert same(update.state["personal"], {k: v for k, v in copy_weights(model).items()
                                               if k in kept})
        updates.append(update)
        models.append(model)
    averaged = algo.server_round(server_context(), state, updates).weights
    assert averaged.keys() == shared
    for name in shared:  # Σ n_k w_k / Σ n_k over the shared tensors only
        expected = (10 * updates[0].weights[name].double() +
                    6 * updates[1].weights[name].double()) / 16
        assert torch.allclose(averaged[name].double(), expected, atol=1e-7)
    # round 2: the broadcast's shared part and the client's own kept part, which the first
    # round trained from the client's initial weights (not from the server's model)
    step = LocalRound(context(info), Tiny(seed=4), Broadcast(averaged), client_data(),
                      updates[0].state)
    algo.load_weights(step)
    loaded = copy_weights(step.model)
    assert same({k: loaded[k] for k in shared}, averaged)
    assert same({k: loaded[k] for k in kept}, updates[0].state["personal"])


# ------------------------------------------------------------------ FedRep


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen():
    info = task()
    algo = FedRep(FedRep.Config(head_epochs=2), task=info)
    data = client_data(10)  # batches of 4: 4, 4, 2 → 3 steps an epoch
    start = Tiny(seed=1)

    # each phase on its own: only its part moves (momentum and weight decay included)
    step = LocalRound(context(info), copy.deepcopy(start), Broadcast({}), data, None)
    step.objective = algo.local_objective(step)
    step.optimizer = make_optimizer(step.model, info.train)
    before = copy_weights(step.model)
    algo.train_part(step, "head", 1)
    after_head = copy_weights(step.model)
    assert all(torch.equal(before[k], after_head[k]) for k in BODY)
    assert all(not torch.equal(before[k], after_head[k]) for k in HEAD)
    algo.train_part(step, "body", 1)
    after_body = copy_weights(step.model)
    assert all(torch.equal(after_head[k], after_body[k]) for k in HEAD)
    assert all(not torch.equal(after_head[k], after_body[k]) for k in BODY)
    assert all(p.requires_grad for p in step.model.parameters())  # restored

    # a client round: head_epochs of the head first (the same draws as a head-only run), then
    # the body, which leaves that head as it was
    model = copy.deepcopy(start)
    update = algo.client_update(context(info, seed=7), model, Broadcast(
        {k: v for k, v in copy_weights(start).items() if k in BODY}), data,
        {"personal": {k: v for k, v in copy_weights(start).items() if k in HEAD}})
    alone = LocalRound(context(info, seed=7), copy.deepcopy(start), Broadcast({}), data, None)
    alone.objective = algo.local_objective(alone)
    alone.optimizer = make_optimizer(alone.model, info.train)
    algo.train_part(alone, "head", 2)
    head_only = copy_weights(alone.model)
    assert same(update.state["personal"], {k: head_only[k] for k in HEAD})
    assert update.weights.keys() == BODY
    assert all(not torch.equal(update.weights[k], copy_weights(start)[k]) for k in BODY)
    assert update.num_steps == 3 * (2 + 1)  # head_epochs + local_epochs, 3 steps each
    assert update.metrics["train_steps"] == 9.0 and "head_train_loss" in update.metrics


# ------------------------------------------------------------------ FedGH


def test_fedgh_server_header_step_is_one_cross_entropy_sgd_step_on_the_prototypes():
    header = {"classifier.weight": torch.tensor([[0.5, -1.0], [0.0, 2.0], [1.0, 1.0]]),
              "classifier.bias": torch.tensor([0.1, 0.0, -0.2])}
    reps = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    labels = torch.tensor([0, 2, 1])
    lr = 0.3
    new, losses = train_header(header, reps, labels, 1, lr, 8, torch.Generator(), CPU)
    # by hand: softmax p of z = R Wᵀ + b; ∂CE/∂z = (p − onehot)/N
    z = reps @ header["classifier.weight"].T + header["classifier.bias"]
    p = torch.softmax(z, 1)
    dz = (p - F.one_hot(labels, 3)) / 3
    assert torch.allclose(new["classifier.weight"],
                          header["classifier.weight"] - lr * dz.T @ reps, atol=1e-6)
    assert torch.allclose(new["classifier.bias"],
                          header["classifier.bias"] - lr * dz.sum(0), atol=1e-6)
    expected_loss = -torch.log(p[torch.arange(3), labels]).mean()
    assert losses[0] == pytest.approx(expected_loss.item(), rel=1e-6)


def test_fedgh_uploads_class_means_only_and_trains_the_header_on_the_classes_held():
    info = task()
    algo = FedGH(FedGH.Config(server_epochs=1, server_lr=0.5, server_batch_size=64), info)
    state = algo.init_server(Tiny(seed=0))
    assert state.weights.keys() == HEAD
    model, data = Tiny(seed=0), client_data(10)
    update = algo.client_update(context(info, copy_weights(Tiny(seed=3))), model,
                                algo.broadcast(state), data, None)
    assert update.weights == {}  # no weights leave the client
    assert update.state["personal"].keys() == BODY
    with torch.no_grad():
        features = model.eval()(data.x).features
    for c in range(2):
        held = data.y == c
        assert update.counts[c] == held.sum()
        assert torch.allclose(update.prototypes[c], features[held].mean(0), atol=1e-6)
    # the server's header is one SGD step of CE on the (class mean, class) pairs, 2 clients
    other = dataclasses.replace(update, prototypes=update.prototypes + 1.0,
                                counts=torch.tensor([4, 0]))  # holds class 0 only
    new = algo.server_round(server_context(), state, [update, other])
    reps = torch.stack([update.prototypes[0], update.prototypes[1], other.prototypes[0]])
    expected, _ = train_header(state.weights, reps, torch.tensor([0, 1, 0]), 1, 0.5, 64,
                               torch.Generator(), CPU)
    assert new.weights.keys() == HEAD
    assert all(torch.allclose(new.weights[k], expected[k], atol=1e-6) for k in HEAD)
    assert new.metrics["header_loss_first"] > 0
    # the next round's client replaces its header with the server's and keeps its extractor
    step = LocalRound(context(info), Tiny(seed=5), algo.broadcast(new), data, update.state)
    algo.load_weights(step)
    loaded = copy_weights(step.model)
    assert same({k: loaded[k] for k in HEAD}, new.weights)
    assert same({k: loaded[k] for k in BODY}, update.state["personal"])


# ------------------------------------------------------------------ FedAvg + FT


@pytest.mark.parametrize("from_evaluation", [0, 3])
def test_fedavg_ft_deploys_the_global_model_after_epochs_of_the_task_loss(from_evaluation):
    info = dataclasses.replace(task(), finetune_epochs=from_evaluation)
    algo = FedAvgFT(FedAvgFT.Config(finetune_epochs=2), info)
    epochs = from_evaluation or 2  # evaluation.personal.finetune_epochs takes precedence
    global_weights, data = copy_weights(Tiny(seed=1)), client_data(10)
    step = LocalRound(context(info, seed=9), Tiny(seed=4), Broadcast(global_weights), data,
                      None)
    deployed = algo.deployed_model(step)
    assert not deployed.training

    model = Tiny(seed=4)
    model.load_state_dict(global_weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    generator = torch.Generator().manual_seed(9)
    model.train()
    for _ in range(epochs):
        for x, y in data.batches(4, generator):
            loss = F.cross_entropy(model(x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert same(copy_weights(deployed), copy_weights(model))


def test_fedavg_ft_trains_and_averages_like_fedavg():
    from algorithms.fedavg import FedAvg

    info = task()
    updates = [method(task=info).client_update(context(info), Tiny(seed=1), Broadcast(
        copy_weights(Tiny(seed=2))), client_data(), None) for method in (FedAvg, FedAvgFT)]
    assert same(updates[0].weights, updates[1].weights)


# ------------------------------------------------------------------ FedProto, FedTGP personal


@pytest.mark.parametrize("method", [FedProtoPersonal, FedTGPPersonal])
def test_personal_prototype_methods_upload_prototypes_and_no_weights(method):
    info = task()
    config = method.Config(server_epochs=2) if method is FedTGPPersonal else method.Config()
    algo = method(config, info)
    state = algo.init_server(Tiny(seed=0))
    assert state.weights == {} and state.prototypes is None
    model = Tiny(seed=0)
    update = algo.client_update(context(info, copy_weights(Tiny(seed=1))), model,
                                algo.broadcast(state), client_data(), None)
    assert update.weights == {}
    assert update.prototypes.shape == (2, 3) and update.counts.sum() == 10
    assert same(update.state["personal"], copy_weights(model))
    new = algo.server_round(server_context(), state, [update])
    assert new.weights == {} and new.prototypes.shape == (2, 3)


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(("params", "message"), [
    ({"name": "fedrep", "head_epochs": 0}, "algorithm.head_epochs: must be >= 1"),
    ({"name": "fedgh", "server_lr": 0}, "algorithm.server_lr: must be > 0"),
    ({"name": "fedgh", "server_epochs": 0}, "algorithm.server_epochs: must be >= 1"),
    ({"name": "fedavg_ft", "finetune_epochs": 0}, "algorithm.finetune_epochs: must be >= 1"),
])
def test_personal_method_config_errors(params, message):
    from raysim.run.validate import config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"algorithm": params, "evaluation": {"personal": {}}})


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize(("name", "group"), [
    ("local", True), ("fedavg_ft", False), ("fedper", False), ("lg_fedavg", True),
    ("fedrep", False), ("fedgh", True), ("fedproto_personal", True), ("fedtgp_personal", True),
])
def test_each_method_runs_personalised(tmp_path, name, group):
    """Two rounds on the local backend, on the htfe4 group where the method runs on one: every
    client scored on its own test part; the server holds only what the method shares, each
    client keeps the rest (of its own architecture)."""
    from conftest import in_one_process, run_rounds, small_config

    from raysim.algorithm import weights_part
    from raysim.registry import algorithm_class

    overrides = {"algorithm.name": name, "rounds": 2, "evaluation.personal.every": 2}
    if name == "fedtgp_personal":
        overrides["algorithm.server_epochs"] = 5
    if group:
        overrides.update({"model.heterogeneous.models": "[htfe4]",
                          "model.heterogeneous.feature_dim": 16})
    config = in_one_process(small_config(**overrides))
    results, weights, states = run_rounds(config, tmp_path)
    method = algorithm_class(name)
    metrics = results[-1].metrics
    assert metrics["personal_clients"] == 12 and metrics["clients_ok"] == 4
    assert 0 <= metrics["personal_test_accuracy"] <= 1
    clients = {client for client, metric, _ in results[-1].client_metrics
               if metric == "personal_test_accuracy"}
    assert clients == set(range(12))
    assert ("test_accuracy" in metrics) == (method.shares == "model")  # a global model
    assert set(method.reported_metrics) <= set(metrics)
    if method.shares == "model":
        return
    trained = [state["personal"] for state in states if state is not None]
    assert trained  # the clients sampled so far
    # the server holds the shared part only; each client keeps exactly the rest
    some = trained[0]
    assert set(weights) == set(weights_part({**some, **weights}, method.shares))
    for kept in trained:
        assert not set(kept) & set(weights)
        if method.shares == "head":
            assert weights["classifier.weight"].shape == (10, 16 if group else 128)
    if group:  # clients of different architectures keep models of different layouts
        assert len({tuple(sorted(kept)) for kept in trained}) > 1
