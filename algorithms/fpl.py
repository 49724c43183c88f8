"""FPL — Huang, Ye, Shi, Li, Du, "Rethinking Federated Learning with Domain Shift: A Prototype
View", CVPR 2023.

Clients send class prototypes as in FedProto. The server does not average them: for each class
it clusters the clients' prototypes with FINCH (cosine) and keeps the cluster means,
    P^c = {π_1^c, …, π_m^c},               and the unbiased prototype  ū^c = mean_j π_j^c  (§3.2)
The client loss adds two terms for every sample (x, y) with z = f(x):
    L_CPCL = −log [ Σ_{π ∈ P^y} exp(cos(z, π)/τ) / Σ_{π ∈ P} exp(cos(z, π)/τ) ]   (Eq. 6)
    L_UPCR = ‖z − ū^y‖²   (Eq. 7; mean over dimensions, as `nn.MSELoss` in the official code)
    L = CE + L_CPCL + L_UPCR
where P holds the cluster prototypes of every class. Both terms are averaged over the samples
whose class has prototypes. Weights are averaged as in FedAvg (the official code does too).
The FINCH partition is the one the official server takes: the coarsest that FINCH keeps.

On segmentation (carried over as FedBCS's paper compares with it), every pixel is a sample, as
in `algorithms/fedproto.py`: pixel features of one U-Net stage (`feature_level`), class
prototypes of pixels, both terms averaged over the batch's pixels whose class has prototypes.
That is FedBCS's contrastive and consistency terms at a single level, without its feature
fusion, style recalibration or foreground-only restriction (FPL aligns every class).

Personalised and heterogeneous settings (`evaluation.personal`, `model.heterogeneous`): FPL is
a domain-shift method whose result is one global model, and its weights are averaged
(`shares = "model"`). Under personalised evaluation it runs as FedAvg + FT does: each client is
scored on its own test part with the global model after `evaluation.personal.finetune_epochs`
of local fine-tuning (with no fine-tuning it deploys no model of its own and is refused). A
heterogeneous group is refused, because averaging every weight needs one architecture. What
would carry over is the prototype side alone: the FINCH clusters, L_CPCL and L_UPCR need only
features of one width (a common `feature_dim`); a prototype-only FPL with personal models
(as `fedproto_personal` is to FedProto) is not registered, as the paper never runs one.

Privacy as FedProto's: local DP noises the prototypes, counts and weights it uploads (FINCH
then clusters noised prototypes); central DP is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.fedproto import FedProto, PrototypeBroadcast, PrototypeState, PrototypeUpdate
from raysim.algorithm import LEARNING_RATE_SPACE, ServerContext, ServerState, extend
from raysim.config import require
from raysim.methods.features import check_feature_level
from raysim.methods.prototypes import check_inference, cluster_prototypes


@dataclass(frozen=True)
class ClusterBroadcast(PrototypeBroadcast):
    clusters: Tensor | None = None  # (M, d) cluster prototypes of all classes
    cluster_labels: Tensor | None = None  # (M,) class of each cluster prototype


@dataclass(frozen=True)
class ClusterState(PrototypeState):
    clusters: Tensor | None = None
    cluster_labels: Tensor | None = None


def cluster_contrastive_loss(z: Tensor, y: Tensor, clusters: Tensor, cluster_labels: Tensor,
                             tau: float) -> Tensor:
    """Eq. 6 per sample: multi-positive InfoNCE over the cluster prototypes (cosine / τ)."""
    logits = F.normalize(z, dim=1) @ F.normalize(clusters, dim=1).T / tau  # (B, M)
    positive = cluster_labels.unsqueeze(0) == y.unsqueeze(1)
    positives = logits.masked_fill(~positive, -torch.inf)
    return torch.logsumexp(logits, 1) - torch.logsumexp(positives, 1)


class FPL(FedProto):
    state_type = ClusterState
    broadcast_type = ClusterBroadcast

    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.tau": {"loguniform": [0.01, 0.5]}}

    @dataclass(frozen=True)
    class Config:
        tau: float = 0.02  # τ of L_CPCL (official `infoNCET` default)
        inference: str = "logits"  # logits | prototype (nearest unbiased prototype)
        feature_level: str = "decoder_0"  # segmentation: the U-Net stage of pixel features

        def __post_init__(self) -> None:
            require(self.tau > 0, "tau", f"must be > 0 (got {self.tau})")
            check_inference(self.inference)
            check_feature_level(self.feature_level)

    def aggregate_prototypes(
        self, ctx: ServerContext, state: ClusterState, averaged: ServerState,
        updates: list[PrototypeUpdate],
    ) -> ClusterState:
        clusters, labels, unbiased, present = cluster_prototypes(
            [u.prototypes for u in updates], [u.counts for u in updates], self.task.num_classes)
        return extend(averaged, ClusterState, prototypes=unbiased, present=present,
                      clusters=clusters, cluster_labels=labels)

    def alignment_loss(self, features: Tensor, labels: Tensor,
                       anchors: ClusterBroadcast) -> Tensor:
        """L_CPCL + L_UPCR over the samples whose class has prototypes."""
        keep = anchors.present[labels]
        if not keep.any():
            return features.sum() * 0.0
        z, y = features[keep], labels[keep]
        cpcl = cluster_contrastive_loss(z, y, anchors.clusters, anchors.cluster_labels,
                                        self.config.tau)
        upcr = ((z - anchors.prototypes[y]) ** 2).mean()
        return cpcl.mean() + upcr
