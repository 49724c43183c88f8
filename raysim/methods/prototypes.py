"""Class prototypes: per-class means of a model's features, the currency of prototype FL;
their FINCH clustering on the server (FPL, FedBCS); the prototype methods' inference key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raysim.config import require
from raysim.methods.finch import finch_cluster_means
from raysim.nn.training import ClientData


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(C, d) mean feature per class (zero rows for absent classes) and (C,) counts."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype,
                       device=features.device).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp(min=1).unsqueeze(1).to(features.dtype), counts


@torch.no_grad()
def local_prototypes(
    model: nn.Module, data: ClientData, num_classes: int, batch_size: int = 256,
    normalize: bool = False,
    features_of: Callable[[Any, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """p_k^c = mean of f(x) (of f(x)/‖f(x)‖ with `normalize`) over client k's samples of class
    c, with the model in eval mode and no augmentation; and the (C,) counts. Summed in float64,
    returned on the CPU, ready to send. `features_of(output, y)` gives a batch's (N, d)
    features and (N,) labels where a sample is not one vector (the pixels of a segmentation
    map, `raysim.methods.features.sample_features`)."""
    model.eval()
    sums, counts = None, torch.zeros(num_classes, dtype=torch.long)
    for x, y in data.ordered_batches(batch_size):
        out = model(x)
        features, y = features_of(out, y) if features_of else (out.features, y)
        features = features.double()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=1)
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64,
                               device=features.device)
        sums.index_add_(0, y, features)
        counts += torch.bincount(y, minlength=num_classes).cpu()
    prototypes = sums.cpu() / counts.clamp(min=1).unsqueeze(1)
    return prototypes.float(), counts


def cluster_prototypes(
    prototypes: Sequence[Tensor], counts: Sequence[Tensor], num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FPL §3.2: FINCH (cosine) per class over the prototypes (C, d) of the clients whose
    `counts` (C,) show that class, keeping the coarsest partition FINCH keeps; a class held by
    one client keeps that client's prototype.

    Returns cluster prototypes (M, d), their classes (M,), unbiased prototypes (C, d: the mean
    of a class's cluster prototypes) and the (C,) mask of classes present.
    """
    dim = prototypes[0].shape[1]
    clusters, labels = [], []
    unbiased = torch.zeros(num_classes, dim)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        held = [p[c] for p, n in zip(prototypes, counts) if n[c] > 0]
        if not held:
            continue
        means = torch.from_numpy(finch_cluster_means(torch.stack(held), "cosine")).float()
        clusters.append(means)
        labels.append(torch.full((len(means),), c, dtype=torch.long))
        unbiased[c] = means.mean(0)
        present[c] = True
    return torch.cat(clusters), torch.cat(labels), unbiased, present


def check_inference(inference: str) -> None:
    """The prototype methods' `inference` key: the classifier, or the nearest global prototype."""
    require(inference in ("logits", "prototype"), "inference", "choose one of logits, prototype")
