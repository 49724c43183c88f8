"""FedGH — Yi, Wang, Liu, Shi, Yu, "FedGH: Heterogeneous Federated Learning with Generalized
Global Header", ACM MM 2023.

Clients keep heterogeneous feature extractors (the body) and share one prediction header
H(·; θ), a Linear(feature_dim, C) (`classifier`). In round t (Fig. 1, Algorithm 1):
    1. client k replaces its header with the received global θ^{t−1} and trains its whole model
       (extractor and header) for E epochs of the task's loss;
    2. it computes its local averaged representations (LARs), the mean feature of each class
       it holds with the trained extractor, R̄_k^s = mean_{(x, y=s) ∈ D_k} f_k(x), and sends
       them with the class labels: no weights;
    3. the server trains θ on the pairs {(R̄_k^s, s)} of the round's clients with cross-entropy,
           θ ← θ − η_θ ∇_θ CE(H(R̄_k^s; θ), s)
       and broadcasts it, and every client deploys its own extractor under it.
Defaults follow HtFLlib's FedGH: SGD at `server_lr` = 0.01 for `server_epochs` = 100 passes
over the round's pairs in shuffled batches of the clients' batch size (the paper takes one
step per pair), with a fresh optimiser every round; the header carries over between rounds.
LARs are computed after local training in eval mode, as FedProto's prototypes
(`raysim.methods.prototypes.local_prototypes`); one pair per class a client holds, unweighted
by counts. Round 1's header is the initial model's (member 0's on a heterogeneous group).
Runs on heterogeneous groups (`model.heterogeneous` with a common `feature_dim`); scored by
personalised evaluation (`evaluation.personal`).

Privacy: local DP noises the LARs and counts as FedProto's prototypes (any one sample is
protected); central DP is refused (the server trains the header instead of averaging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.fedavg import FedAvg
from algorithms.fedproto import PrototypeUpdate
from raysim.algorithm import (
    HEAD,
    LEARNING_RATE_SPACE,
    LocalRound,
    PersonalModel,
    ServerContext,
    ServerState,
    Weights,
    extend,
)
from raysim.config import require
from raysim.methods.features import READ_BATCH_SIZE
from raysim.methods.prototypes import local_prototypes

WEIGHT, BIAS = f"{HEAD}weight", f"{HEAD}bias"


def train_header(header: Weights, representations: Tensor, labels: Tensor, epochs: int,
                 lr: float, batch_size: int, generator: torch.Generator,
                 device: torch.device) -> tuple[Weights, list[float]]:
    """Step 3: `epochs` of SGD on CE(R̄ θ_Wᵀ + θ_b, s) over shuffled batches of the pairs,
    from `header`; the new header (on the CPU) and each epoch's mean loss."""
    weight = header[WEIGHT].detach().to(device, copy=True).requires_grad_(True)
    bias = header[BIAS].detach().to(device, copy=True).requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr)
    representations, labels = representations.to(device), labels.to(device)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(F.linear(representations[idx], weight, bias), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    return {WEIGHT: weight.detach().cpu(), BIAS: bias.detach().cpu()}, losses


class FedGH(PersonalModel, FedAvg):
    shares = "head"
    needs_features = True
    tasks = ("classification",)
    uploads = "prototypes"  # the LARs and their class counts, as FedProto's
    reported_metrics = ("server_header_loss_first", "server_header_loss_last")

    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.server_lr": {"loguniform": [1.0e-3, 0.1]}}

    @dataclass(frozen=True)
    class Config:
        server_epochs: int = 100  # passes over the round's (LAR, class) pairs (HtFLlib)
        server_lr: float = 0.01  # η_θ, the header's SGD learning rate (HtFLlib)
        server_batch_size: int | None = None  # None: the clients' train.batch_size

        def __post_init__(self) -> None:
            require(self.server_epochs >= 1, "server_epochs", "must be >= 1")
            require(self.server_lr > 0, "server_lr", f"must be > 0 (got {self.server_lr})")
            require(self.server_batch_size is None or self.server_batch_size >= 1,
                    "server_batch_size", "must be >= 1")

    # ---------------------------------------------------------------- server side
    def aggregate(self, ctx: ServerContext, state: ServerState,
                  updates: list[PrototypeUpdate]) -> Weights:
        """Nothing is averaged: the header is learnt from the LARs (`server_update`)."""
        return state.weights

    def server_update(self, ctx: ServerContext, state: ServerState, weights: Weights,
                      updates: list[PrototypeUpdate]) -> ServerState:
        held = [(u.prototypes[c], c) for u in updates for c in range(len(u.counts))
                if u.counts[c] > 0]
        if not held:
            return ServerState(weights=weights)
        representations = torch.stack([p for p, _ in held])
        labels = torch.tensor([c for _, c in held])
        header, losses = train_header(
            weights, representations, labels, self.config.server_epochs, self.config.server_lr,
            self.config.server_batch_size or self.task.train.batch_size, ctx.generator,
            ctx.device)
        return ServerState(weights=header, metrics={"header_loss_first": losses[0],
                                                    "header_loss_last": losses[-1]})

    # ---------------------------------------------------------------- client side
    def after_training(self, step: LocalRound) -> tuple[Tensor, Tensor]:
        """Step 2: the LARs of the trained extractor, and the class counts."""
        return local_prototypes(step.model, step.data, self.task.num_classes, READ_BATCH_SIZE)

    def upload(self, step: LocalRound) -> PrototypeUpdate:
        """The LARs and counts (and the sample count): the header stays, the extractor too."""
        representations, counts = step.trained
        return extend(super().upload(step), PrototypeUpdate, weights={},
                      prototypes=representations, counts=counts)
