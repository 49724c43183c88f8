"""The supervised objective and evaluation of each task kind, shared by every method:
classification (cross-entropy; accuracy) and segmentation ((CE + soft Dice)/2, the FedBCS
code's loss, spec fedbcs §4.2; foreground Dice, HD95 and ASD per image)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from raysim.nn.segmentation import joint_loss, segmentation_sums


@dataclass(frozen=True)
class TaskObjective:
    loss: Callable[[Tensor, Tensor], Tensor]  # (logits, targets) → mean loss of the batch
    evaluate: Callable[[Tensor, Tensor], dict[str, float]]  # → metric sums, with "count"


def classification_sums(logits: Tensor, y: Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(1) == y).sum().item(),
            "loss": F.cross_entropy(logits, y, reduction="sum").item(),
            "count": float(len(y))}


def segmentation_loss(logits: Tensor, y: Tensor) -> Tensor:

    return joint_loss(logits, y)


def segmentation_evaluation(logits: Tensor, y: Tensor, symmetric_asd: bool = True
                            ) -> dict[str, float]:
    sums = segmentation_sums(logits.argmax(1), y, symmetric_asd=symmetric_asd)
    return {**sums, "loss": joint_loss(logits, y).item() * len(y)}


def official_segmentation_evaluation(logits: Tensor, y: Tensor) -> dict[str, float]:
    """FedBCS's published metrics: ASD one-sided, MONAI's default (spec fedbcs §5.4)."""
    return segmentation_evaluation(logits, y, symmetric_asd=False)


OBJECTIVES = {
    ("classification", "default"): TaskObjective(F.cross_entropy, classification_sums),
    ("segmentation", "default"): TaskObjective(segmentation_loss, segmentation_evaluation),
    ("segmentation", "official"): TaskObjective(segmentation_loss,
                                                official_segmentation_evaluation),
}


def objective_of(kind: str, protocol: str = "default") -> TaskObjective:
    """The loss and metrics of a task `kind` under an evaluation protocol
    (`raysim.config.EvaluationConfig`)."""
    return OBJECTIVES[kind, protocol]
