"""Differential privacy of what clients send, declared in config (`privacy`), applied where
the data lives, from seeded generators; accounting is `raysim.methods.accounting`'s. Pure
torch, no Ray: the engine calls these functions.

**Central, user-level** (DP-FedAvg, McMahan et al., ICLR 2018). On the worker, per client and
before the worker's exact sum: Δ_k = w_k − w (the delta from the broadcast, every floating
tensor) clipped to L2 norm C over all its tensors (`clip_update`); the worker sums the clipped
deltas with weight 1 each (`WeightSum.add(clipped, 1)`: sample counts are private too). On
the server, once: N(0, σ²C²) added to the sum and the mean taken over the expected clients per
round K, a fixed denominator (`central_update`). Adaptive clipping (Andrew et al., NeurIPS
2021): each client also reports whether ‖Δ_k‖ ≤ C; the server noises that count with σ_b and
moves C towards the target quantile (`next_clip`); the sum's noise drops to σ_Δ =
(σ⁻² − (2σ_b)⁻²)^(−1/2) so the pair costs exactly what σ alone would (`sum_noise_multiplier`).
Central DP trusts the server with each clipped delta: it bounds what the released model says
about any one client, not what the server sees.

**Local** (each client privatises its upload before it leaves; `privatize_upload`, one
mechanism per `uploads` kind, `raysim.methods.leakage.upload_kind`). The weights (when the
method shares them) become w + clip(Δ, C) + N(0, σ²C²), integer buffers stay the broadcast's,
and `num_samples` becomes 1 (the server weighs clients alike). Class statistics are clipped
per record and noised as sums with noised counts (`noised_class_statistics`):

- `prototypes` (FedProto, FPL, FedTGP): each sample's feature clipped to B; per class the sum
  plus N(0, σ²B²) and the count plus N(0, σ²); the prototype is sum / count. Protects: any one
  sample (add/remove). Classification only (a pixel is not a record).
- `class_gradients` (FedHPro): each sample's gradient of its cross-entropy w.r.t. (z, W, b) at
  the received classifier, clipped jointly to B, over every sample of the class (no
  `batch_real` subset, no DSA: a subset would cost a subsampling analysis); per class the sums
  plus N(0, σ²B²), the count plus N(0, σ²); then ∂W = S_W/n, ∂b = S_b/n and u = S_z/n² (the
  official scaling), n the noised count. Protects any one sample.
- `pixel_prototypes` (FedBCS): each last-epoch batch's (background, foreground) class means of
  one level, clipped jointly to B, summed, plus N(0, σ²B²); the batches showing each class,
  plus N(0, σ²). Protects any one image (replace-one: it changes one batch), at sensitivity 2B
  on the sums and √2 on the counts (the accountant sees σ/2 and σ/√2). FedBCS's objective
  keeps each last-epoch batch's class means (its prototypes average them) for it.
- `weights`: the weights alone. Protects the client's whole dataset (any two datasets: 2C).

Counts are `noised` (uploaded rounded, at least 0) or `withheld` (only whether the noised
count rounds to at least one: the server weighs the clients holding a class alike). A class
whose noised count rounds to zero is reported absent. Training metrics the simulator logs are
its instrumentation, not part of an upload.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from raysim.config import AdaptiveClipConfig, ConfigError, PrivacyConfig
from raysim.methods.aggregation import WeightSum
from raysim.seeding import CLIENT_NOISE, SERVER_NOISE, derive_seed
from raysim.types import Weights

# `raysim.methods.accounting` (dp-accounting, which imports scipy.signal: seconds) is imported
# where a plan is made or accounted, so a run without privacy never pays for it.

KNOWN_UPLOADS = ("weights", "prototypes", "class_gradients", "pixel_prototypes")
SUM_STREAM, COUNT_STREAM = 0, 1  # the server's two draws of a round, independent
READ_BATCH_SIZE = 256


# ----------------------------------------------------------------------------- streams


def client_noise_generator(seed: int, round_index: int, client_id: int) -> torch.Generator:
    """A client's local-DP noise: its own stream, apart from training's (so turning noise on
    changes no training draw)."""
    return torch.Generator().manual_seed(derive_seed(seed, CLIENT_NOISE, round_index, client_id))


def server_noise_generator(seed: int, round_index: int, stream: int = SUM_STREAM
                           ) -> torch.Generator:
    """The server's noise of a round: SUM_STREAM for the sum, COUNT_STREAM for the clipped
    count of adaptive clipping."""
    return torch.Generator().manual_seed(derive_seed(seed, SERVER_NOISE, round_index, stream))


def gaussian(shape: tuple[int, ...] | torch.Size, std: float, generator: torch.Generator
             ) -> Tensor:
    """N(0, std²) in float64 on the CPU (the same bits whatever device trained)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * std


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's privacy, resolved before Ray from `config.privacy` (σ calibrated, δ chosen,
    every check passed): what the workers, the server and the accountant use."""

    mechanism: str  # central | local
    kind: str  # the method's upload kind
    noise_multiplier: float  # σ (the accounted one)
    sum_noise_multiplier: float  # σ_Δ of the central sum: σ, less with adaptive clipping
    clip: float  # C (adaptive clipping: its start)
    delta: float
    sampling: str  # fixed | poisson
    num_clients: int
    clients_per_round: int  # K: the fixed denominator, and q = K/N under Poisson sampling
    accountant: str  # rdp | pld
    feature_clip: float  # B (local class statistics)
    counts: str  # noised | withheld
    weights_shared: bool  # local: the upload carries weights, which are privatised too
    adaptive: AdaptiveClipConfig | None = None
    count_noise: float | None = None  # σ_b of adaptive clipping
    warnings: tuple[str, ...] = ()

    @property
    def sampling_rate(self) -> float:
        return min(self.clients_per_round / self.num_clients, 1.0)

    @property
    def poisson(self) -> bool:
        return self.sampling == "poisson"

    def event(self, sigma: float | None = None) -> Any:
        """The DP event of one round (central) or of one participation (local)."""
        from raysim.methods.accounting import central_event

        sigma = self.noise_multiplier if sigma is None else sigma
        if self.mechanism == "central":
            return central_event(sigma, self.sampling, self.num_clients,
                                 self.clients_per_round)
        return local_event(self.kind, sigma, self.weights_shared)

    def make_accountant(self) -> Any:
        """ε after a count of events (`Accountant.epsilon(count)`): rounds (central), a
        client's participations (local)."""
        from raysim.methods.accounting import Accountant

        return Accountant(self.event(), self.delta, self.accountant)

    def describe(self) -> str:
        """One line: the mechanism, σ, the bounds and δ (printed before a run starts)."""
        bound = f"C = {self.clip:g}" + (" (adaptive)" if self.adaptive else "")
        if self.mechanism == "local" and self.kind != "weights":
            bound += f", B = {self.feature_clip:g}, counts {self.counts}"
        return (f"{self.mechanism} DP of {self.kind.replace('_', ' ')}, σ = "
                f"{self.noise_multiplier:.4g}, {bound}, δ = {self.delta:.3g}, {self.sampling} "
                f"client sampling, {self.accountant.upper()} accountant")


