"""What an honest-but-curious server learns from a client's upload, measured against the
client's private truth (`diagnostics.leakage`). Nothing here changes training: the probe reads
the finished upload, uses its own model copy and its own seeded generator.

A method declares what it uploads in an optional class attribute `uploads` (`upload_kind`;
"weights" where it declares none); the probe knows three kinds:

- `weights` (FedAvg, FedProx, SCAFFOLD, MOON): the trained model. Labels leak through the
  classifier bias, which descent on cross-entropy raises for the classes trained on: present =
  {c : Δb_c > 0}, counts ∝ max(Δb_c, 0) scaled to the upload's sample count (an estimate).
  Inputs leak through gradient inversion ("inverting gradients", Geiping et al. 2020): for a
  client with at most `dlg_max_samples` samples, dummy images with the client's labels are
  optimised so that the gradient of their loss at the received weights points along the
  client's weight change, −Δw (one local step's direction, up to scale).
- `prototypes` (FedProto, FPL, FedTGP): class means of the trained local model and class
  counts, sent as they are: exact.
- `class_gradients` (FedHPro, spec fedhpro §8): per class c the gradients u_c = Wᵀ(p̄_c − e_c)/n_c
  (w.r.t. the features) and ∂W, ∂b of the class's loss at the received classifier W. Then
  n_c = ‖Wᵀ∂b‖ / ‖u_c‖ (exactly min(count, batch_real)) and −∂W_c / −∂b_c = Σ_i (1 − p_ic) z_i /
  Σ_i (1 − p_ic), a weighted class mean of the received model's features.

For the class means the server holds, it also inverts each one through the model whose features
they are (the uploaded model for `prototypes`, the received one for `class_gradients`) into an
image, by optimisation with a total-variation prior, and compares it with the client's true
class-mean image: PSNR and SSIM (scikit-image's `structural_similarity`), on pixels in [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysim.methods.prototypes import local_prototypes

SUPPORTED_UPLOADS = ("weights", "prototypes", "class_gradients")
TV_WEIGHT = 1e-3  # total-variation prior of the feature inversion


def unreadable(method: Any) -> str | None:
    """Why the probe cannot read what `method` (a class) uploads, or None. Weights are read
    through the classifier, so a method must send its head; prototypes are read as sent,
    whatever a method keeps (without its model, the server cannot invert the means)."""
    kind = upload_kind(method)
    if kind not in SUPPORTED_UPLOADS:
        return f"it uploads {kind}"
    if kind != "prototypes" and getattr(method, "shares", "model") not in ("model", "head"):
        sent = "no weights" if method.shares == "none" else f"only its {method.shares}"
        return f"it sends {sent}, and the probe reads the classifier of what is sent"
    return None


def upload_kind(method: Any) -> str:
    """What a method (class or instance) uploads besides its weights, as it declares in its
    optional `uploads` class attribute: weights | prototypes | class_gradients | another name
    (which the probe cannot read)."""
    return getattr(method, "uploads", "weights")


@dataclass(frozen=True)
class Inferred:
    """What the server derives from one upload."""

    present: Tensor  # (C,) bool
    counts: Tensor  # (C,) float
    means: Tensor | None = None  # (C, d) class-mean features, of `feature_weights`' model
    feature_weights: dict | None = None  # the weights the means are features of


def classifier_of(weights: dict) -> tuple[Tensor, Tensor]:
    return weights["classifier.weight"].double(), weights["classifier.bias"].double()


def read_weights(update: Any, received: dict) -> Inferred:
    """Label presence and counts from the classifier-bias change (an estimate)."""
    _, before = classifier_of(received)
    _, after = classifier_of(update.weights)
    rise = (after - before).clamp(min=0)
    total = rise.sum()
    counts = rise / total * update.num_samples if total > 0 else torch.zeros_like(rise)
    return Inferred(present=rise > 0, counts=counts)


def read_prototypes(update: Any, received: dict) -> Inferred:
    """Counts as sent; the class means are features of the uploaded model, which a method
    with personal models does not send (the server then has means it cannot invert)."""
    return Inferred(present=update.counts > 0, counts=update.counts.double(),
                    means=update.prototypes.double(), feature_weights=update.weights or None)


def read_class_gradients(update: Any, received: dict) -> Inferred:
    """Spec fedhpro §8: counts n_c = ‖Wᵀ∂b_c‖/‖u_c‖ and weighted means −∂W_c[c]/−∂b_c[c]."""
    weight, _ = classifier_of(received)
    present = update.present.bool()
    classes, dim = update.feature_grads.shape
    counts, means = torch.zeros(classes, dtype=torch.float64), torch.zeros(classes, dim,
                                                                            dtype=torch.float64)
    for c in present.nonzero().squeeze(1).tolist():
        u = update.feature_grads[c].double()
        db = update.bias_grads[c].double()
        counts[c] = (weight.T @ db).norm() / u.norm().clamp(min=1e-30)
        means[c] = update.weight_grads[c, c].double() / db[c]
    return Inferred(present=present, counts=counts, means=means, feature_weights=received)


READERS = {"weights": read_weights, "prototypes": read_prototypes,
           "class_gradients": read_class_gradients}


# ------------------------------------------------------------------------------ inversion


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + \
        (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_feature(model: nn.Module, target: Tensor, shape: tuple[int, ...], steps: int,
                   generator: torch.Generator, lr: float = 0.1) -> Tensor:
    """The input x (normalised, like the model's input) minimising ‖f(x) − t‖²/‖t‖² + λ·TV(x),
    with Adam, from small seeded noise around the dataset mean (x = 0 exactly can sit where
    every ReLU of the first layer is off, with no gradient at all)."""
    x = (0.1 * torch.randn(1, *shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    scale = target.pow(2).sum().clamp(min=1e-12)
    for _ in range(steps):
        loss = (model(x).features[0].double() - target).pow(2).sum() / scale + \
            TV_WEIGHT * total_variation(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return x.detach()[0]


def invert_gradients(model: nn.Module, received: dict, delta: dict[str, Tensor], labels: Tensor,
                     shape: tuple[int, ...], steps: int, generator: torch.Generator,
                     lr: float = 0.1) -> Tensor:
    """Dummy inputs whose loss gradient at the received weights has the largest cosine with
    −Δw over every parameter (inverting gradients, with a TV prior)."""
    model.load_state_dict(received)
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    direction = [-delta[n].float() for n in names]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    x = torch.randn(len(labels), *shape, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x).logits, labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * d).sum() for g, d in zip(grads, direction))
        gnorm = torch.sqrt(sum((g * g).sum() for g in grads)).clamp(min=1e-12)
        objective = 1 - dot / (gnorm * norm) + TV_WEIGHT * total_variation(x)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    return x.detach()


def image_scores(reconstructed: Tensor, truth: Tensor, mean: Tensor, std: Tensor
                 ) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two normalised (C, H, W) images, on pixels in [0, 1]."""
    from skimage.metrics import structural_similarity

    a = (reconstructed * std + mean).clamp(0, 1).double().numpy()
    b = (truth * std + mean).clamp(0, 1).double().numpy()
    mse = float(((a - b) ** 2).mean())
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    side = min(a.shape[1:])
    window = min(7, side if side % 2 else side - 1)
    ssim = structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=window)
    return float(psnr), float(ssim)


