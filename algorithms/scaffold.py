"""SCAFFOLD — Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020 (Algorithm 1, control variates by option II).

The server keeps a control variate c and every client its own c_i (zero at first). Each local
step corrects the client's gradient by c − c_i, so a client drifts less towards its own optimum:
    y ← y − η (g_i(y) − c_i + c)
written here as one more loss term, ⟨c − c_i, y⟩, whose gradient is exactly that correction.
After K local steps the client updates its control variate (option II)
    c_i⁺ = c_i − c + (x − y) / (K η)
and uploads y and Δc_i = c_i⁺ − c_i. The server moves
    x ← x + η_g (ȳ − x),        c ← c + (|S| / N) · mean_i Δc_i
with ȳ the sample-weighted mean of the clients' weights (the paper's uniform mean over S when
all clients hold the same amount of data), |S| the clients of the round, N all clients.
Control variates cover the model's parameters (not BatchNorm statistics); η is `train.lr`.
The paper's steps are plain SGD; with heavy-ball momentum β a local step moves about
η/(1 − β) per unit of gradient, so Kη becomes Kη/(1 − β) (exactly the paper's for β = 0).

Privacy: refused by both mechanisms (central and local DP): Δc_i = −c + (x − y)/(Kη) is the
client's unclipped update itself, which neither the noised sum nor local noise would cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    BatchLoss,
    Broadcast,
    ClientUpdate,
    LocalRound,
    ServerContext,
    ServerState,
    Weights,
    extend,
)
from raysim.config import require


@dataclass(frozen=True)
class ControlBroadcast(Broadcast):
    control: Weights = field(default_factory=dict)  # c


@dataclass(frozen=True)
class ControlUpdate(ClientUpdate):
    control_delta: Weights = field(default_factory=dict)  # Δc_i


@dataclass(frozen=True)
class ControlState(ServerState):
    control: Weights = field(default_factory=dict)


class SCAFFOLD(FedAvg):
    stateful = True  # state["control"]: this client's c_i
    groupable = True

    @dataclass(frozen=True)
    class Config:
        global_lr: float = 1.0  # η_g

        def __post_init__(self) -> None:
            require(self.global_lr > 0, "global_lr", f"must be > 0 (got {self.global_lr})")

    def init_server(self, model: nn.Module) -> ControlState:
        control = {n: torch.zeros_like(p, device="cpu") for n, p in model.named_parameters()}
        return extend(super().init_server(model), ControlState, control=control)

    def broadcast(self, state: ControlState) -> ControlBroadcast:
        return ControlBroadcast(weights=state.weights, control=state.control)

    def client_control(self, step: LocalRound) -> Weights:
        """c_i, zero before the client's first round."""
        saved = (step.state or {}).get("control")
        return saved or {n: torch.zeros_like(c) for n, c in step.broadcast.control.items()}

    def local_objective(self, step: LocalRound) -> BatchLoss:
        base, params = super().local_objective(step), dict(step.model.named_parameters())
        own, control = self.client_control(step), step.broadcast.control
        correction = {n: (c - own[n]).to(step.ctx.device) for n, c in control.items()}

        def loss(x: Tensor, y: Tensor) -> Tensor:
            drift = sum((correction[n] * p).sum() for n, p in params.items())
            return base(x, y) + drift

        return loss

    def loss_extras(self, step: LocalRound) -> dict[str, Any]:
        own, control = self.client_control(step), step.broadcast.control
        return {"correction": {n: c - own[n] for n, c in control.items()}}

    def functional_loss(self, model: nn.Module, weights: Weights, x: Tensor, y: Tensor,
                        extras: dict[str, Any]) -> Tensor:
        drift = sum((c * weights[n]).sum() for n, c in extras["correction"].items())
        return super().functional_loss(model, weights, x, y, extras) + drift

    def upload(self, step: LocalRound) -> ControlUpdate:
        """Option II: c_i⁺ = c_i − c + (x − y)/(K η)."""
        update, train = super().upload(step), step.ctx.train
        own = self.client_control(step)
        scale = step.num_steps * train.lr / (1 - train.momentum)
        new = {n: own[n] - c + (step.broadcast.weights[n] - update.weights[n]) / scale
               for n, c in step.broadcast.control.items()}
        return extend(update, ControlUpdate, state={**(update.state or {}), "control": new},
                      control_delta={n: new[n] - own[n] for n in new})

    def server_update(self, ctx: ServerContext, state: ControlState, weights: Weights,
                      updates: list[ControlUpdate]) -> ControlState:
        eta = self.config.global_lr
        moved = {n: state.weights[n] + eta * (w - state.weights[n]) if n in state.control else w
                 for n, w in weights.items()}
        share = len(updates) / max(self.task.num_clients, len(updates))
        control = {n: c + share * torch.stack([u.control_delta[n] for u in updates]).mean(0)
                   for n, c in state.control.items()}
        return ControlState(weights=moved, control=control)
