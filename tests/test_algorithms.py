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
