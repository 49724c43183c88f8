"""Diagnostics of a method's global class anchors (prototypes, cluster means, hyper-prototypes):
do they carry a semantically consistent signal? Logged every round (`diagnostics.anchors`) for
every method that inherits `raysim.algorithm.ClassAnchors`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def anchor_alignment(local_means: Tensor, counts: Tensor, anchors: Tensor,
                     defined: Tensor) -> float | None:
    """Mean cosine between a client's local class means and the global anchors, over the classes
    the client holds that have an anchor."""
    usable = (counts > 0) & defined
    if not usable.any():
        return None
    return F.cosine_similarity(local_means[usable], anchors[usable], dim=1).mean().item()


def anchor_self_accuracy(anchors: Tensor, defined: Tensor, weight: Tensor,
                         bias: Tensor) -> float | None:
    """How often the global classifier assigns anchor c to class c."""
    if not defined.any():
        return None
    logits = anchors[defined] @ weight.T + bias
    classes = torch.arange(len(anchors))[defined]
    return (logits.argmax(1) == classes).float().mean().item()


def interclass_cosine(anchors: Tensor, defined: Tensor) -> float | None:
    """Mean cosine between the anchors of different classes (lower = better separated)."""
    kept = F.normalize(anchors[defined], dim=1)
    if len(kept) < 2:
        return None
    cos = kept @ kept.T
    off_diagonal = ~torch.eye(len(kept), dtype=torch.bool)
    return cos[off_diagonal].mean().item()


def server_diagnostics(anchors: Tensor, defined: Tensor,
                       classifier: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    """The anchors' inter-class cosine, and with the global (weight, bias) classifier their
    self-classification accuracy."""
    values = {"anchor_interclass_cosine": interclass_cosine(anchors, defined)}
    if classifier is not None:
        weight, bias = classifier
        values["anchor_self_accuracy"] = anchor_self_accuracy(anchors, defined, weight.float(),
                                                              bias.float())
    return {k: v for k, v in values.items() if v is not None}
