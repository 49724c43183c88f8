"""FedBCS — Zhao, Huang, Wang, Zhao, Zhuang, Jiang, Wan, Ye, "Divide, Conquer and Unite:
Hierarchical Style-Recalibrated Prototype Alignment for Federated Medical Image Segmentation",
AAAI 2026. Written from the official code as the spec `fedbcs.md` records it (§n below).

Model: the U-Net of `raysim.nn.models.UNet` with
  * FSR, frequency-domain style recalibration, after encoder stages 2–4 (§2):
        FSR(x) = γ ⊙ F⁻¹( (w₀·|F(IN x)| + w₁·|F(x)|) · e^{i∠F(x)} ) + β,   w = softmax(h / T)
    which equals γ ⊙ (w₀·IN(x) + w₁·x) + β (§2.3; `fsr: closed_form`, three FFTs cheaper);
  * context-aware fusion per level (§3.1): the deepest selected stage of the encoder (decoder)
    is the context; every other selected stage i gives e_i = Conv1×1(concat(s_i, ↑ctx)), and the
    e_i, nearest-resized to one resolution and concatenated, are the level's pixel features F^l.

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

`feature_path: per_branch` (default) computes the same prototypes and losses as
`materialized` (the official concatenation at full resolution) without building the (B, 768,
H, W) tensor: a 1×1 conv commutes with nearest resizing, and means, dot products and squared
norms over a concatenation split into per-branch sums, so each branch stays at its own
resolution and only per-pixel scalars are upsampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.fedavg import FedAvg
from algorithms.fpl import cluster_prototypes
from raysim.algorithm import (
    Broadcast,
    ClientUpdate,
    LocalRound,
    ServerContext,
    ServerState,
    Weights,
    copy_weights,
    extend,
)
from raysim.config import require
from raysim.methods.features import NUM_STAGES
from raysim.nn.segmentation import joint_loss, resize_labels

LEVELS = ("encoder", "decoder")
COS_EPS = 1e-8


# ---------------------------------------------------------------------------- FSR (§2)


class StyleRecalibration(nn.Module):
    """FSR (§2.2): amplitudes of x and of IN(x) mixed by w = softmax(h/T), the phase of x
    kept, then a per-channel affine. `mode="closed_form"` computes γ(w₀·IN(x) + w₁·x) + β,
    which §2.3 shows equal up to the code's 1e-5 denormal clamps."""

    def __init__(self, channels: int, mode: str = "fft", temperature: float = 0.1) -> None:
        super().__init__()
        self.mode, self.temperature = mode, temperature
        self.mix_logits = nn.Parameter(torch.zeros(2, 1, 1))  # h, shared across channels
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.softmax(self.mix_logits / self.temperature, dim=0)
        normalized = F.instance_norm(x, eps=1e-5)
        if self.mode == "closed_form":
            mixed = w[0] * normalized + w[1] * x
        else:
            mixed = self._fft_mix(x, normalized, w)
        return self.gamma * mixed + self.beta

    @staticmethod
    def _fft_mix(x: Tensor, normalized: Tensor, w: Tensor) -> Tensor:
        """The official decompose / compose (§2.2), denormal clamps included."""
        h, wd = x.shape[-2:]
        spectrum, norm_spectrum = torch.fft.fft2(x), torch.fft.fft2(normalized)
        amplitude = torch.sqrt(_clamp_denormal(spectrum.abs().pow(2)))
        norm_amplitude = torch.sqrt(_clamp_denormal(norm_spectrum.abs().pow(2)))
        phase = torch.atan2(spectrum.imag, _clamp_denormal(spectrum.real))
        mixed = w[0] * norm_amplitude + w[1] * amplitude
        composed = torch.polar(mixed / (h * wd) ** 0.5, phase)
        return torch.fft.irfft2(composed, s=(h, wd), norm="ortho")


def _clamp_denormal(t: Tensor) -> Tensor:
    """The code's `replace_denormals`: values in (−1e-5, 1e-5) become 1e-5."""
    return torch.where(t.abs() < 1e-5, torch.full_like(t, 1e-5), t)


# ---------------------------------------------------------------------------- fusion (§3.1)


def level_order(level: str, layers: list[int]) -> list[int]:
    """Stage order of one level as the official code lists it: the encoder finest first, the
    decoder deepest first. The deepest stage is the context; the first branch sets the level's
    resolution (H for the encoder, H/4 for the decoder with the default layers)."""
    return sorted(set(layers), reverse=(level == "decoder"))