def local_event(kind: str, sigma: float, weights_shared: bool = True) -> Any:
    """One local release: a Gaussian per privatised part, each multiplier σ × (its clip
    bound / its sensitivity) (module docstring)."""
    from raysim.methods.accounting import gaussians

    parts = [sigma / 2] if weights_shared or kind == "weights" else []
    if kind in ("prototypes", "class_gradients"):
        parts += [sigma, sigma]
    elif kind == "pixel_prototypes":
        parts += [sigma / 2, sigma / math.sqrt(2)]
    return gaussians(parts)


def plan_privacy(privacy: PrivacyConfig, *, method: str, uploads: str, weighted_mean: bool,
                 num_clients: int, clients_per_round: int, rounds: int,
                 task: str = "classification", weights_shared: bool = True,
                 records: int | None = None, participations: int | None = None,
                 own_server_update: bool = False) -> PrivacyPlan | None:
    """The resolved plan (None with privacy off), or one ConfigError line. `records`: the
    smallest client's sample count (local DP's δ is per client dataset; default N clients);
    `participations`: the most rounds any client takes part in (local calibration; default
    every round); `own_server_update`: the method overrides `server_update` (see
    `check_method`)."""
    if privacy.mechanism == "none":
        return None
    from raysim.methods.accounting import UnreachableTarget, calibrate_noise

    check_method(privacy.mechanism, method, uploads, weighted_mean, task, own_server_update)
    population = num_clients if privacy.mechanism == "central" else (records or num_clients)
    delta = privacy.delta if privacy.delta is not None else population ** -1.1
    warnings = []
    if delta >= 1 / population:
        unit = "clients" if privacy.mechanism == "central" else "samples per client"
        warnings.append(f"privacy.delta: {delta:.3g} >= 1/N = {1 / population:.3g} (N = "
                        f"{population} {unit}) lets a mechanism publish one record outright; "
                        f"the usual choice is 1/N^1.1 = {population ** -1.1:.3g}")
    plan = PrivacyPlan(
        mechanism=privacy.mechanism, kind=uploads, noise_multiplier=0.0,
        sum_noise_multiplier=0.0, clip=privacy.clip, delta=delta, sampling=privacy.sampling,
        num_clients=num_clients, clients_per_round=clients_per_round,
        accountant=privacy.accountant, feature_clip=privacy.local.feature_clip,
        counts=privacy.local.counts, weights_shared=weights_shared,
        adaptive=privacy.adaptive, warnings=tuple(warnings))
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon is not None:
        count = rounds if privacy.mechanism == "central" else (participations or rounds)
        try:
            sigma = calibrate_noise(plan.event, count, delta, privacy.target_epsilon,
                                    privacy.accountant)
        except UnreachableTarget as error:
            raise ConfigError(
                f"privacy.target_epsilon: {privacy.target_epsilon:g} cannot be reached within "
                f"{rounds} rounds at δ = {delta:.3g} ({error}); raise target_epsilon, or run "
                "fewer rounds or sample fewer clients per round") from None
    count_noise, sum_sigma = None, sigma
    if privacy.adaptive is not None:
        count_noise = privacy.adaptive.count_noise or clients_per_round / 20
        if sigma > 0 and not count_noise > sigma / 2:
            raise ConfigError(
                f"privacy.adaptive.count_noise: {count_noise:g} must exceed noise_multiplier/2 "
                f"= {sigma / 2:.3g} (the clipped count spends privacy too); raise it (Andrew et "
                "al. use clients_per_round/20) or lower σ")
        sum_sigma = sum_noise_multiplier(sigma, count_noise)
    return dataclasses.replace(plan, noise_multiplier=sigma, sum_noise_multiplier=sum_sigma,
                               count_noise=count_noise)


