"""FedProto — Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous
Clients", AAAI 2022.

Clients exchange class prototypes: the mean feature of each class.
- Client k, local prototype (Eq. 4):   p_k^c = mean_{(x, y=c) ∈ D_k} f(x)
- Server, global prototype (Eq. 6):    P̄^c = Σ_k |D_{k,c}| p_k^c / Σ_k |D_{k,c}|
- Client loss (Eq. 8):                  CE(g(f(x)), y) + λ · ‖f(x) − P̄^y‖²
  with ‖·‖² as in the official code: `nn.MSELoss` over the batch, where samples whose class has
  no global prototype yet contribute zero.
- Optional nearest-prototype inference (§4.3): ŷ = argmin_c ‖f(x) − P̄^c‖.

On segmentation (carried over as FedBCS's paper compares with it): every pixel is a sample. Its
feature f is its column of one U-Net stage (`feature_level`, by default the decoder's last
stage, the input of the 1×1 head), so p_k^c is the mean feature of client k's pixels of class c
(counts are pixel counts), Eq. 6 weights by pixel counts, and the Eq. 8 term is the mean over
the batch's pixels; the supervised loss is the task's ((CE + Dice)/2). Inference is the
segmentation head's.

Reading choices, each a config key: the paper's setting shares no weights (every client keeps a
personal model); raysim evaluates one global model, so weights are also averaged as in FedAvg,
which is how prototype baselines are usually compared on a global test set. Prototypes are
computed after local training in eval mode (the official code averages features seen during the
training epochs instead). The official server averages clients uniformly; `weighted: true`
follows Eq. 6.

Privacy: local DP recomputes the prototypes from each sample's feature clipped to B, adds
N(0, σ²B²) to the class sums and N(0, σ²) to the counts (or withholds them), and privatises the
weights as FedAvg's: any one sample is protected; which clients take part is not. Central DP is
refused (the prototypes would reach the server unprotected).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    LEARNING_RATE_SPACE,
    BatchLoss,
    Broadcast,
    ClassAnchors,
    ClientUpdate,
    LocalRound,
    ServerContext,
    ServerState,
    Weights,
    call_model,
    extend,
    task_kind,
)
from raysim.config import Config as ExperimentConfig
from raysim.config import ConfigError, require
from raysim.methods.features import SampleFeatures, check_feature_level
from raysim.methods.prototypes import check_inference, local_prototypes


@dataclass(frozen=True)
class PrototypeBroadcast(Broadcast):
    prototypes: Tensor | None = None  # (C, d) global prototypes; None before the first round
    present: Tensor | None = None  # (C,) bool: classes some client has reported


@dataclass(frozen=True)
class PrototypeUpdate(ClientUpdate):
    prototypes: Tensor | None = None  # (C, d) local class means (zero rows: absent classes)
    counts: Tensor | None = None  # (C,) local samples per class


@dataclass(frozen=True)
class PrototypeState(ServerState):
    prototypes: Tensor | None = None
    present: Tensor | None = None


def aggregate_prototypes(
    updates: list[PrototypeUpdate], weighted: bool = True
) -> tuple[Tensor, Tensor]:
    """Eq. 6: per class, the (sample-weighted) mean of the clients' prototypes of that class."""
    protos = torch.stack([u.prototypes.double() for u in updates])  # (K, C, d)
    counts = torch.stack([u.counts for u in updates]).double()  # (K, C)
    weights = counts if weighted else (counts > 0).double()
    total = weights.sum(0)  # (C,)
    mean = (weights.unsqueeze(2) * protos).sum(0) / total.clamp(min=1e-12).unsqueeze(1)
    return mean.float(), total > 0


def prototype_alignment(features: Tensor, labels: Tensor, prototypes: Tensor,
                        present: Tensor) -> Tensor:
    """(1 / (B·d)) Σ_i ‖f_i − P̄^{y_i}‖² over samples whose class has a prototype (others add 0)."""
    mask = present[labels].unsqueeze(1).to(features.dtype)
    return (((features - prototypes[labels]) * mask) ** 2).mean()


def tensors_to(broadcast: PrototypeBroadcast, device: torch.device) -> PrototypeBroadcast:
    """The broadcast's prototype tensors on `device`, once per client (weights stay put)."""
    moved = {
        f.name: getattr(broadcast, f.name).to(device)
        for f in dataclasses.fields(broadcast)
        if f.name != "weights" and isinstance(getattr(broadcast, f.name), Tensor)
    }
    return dataclasses.replace(broadcast, **moved)