class ContextFusion(nn.Module):
    """One level's 1×1 fusion convs: e_i = Conv(concat(s_i, ↑ctx)) for each non-context stage."""

    def __init__(self, stages: list[int], channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.context = max(stages)
        self.branches = [s for s in stages if s != self.context]
        context_channels = channels[self.context]
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[s] + context_channels, out_channels, 1) for s in self.branches
        )
        self.dim = out_channels * len(self.branches)

    def materialized(self, stage_maps: tuple[Tensor, ...]) -> Tensor:
        """The official feature F^l (B, D, H_l, W_l): fuse each branch at its own resolution,
        nearest-resize all to the first branch's and concatenate."""
        context = stage_maps[self.context]
        fused = [
            conv(torch.cat([stage_maps[s], _resize(context, stage_maps[s].shape[-2:])], 1))
            for s, conv in zip(self.branches, self.convs)
        ]
        size = fused[0].shape[-2:]
        return torch.cat([_resize(f, size) for f in fused], 1)

    def per_branch(self, stage_maps: tuple[Tensor, ...]) -> FactoredFeatures:
        """The same feature, never built: each branch keeps its conv's inputs (the stage,
        subsampled first if finer than the level, and the context at its own resolution) with
        the conv's weights. A 1×1 conv commutes with nearest resizing, so every quantity the
        method needs is computed from these (see `FactoredFeatures`)."""
        size = tuple(stage_maps[self.branches[0]].shape[-2:])
        context = stage_maps[self.context]
        branches = []
        for s, conv in zip(self.branches, self.convs):
            stage = stage_maps[s]
            if stage.shape[-1] > size[-1]:
                stage = _resize(stage, size)
            weight = conv.weight[:, :, 0, 0]
            c = stage.shape[1]
            branches.append(FactoredBranch(stage, context, weight[:, :c], weight[:, c:],
                                           conv.bias, size[-1] // stage.shape[-1]))
        return FactoredFeatures(branches, size)


def _resize(t: Tensor, size: Any) -> Tensor:
    return t if tuple(t.shape[-2:]) == tuple(size) else F.interpolate(t, size=tuple(size),
                                                                     mode="nearest")


def _sum_pool(weights: Tensor, factor: int) -> Tensor:
    """(B, 1, H, W) pixel weights → the total each (factor × factor) block stands for."""
    return weights if factor == 1 else F.avg_pool2d(weights, factor) * factor**2


@dataclass
class FactoredBranch:
    """e = W_s·s + ↑(W_c·ctx + b) at the branch's resolution, kept as its factors."""

    stage: Tensor  # s (B, C_s, h, w)
    context: Tensor  # ctx (B, C_c, h_c, w_c)
    stage_weight: Tensor  # W_s (O, C_s)
    context_weight: Tensor  # W_c (O, C_c)
    bias: Tensor  # b (O,)
    factor: int  # nearest-upsampling factor from the branch's resolution to the level's

    def context_part(self) -> Tensor:
        """u = W_c·ctx + b at the context's resolution (B, O, h_c, w_c)."""
        return torch.einsum("bchw,oc->bohw", self.context, self.context_weight) + \
            self.bias.view(1, -1, 1, 1)

    def up(self, t: Tensor) -> Tensor:
        """Context resolution → branch resolution (nearest)."""
        return _resize(t, self.stage.shape[-2:])

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """Σ_p weights_p · e_p, (O,), from (B, 1, h, w) weights at the branch's resolution."""
        ratio = self.stage.shape[-1] // self.context.shape[-1]
        context_weights = _sum_pool(weights, ratio)
        return self.stage_weight @ (self.stage * weights).sum((0, 2, 3)) + \
            (self.context_part() * context_weights).sum((0, 2, 3))

    def scalars(self, anchors: Tensor) -> Tensor:
        """(B, A + 1, h, w): ⟨e_p, a⟩ for each row a of `anchors` (A, O), then ‖e_p‖², with
        ‖W_s s + u‖² = sᵀ(W_sᵀW_s)s + 2 sᵀW_sᵀu + ‖u‖² — nothing wider than C_s at (h, w)."""
        s, u = self.stage, self.context_part()
        dots = torch.einsum("bchw,ac->bahw", s, anchors @ self.stage_weight) + \
            self.up(torch.einsum("bohw,ao->bahw", u, anchors))
        gram = self.stage_weight.T @ self.stage_weight
        sq = (s * torch.einsum("bchw,cd->bdhw", s, gram)).sum(1, keepdim=True) + \
            2 * (s * self.up(torch.einsum("bohw,oc->bchw", u, self.stage_weight))).sum(
                1, keepdim=True) + self.up(u.pow(2).sum(1, keepdim=True))
        return torch.cat([dots, sq], 1)


@dataclass
class DenseFeatures:
    """F^l as the official code holds it: one (B, D, H, W) tensor."""

    tensor: Tensor

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])

    def class_sums(self, mask: Tensor) -> Tensor:
        return self.tensor.permute(0, 2, 3, 1)[mask].sum(0)

    def pixel_scalars(self, anchors: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        f = self.tensor.permute(0, 2, 3, 1)[mask]  # (N, D), the official flattened copy
        return f @ anchors.T, f.pow(2).sum(1)


@dataclass
class FactoredFeatures:
    """F^l of one level as factored branches (concatenated in order) at resolution `size`."""

    branches: list[FactoredBranch]
    size: tuple[int, int]

    def class_sums(self, mask: Tensor) -> Tensor:
        """Σ of F over the level-resolution pixels of `mask` (B, H, W), (D,)."""
        m = mask[:, None].to(self.branches[0].stage.dtype)
        return torch.cat([b.weighted_sum(_sum_pool(m, b.factor)) for b in self.branches])

    def pixel_scalars(self, anchors: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """For the pixels of `mask`: ⟨f_i, a⟩ for each row a of `anchors` (N, A), and ‖f_i‖²
        (N,): per-branch scalars, nearest-upsampled to the level's resolution and summed."""
        total, offset = None, 0
        for branch in self.branches:
            width = branch.stage_weight.shape[0]
            scalars = _resize(branch.scalars(anchors[:, offset:offset + width]), self.size)
            offset += width
            total = scalars if total is None else total + scalars
        picked = total.permute(0, 2, 3, 1)[mask]
        return picked[:, :-1], picked[:, -1]


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


# ---------------------------------------------------------------------------- the method


class FedBCS(FedAvg):
    tasks = ("segmentation",)
    reported_metrics = (
        "train_seg_loss", "train_align_loss", "train_contrastive_saturated",
        *(f"server_clusters_{level}_{c}" for level in LEVELS
          for c in ("background", "foreground")))

    uploads = "pixel_prototypes"
    search_space = {**FedAvg.search_space,
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
            require(self.fsr in ("fft", "closed_form", "none"), "fsr",
                    f"choose one of fft, closed_form, none (got {self.fsr!r})")
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
            require(self.feature_path in ("per_branch", "materialized"), "feature_path",
                    "choose one of per_branch, materialized")

    # ---------------------------------------------------------------- model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """FSR after encoder stages 2–4 (indices 1–3, §2.1) and one fusion per level."""
        cfg = self.config
        if cfg.fsr != "none":
            for i in (1, 2, 3):
                model.recalibrate[i] = StyleRecalibration(model.encoder_channels[i], cfg.fsr,
                                                          cfg.fsr_temperature)
        fusion = {}
        for level in cfg.levels:
            channels = getattr(model, f"{level}_channels")
            stages = level_order(level, getattr(cfg, f"{level}_layers"))
            width = cfg.fusion_channels or channels[max(stages)]
            fusion[level] = ContextFusion(stages, channels, width)
        model.fusion = nn.ModuleDict(fusion)
        return model

    def level_features(
        self, model: nn.Module, out: Any, level: str
    ) -> DenseFeatures | FactoredFeatures:
        """F^l of one level; both forms offer `size`, `class_sums` and `pixel_scalars`."""
        stage_maps = out.encoder if level == "encoder" else out.decoder
        fusion = model.fusion[level]
        if self.config.feature_path == "materialized":
            return DenseFeatures(fusion.materialized(stage_maps))
        return fusion.per_branch(stage_maps)

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

    def upload(self, step: LocalRound) -> BCSUpdate:
        prototypes, counts = step.objective.local_prototypes()
        return extend(super().upload(step), BCSUpdate, prototypes=prototypes, counts=counts)

    def alignment_loss(
        self, features: DenseFeatures | FactoredFeatures, labels: Tensor,
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

    def __init__(self, method: FedBCS, model: nn.Module, broadcast: BCSBroadcast,
                 device: torch.device, collect_from: int) -> None:
        self.method, self.model, self.collect_from = method, model, collect_from
        self.levels = method.config.levels
        self.anchors = {level: (c.to(device), lab.to(device))
                        for level, (c, lab) in broadcast.prototypes.items()}
        self.step = 0
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
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
                features = self.method.level_features(self.model, out, level)
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
    def _collect(
        self, level: str, features: DenseFeatures | FactoredFeatures, labels: Tensor
    ) -> None:
        """§3.2: this batch's class means, summed towards the mean over batches."""
        if level not in self.sums:
            dim = self.model.fusion[level].dim
            self.sums[level] = torch.zeros(2, dim, dtype=torch.float64)
            self.counts[level] = torch.zeros(2, dtype=torch.long)
        for c in (0, 1):
            mask = labels == c
            n = int(mask.sum())
            if n == 0:
                continue
            self.sums[level][c] += (features.class_sums(mask).double() / n).cpu()
            self.counts[level][c] += 1

    def local_prototypes(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        means = {level: (s / self.counts[level].clamp(min=1)[:, None]).float()
                 for level, s in self.sums.items()}
        return means, dict(self.counts)

    def metrics(self) -> dict[str, float]:
        seg, align, saturated, terms = self.running.tolist()
        out = {"train_seg_loss": seg / max(self.step, 1),
               "train_align_loss": align / max(self.step, 1)}
        if terms:
            out["train_contrastive_saturated"] = saturated / terms
        return out
