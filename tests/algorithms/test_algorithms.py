"""Test-only algorithms, imported by worker processes as `test_algorithms:<Class>`, and the
exact-value checks of the bundled algorithms' losses."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.fedavg import FedAvg
from algorithms.fedprox import FedProx
from algorithms.moon import MOON
from raysim.algorithm import Broadcast, ClientContext, ClientUpdate, LocalRound
from raysim.config import TrainConfig
from raysim.nn.models import ModelOutput


class Counting(FedAvg):
    """Stateful: each client counts its own participations (state must survive rounds/workers)."""

    stateful = True

    def upload(self, step):
        update = super().upload(step)
        count = (step.state or 0) + 1
        return ClientUpdate(update.weights, update.num_samples,
                            {**update.metrics, "participations": float(count)}, state=count)


class FailsOnClientZero(FedAvg):
    @dataclass(frozen=True)
    class Config:
        mode: str = "raise"  # raise | nan

    def upload(self, step):
        update = super().upload(step)
        if step.ctx.client_id == 0:
            if self.config.mode == "raise":
                raise RuntimeError("client 0 is broken")
            update.weights["classifier.bias"].fill_(float("nan"))
        return update


class FailsOnceOnClientZero(FedAvg):
    """Client 0's first attempt in each round raises (a transient fault); retries succeed."""

    attempted: set[int] = set()  # rounds client 0 has tried in this worker process

    def before_training(self, step):
        if step.ctx.client_id == 0 and step.ctx.round not in self.attempted:
            self.attempted.add(step.ctx.round)
            raise RuntimeError("the first attempt fails")
        return super().before_training(step)


