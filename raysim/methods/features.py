"""What a prototype method calls a sample's feature, per task. On classification it is the
classifier's input, one vector per sample. On segmentation every pixel is a sample: its feature
is its column of one declared U-Net stage (`feature_level`, the decoder's last stage by default,
as the single-level ablation of FedBCS), its label the mask's class there; an image-level
representation (MOON's) is that stage's mean over pixels.

`SampleFeatures` holds that choice for one task, so a method reads features and labels the same
way on either task kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from raysim.config import TrainConfig, require
from raysim.nn.segmentation import resize_labels

NUM_STAGES = 4  # the bundled U-Net's encoder and decoder stages, 0 = the finest
FEATURE_LEVELS = tuple(f"{part}_{i}" for part in ("decoder", "encoder") for i in range(NUM_STAGES))
DEFAULT_LEVEL = FEATURE_LEVELS[0]  # the decoder's last stage, the input of the 1×1 head
READ_BATCH_SIZE = 256  # a pass that only reads a classifier's features


def check_feature_level(level: str) -> None:
    require(level in FEATURE_LEVELS, "feature_level",
            f"choose one of {', '.join(FEATURE_LEVELS)} (segmentation: the U-Net stage whose "
            f"pixels are the features; decoder_0 is the decoder's last stage)")


def stage_map(out: Any, level: str) -> Tensor:
    """The (B, C, h, w) map of `level` in a `SegmentationOutput`."""
    part, _, index = level.rpartition("_")
    return getattr(out, part)[int(index)]


def sample_features(out: Any, y: Tensor, kind: str, level: str) -> tuple[Tensor, Tensor]:
    """(N, d) features and (N,) labels of a batch: its samples, or on segmentation its pixels
    at `level` (labels resized to that stage by nearest neighbour)."""
    if kind != "segmentation":
        return out.features, y
    maps = stage_map(out, level)
    labels = resize_labels(y, maps.shape[-2:])
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]), labels.reshape(-1)


def image_features(out: Any, kind: str, level: str) -> Tensor:
    """(B, d) one representation per sample: the feature, or on segmentation the stage's mean
    over pixels."""
    if kind != "segmentation":
        return out.features
    return stage_map(out, level).mean((2, 3))


@dataclass(frozen=True)
class SampleFeatures:
    """A sample's feature and label on one task: per sample on classification, per pixel of
    the U-Net stage `level` on segmentation. Call it on a batch's model output and labels."""

    kind: str = "classification"
    level: str = DEFAULT_LEVEL

    @classmethod
    def of(cls, task: Any, level: str | None = None) -> SampleFeatures:
        """For a method's `TaskInfo` (None: classification) and its `feature_level`."""
        return cls(task.kind if task is not None else "classification", level or DEFAULT_LEVEL)

    def __call__(self, out: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """(N, d) features and (N,) labels of a batch (`sample_features`)."""
        return sample_features(out, y, self.kind, self.level)

    def per_image(self, out: Any) -> Tensor:
        """(B, d), one representation per input (`image_features`)."""
        return image_features(out, self.kind, self.level)

    def read_batch_size(self, train: TrainConfig) -> int:
        """The batch size of a pass that only reads the model (local prototypes): on
        segmentation the training one, as the U-Net's BatchNorm normalises with the statistics
        of the batch it sees."""
        return train.batch_size if self.kind == "segmentation" else READ_BATCH_SIZE
