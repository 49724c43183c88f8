"""FedTGP — Zhang, Liu, Hua, Cao, "FedTGP: Trainable Global Prototypes with
Adaptive-Margin-Enhanced Contrastive Learning for Data and Model Heterogeneity in Federated
Learning", AAAI 2024.

Clients work as in FedProto: CE + λ·‖f(x) − P^y‖², then send their class means p_k^c.
The server learns the global prototypes instead of averaging them: P^c = F(e_c), a trainable
class embedding e_c passed through Linear → ReLU → Linear (hidden width = feature dim). Every
round it trains F for S epochs on the round's client prototypes {(p_k^c, c)} with the
adaptive-margin-enhanced contrastive loss (Eq. 5–7):

    L(p, c) = −log [ exp(−(‖p − P^c‖ + δ)) / (exp(−(‖p − P^c‖ + δ)) + Σ_{c'≠c} exp(−‖p − P^{c'}‖)) ]
    δ = min( max_c min_{c'≠c} ‖Q^c − Q^{c'}‖ , threshold ),      Q^c = mean_k p_k^c

i.e. cross-entropy over negative distances with a margin added to the true class's distance.
F, its class embeddings and its optimiser (one for the whole run, as in the official code)
persist across rounds in the server state, and this training runs on the server actor.
Defaults follow the official code: λ = 10, S = 100, threshold = 100, plain SGD with the
clients' learning rate and batch size. As there, every class has a global
prototype from the first server step on. Weights are averaged as in FedAvg (see FedProto).

Privacy as FedProto's: local DP noises the prototypes, counts and weights it uploads (the
server trains its prototypes on noised ones); central DP is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.fedproto import FedProto, PrototypeState, PrototypeUpdate
from raysim.algorithm import (
    LEARNING_RATE_SPACE,
    ServerContext,
    ServerState,
    copy_tensors,
    copy_weights,
    extend,
)
from raysim.config import require
from raysim.methods.prototypes import check_inference


class TrainablePrototypes(nn.Module):
    """P = F(E): one embedding per class through a two-layer MLP."""

    def __init__(self, num_classes: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, dim)

    def forward(self) -> Tensor:
        return self.fc(self.middle(self.embeddings.weight))  # (C, d)


@dataclass(frozen=True)
class TrainablePrototypeState(PrototypeState):
    # F's parameters and its optimiser's state (state dicts: the state is data, so it can be
    # checkpointed); they stay on the server and are never broadcast
    generator: dict[str, Tensor] | None = None
    generator_optimizer: dict | None = None


def adaptive_margin(class_means: Tensor, threshold: float) -> float:
    """Eq. 7: δ = min(max_c min_{c'≠c} ‖Q^c − Q^{c'}‖, threshold); the threshold alone when
    fewer than two classes were reported (the official code's fallback)."""
    if len(class_means) < 2:
        return threshold
    distances = torch.cdist(class_means, class_means)
    distances.fill_diagonal_(float("inf"))
    return min(distances.min(1).values.max().item(), threshold)


def margin_contrastive_loss(prototypes: Tensor, labels: Tensor, generated: Tensor,
                            margin: float) -> Tensor:
    """Eq. 5–6, averaged over the client prototypes in the batch."""
    distances = torch.cdist(prototypes, generated)  # (N, C)
    distances = distances + margin * F.one_hot(labels, generated.shape[0])
    return F.cross_entropy(-distances, labels)


class FedTGP(FedProto):
    tasks = ("classification",)
    state_type = TrainablePrototypeState
    reported_metrics = ("server_tgp_loss_first", "server_tgp_loss_last", "server_tgp_margin")

    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.lam": {"loguniform": [0.1, 30.0]}}

    @dataclass(frozen=True)
    class Config:
        lam: float = 10.0  # λ, client prototype-alignment weight (official default)
        server_epochs: int = 100  # S, passes over the round's client prototypes
        margin_threshold: float = 100.0  # cap of the adaptive margin δ
        server_lr: float | None = None  # None: the clients' train.lr, as the official code
        server_batch_size: int | None = None  # None: the clients' train.batch_size
        inference: str = "logits"  # logits | prototype

        def __post_init__(self) -> None:
            require(self.lam > 0, "lam", f"must be > 0 (got {self.lam})")
            require(self.server_epochs >= 1, "server_epochs", "must be >= 1")
            require(self.margin_threshold >= 0, "margin_threshold", "must be >= 0")
            require(self.server_lr is None or self.server_lr > 0, "server_lr", "must be > 0")
            require(self.server_batch_size is None or self.server_batch_size >= 1,
                    "server_batch_size", "must be >= 1")
            check_inference(self.inference)

    def aggregate_prototypes(
        self, ctx: ServerContext, state: TrainablePrototypeState, averaged: ServerState,
        updates: list[PrototypeUpdate],
    ) -> TrainablePrototypeState:
        generator = self.new_generator(ctx, state.generator)
        optimizer = torch.optim.SGD(generator.parameters(),
                                    lr=self.config.server_lr or self.task.train.lr)
        if state.generator_optimizer is not None:
            optimizer.load_state_dict(state.generator_optimizer)
        held = [(u.prototypes[c], c) for u in updates for c in range(len(u.counts))
                if u.counts[c] > 0]
        prototypes = torch.stack([p for p, _ in held]).to(ctx.device)
        labels = torch.tensor([c for _, c in held], device=ctx.device)
        class_means = torch.stack([prototypes[labels == c].mean(0) for c in labels.unique()])
        margin = adaptive_margin(class_means, self.config.margin_threshold)
        losses = self.train_generator(ctx, generator, optimizer, prototypes, labels, margin)
        with torch.no_grad():
            generated = generator().cpu()
        present = torch.ones(len(generated), dtype=torch.bool)
        metrics = {"tgp_loss_first": losses[0], "tgp_loss_last": losses[-1], "tgp_margin": margin}
        return extend(averaged, TrainablePrototypeState, prototypes=generated, present=present,
                      generator=copy_weights(generator),
                      generator_optimizer=copy_tensors(optimizer.state_dict()), metrics=metrics)

    def new_generator(self, ctx: ServerContext,
                      weights: dict[str, Tensor] | None = None) -> TrainablePrototypes:
        """F with `weights`, or in the first round initialised from the round's server
        generator; global RNG state is never touched."""
        dim = self.task.feature_dim
        with torch.random.fork_rng(devices=[]):
            if weights is None:
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=ctx.generator)))
            generator = TrainablePrototypes(self.task.num_classes, dim, dim).to(ctx.device)
        if weights is not None:
            generator.load_state_dict(weights)
        return generator

    def train_generator(
        self, ctx: ServerContext, generator: TrainablePrototypes,
        optimizer: torch.optim.Optimizer, prototypes: Tensor, labels: Tensor, margin: float,
    ) -> list[float]:
        """S epochs of SGD over shuffled batches of client prototypes; returns epoch losses."""
        batch = self.config.server_batch_size or self.task.train.batch_size
        generator.train()
        losses = []
        for _ in range(self.config.server_epochs):
            order = torch.randperm(len(labels), generator=ctx.generator).to(labels.device)
            total = 0.0
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                loss = margin_contrastive_loss(prototypes[idx], labels[idx], generator(), margin)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / len(order))
        generator.eval()
        return losses
