"""Client groups: K clients trained at once give each client what training it alone gives
(to the tolerance stated per test), from its own batches, with masks for unequal clients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from algorithms.fedavg import FedAvg
from algorithms.fedproto import FedProto, PrototypeBroadcast
from algorithms.fedprox import FedProx
from algorithms.fpl import FPL
from algorithms.moon import MOON
from algorithms.scaffold import SCAFFOLD, ControlBroadcast
from raysim.algorithm import (
    ClientContext,
    ServerContext,
    TaskInfo,
    copy_weights,
    ungroupable_reason,
)
from raysim.config import ConfigError, TrainConfig
from raysim.data import DatasetSpec
from raysim.engine.grouped import (
    assign_groups,
    check_client_group,
    check_group_memory,
    check_grouping,
    client_groups,
    train_clients,
)
from raysim.nn import client_groups as cg
from raysim.nn.models import MLP, LogisticRegression, SmallCNN
from raysim.nn.training import ClientData, Preprocess
from raysim.registry import algorithm_class
from raysim.run.validate import config_from_dict

CPU = torch.device("cpu")
DIGITS = DatasetSpec("d", 10, (1, 8, 8), (0.5,), (0.25,), 16.0, None)
SIZES = [27, 21, 1, 30, 12]  # unequal; 21 % 10 == 1 leaves a single sample behind each epoch
# the worst client weight after a round, grouped − alone, may differ by this (measured: ≤ 3e-8)
TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def digit_clients(sizes=SIZES, spec=DIGITS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randint(0, 17, (n, *spec.input_shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    pre = Preprocess(spec, CPU)
    cuts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    perm = torch.randperm(n, generator=g)
    return [ClientData(x, y, perm[a:b], pre) for a, b in zip(cuts, cuts[1:])]


def contexts(train, count, round_index=2):
    return [ClientContext(k, round_index, torch.Generator().manual_seed(100 + k), CPU, train)
            for k in range(count)]


def alone_and_grouped(method, model, datas, broadcast, states, train):
    """Each client's update trained alone and in one group, from identical inputs."""
    alone = [method.client_update(ctx, model, broadcast, d, s)
             for ctx, d, s in zip(contexts(train, len(datas)), datas, states)]
    grouped = train_clients(method, [model] * len(datas), datas, contexts(train, len(datas)),
                            broadcast, states)
    return alone, grouped


def assert_close(alone, grouped, tolerance=TOLERANCE):
    assert len(alone) == len(grouped)
    for a, g in zip(alone, grouped):
        assert a.num_samples == g.num_samples and a.num_steps == g.num_steps
        assert a.metrics["train_steps"] == g.metrics["train_steps"]
        assert a.metrics["train_loss"] == pytest.approx(g.metrics["train_loss"], rel=1e-5)
        for name, tensor in a.weights.items():
            torch.testing.assert_close(g.weights[name], tensor, atol=tolerance, rtol=0)


def task(train, feature_dim=None):
    return TaskInfo(num_classes=10, input_shape=(1, 8, 8), feature_dim=feature_dim, train=train,
                    seed=1, num_clients=5)


# ------------------------------------------------------------------------------- batches


def test_group_batches_are_each_clients_own_batches_in_order():
    datas = digit_clients()
    gathered = list(cg.group_batches(datas, [torch.Generator().manual_seed(k) for k in
                                             range(5)], 10, 2))
    for k, data in enumerate(datas):
        g = torch.Generator().manual_seed(k)
        alone = [b for _ in range(2) for b in data.batches(10, g)]
        mine = [(bk.x[bk.positions.index(k)], bk.y[bk.positions.index(k)])
                for step in gathered for bk in step if k in bk.positions]
        assert len(mine) == len(alone) == 2 * cg.epoch_steps(len(data), 10)
        for (x, y), (xa, ya) in zip(mine, alone):
            assert torch.equal(x, xa) and torch.equal(y, ya)
    # each step's buckets hold one batch size each, every client at most once
    for step in gathered:
        seen = [p for bk in step for p in bk.positions]
        assert len(seen) == len(set(seen))
        assert all(bk.x.shape[0] == len(bk.positions) for bk in step)