class FedProto(FedAvg, ClassAnchors):
    needs_features = True
    tasks = ("classification", "segmentation")
    state_type: type[PrototypeState] = PrototypeState
    broadcast_type: type[PrototypeBroadcast] = PrototypeBroadcast

    uploads = "prototypes"
    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.lam": {"loguniform": [0.1, 10.0]}}
    groupable = True
    loss_hooks = ("alignment_loss",)  # FPL's has data-dependent branches: it runs one by one

    @dataclass(frozen=True)
    class Config:
        lam: float = 1.0  # λ, weight of the prototype term (official default 1)
        weighted: bool = True  # Eq. 6 sample weighting; false = uniform over clients (code)
        inference: str = "logits"  # logits | prototype (nearest global prototype)
        feature_level: str = "decoder_0"  # segmentation: the U-Net stage of pixel features

        def __post_init__(self) -> None:
            require(self.lam > 0, "lam", f"must be > 0 (got {self.lam})")
            check_inference(self.inference)
            check_feature_level(self.feature_level)

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        super().check_config(config)
        if task_kind(config) == "segmentation" and config.algorithm.params.inference != "logits":
            raise ConfigError("algorithm.inference: nearest-prototype inference classifies "
                              "whole samples; on a segmentation task use inference: logits")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a sample's feature and label: per sample, or per pixel of one U-Net stage
        self.samples = SampleFeatures.of(self.task, getattr(self.config, "feature_level", None))

    # ---------------------------------------------------------------- server side
    def init_server(self, model: nn.Module) -> PrototypeState:
        return extend(super().init_server(model), self.state_type)

    def broadcast(self, state: PrototypeState) -> PrototypeBroadcast:
        names = [f.name for f in dataclasses.fields(self.broadcast_type)]
        return self.broadcast_type(**{name: getattr(state, name) for name in names})

    def server_update(self, ctx: ServerContext, state: PrototypeState, weights: Weights,
                      updates: list[PrototypeUpdate]) -> PrototypeState:
        averaged = super().server_update(ctx, state, weights, updates)
        return self.aggregate_prototypes(ctx, state, averaged, updates)

    def aggregate_prototypes(
        self, ctx: ServerContext, state: PrototypeState, averaged: ServerState,
        updates: list[PrototypeUpdate],
    ) -> PrototypeState:
        """Eq. 6 on top of FedAvg's weights."""
        prototypes, present = aggregate_prototypes(updates, self.config.weighted)
        return extend(averaged, self.state_type, prototypes=prototypes, present=present)

    # ---------------------------------------------------------------- client side
    def local_objective(self, step: LocalRound) -> BatchLoss:
        if step.broadcast.prototypes is None:  # round 1: nothing to align to yet
            return super().local_objective(step)
        model, anchors = step.model, tensors_to(step.broadcast, step.ctx.device)
        task_loss = self.objectives.loss

        def loss(x: Tensor, y: Tensor) -> Tensor:
            out = model(x)
            features, labels = self.samples(out, y)
            return task_loss(out.logits, y) + self.alignment_loss(features, labels, anchors)

        return loss

    def loss_extras(self, step: LocalRound) -> dict[str, Any]:
        """The broadcast's prototype tensors (none in round 1: nothing to align to yet)."""
        broadcast = step.broadcast
        if broadcast.prototypes is None:
            return {}
        return {f.name: getattr(broadcast, f.name) for f in dataclasses.fields(broadcast)
                if f.name != "weights" and isinstance(getattr(broadcast, f.name), Tensor)}

    def functional_loss(self, model: nn.Module, weights: Weights, x: Tensor, y: Tensor,
                        extras: dict[str, Any]) -> Tensor:
        if not extras:
            return super().functional_loss(model, weights, x, y, extras)
        out = call_model(model, weights, x)
        features, labels = self.samples(out, y)
        anchors = self.broadcast_type(weights={}, **extras)
        return self.objectives.loss(out.logits, y) + self.alignment_loss(features, labels,
                                                                        anchors)

    def after_training(self, step: LocalRound) -> tuple[Tensor, Tensor]:
        """Eq. 4: the local class means of the trained model, and the class counts."""
        return local_prototypes(step.model, step.data, self.task.num_classes,
                                self.samples.read_batch_size(step.ctx.train),
                                features_of=self.samples)

    def upload(self, step: LocalRound) -> PrototypeUpdate:
        prototypes, counts = step.trained
        return extend(super().upload(step), PrototypeUpdate, prototypes=prototypes,
                      counts=counts)

    def local_means(self, update: PrototypeUpdate) -> tuple[Tensor, Tensor]:
        return update.prototypes, update.counts

    def alignment_loss(self, features: Tensor, labels: Tensor,
                       anchors: PrototypeBroadcast) -> Tensor:
        """λ · ‖f(x) − P̄^y‖² (Eq. 8)."""
        return self.config.lam * prototype_alignment(
            features, labels, anchors.prototypes, anchors.present
        )

    def anchors(self, broadcast: PrototypeBroadcast) -> tuple[Tensor, Tensor] | None:
        if broadcast.prototypes is None:
            return None
        return broadcast.prototypes, broadcast.present

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_batch(
        self, model: nn.Module, broadcast: PrototypeBroadcast, x: Tensor, y: Tensor
    ) -> dict[str, float]:
        if self.config.inference == "logits" or broadcast.prototypes is None:
            return super().evaluate_batch(model, broadcast, x, y)
        out = model(x)
        prototypes = broadcast.prototypes.to(x.device)
        distances = torch.cdist(out.features, prototypes)
        distances[:, ~broadcast.present.to(x.device)] = float("inf")
        sums = self.objectives.evaluate(out.logits, y)
        return {**sums, "accuracy": (distances.argmin(1) == y).sum().item()}
