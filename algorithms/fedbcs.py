"""FedBCS — Zhao, Huang, Wang, Zhao, Zhuang, Jiang, Wan, Ye, "Divide, Conquer and Unite:
Hierarchical Style-Recalibrated Prototype Alignment for Federated Medical Image Segmentation",
AAAI 2026. Written from the official code as the spec `fedbcs.md` records it (§n below).

Model (`raysim.nn.fedbcs_unet.FedBCSUNet`): the U-Net with FSR, frequency-domain style
recalibration, after encoder stages 2–4 (§2), and a context-aware fusion per level (§3.1) whose
output F^l holds the level's pixel features.

Client, per batch (§1.2, §3.4), with y resized (nearest) to each level's resolution:
    L = ½(CE + SoftDice) + λ · (1/|levels|) Σ_l [ L_contra^l + L_consis^l ]
    L_contra = mean_{i ∈ fg} −log( (Σ_{π∈Pos} e_iπ + 1e-9) / (Σ_{π∈Pos∪Neg} e_iπ + 1e-9) ),
               e_iπ = min(exp(min(cos(f_i, π)/τ, 20)), 1e6)
    L_consis = MSE(f_i, p̄) over foreground pixels,  p̄ = mean of the foreground cluster prototypes
where Pos / Neg are the global cluster prototypes of the foreground / background class. The
alignment starts once global prototypes exist (round 2). Local prototypes P_k^{l,c} are the
unweighted means over the last local epoch's batches of the batch-wise class means of F^l (§3.2),
taken from the training forward passes themselves.

Server (§3.3): per (level, class), FINCH (cosine) over the client prototypes, the coarsest
partition it keeps, cluster means as the global prototypes; weights (FSR and fusion included)
are averaged as in FedAvg.

Where this file departs from the official code, on purpose (spec §7):
  * labels are resized with nearest neighbour (the code's TNBC path area-resizes them);
  * a class held by one client keeps that client's prototype (the code crashes there, §7.12);
  * layer choices of any depth work: fusion widths follow the U-Net (§7.6 hard-codes them);
  * with one level switched off, the alignment is averaged over the levels left (the code
    always divides by 2); λ (`weight`) is applied (the code's `--alp` is unused, i.e. λ = 1).
Everything else — the clamps and τ = 0.005 (§3.4), FSR's T = 0.1, persistent optimiser state
(`train.keep_optimizer_state` in the ready configs), the resolutions — follows the code.
`feature_path: per_branch` (default) computes the same prototypes and losses as `materialized`
(the official concatenation at full resolution) without building it (see the model's module).

Privacy: local DP (`privacy.mechanism: local`) uploads the prototypes of
`raysim.methods.privacy.private_pixel_prototypes`: each last-epoch batch's (background,
foreground) class means of a level, which the objective keeps (its prototypes average them), clipped
jointly to B, summed and noised, with the batches showing each class counted and noised. It
protects any one image (replacing it changes one batch of the last epoch) and, through the
weights part, the client's whole dataset; it does not protect which classes a site's images
show beyond the noised counts. Central DP is refused: it noises the mean weight update and
would leave the prototypes unprotected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    LEARNING_RATE_SPACE,
    Broadcast,
    ClientUpdate,
    LocalRound,
    ServerContext,
    ServerState,
    Weights,
    copy_weights,
    extend,
)
from raysim.config import Config as ExperimentConfig
from raysim.config import require
from raysim.methods.features import NUM_STAGES
from raysim.methods.prototypes import cluster_prototypes
from raysim.nn.fedbcs_unet import FEATURE_PATHS, FSR_FORMS, LEVELS, FedBCSUNet, LevelFeatures
from raysim.nn.models import UNet
from raysim.nn.segmentation import joint_loss, resize_labels
from raysim.registry import MODELS

COS_EPS = 1e-8


# ---------------------------------------------------------------------------- losses (§3.4)


def prototype_contrastive_loss(
    cos: Tensor, positive: Tensor, tau: float, logit_cap: float = 20.0, exp_cap: float = 1e6
) -> tuple[Tensor, Tensor]:
    """L_contra from cosines (N, M) of N pixels to M prototypes, `positive` (M,) marking the
    foreground ones; returns the loss and the share of pixel–prototype terms at a clamp (whose
    gradient is zero: with τ = 0.005 every cosine above ≈ 0.069 saturates, §3.4)."""
    logits = (cos / tau).clamp(max=logit_cap)
    e = logits.exp().clamp(max=exp_cap)
    pos = e[:, positive].sum(1)
    loss = -torch.log((pos + 1e-9) / (e.sum(1) + 1e-9))
    saturated = (logits.detach().exp() >= exp_cap).float().mean()
    return loss.mean(), saturated


def cosines(dots: Tensor, sq_norms: Tensor, anchors: Tensor) -> Tensor:
    """cos(f_i, a_j) from ⟨f_i, a_j⟩ (N, A), ‖f_i‖² (N,) and the anchors (A, D)."""
    f_norm = sq_norms.clamp(min=0).sqrt().clamp(min=COS_EPS)
    a_norm = anchors.norm(dim=1).clamp(min=COS_EPS)
    return dots / (f_norm[:, None] * a_norm[None, :])


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class BCSBroadcast(Broadcast):
    # level → (cluster prototypes (M, D), their classes (M,)); empty before round 2
    prototypes: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class BCSState(ServerState):
    prototypes: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class BCSUpdate(ClientUpdate):
    prototypes: dict[str, Tensor] = field(default_factory=dict)  # level → (2, D)
    counts: dict[str, Tensor] = field(default_factory=dict)  # level → batches showing each class
    # under local DP only, for the worker's mechanism (which drops them): each last-epoch
    # batch's class means, level → (n, 2, D), and the classes it showed, level → (n, 2)
    batch_means: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None


# ---------------------------------------------------------------------------- the method


class FedBCS(FedAvg):
    tasks = ("segmentation",)
    reported_metrics = (
        "train_seg_loss", "train_align_loss", "train_contrastive_saturated",
        *(f"server_clusters_{level}_{c}" for level in LEVELS
          for c in ("background", "foreground")))

    uploads = "pixel_prototypes"
    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.tau": {"loguniform": [1.0e-3, 0.1]},
        "algorithm.weight": {"loguniform": [0.1, 10.0]}}

    @dataclass(frozen=True)
    class Config:
        fsr: str = "closed_form"  # fft (the paper's form) | closed_form (same outputs) | none
        fsr_temperature: float = 0.1  # T of w = softmax(h/T)
        levels: list[str] = field(default_factory=lambda: list(LEVELS))
        encoder_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
        decoder_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
        fusion_channels: int | None = None  # per branch; None: the context stage's width
        tau: float = 0.005  # official `--infoNCET`
        contrastive: bool = True  # L_contra
        consistency: bool = True  # L_consis
        weight: float = 1.0  # λ on the averaged alignment loss
        feature_path: str = "per_branch"  # per_branch | materialized (same values, more memory)

        def __post_init__(self) -> None:
            require(self.fsr in FSR_FORMS, "fsr",
                    f"choose one of {', '.join(FSR_FORMS)} (got {self.fsr!r})")
            require(self.fsr_temperature > 0, "fsr_temperature", "must be > 0")
            require(len(self.levels) >= 1 and set(self.levels) <= set(LEVELS), "levels",
                    f"choose one or both of {', '.join(LEVELS)} (got {self.levels})")
            for key in ("encoder_layers", "decoder_layers"):
                layers = getattr(self, key)
                bad = [i for i in layers if not 0 <= i < NUM_STAGES]
                require(not bad, key, f"stage {bad[0] if bad else ''} does not exist: the U-Net "
                        f"has stages 0 (finest) to {NUM_STAGES - 1} (deepest)")
                require(len(set(layers)) >= 2, key,
                        "needs at least two stages: the deepest is the context, the others "
                        "are fused with it")
            require(self.fusion_channels is None or self.fusion_channels >= 1,
                    "fusion_channels", "must be >= 1")
            require(self.tau > 0, "tau", f"must be > 0 (got {self.tau})")
            require(self.weight >= 0, "weight", "must be >= 0")
            require(self.feature_path in FEATURE_PATHS, "feature_path",
                    f"choose one of {', '.join(FEATURE_PATHS)}")

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        super().check_config(config)
        require(issubclass(MODELS[config.model.name], UNet), "model.name",
                "FedBCS recalibrates and fuses the stages of raysim's U-Net; use model.name: "
                "unet")

    # ---------------------------------------------------------------- model
    def prepare_model(self, model: UNet) -> FedBCSUNet:
        """FSR after encoder stages 2–4 and one fusion per level (§2.1, §3.1)."""
        cfg = self.config
        layers = {level: getattr(cfg, f"{level}_layers") for level in cfg.levels}
        return FedBCSUNet(model, layers, cfg.fsr, cfg.fsr_temperature, cfg.fusion_channels,
                          cfg.feature_path)

    # ---------------------------------------------------------------- server side
    def init_server(self, model: nn.Module) -> BCSState:
        return BCSState(weights=copy_weights(model))

    def broadcast(self, state: BCSState) -> BCSBroadcast:
        return BCSBroadcast(weights=state.weights, prototypes=state.prototypes)

    def server_update(self, ctx: ServerContext, state: BCSState, weights: Weights,
                      updates: list[BCSUpdate]) -> BCSState:
        """§3.3: FedAvg of the weights; FINCH cluster prototypes per (level, class)."""
        averaged = super().server_update(ctx, state, weights, updates)
        prototypes, metrics = {}, {}
        for level in self.config.levels:
            clusters, labels, _, _ = cluster_prototypes(
                [u.prototypes[level] for u in updates], [u.counts[level] for u in updates], 2)
            prototypes[level] = (clusters, labels)
            for c, name in enumerate(("background", "foreground")):
                metrics[f"clusters_{level}_{name}"] = float((labels == c).sum())
        return extend(averaged, BCSState, prototypes=prototypes, metrics=metrics)

    # ---------------------------------------------------------------- client side
    def local_objective(self, step: LocalRound) -> AlignmentObjective:
        """§1.2, collecting the local prototypes during the last local epoch (§3.2)."""
        train = step.ctx.train
        collect_from = (train.local_epochs - 1) * step.data.steps_per_epoch(train.batch_size)
        return AlignmentObjective(self, step.model, step.broadcast, step.ctx.device,
                                  collect_from)

    def after_training(self, step: LocalRound) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """§3.2: the local prototypes the objective collected in the last epoch, and counts."""
        return step.objective.local_prototypes()

    def upload(self, step: LocalRound) -> BCSUpdate:
        prototypes, counts = step.trained
        private = self.task is not None and self.task.privacy is not None
        return extend(super().upload(step), BCSUpdate, prototypes=prototypes, counts=counts,
                      batch_means=step.objective.batch_means() if private else None)

    def alignment_loss(
        self, features: LevelFeatures, labels: Tensor,
        anchors: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor | None]:
        """L_contra + L_consis of one level over its foreground pixels (§3.4); also the share of
        saturated contrastive terms (None when the contrastive term is off)."""
        cfg = self.config
        clusters, cluster_labels = anchors
        foreground = labels != 0
        positive = cluster_labels == 1
        if not foreground.any() or not positive.any():
            return labels.new_zeros((), dtype=torch.float32), None
        center = clusters[positive].mean(0, keepdim=True)  # p̄, the unbiased prototype
        table = torch.cat([clusters, center])
        dots, sq_norms = features.pixel_scalars(table, foreground)
        loss, saturated = dots.new_zeros(()), None
        if cfg.contrastive:
            cos = cosines(dots[:, :-1], sq_norms, clusters)
            contra, saturated = prototype_contrastive_loss(cos, positive, cfg.tau)
            loss = loss + contra
        if cfg.consistency:  # ‖f − p̄‖² = ‖f‖² − 2⟨f, p̄⟩ + ‖p̄‖², mean over pixels and dims
            sq_dist = sq_norms - 2 * dots[:, -1] + center.pow(2).sum()
            loss = loss + sq_dist.mean() / clusters.shape[1]
        return loss, saturated


class AlignmentObjective:
    """One batch's FedBCS loss (§1.2), collecting the local prototypes of the last epoch and
    running sums for the metrics."""

    def __init__(self, method: FedBCS, model: FedBCSUNet, broadcast: BCSBroadcast,
                 device: torch.device, collect_from: int) -> None:
        self.method, self.model, self.collect_from = method, model, collect_from
        self.levels = method.config.levels
        self.anchors = {level: (c.to(device), lab.to(device))
                        for level, (c, lab) in broadcast.prototypes.items()}
        self.step = 0
        # each collected batch's (2, D) class means (zero where absent) and the classes it shows
        self.blocks: dict[str, list[Tensor]] = {}
        self.shown: dict[str, list[Tensor]] = {}
        # running sums (no per-batch device sync): seg loss, alignment loss, saturation, terms
        self.running = torch.zeros(4, device=device)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.model(x)
        seg = joint_loss(out.logits, y)
        collect = self.step >= self.collect_from
        self.step += 1
        align = seg.new_zeros(())
        for level in self.levels:
            aligning = level in self.anchors
            if not (aligning or collect):
                continue  # nothing needs this level's features in this batch
            with torch.set_grad_enabled(aligning and torch.is_grad_enabled()):
                features = self.model.level_features(out, level)
            labels = resize_labels(y, features.size)
            if collect:
                self._collect(level, features, labels)
            if aligning:
                loss, saturated = self.method.alignment_loss(features, labels,
                                                             self.anchors[level])
                align = align + loss
                if saturated is not None:
                    self.running[2:] += torch.stack([saturated, saturated.new_ones(())])
        align = align / len(self.levels)
        self.running[:2] += torch.stack([seg.detach(), align.detach()])
        return seg + self.method.config.weight * align

    @torch.no_grad()
    def _collect(self, level: str, features: LevelFeatures, labels: Tensor) -> None:
        """§3.2: this batch's class means, kept towards the mean over batches."""
        block = torch.zeros(2, self.model.fusion[level].dim, dtype=torch.float64)
        shown = torch.zeros(2, dtype=torch.bool)
        for c in (0, 1):
            mask = labels == c
            n = int(mask.sum())
            if n == 0:
                continue
            block[c] = (features.class_sums(mask).double() / n).cpu()
            shown[c] = True
        self.blocks.setdefault(level, []).append(block)
        self.shown.setdefault(level, []).append(shown)

    def batch_means(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each collected batch's class means, level → (n, 2, D), and the classes it showed,
        level → (n, 2) (what local DP clips and noises)."""
        return ({level: torch.stack(b) for level, b in self.blocks.items()},
                {level: torch.stack(s) for level, s in self.shown.items()})

    def local_prototypes(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """§3.2: per level, the mean over the batches showing each class of their class means,
        and how many batches showed it (summed in batch order)."""
        means, counts = {}, {}
        for level, blocks in self.blocks.items():
            sums = sum(blocks, torch.zeros_like(blocks[0]))
            counts[level] = sum((s.long() for s in self.shown[level]),
                                torch.zeros(2, dtype=torch.long))
            means[level] = (sums / counts[level].clamp(min=1)[:, None]).float()
        return means, counts

    def metrics(self) -> dict[str, float]:
        seg, align, saturated, terms = self.running.tolist()
        out = {"train_seg_loss": seg / max(self.step, 1),
               "train_align_loss": align / max(self.step, 1)}
        if terms:
            out["train_contrastive_saturated"] = saturated / terms
        return out
