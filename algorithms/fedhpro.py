"""FedHPro — federated learning with hyper-prototypes distilled from real-sample gradients
(arXiv 2605.13475, ICML 2026; official code mala-lab/FedHPro). Section marks follow the method's
specification: §1 round structure, §2 hyper-prototypes, §3 local objective. At code level
FedHPro is CReFF plus a hyper-prototype regulariser on the clients.

State: H ∈ R^{C·L×D}, L hyper-prototypes per class (rows [cL, (c+1)L) belong to class c), and
F ∈ R^{C·M×D}, M "meta" (CReFF federated) features per class; both start N(0, 1) and persist.

Client k, from the broadcast model θ (backbone f, classifier h0 = (W, b)) and H:
- §1(a) real-sample gradients, BEFORE local training, with θ in eval mode: for each local class
  c, up to `batch_real` of its samples, one Siamese DSA transform (`raysim.methods.dsa`), features
  z = f(x); with ℓ_c = CE(W z + b, c) (mean over the n_c samples) it sends
  u_{k,c} = mean_i ∂ℓ_c/∂z_i = Wᵀ(p̄_c − e_c)/n_c and v_{k,c} = (∂ℓ_c/∂W, ∂ℓ_c/∂b).
- §1(b), §3 local training: CE + HPCL + HPAL, with ẑ = z/‖z‖,
      P_c = mean_l H_{c,l}/‖H_{c,l}‖ (not re-normalised),  a_ik = ⟨ẑ_i, P_k⟩/τ for all C classes,
      HPCL = mean_i [log(Σ_k exp(a_ik) + m_k) − a_{i,y_i}]      (m_k = 0 without the margin)
      HPAL = SmoothL1_{β=1}(ẑ_i, Q_{y_i}/‖Q_{y_i}‖), mean over B·D,  Q_c = mean_l H_{c,l}
  and the client margin m_k = Σ_{c≠c' local} ⟨μ_c, μ_c'⟩/(C−1)² over its class-mean features μ.

Server, after FedAvg of the weights, with ū_c, v̄_c the uniform means over the clients holding c:
- §1 S2 (CReFF): `meta_steps` SGD steps on F minimising
      Σ_c Σ_{p∈{W,b}} d_lw(∇_p CE(h0(F_c), c), v̄_c[p]),  d_lw = Σ_rows (1 − cos)  (layer-wise)
- §1 S3: a fresh Linear(D, C) trained `crt_epochs` epochs on (F, labels) replaces the averaged
  classifier in the new global model.
- §1 S4, §2: `hp_steps` SGD steps on H minimising Σ_c d(mean_l ∇_{H_{c,l}} CE(h(H_c), c), ū_c).
  Since the synthetic gradient is h.Wᵀ g(h(H)), H only ever moves inside the row space of the
  classifiers used (§2); the rest of each hyper-prototype keeps its random initial value.
Classes no client holds keep their F and H (they still serve as HPCL negatives).

Two methods: `fedhpro` (`FedHPro`) follows the code; `fedhpro_paper` (`FedHProPaper`) is the
paper-intent reading of §9, and differs in four hooks only:
- HP distance d (`default_distance`): official "sign", the per-coordinate form the code
  degenerates to (§1), Σ_i [1 − r_i s_i/(|r_i||s_i| + 1e-6)]; paper "cos", one cosine distance
  of the D-vectors;
- S4 classifier h (`matching_classifier`): official the S3 classifier just trained (the averaged
  one with `creff: false`); paper h0, the classifier the clients' gradients were computed with;
- HPCL weight (`hpcl_weight`): official λ_hpcl/B (the code divides the batch mean by B once
  more), paper λ_hpcl;
- margin (`local_margin`; off by default in both): official recomputed at every mini-batch from
  the current local model on raw features (the code runs this pass in train mode, updating
  BatchNorm statistics; here it runs in eval mode and leaves them alone); paper computed once
  per round, before local training, with the received model in eval mode on L2-normalised
  features.

Reading choices where the code or spec leaves room: λ_hpcl and λ_hpal scale the terms in both
methods (their default 1 reproduces the code's weights); `distance` changes only the HP matching,
S2 always uses CReFF's layer-wise distance; a margin m_k ≤ 0 is ignored like m_k = 0; the official
`repeat_num` = 1 is the only setting (one DSA draw per class per round); in round 1 the code
computes the real gradients with a separately initialised Linear, here with the initial model's
classifier (from round 2 on both are the broadcast classifier); every random draw (sample choice,
DSA, shuffles, fresh classifier init) comes from the seeded client or server generator.

Personalised and heterogeneous settings (`evaluation.personal`, `model.heterogeneous`): the
server averages the whole model FedAvg-style (backbone and BatchNorm statistics, spec §1) and,
with CReFF, replaces the averaged classifier by the one it re-trains (S3) and broadcasts that
one model; `shares = "model"`. So both methods run personalised on one architecture with
fine-tuning: each client is scored on its own test part with the broadcast model after
`evaluation.personal.finetune_epochs` local epochs of the task's loss (without fine-tuning there
is no personal model to score, and the run is refused). A heterogeneous group is refused: the
backbone is averaged, which needs every client to have the same one. The rest would carry
over, and why it is not registered: H, F and the uploaded u_{k,c}, v_{k,c} live in the feature
space D and the classifier's (C, D) (one shape given a common `feature_dim`), and S2–S4 never
touch a backbone (spec §7.2); but with personal backbones the real-sample gradients of
different clients would be taken through different feature extractors, and the re-trained
classifier would be shared by extractors that were never averaged: a FedGH-like method that
neither the paper nor the code evaluates.

Privacy: local DP recomputes the class gradients per sample at the received classifier,
clipped jointly to B, over every sample of a class (no `batch_real` subset, no DSA), with noised
sums and counts, and privatises the weights as FedAvg's: any one sample is protected, counts and
class means stop being exact; the private upload is not the official one. Central DP is refused
(the class gradients would reach the server unprotected).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    LEARNING_RATE_SPACE,
    Broadcast,
    ClassAnchors,
    ClientContext,
    ClientUpdate,
    LocalRound,
    ServerContext,
    ServerState,
    Weights,
    extend,
)
from raysim.config import require
from raysim.methods.dsa import siamese_augment
from raysim.methods.prototypes import local_prototypes
from raysim.nn.training import ClientData
from raysim.seeding import derive_seed

HYPER_PROTOTYPE_INIT = 0x48B0  # derive_seed tag of the initial H and F
DISTANCES = ("sign", "cos", "mse")
EPS = 1e-6  # the official distances' denominator guard


@dataclass(frozen=True)
class HyperPrototypeBroadcast(Broadcast):
    hyper_prototypes: Tensor | None = None  # (C·L, D) H


@dataclass(frozen=True)
class GradientUpdate(ClientUpdate):
    feature_grads: Tensor | None = None  # (C, D) u_{k,c}; zero rows for absent classes
    weight_grads: Tensor | None = None  # (C, C, D) ∂ℓ_c/∂W
    bias_grads: Tensor | None = None  # (C, C) ∂ℓ_c/∂b
    present: Tensor | None = None  # (C,) bool: classes this client holds


@dataclass(frozen=True)
class HyperPrototypeState(ServerState):
    hyper_prototypes: Tensor | None = None  # (C·L, D)
    hp_init: Tensor | None = None  # the initial H, for diagnostics
    meta_features: Tensor | None = None  # (C·M, D) F; None with creff off


# ---------------------------------------------------------------------------- losses (§3)


def hpcl_anchors(hyper_prototypes: Tensor, num_classes: int) -> Tensor:
    """P_c = mean_l H_{c,l}/‖H_{c,l}‖, (C, D); deliberately not re-normalised (official)."""
    grouped = hyper_prototypes.view(num_classes, -1, hyper_prototypes.shape[1])
    return F.normalize(grouped, dim=2).mean(1)


def hpal_anchors(hyper_prototypes: Tensor, num_classes: int) -> Tensor:
    """Q_c = mean_l H_{c,l}, the raw mean, (C, D)."""
    return hyper_prototypes.view(num_classes, -1, hyper_prototypes.shape[1]).mean(1)


def hpcl_loss(features: Tensor, labels: Tensor, anchors: Tensor, tau: float,
              margin: float = 0.0) -> Tensor:
    """mean_i [log(Σ_k exp(a_ik) + m) − a_{i,y_i}], a_ik = ⟨ẑ_i, P_k⟩/τ; m ≤ 0 means no margin.
    The official 1/B is applied by the caller."""
    logits = F.normalize(features, dim=1) @ anchors.T / tau
    log_den = torch.logsumexp(logits, dim=1)
    if margin > 0:
        log_den = torch.logaddexp(log_den, torch.tensor(math.log(margin), device=logits.device,
                                                        dtype=logits.dtype))
    return (log_den - logits.gather(1, labels.view(-1, 1)).squeeze(1)).mean()


def hpal_loss(features: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
    """SmoothL1_{β=1}(ẑ_i, Q_{y_i}/‖Q_{y_i}‖), averaged over all B·D elements."""
    return F.smooth_l1_loss(F.normalize(features, dim=1), F.normalize(anchors[labels], dim=1))


@torch.no_grad()
def client_margin(model: nn.Module, data: ClientData, num_classes: int,
                  normalize: bool = False, batch_size: int = 100) -> float:
    """m_k = Σ_{c≠c'} ⟨μ_c, μ_c'⟩/(C−1)² over the classes the client holds, μ_c its class-mean
    feature (of L2-normalised features with `normalize`). Eval mode; the mode is restored."""
    was_training = model.training
    means, counts = local_prototypes(model, data, num_classes, batch_size, normalize)
    model.train(was_training)
    means = means[counts > 0]
    products = means @ means.T
    off_diagonal = products.sum() - products.diagonal().sum()
    return (off_diagonal / max(num_classes - 1, 1) ** 2).item()


class HyperPrototypeObjective:
    """CE + w_cl·HPCL + w_al·HPAL of one batch (§3), keeping running sums for the metrics.
    `margin` is m_k, or a function recomputing it at every batch (the official reading);
    `hpcl_weight(B)` is w_cl for a batch of B samples."""

    def __init__(self, model: nn.Module, config: Any, num_classes: int,
                 hyper_prototypes: Tensor, margin: float | Callable[[], float] = 0.0,
                 hpcl_weight: Callable[[int], float] | None = None) -> None:
        self.model, self.config, self.margin = model, config, margin
        self.hpcl_weight = hpcl_weight or (lambda batch_size: config.lambda_hpcl)
        self.contrast_anchors = hpcl_anchors(hyper_prototypes, num_classes)
        self.align_anchors = hpal_anchors(hyper_prototypes, num_classes)
        self.sums = torch.zeros(3, device=hyper_prototypes.device)  # hpcl, hpal, margin
        self.steps = 0

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        cfg = self.config
        out = self.model(x)
        loss = F.cross_entropy(out.logits, y)
        terms = torch.zeros(3, device=self.sums.device)
        if cfg.hpcl:
            margin = self.margin() if callable(self.margin) else self.margin
            contrast = hpcl_loss(out.features, y, self.contrast_anchors, cfg.tau, margin)
            loss = loss + self.hpcl_weight(len(y)) * contrast
            terms[0], terms[2] = contrast.detach(), margin
        if cfg.hpal:
            align = hpal_loss(out.features, y, self.align_anchors)
            loss = loss + cfg.lambda_hpal * align
            terms[1] = align.detach()
        self.sums += terms
        self.steps += 1
        return loss

    def metrics(self) -> dict[str, float]:
        """Batch means of the unweighted HPCL and HPAL terms and of the margin used."""
        hpcl, hpal, margin = (self.sums / max(self.steps, 1)).tolist()
        return {"train_hpcl": hpcl, "train_hpal": hpal, "train_margin": margin}


# ---------------------------------------------------------------------------- matching (§1, §2)


def linear_ce_gradients(inputs: Tensor, labels: Tensor, weight: Tensor,
                        bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ℓ_g = CE_mean(inputs_g Wᵀ + b, labels_g) for G groups of N inputs, in closed
    form (differentiable, so they can be matched): w.r.t. the inputs (G, N, D), W (G, C, D) and
    b (G, C). With r = (softmax − e_c)/N: ∂/∂x = r W, ∂/∂W = rᵀ x, ∂/∂b = Σ_n r."""
    n = inputs.shape[1]
    probs = torch.softmax(inputs @ weight.T + bias, dim=-1)
    residual = (probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)[:, None, :]) / n
    return residual @ weight, residual.transpose(1, 2) @ inputs, residual.sum(1)


