"""SCAFFOLD's corrected local step, its option-II control variates and its server update,
checked against numbers computed by hand on a 2×2 linear model; and a real run."""

from __future__ import annotations

import pytest
import torch
from conftest import in_one_process, run_rounds, small_config
from test_fedhpro import LinearHead, identity_data

from algorithms.scaffold import SCAFFOLD, ControlState, ControlUpdate
from raysim.algorithm import ClientContext, ServerContext, TaskInfo
from raysim.config import TrainConfig

CPU = torch.device("cpu")
TRAIN = TrainConfig(local_epochs=1, batch_size=4, lr=0.1)


def zero_model() -> LinearHead:
    model = LinearHead(2, 2)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    return model


def method(global_lr: float = 1.0) -> SCAFFOLD:
    return SCAFFOLD(SCAFFOLD.Config(global_lr=global_lr),
                    TaskInfo(2, (1, 1, 2), 2, TRAIN, num_clients=4))


def test_one_corrected_step_and_option_two_control_variate_by_hand():
    algo = method()
    c = {"classifier.weight": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
         "classifier.bias": torch.tensor([0.5, -0.5])}
    c_i = {"classifier.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
           "classifier.bias": torch.tensor([0.0, 1.0])}
    state = ControlState(weights=zero_model().state_dict(), control=c)
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), CPU, TRAIN)
    x, y = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([0])
    update = algo.client_update(ctx, zero_model(), algo.broadcast(state), identity_data(x, y),
                                {"control": c_i})
    # zero weights: softmax = (½, ½), so ∂CE/∂logits = (−½, ½) and g = that ⊗ (x, 1)
    g = {"classifier.weight": torch.tensor([[-0.5, -1.0], [0.5, 1.0]]),
         "classifier.bias": torch.tensor([-0.5, 0.5])}
    assert update.metrics["train_steps"] == 1 and update.num_steps == 1
    for name in g:
        # y = x − η (g − c_i + c), one step from x = 0
        expected = -0.1 * (g[name] - c_i[name] + c[name])
        assert torch.allclose(update.weights[name], expected, atol=1e-6)
        # option II with K = 1: c_i⁺ = c_i − c + (x − y)/η = g
        assert torch.allclose(update.state["control"][name], g[name], atol=1e-6)
        assert torch.allclose(update.control_delta[name], g[name] - c_i[name], atol=1e-6)


def test_first_round_starts_from_zero_control_variates():
    algo = method()
    state = algo.init_server(zero_model())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in state.control.values())
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), CPU, TRAIN)
    x, y = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([0])
    update = algo.client_update(ctx, zero_model(), algo.broadcast(state), identity_data(x, y),
                                None)  # no correction: plain SGD, and c_i⁺ = g
    assert torch.allclose(update.weights["classifier.bias"], torch.tensor([0.05, -0.05]))
    assert torch.allclose(update.state["control"]["classifier.bias"], torch.tensor([-0.5, 0.5]))


@pytest.mark.parametrize("global_lr", [1.0, 0.5])
def test_server_moves_weights_by_eta_g_and_control_by_the_sampled_share(global_lr):
    algo = method(global_lr)
    x0 = {"classifier.weight": torch.ones(2, 2), "classifier.bias": torch.zeros(2)}
    c = {"classifier.weight": torch.zeros(2, 2), "classifier.bias": torch.ones(2)}
    state = ControlState(weights=x0, control=c)
    ups = [ControlUpdate(weights={"classifier.weight": torch.full((2, 2), w),
                                  "classifier.bias": torch.full((2,), w)}, num_samples=n,
                         control_delta={"classifier.weight": torch.full((2, 2), d),
                                        "classifier.bias": torch.full((2,), d)})
           for w, n, d in ((3.0, 1, 2.0), (5.0, 3, 4.0))]
    new = algo.server_round(ServerContext(1, torch.Generator(), CPU), state, ups)
    mean = (3.0 * 1 + 5.0 * 3) / 4  # the sample-weighted ȳ = 4.5
    assert torch.allclose(new.weights["classifier.weight"],
                          torch.full((2, 2), 1.0 + global_lr * (mean - 1.0)))
    assert torch.allclose(new.weights["classifier.bias"], torch.full((2,), global_lr * mean))
    # c + |S|/N · mean Δc = 1 + 2/4 · 3
    assert torch.allclose(new.control["classifier.bias"], torch.full((2,), 2.5))
    assert torch.allclose(new.control["classifier.weight"], torch.full((2, 2), 1.5))


@pytest.mark.slow
def test_scaffold_runs_deterministically_and_keeps_control_variates(ray_session, tmp_path):
    config = small_config(**{"algorithm.name": "scaffold", "rounds": 4, "train.local_epochs": 2})
    # in one process, and on two Ray workers: the same weights
    one, w1, states = run_rounds(in_one_process(config), tmp_path / "local")
    two, w2, _ = run_rounds(config, tmp_path, num_workers=2)
    assert [r.metrics for r in one][-1]["clients_failed"] == 0
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(s is not None and "control" in s for s in states)
    assert one[-1].metrics["test_accuracy"] > 0.3  # chance is 0.1
