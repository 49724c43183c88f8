"""FedRep — Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021.

The model is a shared representation φ (the body: everything but `classifier`) and a
personal head h_k. Client k, from the received φ^t and its own head (Algorithm 1):
    1. h_k ← τ_h epochs of SGD on the task's loss f_k(φ^t, h) over h, φ frozen   (`head_epochs`)
    2. φ_k ← τ epochs of SGD on f_k(φ, h_k) over φ, the new head frozen       (`train.local_epochs`)
and sends φ_k; the server averages the bodies, φ^{t+1} = Σ_k n_k φ_k / Σ_k n_k (sample-weighted
as FedAvg and PFLlib; Algorithm 1's plain mean is the same for clients of equal size). Each
client deploys φ with its head.

Reading choices: the paper trains the head for 10 local epochs; the default here is 5, as
digits-sized clients fit a linear head in a few epochs and the head phase costs as much as
the body phase per epoch (a full forward pass), so 10 doubles a round's time for little gain.
Both phases step one optimiser (`train`'s), each over its own parameters only (a frozen
parameter has no gradient, so SGD's momentum and weight decay leave it alone), on the same
seeded shuffles in turn; BatchNorm statistics of the body follow both phases, as in PFLlib.
`train_loss` is the body phase's, `head_train_loss` the head phase's, `train_steps` both.
One architecture for all clients (the body is averaged).

Privacy as FedAvg's, for the body: central DP clips and noises the body's delta; local DP
uploads the body privatised; the head never leaves the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from algorithms.fedper import FedPer
from raysim.algorithm import HEAD, LEARNING_RATE_SPACE, LocalRound
from raysim.config import require


class FedRep(FedPer):
    """FedPer's split (body averaged, head kept), trained head first, then body."""

    reported_metrics = ("head_train_loss",)

    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.head_epochs": {"choice": [1, 5, 10]}}

    @dataclass(frozen=True)
    class Config:
        head_epochs: int = 5  # τ_h, head-only epochs before the body's (paper: 10)

        def __post_init__(self) -> None:
            require(self.head_epochs >= 1, "head_epochs", "must be >= 1")

    def train_locally(self, step: LocalRound) -> dict[str, float]:
        """Head with the body frozen, then body with the head frozen."""
        head = self.train_part(step, "head", self.config.head_epochs)
        head_steps = step.num_steps
        body = self.train_part(step, "body", step.ctx.train.local_epochs)
        step.num_steps += head_steps
        return {**body, "train_steps": float(step.num_steps),
                "head_train_loss": head["train_loss"]}

    def train_part(self, step: LocalRound, part: str, epochs: int) -> dict[str, float]:
        """`epochs` of the objective updating only the head or only the body."""
        ctx, params = step.ctx, dict(step.model.named_parameters())
        trainable = {name: p.requires_grad for name, p in params.items()}
        for name, p in params.items():
            p.requires_grad_(trainable[name] and name.startswith(HEAD) == (part == "head"))
        step.ctx = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train,
                                                                      local_epochs=epochs))
        try:
            return super().train_locally(step)
        finally:
            step.ctx = ctx
            for name, p in params.items():
                p.requires_grad_(trainable[name])
