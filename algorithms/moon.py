"""MOON — Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021.

The client adds a model-contrastive term that pulls its representation z = f(x) towards the
global model's z_glob and pushes it away from z_prev, the representation of this client's own
model from its previous round (Eq. 3–4):

    ℓ_con = −log [ exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) ]
    ℓ = CE + μ · ℓ_con,          sim = cosine similarity

The previous local model is client state that the engine keeps across rounds and workers; a
client's first round uses the global model in its place (the official code starts every
client's model pool from the initial global model, which makes ℓ_con the constant log 2).
Reading choices: the representation is the model's feature (raysim models have no separate
projection head), and the two frozen models run in eval mode.

On segmentation (carried over as FedBCS's paper compares with it) the representation of an
image is the mean over pixels of one U-Net stage (`feature_level`, by default the decoder's
last stage), so ℓ_con stays one term per image; the supervised loss is the task's.

Privacy as FedAvg's: the upload is the weights alone (under local DP, privatised); the kept
previous model is client state and never leaves the client.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    LEARNING_RATE_SPACE,
    BatchLoss,
    ClientUpdate,
    LocalRound,
    Weights,
    call_model,
)
from raysim.config import require
from raysim.methods.features import SampleFeatures, check_feature_level


def model_contrastive_loss(z: Tensor, z_glob: Tensor, z_prev: Tensor, tau: float) -> Tensor:
    """Eq. 3, averaged over the batch: cross-entropy with the global view as the positive."""
    positive = F.cosine_similarity(z, z_glob, dim=1) / tau
    negative = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


class MOON(FedAvg):
    stateful = True  # state["previous"]: this client's weights after its last round
    needs_features = True
    tasks = ("classification", "segmentation")
    groupable = True

    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.mu": {"loguniform": [0.1, 10.0]},
        "algorithm.tau": {"choice": [0.1, 0.5, 1.0]}}

    @dataclass(frozen=True)
    class Config:
        mu: float = 1.0  # μ (the paper uses 5 on CIFAR-10, 1 on CIFAR-100 / Tiny-ImageNet)
        tau: float = 0.5  # τ, temperature
        feature_level: str = "decoder_0"  # segmentation: the U-Net stage pooled into z

        def __post_init__(self) -> None:
            require(self.mu > 0, "mu", f"must be > 0 (got {self.mu})")
            require(self.tau > 0, "tau", f"must be > 0 (got {self.tau})")
            check_feature_level(self.feature_level)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frozen: dict[str, nn.Module] = {}  # reusable copies, built once per process
        self.samples = SampleFeatures.of(self.task, self.config.feature_level)

    def frozen_model(self, role: str, model: nn.Module, weights: Weights) -> nn.Module:
        if role not in self._frozen:
            self._frozen[role] = copy.deepcopy(model).requires_grad_(False)
        frozen = self._frozen[role]
        frozen.load_state_dict(weights)
        return frozen.eval()

    def local_objective(self, step: LocalRound) -> BatchLoss:
        model, broadcast = step.model, step.broadcast
        global_model = self.frozen_model("global", model, broadcast.weights)
        previous = step.state.get("previous") if step.state else None
        previous_model = self.frozen_model("previous", model, previous or broadcast.weights)
        mu, tau, task_loss = self.config.mu, self.config.tau, self.objectives.loss
        represent = self.samples.per_image

        def loss(x: Tensor, y: Tensor) -> Tensor:
            out = model(x)
            with torch.no_grad():
                z_glob = represent(global_model(x))
                z_prev = represent(previous_model(x))
            z = represent(out)
            contrastive = model_contrastive_loss(z, z_glob, z_prev, tau)
            return task_loss(out.logits, y) + mu * contrastive

        return loss

    def loss_extras(self, step: LocalRound) -> dict[str, Any]:
        previous = step.state.get("previous") if step.state else None
        return {"global": step.broadcast.weights, "previous": previous or step.broadcast.weights}

    def functional_loss(self, model: nn.Module, weights: Weights, x: Tensor, y: Tensor,
                        extras: dict[str, Any]) -> Tensor:
        represent = self.samples.per_image
        out = call_model(model, weights, x)
        z_glob = represent(call_model(model, extras["global"], x)).detach()
        z_prev = represent(call_model(model, extras["previous"], x)).detach()
        contrastive = model_contrastive_loss(represent(out), z_glob, z_prev, self.config.tau)
        return self.objectives.loss(out.logits, y) + self.config.mu * contrastive

    def upload(self, step: LocalRound) -> ClientUpdate:
        """The weights sent are also this client's "previous" model for its next round."""
        update = super().upload(step)
        return replace(update, state={**(update.state or {}), "previous": update.weights})