class Linear(nn.Module):
    """y = Wx + b as a classifier with the ModelOutput interface."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(2, 2)

    def forward(self, x):
        return ModelOutput(x, self.classifier(x))


def _ctx() -> ClientContext:
    return ClientContext(0, 1, torch.Generator().manual_seed(0), torch.device("cpu"), TrainConfig())


def step(model, weights) -> LocalRound:
    """A client round of `model` that received `weights` (no data: objectives only)."""
    return LocalRound(_ctx(), model, Broadcast(weights), None, None)


def test_fedavg_objective_is_cross_entropy():
    model = Linear()
    x, y = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([0, 1])
    loss = FedAvg().local_objective(step(model, {}))(x, y)
    assert torch.allclose(loss, F.cross_entropy(model.classifier(x), y))


def test_fedprox_adds_mu_half_squared_distance_to_global_weights():
    model = Linear()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.classifier.bias.copy_(torch.tensor([0.5, -0.5]))
    anchor = {"classifier.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)}
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    mu = 0.3
    objective = FedProx(FedProx.Config(mu=mu)).local_objective(step(model, anchor))
    loss = objective(x, y)
    # ‖w − w_t‖² = 1 + 1 + 0.25 + 0.25 = 2.5; logits = [1.5, 1.5] → CE = log 2
    expected = torch.log(torch.tensor(2.0)) + mu / 2 * 2.5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fedprox_gradient_pulls_towards_global_weights():
    model = Linear()
    anchor = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}
    x, y = torch.zeros(1, 2), torch.tensor([0])
    FedProx(FedProx.Config(mu=2.0)).local_objective(step(model, anchor))(x, y).backward()
    # with x = 0 the CE gradient on W is zero, so grad W = μ (W − W_t) = −2 everywhere
    assert torch.allclose(model.classifier.weight.grad, torch.full((2, 2), -2.0))


class RecordingMOON(MOON):
    """MOON whose client state also logs, per participation, which process trained the client,
    a digest of the previous-round model it was given, and a digest of the model it produced."""

    def upload(self, step):
        update, state = super().upload(step), step.state
        given = digest(state["previous"]) if state else None
        history = (state["history"] if state else []) + [
            (step.ctx.round, os.getpid(), given, digest(update.state["previous"]))
        ]
        return replace(update, state={**update.state, "history": history})


def digest(weights) -> float:
    return float(sum(t.double().sum() * (i + 1) for i, t in enumerate(weights.values())))


# ---------------------------------------------------------------- the contract's own checks


def test_a_method_with_its_own_aggregate_is_not_pre_summed():
    from raysim.methods.aggregation import mean

    class UniformMean(FedAvg):
        def aggregate(self, ctx, state, updates):
            return mean([u.weights for u in updates])

    class Child(UniformMean):
        pass

    class ReadsEveryClient(FedAvg):
        weighted_mean = False

    assert FedAvg.weighted_mean and FedProx.weighted_mean
    assert not UniformMean.weighted_mean and not Child.weighted_mean
    assert not ReadsEveryClient.weighted_mean


@pytest.mark.parametrize(("body", "message"), [
    ({"aggregate": lambda self, ctx, state, updates: {}, "weighted_mean": True},
     "^Bad overrides aggregate and declares weighted_mean = True, so the workers would "
     "pre-sum the weights and its aggregate would see none; delete the weighted_mean line$"),
    ({"check_task": classmethod(lambda cls, config, kind: None)},
     r"^Bad.check_task is no longer read: check_config\(cls, config\), which receives the "
     "whole validated config"),
    ({"has_anchors": True}, "^Bad.has_anchors is no longer read: inherit "
                            "raysim.algorithm.ClassAnchors instead"),
    ({"client_update": lambda self, *args: None},
     "^Bad overrides client_update, the engine's own step; override its hooks instead"),
    ({"server_round": lambda self, *args: None}, "^Bad overrides server_round"),
])
def test_declarations_that_contradict_the_hooks_are_refused_in_one_line(body, message):
    with pytest.raises(TypeError, match=message):
        type("Bad", (FedAvg,), body)


def test_a_pre_summed_update_says_why_it_holds_no_weights():
    from raysim.algorithm import SummedWeights

    weights = SummedWeights()
    assert len(weights) == 0
    with pytest.raises(KeyError, match="workers summed this method's client weights .* "
                                       "declares weighted_mean = False"):
        weights["classifier.weight"]


class AsStored:
    def batch(self, x, y, generator=None):
        return x, y


def test_an_upload_carries_its_sample_and_local_step_counts():
    from raysim.nn.training import ClientData

    torch.manual_seed(0)
    x, y = torch.randn(7, 2), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), torch.device("cpu"),
                        TrainConfig(local_epochs=2, batch_size=3))
    model = Linear()
    update = FedAvg().client_update(ctx, model, Broadcast(model.state_dict()),
                                    ClientData(x, y, torch.arange(7), AsStored()), None)
    # 7 samples in batches of 3: 3, 3, and a trailing 1 that is skipped; two epochs
    assert update.num_samples == 7 and update.num_steps == 4
    assert update.metrics["train_steps"] == 4.0


def test_tools_find_their_optional_declarations():
    from algorithms.fedbcs import FedBCS
    from algorithms.fedhpro import FedHPro
    from algorithms.fedproto import FedProto
    from raysim.algorithm import LEARNING_RATE_SPACE, ClassAnchors, search_space_of
    from raysim.methods.leakage import upload_kind
    from raysim.results.metric_names import ANCHOR_DIAGNOSTICS, algorithm_metrics

    assert issubclass(FedProto, ClassAnchors) and issubclass(FedHPro, ClassAnchors)
    assert not issubclass(MOON, ClassAnchors) and not issubclass(FedBCS, ClassAnchors)
    assert set(ANCHOR_DIAGNOSTICS) <= set(algorithm_metrics("fedproto"))
    assert not set(ANCHOR_DIAGNOSTICS) & set(algorithm_metrics("moon"))
    assert upload_kind(FedAvg) == "weights" and upload_kind(FedProto) == "prototypes"
    assert upload_kind(FedHPro()) == "class_gradients"
    assert search_space_of(FedAvg) == LEARNING_RATE_SPACE
    assert set(search_space_of(FedProx)) == {"train.lr", "algorithm.mu"}