def check_method(mechanism: str, method: str, uploads: str, weighted_mean: bool,
                 task: str, own_server_update: bool = False) -> None:
    """Whether `mechanism` covers everything `method` sends; else one ConfigError line. A
    method whose upload is `weights` and whose server step is its own (`own_server_update`)
    reads more of each upload than the weights (SCAFFOLD's control variates), which neither
    mechanism privatises."""
    if mechanism == "none":
        return
    if uploads == "weights" and own_server_update:
        raise ConfigError(
            f"privacy.mechanism: {method}'s server step reads more of each client's upload "
            "than its weights (its own server_update, e.g. control variates), which no "
            "privacy mechanism covers; use a method that averages weights only (fedavg, "
            "fedprox, moon) or one whose upload local DP knows")
    if mechanism == "central":
        if uploads != "weights":
            raise ConfigError(
                f"privacy.mechanism: central DP noises the mean model update only; {method} "
                f"also uploads {uploads.replace('_', ' ')}, which would reach the server "
                "unprotected (use mechanism: local)")
        if not weighted_mean:
            raise ConfigError(
                f"privacy.mechanism: central DP adds its noise to the mean of clipped client "
                f"deltas; {method} aggregates its updates otherwise (its own aggregate), so "
                "the noise would not bound what its model reveals (use a mean-aggregating "
                "method, or mechanism: local)")
        return
    if uploads not in KNOWN_UPLOADS:
        raise ConfigError(
            f"privacy.mechanism: local DP does not know {method}'s upload {uploads!r}; it "
            f"privatises: {', '.join(KNOWN_UPLOADS)}")
    if uploads == "prototypes" and task != "classification":
        raise ConfigError(
            f"privacy.mechanism: local DP of {method}'s pixel prototypes on a {task} task is "
            "not supported (a record, an image, spans many pixels of a class mean); use it on "
            "a classification task, or fedbcs")