# ----------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class LeakageSettings:
    inversion_steps: int = 200
    inversion_classes: int = 3  # class means inverted per probed client
    dlg_max_samples: int = 8
    dlg_steps: int = 200


class LeakageProbe:
    """Runs on the worker that trained the client, on a copy of its model."""

    def __init__(self, model: nn.Module, uploads: str, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], settings: LeakageSettings
                 ) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(True)
        self.read = READERS[uploads]
        self.uploads = uploads
        self.num_classes = num_classes
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.settings = settings

    def measure(self, update: Any, received: dict, data: Any, generator: torch.Generator,
                trained: dict | None = None) -> dict[str, float]:
        """`leak_*` metrics of one client's upload against its data. `trained`: the weights
        the client trained, where its upload carries others (privatised, `privacy`): its
        prototypes are class means of the trained model, so the true means are that model's
        (the server still inverts through the weights it received)."""
        inferred = self.read(update, received)
        true_counts = torch.bincount(data.labels.cpu(), minlength=self.num_classes).double()
        true_present = true_counts > 0
        metrics = {
            "leak_presence_exact": float((inferred.present == true_present).all()),
            "leak_presence_accuracy": (inferred.present == true_present).double().mean().item(),
            "leak_counts_exact": float(torch.equal(inferred.counts.round(), true_counts)),
            "leak_counts_mae": (inferred.counts - true_counts).abs().mean().item(),
        }
        if inferred.means is not None and inferred.feature_weights is not None:
            private = trained is not None and self.uploads == "prototypes"
            self.model.load_state_dict(trained if private else inferred.feature_weights)
            true_means, _ = local_prototypes(self.model, data, self.num_classes)
            held = true_present.nonzero().squeeze(1)
            metrics["leak_mean_cosine"] = F.cosine_similarity(
                inferred.means[held], true_means[held].double(), dim=1).mean().item()
        pairs = self.reconstruct(update, received, data, generator, inferred)
        if pairs:
            scores = [image_scores(image, truth, self.mean, self.std) for _, truth, image in pairs]
            metrics["leak_image_psnr"] = float(np.mean([s[0] for s in scores]))
            metrics["leak_image_ssim"] = float(np.mean([s[1] for s in scores]))
        return metrics

    def reconstruct(self, update: Any, received: dict, data: Any, generator: torch.Generator,
                    inferred: Inferred | None = None) -> list[tuple[int, Tensor, Tensor]]:
        """(class, true class-mean image, the server's reconstruction) for up to
        `inversion_classes` classes, normalised as the model's input: inverted class means, or
        for weights-only uploads of small clients gradient inversion; [] where neither
        applies."""
        inferred = inferred or self.read(update, received)
        x_all, labels = next(data.ordered_batches(len(data)))
        x_all, labels = x_all.cpu(), labels.cpu()
        shape = tuple(x_all.shape[1:])
        classes = labels.unique()[: self.settings.inversion_classes].tolist()
        if inferred.means is not None:
            if inferred.feature_weights is None:  # no model to invert the means through
                return []
            self.model.load_state_dict(inferred.feature_weights)
            return [(c, x_all[labels == c].mean(0),
                     invert_feature(self.model, inferred.means[c], shape,
                                    self.settings.inversion_steps, generator)) for c in classes]
        if len(data) > self.settings.dlg_max_samples or \
                set(received) != set(self.model.state_dict()):  # a shared head only
            return []
        delta = {k: update.weights[k].float() - received[k].float() for k in received
                 if k in update.weights}
        images = invert_gradients(self.model, received, delta, labels, shape,
                                  self.settings.dlg_steps, generator)
        return [(c, x_all[labels == c].mean(0), images[labels == c].mean(0)) for c in classes]


def probed_clients(sampled: list[int], count: int) -> set[int]:
    """The clients of a round the probe reads: the `count` lowest ids among the sampled (a
    choice every worker makes alike, without any random draw)."""
    return set(sorted(sampled)[:count])
