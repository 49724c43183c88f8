"""Loss and per-image metrics for 2-D segmentation (FedBCS spec §4.2 and §5.4).

The loss is HarmoFL's/FedBCS's JointLoss, (CE + soft Dice)/2. The metrics follow the MONAI
definitions the official evaluation used (`DiceMetric`, `HausdorffDistanceMetric(percentile=95)`,
`SurfaceDistanceMetric`), restricted to one foreground class and computed per 2-D image:

* surface of a mask = the mask XOR its binary erosion with the 4-neighbour cross, where pixels
  outside the image count as background (scipy's `binary_erosion`, as in MONAI's
  `get_mask_edges`), so foreground pixels on the image border are surface pixels;
* directed distances = Euclidean distance transform of the complement of the other surface
  (`scipy.ndimage.distance_transform_edt(..., sampling=spacing)`) read at this surface's pixels,
  i.e. each surface pixel's distance to the nearest pixel of the other surface; the same values
  (to rounding) are obtained here by nearest-neighbour queries on the surface points.

MONAI returns nan or inf when a mask is empty, and inf survives its nan-skipping mean. Here every
per-image value is finite, so per-client means stay finite; the conventions are documented on
each function. Spacing is (row, column) in the order of the (H, W) axes; with the default
(1.0, 1.0) distances are in pixels, as in the official code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "asd_per_image",
    "dice_per_image",
    "hd95_per_image",
    "joint_loss",
    "resize_labels",
    "segmentation_sums",
    "soft_dice_loss",
]

Spacing = tuple[float, float]
LabelMap = Tensor | np.ndarray

DICE_SMOOTH = 1e-5  # HarmoFL's DiceLoss smoothing, added to numerator and denominator
HD_PERCENTILE = 95.0


# ----------------------------------------------------------------------------------- loss


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """1 − mean over all K classes (background included) of (2Σpy + s)/(Σp + Σy + s).

    p = softmax(logits) over the class axis, y = one-hot(target); every sum runs over the WHOLE
    batch (B, H, W), not per image, as in the official DiceLoss. One-hot is built by comparing
    labels with 0..K−1, so a label outside that range belongs to no class (as the official
    `gt == i` masks do). Probabilities are taken in float32 so half-precision logits do not lose
    the batch-wide sums. logits (B, K, H, W), target (B, H, W) integer.
    """
    if logits.dim() != 4 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected logits (B,K,H,W) and target (B,H,W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()


def joint_loss(logits: Tensor, target: Tensor) -> Tensor:
    """(CE + soft Dice)/2, the official JointLoss: CE averaged over all pixels of the batch,
    soft Dice as in `soft_dice_loss`. logits (B, K, H, W), target (B, H, W) int64."""
    ce = F.cross_entropy(logits.float(), target.long())
    return (ce + soft_dice_loss(logits, target)) / 2.0


def resize_labels(y: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) labels → (B, h, w), nearest neighbour (the labels of a coarser feature map)."""
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    return F.interpolate(y[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# ------------------------------------------------------------------------------- metrics


def _foreground_masks(pred: LabelMap, target: LabelMap,
                      foreground: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) bool numpy masks of `foreground`; compared on the tensors' device so only one
    byte per pixel crosses to the CPU."""
    if tuple(pred.shape) != tuple(target.shape) or len(pred.shape) != 3:
        raise ValueError(f"expected pred and target label maps of one shape (B,H,W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")

    def to_mask(labels: LabelMap) -> np.ndarray:
        if isinstance(labels, Tensor):
            return (labels.detach() == foreground).cpu().numpy()
        return np.asarray(labels) == foreground

    return to_mask(pred), to_mask(target)


def _check_spacing(spacing: Spacing) -> tuple[float, float]:
    sy, sx = (float(s) for s in spacing)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"spacing must be two positive finite numbers, got {spacing}")
    return sy, sx


def _dice(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    inter = np.count_nonzero(p & g, axis=(1, 2))
    total = np.count_nonzero(p, axis=(1, 2)) + np.count_nonzero(g, axis=(1, 2))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def _surface(mask: np.ndarray) -> np.ndarray:
    """mask XOR erosion(mask) with the 4-neighbour cross and background outside the image, per
    image of a (B, H, W) stack; equals MONAI's `get_mask_edges` (scipy `binary_erosion`)."""
    inner = mask.copy()
    inner[:, 1:, :] &= mask[:, :-1, :]
    inner[:, :-1, :] &= mask[:, 1:, :]
    inner[:, :, 1:] &= mask[:, :, :-1]
    inner[:, :, :-1] &= mask[:, :, 1:]
    inner[:, 0, :] = inner[:, -1, :] = False
    inner[:, :, 0] = inner[:, :, -1] = False
    return mask & ~inner


class _SurfaceDistances:
    """Directed surface distances of a batch, grouped per image and sorted within each image.

    `values[start[b]:start[b] + count[b]]` are image b's distances, ascending. Only images where
    both surfaces are non-empty (`valid`) have any.
    """

    def __init__(self, values: np.ndarray, count: np.ndarray) -> None:
        self.values = values
        self.count = count
        self.start = np.concatenate(([0], np.cumsum(count)[:-1]))

    def sums(self) -> np.ndarray:
        image = np.repeat(np.arange(len(self.count)), self.count)
        return np.bincount(image, weights=self.values, minlength=len(self.count))

    def percentile(self, q: float) -> np.ndarray:
        """np.percentile's default 'linear' rule per image; 0 where an image has no values."""
        n = self.count
        pos = q / 100.0 * np.maximum(n - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
        if self.values.size == 0:
            return np.zeros(len(n))
        last = self.values.size - 1
        v_lo = self.values[np.minimum(self.start + lo, last)]
        v_hi = self.values[np.minimum(self.start + hi, last)]
        return np.where(n > 0, v_lo + (pos - lo) * (v_hi - v_lo), 0.0)


def _surface_points(surface: np.ndarray, valid: np.ndarray,
                    spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Physical coordinates (image·step, row·sy, col·sx) of the surface pixels of the `valid`
    images, grouped by image (C order), and their (B,) counts. The image axis gets a step
    larger than any in-image distance, so a nearest neighbour is always in the same image."""
    surface = surface & valid[:, None, None]
    count = np.count_nonzero(surface, axis=(1, 2))
    height, width = surface.shape[1:]
    step = 2.0 * math.hypot(height * spacing[0], width * spacing[1]) + 1.0
    points = np.stack(np.nonzero(surface), axis=1).astype(np.float64)
    points *= np.array([step, spacing[0], spacing[1]])
    return points, count


def _directed(source: np.ndarray, count: np.ndarray, other: np.ndarray) -> _SurfaceDistances:
    """Distance from every `source` point to the nearest `other` point of the same image.

    This is the value MONAI reads from `distance_transform_edt(~other_surface)` at the source
    surface pixels (the EDT at a pixel is its distance to the nearest surface pixel). One k-d tree
    over the whole batch's surface points costs O(n log n) in surface pixels rather than O(H·W)
    per image: 1.5× (64²) to 3× (384²) faster than a loop of 2-D EDTs. `source` is grouped by
    image as `_SurfaceDistances` expects.
    """
    # imported here: scipy.spatial costs every worker process ~0.25 s, and only
    # segmentation metrics use it
    from scipy.spatial import cKDTree

    if len(source) == 0:
        return _SurfaceDistances(np.zeros(0), count)
    values, _ = cKDTree(other).query(source)
    image = np.repeat(np.arange(len(count)), count)
    return _SurfaceDistances(values[np.lexsort((values, image))], count)


class _BatchSurfaces:
    """Both directed distance sets of a batch plus the empty-mask bookkeeping, computed once
    and shared by HD95 and ASD."""

    def __init__(self, p: np.ndarray, g: np.ndarray, spacing: Spacing) -> None:
        self.spacing = _check_spacing(spacing)
        height, width = p.shape[1:]
        self.diagonal = math.hypot(height * self.spacing[0], width * self.spacing[1])
        sp, sg = _surface(p), _surface(g)
        has_p, has_g = sp.any(axis=(1, 2)), sg.any(axis=(1, 2))
        self.both_empty = ~has_p & ~has_g
        self.valid = has_p & has_g
        points_p, count_p = _surface_points(sp, self.valid, self.spacing)
        points_g, count_g = _surface_points(sg, self.valid, self.spacing)
        self.pred_to_gt = _directed(points_p, count_p, points_g)
        self.gt_to_pred = _directed(points_g, count_g, points_p)

    def _finish(self, values: np.ndarray) -> np.ndarray:
        out = np.where(self.valid, values, self.diagonal)
        return np.where(self.both_empty, 0.0, out)

    def hd95(self) -> np.ndarray:
        directed = np.maximum(self.pred_to_gt.percentile(HD_PERCENTILE),
                              self.gt_to_pred.percentile(HD_PERCENTILE))
        return self._finish(directed)

    def asd(self, symmetric: bool) -> np.ndarray:
        if symmetric:
            total = self.pred_to_gt.sums() + self.gt_to_pred.sums()
            count = self.pred_to_gt.count + self.gt_to_pred.count
        else:
            total, count = self.pred_to_gt.sums(), self.pred_to_gt.count
        return self._finish(total / np.maximum(count, 1))


def dice_per_image(pred: LabelMap, target: LabelMap, foreground: int = 1) -> np.ndarray:
    """(B,) float64 Dice 2|P∩G|/(|P|+|G|) of the `foreground` class per image.

    Both masks empty gives 1.0 (a correct empty prediction; MONAI's `compute_dice` with
    `ignore_empty=False`). MONAI's default `ignore_empty=True`, which the official DiceMetric
    used, gives nan whenever the ground truth is empty and drops the image from the mean; here a
    false positive on an empty ground truth scores 0.0 and counts.
    """
    p, g = _foreground_masks(pred, target, foreground)
    return _dice(p, g)


def hd95_per_image(pred: LabelMap, target: LabelMap, spacing: Spacing = (1.0, 1.0),
                   foreground: int = 1) -> np.ndarray:
    """(B,) float64 95th-percentile symmetric Hausdorff distance between the mask surfaces.

    As MONAI's `HausdorffDistanceMetric(percentile=95)`: the 95th percentile (numpy 'linear')
    of each directed distance set, then the max of the two, not the percentile of their union.
    Conventions (MONAI gives nan/inf): both masks empty → 0.0; exactly one empty → the image
    diagonal hypot(H·sy, W·sx), an upper bound on any in-image distance.
    """
    p, g = _foreground_masks(pred, target, foreground)
    return _BatchSurfaces(p, g, spacing).hd95()


def asd_per_image(pred: LabelMap, target: LabelMap, spacing: Spacing = (1.0, 1.0),
                  symmetric: bool = True, foreground: int = 1) -> np.ndarray:
    """(B,) float64 average surface distance.

    symmetric=True (default): mean over the union of both directed distance sets (MONAI's
    `SurfaceDistanceMetric(symmetric=True)`, i.e. ASSD). symmetric=False: mean of the
    pred → ground-truth distances only, MONAI's default, which the official code logged as
    "ASSD" (spec §7.14). Empty-mask conventions as `hd95_per_image`: both empty → 0.0, exactly
    one empty → the image diagonal.
    """
    p, g = _foreground_masks(pred, target, foreground)
    return _BatchSurfaces(p, g, spacing).asd(symmetric)


def segmentation_sums(pred: LabelMap, target: LabelMap, spacing: Spacing = (1.0, 1.0),
                      foreground: int = 1, symmetric_asd: bool = True) -> dict[str, float]:
    """Batch sums {"dice", "hd95", "asd", "count"} of the per-image metrics, so that summing
    over batches and dividing by "count" gives the per-image mean of spec §5.4 without
    depending on batch sizes. Surfaces and surface distances are computed once."""
    p, g = _foreground_masks(pred, target, foreground)
    surfaces = _BatchSurfaces(p, g, spacing)
    return {
        "dice": float(_dice(p, g).sum()),
        "hd95": float(surfaces.hd95().sum()),
        "asd": float(surfaces.asd(symmetric_asd).sum()),
        "count": float(p.shape[0]),
    }
