"""The supervised objective and evaluation of each task kind, shared by every method:
classification (cross-entropy; accuracy) and segmentation ((CE + soft Dice)/2, the FedBCS
code's loss, spec fedbcs §4.2; foreground Dice, HD95 and ASD per image)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TaskObjective:
    loss: Callable[[Tensor, Tensor], Tensor]  # (logits, targets) → mean loss of the batch
    evaluate: Callable[[Tensor, Tensor], dict[str, float]]  # → metric sums, with "count"


def classification_sums(logits: Tensor, y: Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(1) == y).sum().item(),
            "loss": F.cross_entropy(logits, y, reduction="sum").item(),
            "count": float(len(y))}


def segmentation_loss(logits: Tensor, y: Tensor) -> Tensor:
    from raysim.nn.segmentation import joint_loss

    return joint_loss(logits, y)


def segmentation_evaluation(logits: Tensor, y: Tensor) -> dict[str, float]:
    from raysim.nn.segmentation import joint_loss, segmentation_sums

    return {**segmentation_sums(logits.argmax(1), y), "loss": joint_loss(logits, y).item() * len(y)}


OBJECTIVES = {
    "classification": TaskObjective(F.cross_entropy, classification_sums),
    "segmentation": TaskObjective(segmentation_loss, segmentation_evaluation),
}


def objective_of(kind: str) -> TaskObjective:
    return OBJECTIVES[kind]