def test_generated_clients_and_augmented_batches_match_too():
    g = torch.Generator().manual_seed(1)
    own = [ClientData(torch.randn(n, 1, 1, 6, generator=g), torch.randint(0, 3, (n,), generator=g),
                      torch.arange(n), Preprocess(DatasetSpec("v", 3, (1, 1, 6), (0.0,), (1.0,),
                                                              1.0, None), CPU))
           for n in (5, 9)]
    augmented = digit_clients([13, 6], dataclasses.replace(DIGITS, augment="crop_flip"))
    for datas in (own, augmented):
        steps = list(cg.group_batches(datas, [torch.Generator().manual_seed(k) for k in (0, 1)],
                                      4, 1))
        for k, data in enumerate(datas):
            alone = list(data.batches(4, torch.Generator().manual_seed(k)))
            mine = [bk.x[bk.positions.index(k)] for s in steps for bk in s if k in bk.positions]
            assert all(torch.equal(a, b) for (a, _), b in zip(alone, mine, strict=True))


# ------------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
])
def test_stacked_optimiser_is_torchs_update_and_a_finished_client_stays_put(make):
    g = torch.Generator().manual_seed(0)
    starts = [torch.randn(3, 4, generator=g) for _ in range(2)]
    grads = [[torch.randn(3, 4, generator=g) for _ in range(5)] for _ in range(2)]
    alone = []
    for k, steps in enumerate((5, 3)):  # client 1 stops after 3 steps
        p = nn.Parameter(starts[k].clone())
        opt = make([p])
        for t in range(steps):
            p.grad = grads[k][t].clone()
            opt.step()
        alone.append(p.detach())
    holder = nn.Parameter(starts[0].clone())
    settings = cg.StackedSettings.of(make([holder]), [holder])
    params = {"w": torch.stack(starts)}
    stacked = cg.StackedOptimizer(settings, params, 2)
    for t in range(3):
        stacked.step(params, {"w": torch.stack([grads[0][t], grads[1][t]])})
    for t in range(3, 5):  # client 1 has finished: only client 0 steps
        stacked.step(params, {"w": grads[0][t][None]}, torch.tensor([0]))
    for k in range(2):
        torch.testing.assert_close(params["w"][k], alone[k], atol=1e-6, rtol=1e-6)


def test_optimisers_without_a_stacked_form_are_named():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(cg.UnsupportedOptimizer, match="nesterov"):
        cg.StackedSettings.of(torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True), [p])
    with pytest.raises(cg.UnsupportedOptimizer, match="RMSprop"):
        cg.StackedSettings.of(torch.optim.RMSprop([p], lr=0.1), [p])


# ------------------------------------------------------------------------------- methods