# ----------------------------------------------------------------------------- central


def client_delta(trained: Weights, received: Weights) -> dict[str, Tensor]:
    """Δ = trained − received in float64, over the floating tensors the upload carries
    (integer buffers such as BatchNorm's batch counter count the client's batches: not sent)."""
    return {name: trained[name].detach().cpu().double() - received[name].detach().cpu().double()
            for name in trained if trained[name].is_floating_point()}


def l2_norm(tensors: dict[str, Tensor]) -> float:
    """The L2 norm over every tensor together (in name order: the same bits every time)."""
    return math.sqrt(sum(float(tensors[name].double().pow(2).sum()) for name in sorted(tensors)))


def clip_update(delta: dict[str, Tensor], clip: float) -> tuple[dict[str, Tensor], float]:
    """Δ·min(1, C/‖Δ‖) (float64) and ‖Δ‖: the client's whole contribution within norm C."""
    norm = l2_norm(delta)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: value.double() * scale for name, value in delta.items()}, norm


def add_noise(tensors: dict[str, Tensor], std: float, generator: torch.Generator
              ) -> dict[str, Tensor]:
    """Each tensor (float64) plus N(0, std²), drawn in name order."""
    return {name: tensors[name].double() + gaussian(tensors[name].shape, std, generator)
            for name in sorted(tensors)}


def summed_deltas(total: WeightSum) -> dict[str, Tensor]:
    """Σ_k clip(Δ_k) from the workers' merged exact sum (each added with weight 1), as
    float64: the exact total, not the mean."""
    return {name: torch.from_numpy(total.total(name)) for name in total.bins}


def apply_delta(received: Weights, delta: dict[str, Tensor]) -> Weights:
    """received + delta for the tensors `delta` holds, cast back; the rest as received."""
    return {name: (value.double() + delta[name]).to(value.dtype) if name in delta else value
            for name, value in received.items()}


def central_update(received: Weights, summed: dict[str, Tensor], plan: PrivacyPlan,
                   clip: float, generator: torch.Generator) -> Weights:
    """The new global weights: w + (Σ_k clip(Δ_k) + N(0, σ_Δ²C²)) / K, K the expected clients
    per round (a fixed denominator: the number that took part is not released)."""
    noised = add_noise(summed, plan.sum_noise_multiplier * clip, generator)
    return apply_delta(received, {name: value / plan.clients_per_round
                                  for name, value in noised.items()})


