"""FedBCS's model (spec fedbcs.md §2, §3.1): the U-Net of `raysim.nn.models.UNet` with

  * FSR, frequency-domain style recalibration, after encoder stages 2–4 (§2):
        FSR(x) = γ ⊙ F⁻¹( (w₀·|F(IN x)| + w₁·|F(x)|) · e^{i∠F(x)} ) + β,   w = softmax(h / T)
    which equals γ ⊙ (w₀·IN(x) + w₁·x) + β (§2.3; `closed_form`, three FFTs cheaper);
  * context-aware fusion per level (§3.1): the deepest selected stage of the encoder (decoder)
    is the context; every other selected stage i gives e_i = Conv1×1(concat(s_i, ↑ctx)), and the
    e_i, nearest-resized to one resolution and concatenated, are the level's pixel features F^l.

F^l comes in two forms with the same values: `materialized` (the official concatenation at full
resolution) and `per_branch`, which never builds the (B, 768, H, W) tensor: a 1×1 conv commutes
with nearest resizing, and means, dot products and squared norms over a concatenation split into
per-branch sums, so each branch stays at its own resolution and only per-pixel scalars are
upsampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysim.nn.models import UNet

LEVELS = ("encoder", "decoder")
FSR_STAGES = (1, 2, 3)  # encoder stages 2–4 (§2.1)
FSR_FORMS = ("fft", "closed_form", "none")
FEATURE_PATHS = ("per_branch", "materialized")


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


def level_order(level: str, layers: Sequence[int]) -> list[int]:
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


LevelFeatures = DenseFeatures | FactoredFeatures


# ---------------------------------------------------------------------------- the model


class FedBCSUNet(UNet):
    """A U-Net with FSR after encoder stages 2–4 (`fsr`: fft | closed_form | none) and one
    context fusion per level of `layers` ({level: its stages}), `fusion_channels` wide per
    branch (None: the context stage's width).

    It takes over the layers of an already built U-Net (initialised under the run's seed) under
    their own names and adds its own after them, so the state-dict keys are the U-Net's with
    `recalibrate.<i>.*` and `fusion.<level>.*` (the keys FedBCS checkpoints hold); the U-Net
    given is left as it was. The forward pass is the U-Net's, which runs `recalibrate[i]` on
    encoder stage i's output.
    """

    def __init__(self, unet: UNet, layers: Mapping[str, Sequence[int]], fsr: str = "fft",
                 fsr_temperature: float = 0.1, fusion_channels: int | None = None,
                 feature_path: str = "per_branch") -> None:
        if not isinstance(unet, UNet):
            raise TypeError(f"FedBCSUNet builds on raysim.nn.models.UNet, got "
                            f"{type(unet).__name__}")
        nn.Module.__init__(self)
        for name, module in unet.named_children():
            self.add_module(name, module)
        self.encoder_channels, self.decoder_channels = unet.encoder_channels, unet.decoder_channels
        self.feature_path = feature_path
        self.recalibrate = nn.ModuleList(
            StyleRecalibration(channels, fsr, fsr_temperature)
            if fsr != "none" and i in FSR_STAGES else original
            for i, (channels, original) in enumerate(zip(unet.encoder_channels,
                                                         unet.recalibrate)))
        fusion = {}
        for level, stages in layers.items():
            channels = getattr(self, f"{level}_channels")
            stages = level_order(level, stages)
            fusion[level] = ContextFusion(stages, channels,
                                          fusion_channels or channels[max(stages)])
        self.fusion = nn.ModuleDict(fusion)

    def level_features(self, out: Any, level: str) -> LevelFeatures:
        """F^l of one level from the forward pass's `SegmentationOutput`; both forms offer
        `size`, `class_sums` and `pixel_scalars`."""
        stage_maps = out.encoder if level == "encoder" else out.decoder
        fusion = self.fusion[level]
        if self.feature_path == "materialized":
            return DenseFeatures(fusion.materialized(stage_maps))
        return fusion.per_branch(stage_maps)