TRAIN = TrainConfig(local_epochs=1, batch_size=10, lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("make_model", [
    lambda: LogisticRegression((1, 8, 8), 10),
    lambda: MLP((1, 8, 8), 10, width=32),
    lambda: SmallCNN((1, 8, 8), 10, feature_dim=16),
])
def test_fedavg_group_gives_each_client_its_own_training(make_model):
    """Unequal sizes (one client of a single sample), 2 epochs, momentum, weight decay."""
    torch.manual_seed(0)
    model = make_model()
    train = dataclasses.replace(TRAIN, local_epochs=2)
    method = FedAvg(None, task(train), CPU)
    broadcast = method.broadcast(method.init_server(model))
    assert_close(*alone_and_grouped(method, model, digit_clients(), broadcast, [None] * 5,
                                    train))


def test_finish_sees_each_client_with_its_trained_weights_in_the_model():
    """What the worker does after a client's step (privacy, diagnostics) reads the model."""
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = FedAvg(None, task(TRAIN), CPU)
    broadcast = method.broadcast(method.init_server(model))

    def finish(position, update):
        held = model.state_dict()
        assert all(torch.equal(held[n], update.weights[n]) for n in held)
        return position, update.num_samples

    datas = digit_clients()
    results = train_clients(method, [model] * 5, datas, contexts(TRAIN, 5), broadcast,
                            [None] * 5, finish)
    assert results == [(k, len(d)) for k, d in enumerate(datas)]


def test_adam_with_per_client_step_counts():
    train = dataclasses.replace(TRAIN, optimizer="adam", lr=0.01)
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = FedAvg(None, task(train), CPU)
    broadcast = method.broadcast(method.init_server(model))
    assert_close(*alone_and_grouped(method, model, digit_clients(), broadcast, [None] * 5,
                                    train))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_kept_optimiser_state_goes_on_per_client_as_alone(optimizer):
    """`train.keep_optimizer_state`: each client's momentum (SGD) or moments and step count
    (Adam) come from its last round and go to its next, as its own torch optimiser's; a
    client without a last round (the third) starts fresh, as alone."""
    train = dataclasses.replace(TRAIN, optimizer=optimizer, keep_optimizer_state=True,
                                lr=0.01 if optimizer == "adam" else TRAIN.lr)
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = FedAvg(None, task(train), CPU)
    broadcast = method.broadcast(method.init_server(model))
    datas = digit_clients()
    alone, grouped = alone_and_grouped(method, model, datas, broadcast, [None] * 5, train)
    assert_close(alone, grouped)
    forget = 2  # this client comes back without a state
    states = [[None if k == forget else u.state for k, u in enumerate(run)]
              for run in (alone, grouped)]
    again_alone = [method.client_update(ctx, model, broadcast, d, s)
                   for ctx, d, s in zip(contexts(train, 5, round_index=3), datas, states[0])]
    again_grouped = train_clients(method, [model] * 5, datas, contexts(train, 5, round_index=3),
                                  broadcast, states[1])
    assert_close(again_alone, again_grouped)
    # the kept state is used: client 0 resumed lands far from where a fresh start lands
    fresh = method.client_update(contexts(train, 5, round_index=3)[0], model, broadcast,
                                 datas[0], None)
    assert max((again_grouped[0].weights[n] - w).abs().max().item()
               for n, w in fresh.weights.items()) > 1e-3  # measured 0.026 (SGD), 0.030 (Adam)
    for a, g in zip(again_alone, again_grouped):  # the states each leaves for its next round
        mine, theirs = g.state["optimizer"], a.state["optimizer"]
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys() and mine["state"]
        for index, entry in theirs["state"].items():
            assert list(mine["state"][index]) == list(entry)
            for key, value in entry.items():
                assert mine["state"][index][key].dtype == value.dtype
                torch.testing.assert_close(mine["state"][index][key], value, atol=1e-5, rtol=0)


def test_fedprox_proximal_term():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = FedProx(FedProx.Config(mu=0.5), task(TRAIN), CPU)
    broadcast = method.broadcast(method.init_server(model))
    alone, grouped = alone_and_grouped(method, model, digit_clients(), broadcast, [None] * 5,
                                       TRAIN)
    assert_close(alone, grouped)
    plain = train_clients(FedAvg(None, task(TRAIN), CPU), [model] * 5, digit_clients(),
                          contexts(TRAIN, 5), broadcast, [None] * 5)
    # the proximal term changed the result: the comparison above is not FedAvg's
    assert (plain[0].weights["classifier.weight"] - grouped[0].weights["classifier.weight"]
            ).abs().max() > 10 * TOLERANCE


def test_scaffold_correction_and_control_update():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = SCAFFOLD(None, task(TRAIN), CPU)
    state = method.init_server(model)
    g = torch.Generator().manual_seed(5)
    control = {n: torch.randn(c.shape, generator=g) * 0.1 for n, c in state.control.items()}
    broadcast = ControlBroadcast(weights=state.weights, control=control)
    states = [None, {"control": {n: torch.randn(c.shape, generator=g) * 0.1
                                 for n, c in control.items()}}, None, None, None]
    alone, grouped = alone_and_grouped(method, model, digit_clients(), broadcast, states, TRAIN)
    assert_close(alone, grouped)
    for a, b in zip(alone, grouped):
        for n in control:
            torch.testing.assert_close(b.control_delta[n], a.control_delta[n], atol=1e-3,
                                       rtol=0)  # (x − y)/(Kη): the weight error over Kη


def test_moon_with_a_previous_model():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = MOON(MOON.Config(mu=1.0, tau=0.5), task(TRAIN, feature_dim=16), CPU)
    broadcast = method.broadcast(method.init_server(model))
    previous = {k: v + 0.05 * torch.randn_like(v) for k, v in broadcast.weights.items()}
    states = [None, {"previous": previous}, None, {"previous": previous}, None]
    assert_close(*alone_and_grouped(method, model, digit_clients(), broadcast, states, TRAIN))


def test_fedproto_prototype_term():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = FedProto(FedProto.Config(lam=1.0), task(TRAIN, feature_dim=16), CPU)
    g = torch.Generator().manual_seed(3)
    present = torch.tensor([True] * 7 + [False] * 3)  # some classes have no prototype yet
    broadcast = PrototypeBroadcast(weights=copy_weights(model),
                                   prototypes=torch.rand(10, 16, generator=g), present=present)
    alone, grouped = alone_and_grouped(method, model, digit_clients(), broadcast, [None] * 5,
                                       TRAIN)
    assert_close(alone, grouped)
    for a, b in zip(alone, grouped):  # after_training ran on each client's trained model
        torch.testing.assert_close(b.prototypes, a.prototypes, atol=1e-4, rtol=0)


def test_personal_models_start_from_each_clients_own_part():
    """LG-FedAvg: each client's body is its own (client state), the head the broadcast's."""
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, width=32)
    method = algorithm_class("lg_fedavg")(None, task(TRAIN, feature_dim=16), CPU)
    state = method.init_server(model)
    datas = digit_clients()
    first = [method.client_update(ctx, model, method.broadcast(state), d, None)
             for ctx, d in zip(contexts(TRAIN, 5, round_index=1), datas)]
    state = method.server_round(ServerContext(1, torch.Generator(), CPU), state, first)
    alone, grouped = alone_and_grouped(method, model, datas, method.broadcast(state),
                                       [u.state for u in first], TRAIN)
    assert_close(alone, grouped)
    for a, g in zip(alone, grouped):
        for name, tensor in a.state["personal"].items():
            torch.testing.assert_close(g.state["personal"][name], tensor, atol=TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------- declarations


def test_a_method_that_overrides_training_is_not_grouped_unless_it_says_so():
    class Custom(FedAvg):
        def local_objective(self, step):
            return super().local_objective(step)

    assert not Custom.groupable and "local_objective" in ungroupable_reason(Custom)
    assert FPL.groupable is False and "alignment_loss" in ungroupable_reason(FPL)
    with pytest.raises(TypeError, match="functional_loss is older"):
        class Stale(FedAvg):
            groupable = True

            def local_objective(self, step):
                return super().local_objective(step)
    with pytest.raises(TypeError, match="own train_locally"):
        class Looping(FedAvg):
            groupable = True

            def train_locally(self, step):
                return super().train_locally(step)


def test_client_group_errors_are_one_line_before_ray():
    with pytest.raises(ConfigError, match=r"^train\.client_group: must be >= 1") as error:
        config_from_dict({"train": {"client_group": 0}})
    assert "\n" not in str(error.value)
    strict = TrainConfig(client_group=8, client_group_strict=True)
    model = MLP((1, 8, 8), 10, width=8)
    with pytest.raises(ConfigError, match=r"FPL is not groupable.*alignment_loss") as error:
        check_client_group(FPL(None, task(strict), CPU), model, strict)
    assert "\n" not in str(error.value)
    lenient = dataclasses.replace(strict, client_group_strict=False)
    note = check_client_group(FPL(None, task(lenient), CPU), model, lenient)
    assert "one by one" in note and "\n" not in note
    batchnorm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert "BatchNorm" in check_client_group(FedAvg(None, task(lenient), CPU), batchnorm, lenient)
    assert check_client_group(FedProx(None, task(lenient), CPU), model, lenient) is None
    # for a whole config, every architecture: the CNN groups, FPL does not
    config = config_from_dict({"algorithm": {"name": "fpl"},
                               "train": {"client_group": 4, "client_group_strict": True}})
    info = task(config.train, feature_dim=128)
    with pytest.raises(ConfigError, match="FPL is not groupable"):
        check_grouping(config, info)
    fedavg = dataclasses.replace(config, algorithm=config_from_dict({}).algorithm)
    assert check_grouping(fedavg, info) is None


def test_groups_are_the_same_whatever_the_worker_count():
    assert client_groups([9, 2, 7, 4, 1], 2) == [[1, 2], [4, 7], [9]]
    assert client_groups([3, 1], 8) == [[1, 3]]
    sampled = [3, 17, 5, 40, 22, 8, 31, 11, 2, 29, 14]
    costs = {c: (c * 7) % 13 + 1 for c in sampled}
    whole = client_groups(sampled, 3)
    for workers in (1, 2, 3, 5):
        assigned = assign_groups(sampled, costs, 3, workers)
        assert sorted(c for ids in assigned for c in ids) == sorted(sampled)
        # each worker re-forms exactly the groups it was handed
        assert sorted(g for ids in assigned for g in client_groups(ids, 3)) == sorted(whole)


def test_a_group_too_large_for_memory_names_the_k_that_fits():
    model = SmallCNN((1, 8, 8), 10, feature_dim=16)
    sample = torch.zeros(16, 1, 8, 8)
    one = cg.group_bytes(model, sample, 1, "sgd")
    assert cg.group_bytes(model, sample, 10, "sgd") == 10 * one
    assert one > sum(p.numel() * 4 for p in model.parameters())  # weights, moments, activations
    train = TrainConfig(batch_size=16, client_group=64)
    with pytest.raises(ConfigError, match=r"^train\.client_group: 64 clients .* client_group: 10 "
                                          r"fits$"):
        check_group_memory(model, (1, 8, 8), train, 10 * one + 1)
    check_group_memory(model, (1, 8, 8), train, 64 * one)  # fits: no error
