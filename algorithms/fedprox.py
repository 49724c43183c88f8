"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

The only change to FedAvg is the client objective (Eq. 2):
    h_k(w; w_t) = F_k(w) + μ/2 · ‖w − w_t‖²
a proximal term that keeps local models near the global weights w_t they started from.

Privacy as FedAvg's: the proximal term is local, the upload is the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import LEARNING_RATE_SPACE, BatchLoss, LocalRound, Weights
from raysim.config import require


class FedProx(FedAvg):
    groupable = True
    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.mu": {"loguniform": [1.0e-3, 1.0]}}

    @dataclass(frozen=True)
    class Config:
        mu: float = 0.01  # proximal coefficient μ

        def __post_init__(self) -> None:
            require(self.mu >= 0, "mu", f"must be >= 0 (got {self.mu})")

    def local_objective(self, step: LocalRound) -> BatchLoss:
        base = super().local_objective(step)
        params = dict(step.model.named_parameters())
        anchor = [step.broadcast.weights[name].to(step.ctx.device) for name in params]
        mu = self.config.mu

        def loss(x: Tensor, y: Tensor) -> Tensor:
            proximal = sum((p - a).pow(2).sum() for p, a in zip(params.values(), anchor))
            return base(x, y) + mu / 2 * proximal

        return loss

    def loss_extras(self, step: LocalRound) -> dict[str, Any]:
        return {"anchor": {name: step.broadcast.weights[name]
                           for name, _ in step.model.named_parameters()}}

    def functional_loss(self, model: nn.Module, weights: Weights, x: Tensor, y: Tensor,
                        extras: dict[str, Any]) -> Tensor:
        proximal = sum((weights[name] - a).pow(2).sum() for name, a in extras["anchor"].items())
        return super().functional_loss(model, weights, x, y, extras) + \
            self.config.mu / 2 * proximal