def sum_noise_multiplier(sigma: float, count_noise: float) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm. 1): the sum's noise that,
    with the clipped count's σ_b (sensitivity 1/2), costs what σ alone costs."""
    if sigma == 0:
        return 0.0
    return (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5


def next_clip(clip: float, unclipped: int, plan: PrivacyPlan, generator: torch.Generator
              ) -> float:
    """C·exp(−η_C(b̃ − γ)), b̃ = (#{k: ‖Δ_k‖ ≤ C} + N(0, σ_b²)) / K (geometric update)."""
    adaptive = plan.adaptive
    noised = unclipped + float(gaussian((), plan.count_noise, generator))
    share = noised / plan.clients_per_round
    return clip * math.exp(-adaptive.clip_lr * (share - adaptive.target_quantile))


# ----------------------------------------------------------------------------- local


def privatize_weights(trained: Weights, received: Weights, clip: float, sigma: float,
                      generator: torch.Generator) -> Weights:
    """w + clip(Δ, C) + N(0, σ²C²) for the floating tensors `trained` holds (cast back);
    integer buffers are the received ones."""
    clipped, _ = clip_update(client_delta(trained, received), clip)
    noised = add_noise(clipped, sigma * clip, generator)
    return {name: (received[name].detach().cpu().double() + noised[name]).to(value.dtype)
            if name in noised else received[name].detach().cpu().clone()
            for name, value in trained.items()}


def clip_rows(x: Tensor, bound: float) -> Tensor:
    """Each row scaled to L2 norm at most `bound` (float64)."""
    x = x.double()
    norms = x.norm(dim=1, keepdim=True)
    return x * (bound / norms.clamp(min=1e-300)).clamp(max=1.0)


@dataclass(frozen=True)
class ClassStatistics:
    """Noised class statistics as uploaded: means (C, ...) float32 (zero rows where absent),
    counts (C,) long (`noised`: rounded, or `withheld`: 0/1), the (C,) present mask and the
    noised counts themselves (float64, for the normalisations)."""

    means: Tensor
    counts: Tensor
    present: Tensor
    noised_counts: Tensor


def noised_class_statistics(sums: Tensor, counts: Tensor, bound: float, sigma: float,
                            counts_mode: str, generator: torch.Generator,
                            count_bound: float = 1.0) -> ClassStatistics:
    """sums (C, ...) + N(0, σ²B²) and counts (C,) + N(0, σ²·count_bound²); a class is present
    where the noised count rounds to at least 1 (so σ → 0 gives the exact counts), its mean is
    noised sum / max(noised count, 1)."""
    noised_sums = sums.double() + gaussian(sums.shape, sigma * bound, generator)
    noised = counts.double() + gaussian(counts.shape, sigma * count_bound, generator)
    present = noised >= 0.5
    shape = (-1, *[1] * (sums.dim() - 1))
    means = torch.where(present.view(shape), noised_sums / noised.clamp(min=1).view(shape),
                        torch.zeros((), dtype=torch.float64))
    uploaded = noised.round().clamp(min=0).long() if counts_mode == "noised" else present.long()
    return ClassStatistics(means.float(), uploaded * present, present, noised)


def private_prototypes(features: Tensor, labels: Tensor, num_classes: int, bound: float,
                       sigma: float, counts_mode: str, generator: torch.Generator
                       ) -> ClassStatistics:
    """Class means of per-sample features clipped to `bound`, noised (module docstring)."""
    clipped = clip_rows(features.detach().cpu(), bound)
    labels = labels.cpu()
    sums = torch.zeros(num_classes, clipped.shape[1], dtype=torch.float64).index_add_(
        0, labels, clipped)
    counts = torch.bincount(labels, minlength=num_classes)
    return noised_class_statistics(sums, counts, bound, sigma, counts_mode, generator)


def private_class_gradients(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                            bound: float, sigma: float, counts_mode: str,
                            generator: torch.Generator) -> dict[str, Tensor]:
    """FedHPro's (u, ∂W, ∂b) per class from per-sample gradients of the cross-entropy of a
    linear classifier (W, b) at features z_i: g_b = p_i − e_y, g_z = Wᵀg_b, g_W = g_b z_iᵀ,
    jointly clipped to `bound`, summed per class and noised; normalised by the noised count
    (u by its square, the official scaling). Keys as `GradientUpdate`'s fields."""
    z = features.detach().cpu().double()
    w, b = weight.detach().cpu().double(), bias.detach().cpu().double()
    labels = labels.cpu()
    classes = w.shape[0]
    g_b = torch.softmax(z @ w.T + b, dim=1) - torch.nn.functional.one_hot(labels, classes)
    g_z = g_b @ w
    norms = (g_z.pow(2).sum(1) + g_b.pow(2).sum(1) * (z.pow(2).sum(1) + 1)).sqrt()
    scale = (bound / norms.clamp(min=1e-300)).clamp(max=1.0)
    g_b, g_z = g_b * scale[:, None], g_z * scale[:, None]
    by_class = torch.nn.functional.one_hot(labels, classes).double().T  # (C, n)
    sums = torch.cat([by_class @ g_z,  # (C, D)
                      torch.einsum("cn,nk,nd->ckd", by_class, g_b, z).flatten(1),  # (C, C·D)
                      by_class @ g_b], dim=1)  # (C, C)
    stats = noised_class_statistics(sums, torch.bincount(labels, minlength=classes), bound,
                                    sigma, counts_mode, generator)
    dim = z.shape[1]
    per_sample = stats.means.double()
    n = stats.noised_counts.clamp(min=1)[:, None]
    return {"feature_grads": (per_sample[:, :dim] / n).float(),
            "weight_grads": per_sample[:, dim:dim + classes * dim].reshape(
                classes, classes, dim).float(),
            "bias_grads": per_sample[:, dim + classes * dim:].float(),
            "present": stats.present}


def private_pixel_prototypes(batch_means: dict[str, Tensor], shown: dict[str, Tensor],
                             bound: float, sigma: float, counts_mode: str,
                             generator: torch.Generator
                             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """FedBCS's per-level (2, D) prototypes and counts from each last-epoch batch's class
    means `batch_means[level]` (n, 2, D) and the classes it shows `shown[level]` (n, 2):
    each batch's block clipped jointly to `bound`, summed and noised, the batches showing
    each class counted and noised (levels in name order)."""
    prototypes, counts = {}, {}
    for level in sorted(batch_means):
        blocks = batch_means[level].detach().cpu().double() * shown[level].cpu()[..., None]
        clipped = clip_rows(blocks.flatten(1), bound).view_as(blocks)
        stats = noised_class_statistics(clipped.sum(0), shown[level].long().sum(0), bound,
                                        sigma, counts_mode, generator)
        prototypes[level], counts[level] = stats.means, stats.counts
    return prototypes, counts


# ----------------------------------------------------------------------------- uploads


@torch.no_grad()
def sample_features(model: torch.nn.Module, data: Any) -> tuple[Tensor, Tensor]:
    """(n, d) features and (n,) labels of every sample of a client, in eval mode, on the CPU."""
    model.eval()
    features, labels = [], []
    for x, y in data.ordered_batches(READ_BATCH_SIZE):
        features.append(model(x).features.cpu())
        labels.append(y.cpu())
    return torch.cat(features), torch.cat(labels)


def _weights_part(update: Any, step: Any, plan: PrivacyPlan, generator: torch.Generator
                  ) -> dict[str, Any]:
    fields: dict[str, Any] = {"num_samples": 1}
    if plan.weights_shared or plan.kind == "weights":
        fields["weights"] = privatize_weights(update.weights, step.broadcast.weights, plan.clip,
                                              plan.noise_multiplier, generator)
    return fields


def privatize_weight_upload(update: Any, step: Any, plan: PrivacyPlan,
                            generator: torch.Generator) -> Any:
    return dataclasses.replace(update, **_weights_part(update, step, plan, generator))


def privatize_prototype_upload(update: Any, step: Any, plan: PrivacyPlan,
                               generator: torch.Generator) -> Any:
    """The trained model's per-sample features, clipped, as noised class means."""
    fields = _weights_part(update, step, plan, generator)
    features, labels = sample_features(step.model, step.data)
    stats = private_prototypes(features, labels, update.prototypes.shape[0], plan.feature_clip,
                               plan.noise_multiplier, plan.counts, generator)
    return dataclasses.replace(update, prototypes=stats.means, counts=stats.counts, **fields)


def privatize_gradient_upload(update: Any, step: Any, plan: PrivacyPlan,
                              generator: torch.Generator) -> Any:
    """FedHPro's class gradients recomputed at the received model, per sample, noised."""
    fields = _weights_part(update, step, plan, generator)
    received = copy.deepcopy(step.model)
    received.load_state_dict(step.broadcast.weights)
    features, labels = sample_features(received, step.data)
    grads = private_class_gradients(features, labels, received.classifier.weight,
                                    received.classifier.bias, plan.feature_clip,
                                    plan.noise_multiplier, plan.counts, generator)
    return dataclasses.replace(update, **grads, **fields)


def privatize_pixel_upload(update: Any, step: Any, plan: PrivacyPlan,
                           generator: torch.Generator) -> Any:
    """FedBCS's prototypes from the per-batch class means its upload carries under privacy
    (`update.batch_means`: level → (n, 2, D), level → (n, 2) shown), which go no further."""
    fields = _weights_part(update, step, plan, generator)
    batch_means, shown = update.batch_means
    prototypes, counts = private_pixel_prototypes(batch_means, shown, plan.feature_clip,
                                                  plan.noise_multiplier, plan.counts, generator)
    return dataclasses.replace(update, prototypes=prototypes, counts=counts, batch_means=None,
                               **fields)


LOCAL_MECHANISMS = {"weights": privatize_weight_upload,
                    "prototypes": privatize_prototype_upload,
                    "class_gradients": privatize_gradient_upload,
                    "pixel_prototypes": privatize_pixel_upload}


def privatize_upload(update: Any, step: Any, plan: PrivacyPlan, generator: torch.Generator
                     ) -> Any:
    """A client's upload as it leaves the worker under local DP: the mechanism of its kind
    (`plan.kind`), noise from `generator` (`client_noise_generator`), weights first."""
    return LOCAL_MECHANISMS[plan.kind](update, step, plan, generator)