def row_cosine_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """1 − ⟨r, s⟩/(‖r‖‖s‖ + 1e-6) along the last dimension (the official distance_wb per row)."""
    dot = (real * synthetic).sum(-1)
    return 1 - dot / (real.norm(dim=-1) * synthetic.norm(dim=-1) + EPS)


def sign_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """Σ_i [1 − r_i s_i/(|r_i||s_i| + 1e-6)] per row: the official 'matching' HP distance, which
    applies distance_wb to 0-dim coordinates (§1) — a per-coordinate sign agreement."""
    return (1 - real * synthetic / (real.abs() * synthetic.abs() + EPS)).sum(-1)


def cosine_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """1 − cosine of the whole vectors, per row."""
    return row_cosine_distance(real, synthetic)


def mse_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """Σ_i (r_i − s_i)² per row."""
    return ((real - synthetic) ** 2).sum(-1)


HP_DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sign": sign_distance, "cos": cosine_distance, "mse": mse_distance,
}


def _descend(start: Tensor, loss_fn: Callable[[Tensor], Tensor], steps: int,
             lr: float) -> tuple[Tensor, list[float]]:
    """`steps` plain-SGD steps (the official optimiser) from a copy of `start`. Returns the
    result and the losses before each step plus the loss of the result."""
    param = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([param], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(param)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    with torch.no_grad():
        losses.append(loss_fn(param))
    return param.detach(), torch.stack(losses).tolist()


def match_meta_features(features: Tensor, weight: Tensor, bias: Tensor, real_weight: Tensor,
                        real_bias: Tensor, held: Tensor, steps: int,
                        lr: float) -> tuple[Tensor, list[float]]:
    """S2 (CReFF): move F (C·M, D) so that each held class's classifier gradient under h0 = (W, b)
    matches v̄_c layer-wise: Σ_c [Σ_rows d(∂W) + d(∂b)]. Rows of unheld classes are untouched."""
    num_classes, dim = weight.shape
    classes = held.nonzero().squeeze(1)

    def loss(f: Tensor) -> Tensor:
        groups = f.view(num_classes, -1, dim)[classes]
        _, grad_w, grad_b = linear_ce_gradients(groups, classes, weight, bias)
        return (row_cosine_distance(real_weight[classes], grad_w).sum()
                + row_cosine_distance(real_bias[classes], grad_b).sum())

    return _descend(features, loss, steps, lr)


def match_hyper_prototypes(hyper_prototypes: Tensor, weight: Tensor, bias: Tensor,
                           real_grads: Tensor, held: Tensor, distance: str, steps: int,
                           lr: float) -> tuple[Tensor, list[float]]:
    """S4: move H (C·L, D) so that, per held class, s_c = mean_l ∇_{H_{c,l}} CE(h(H_c), c)
    matches ū_c under `distance`; summed over classes."""
    num_classes, dim = weight.shape
    classes = held.nonzero().squeeze(1)
    measure = HP_DISTANCES[distance]

    def loss(h: Tensor) -> Tensor:
        groups = h.view(num_classes, -1, dim)[classes]
        grad_inputs, _, _ = linear_ce_gradients(groups, classes, weight, bias)
        return measure(real_grads[classes], grad_inputs.mean(1)).sum()

    return _descend(hyper_prototypes, loss, steps, lr)


def retrain_classifier(features: Tensor, labels: Tensor, num_classes: int, epochs: int,
                       lr: float, batch_size: int, generator: torch.Generator) -> nn.Linear:
    """S3: a fresh Linear(D, C) (default init, seeded from `generator` without touching the
    global RNG) trained with plain SGD on shuffled batches of (features, labels)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr)
    features, labels = features.detach(), labels.to(features.device)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(features.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


def aggregate_gradients(updates: Sequence[GradientUpdate]) -> tuple[Tensor, Tensor, Tensor,
                                                                      Tensor]:
    """ū_c, v̄_c = (∂W, ∂b): uniform means over the clients holding c, summed in client order in
    float64 (as the official code, not weighted by sample counts); and the (C,) held mask."""
    present = torch.stack([u.present.cpu() for u in updates])  # (K, C)
    count = present.sum(0).clamp(min=1).double()

    def mean(name: str) -> Tensor:
        total = None
        for u, mask in zip(updates, present):
            value = getattr(u, name).cpu().double()
            value = value * mask.view(-1, *[1] * (value.dim() - 1))
            total = value if total is None else total + value
        return (total / count.view(-1, *[1] * (total.dim() - 1))).float()

    return (mean("feature_grads"), mean("weight_grads"), mean("bias_grads"),
            present.any(0))


# ---------------------------------------------------------------------------- the method


class FedHPro(FedAvg, ClassAnchors):
    """CReFF's federated features and classifier re-training plus hyper-prototype learning,
    as the official code does it."""

    needs_features = True
    tasks = ("classification",)
    reported_metrics = ("train_hpcl", "train_hpal", "train_margin",
                        "server_meta_match_loss_first", "server_meta_match_loss_last",
                        "server_crt_accuracy", "server_hp_match_loss_first",
                        "server_hp_match_loss_last", "server_hp_init_cosine")

    uploads = "class_gradients"
    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.tau": {"loguniform": [0.02, 0.5]},
        "algorithm.hp_lr": {"loguniform": [0.01, 1.0]},
        "algorithm.lambda_hpcl": {"loguniform": [0.1, 3.0]}}
    default_distance = "sign"  # the HP matching distance where `distance` is unset

    @dataclass(frozen=True)
    class Config:
        """Defaults of the official code (README command for CIFAR-10)."""

        # the key that chose the reading before each reading became a method of its own
        RENAMED_KEYS: ClassVar[dict[str, str]] = {
            "variant": "no longer a key: algorithm.name: fedhpro_paper is the paper's reading, "
                       "fedhpro the official code's"}

        creff: bool = True  # S2 + S3: meta features and classifier re-training
        hpcl: bool = True  # client contrastive term
        hpal: bool = True  # client alignment term
        margin: bool = False  # client margin m_k in HPCL (official default: off)
        distance: str | None = None  # HP matching: sign | cos | mse; None: the method's default
        dsa: bool = True  # Siamese augmentation of the real samples
        hp_per_class: int = 5  # L
        hp_steps: int = 30  # T_hp, server HP steps per round
        hp_lr: float = 0.1
        tau: float = 0.05  # HPCL temperature
        batch_real: int = 100  # real samples per class for the gradients
        meta_length: int = 50  # M, meta features per class
        meta_steps: int = 100  # S2 steps per round
        meta_lr: float = 0.1
        crt_epochs: int = 100  # S3 epochs
        crt_lr: float = 0.01
        crt_batch: int = 50
        lambda_hpcl: float = 1.0  # fedhpro: divided by B as in the code
        lambda_hpal: float = 1.0

        def __post_init__(self) -> None:
            require(self.distance is None or self.distance in DISTANCES, "distance",
                    f"choose one of {', '.join(DISTANCES)} (or leave unset)")
            for key in ("tau", "hp_lr", "meta_lr", "crt_lr", "lambda_hpcl", "lambda_hpal"):
                value = getattr(self, key)
                require(value > 0, key, f"must be > 0 (got {value})")
            for key in ("hp_per_class", "hp_steps", "batch_real", "meta_length", "meta_steps",
                        "crt_epochs", "crt_batch"):
                require(getattr(self, key) >= 1, key, "must be >= 1")

    @property
    def distance(self) -> str:
        """The HP matching distance in force."""
        return self.config.distance or self.default_distance

    # ---------------------------------------------------------------- where the readings differ
    def matching_classifier(self, h0: tuple[Tensor, Tensor],
                            installed: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """S4's classifier h: the code matches through the classifier S3 has just installed
        (the averaged one without CReFF), not h0 = (W, b) the clients' gradients came from."""
        return installed

    def hpcl_weight(self, batch_size: int) -> float:
        """w_cl: the code divides HPCL's batch mean by B once more."""
        return self.config.lambda_hpcl / batch_size

    def local_margin(self, step: LocalRound) -> float | Callable[[], float]:
        """m_k, recomputed at every mini-batch from the current local model on raw features
        (the code's behaviour)."""
        return functools.partial(client_margin, step.model, step.data, self.task.num_classes)

    # ---------------------------------------------------------------- server side
    def init_server(self, model: nn.Module) -> HyperPrototypeState:
        """H and F ~ N(0, 1) from the run seed (F only with creff)."""
        cfg, classes, dim = self.config, self.task.num_classes, self.task.feature_dim
        generator = torch.Generator().manual_seed(derive_seed(self.task.seed,
                                                              HYPER_PROTOTYPE_INIT))
        hyper = torch.randn(classes * cfg.hp_per_class, dim, generator=generator)
        meta = torch.randn(classes * cfg.meta_length, dim, generator=generator) \
            if cfg.creff else None
        return extend(super().init_server(model), HyperPrototypeState, hyper_prototypes=hyper,
                      hp_init=hyper.clone(), meta_features=meta)

    def broadcast(self, state: HyperPrototypeState) -> HyperPrototypeBroadcast:
        return HyperPrototypeBroadcast(weights=state.weights,
                                       hyper_prototypes=state.hyper_prototypes)

    def server_update(self, ctx: ServerContext, state: HyperPrototypeState, weights: Weights,
                      updates: list[GradientUpdate]) -> HyperPrototypeState:
        """After FedAvg: S2 (meta features), S3 (classifier re-training), S4 (hyper-prototypes)."""
        cfg, device = self.config, ctx.device
        weights = dict(weights)
        real_features, real_weight, real_bias, held = (
            t.to(device) for t in aggregate_gradients(updates))
        # h0: the classifier the clients computed their gradients with
        w0 = state.weights["classifier.weight"].to(device).float()
        b0 = state.weights["classifier.bias"].to(device).float()
        metrics: dict[str, float] = {}
        meta = None
        if cfg.creff:
            meta, losses = match_meta_features(state.meta_features.to(device), w0, b0,
                                               real_weight, real_bias, held, cfg.meta_steps,
                                               cfg.meta_lr)
            labels = torch.arange(self.task.num_classes, device=device).repeat_interleave(
                cfg.meta_length)
            classifier = retrain_classifier(meta, labels, self.task.num_classes,
                                            cfg.crt_epochs, cfg.crt_lr, cfg.crt_batch,
                                            ctx.generator)
            with torch.no_grad():
                accuracy = (classifier(meta).argmax(1) == labels).float().mean().item()
            weights["classifier.weight"] = classifier.weight.detach().cpu()
            weights["classifier.bias"] = classifier.bias.detach().cpu()
            metrics.update(meta_match_loss_first=losses[0], meta_match_loss_last=losses[-1],
                           crt_accuracy=accuracy)
            meta = meta.cpu()
        installed = (weights["classifier.weight"].to(device).float(),
                     weights["classifier.bias"].to(device).float())
        w, b = self.matching_classifier((w0, b0), installed)
        hyper, losses = match_hyper_prototypes(state.hyper_prototypes.to(device), w, b,
                                               real_features, held, self.distance,
                                               cfg.hp_steps, cfg.hp_lr)
        hyper = hyper.cpu()
        init_cosine = F.cosine_similarity(hyper, state.hp_init, dim=1).mean().item()
        metrics.update(hp_match_loss_first=losses[0], hp_match_loss_last=losses[-1],
                       hp_init_cosine=init_cosine)
        return HyperPrototypeState(weights=weights, metrics=metrics, hyper_prototypes=hyper,
                                   hp_init=state.hp_init, meta_features=meta)

    # ---------------------------------------------------------------- client side
    def before_training(self, step: LocalRound) -> dict[str, Tensor]:
        """§1(a): the real-sample gradients, on the received model, before local training."""
        return self.real_gradients(step.ctx, step.model, step.data)

    def upload(self, step: LocalRound) -> GradientUpdate:
        """The trained weights with the gradients of §1(a)."""
        return extend(super().upload(step), GradientUpdate, **step.prepared)

    def real_gradients(self, ctx: ClientContext, model: nn.Module,
                       data: ClientData) -> dict[str, Tensor]:
        """u_{k,c} and v_{k,c} for each local class, with the model in eval mode (§1(a))."""
        classes = self.task.num_classes
        model.eval()
        weight, bias = model.classifier.weight, model.classifier.bias
        feature_grads = torch.zeros(classes, weight.shape[1])
        weight_grads = torch.zeros(classes, *weight.shape)
        bias_grads = torch.zeros(classes, classes)
        labels = data.labels
        present = torch.bincount(labels, minlength=classes).cpu() > 0
        for c in present.nonzero().squeeze(1).tolist():
            members = data.indices[labels == c]
            chosen = torch.randperm(len(members), generator=ctx.generator)[: self.config.batch_real]
            x = data.preprocess(data.x[members[chosen.to(members.device)]])
            if self.config.dsa:
                x = siamese_augment(x, ctx.generator)
            with torch.no_grad():
                z = model(x).features
            z = z.detach().requires_grad_(True)
            target = torch.full((len(z),), c, dtype=torch.long, device=z.device)
            loss = F.cross_entropy(model.classifier(z), target)
            grad_z, grad_w, grad_b = torch.autograd.grad(loss, [z, weight, bias])
            feature_grads[c] = grad_z.mean(0).cpu()
            weight_grads[c], bias_grads[c] = grad_w.cpu(), grad_b.cpu()
        return {"feature_grads": feature_grads, "weight_grads": weight_grads,
                "bias_grads": bias_grads, "present": present}

    def local_objective(self, step: LocalRound) -> HyperPrototypeObjective:
        """CE + HPCL + HPAL (§3), with the client margin from the client's data."""
        cfg = self.config
        margin = self.local_margin(step) if cfg.margin and cfg.hpcl else 0.0
        hyper = step.broadcast.hyper_prototypes.to(step.ctx.device)
        return HyperPrototypeObjective(step.model, cfg, self.task.num_classes, hyper, margin,
                                       self.hpcl_weight)

    def anchors(self, broadcast: HyperPrototypeBroadcast) -> tuple[Tensor, Tensor] | None:
        """Q_c = mean_l H_{c,l} (raw mean), (C, D); every class has one."""
        if broadcast.hyper_prototypes is None:
            return None
        anchors = hpal_anchors(broadcast.hyper_prototypes, self.task.num_classes)
        return anchors, torch.ones(len(anchors), dtype=torch.bool)


class FedHProPaper(FedHPro):
    """FedHPro as the paper means it (spec §9), where the official code reads otherwise."""

    default_distance = "cos"

    def matching_classifier(self, h0: tuple[Tensor, Tensor],
                            installed: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """S4 matches through h0, the classifier the clients' gradients were computed with."""
        return h0

    def hpcl_weight(self, batch_size: int) -> float:
        return self.config.lambda_hpcl

    def local_margin(self, step: LocalRound) -> float:
        """m_k once per round, before local training, from the received model on
        L2-normalised features."""
        return client_margin(step.model, step.data, self.task.num_classes, normalize=True)
