"""Segmentation loss and metrics on hand-made masks with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion, distance_transform_edt

from raysim.nn.segmentation import (
    asd_per_image,
    dice_per_image,
    hd95_per_image,
    joint_loss,
    segmentation_sums,
    soft_dice_loss,
)

SQRT2, SQRT5 = math.sqrt(2.0), math.sqrt(5.0)


def square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.int64)
    mask[top:top + side, left:left + side] = 1
    return mask


def batch(*masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)).long()


# ------------------------------------------------------------------------------------ Dice


def test_dice_of_two_overlapping_squares():
    # 4×4 squares offset by (2, 2): overlap 2×2 = 4 → 2·4 / (16 + 16) = 0.25.
    pred = batch(square((8, 8), 0, 0, 4))
    target = batch(square((8, 8), 2, 2, 4))
    np.testing.assert_allclose(dice_per_image(pred, target), [0.25])
    np.testing.assert_allclose(dice_per_image(pred.numpy(), target.numpy()), [0.25])


def test_dice_uses_the_requested_foreground_class():
    # Labels 0/1/2: class 2 is a single shared pixel, class 1 overlaps 1 of 2 + 1 pixels.
    pred = torch.tensor([[[1, 1, 2, 0]]])
    target = torch.tensor([[[1, 0, 2, 0]]])
    np.testing.assert_allclose(dice_per_image(pred, target), [2 * 1 / 3])
    np.testing.assert_allclose(dice_per_image(pred, target, foreground=2), [1.0])


# ---------------------------------------------------------------------- surface distances


def test_square_vs_itself_has_zero_distances():
    mask = batch(square((12, 12), 3, 2, 6))
    assert hd95_per_image(mask, mask).tolist() == [0.0]
    assert asd_per_image(mask, mask).tolist() == [0.0]
    assert dice_per_image(mask, mask).tolist() == [1.0]


def test_square_vs_square_shifted_two_columns():
    # 10×10 squares, G shifted right by k=2. P's 36 surface pixels to G's surface:
    # top/bottom rows {2, 1, 0×8} each; left column 8×2; right column r=1..8 → min(2, r, 9−r)
    # = {1, 2×6, 1}. Multiset {0×16, 1×4, 2×16}: sum 36, mean 1; 95th pct (pos 33.25) = 2.
    # G→P is the mirror image, so the same multiset.
    pred = batch(square((16, 16), 3, 2, 10))
    target = batch(square((16, 16), 3, 4, 10))
    np.testing.assert_allclose(hd95_per_image(pred, target), [2.0])
    np.testing.assert_allclose(asd_per_image(pred, target), [1.0])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [1.0])


def test_anisotropic_spacing_on_the_shifted_square():
    # Same squares, spacing (rows 1, cols 3): column offsets ×3. P→G: top/bottom {6, 3, 0×8}
    # each; left column 8×6; right column min(6, r, 9−r) = {1,2,3,4,4,3,2,1}. Sum 86 over 36
    # pixels; sorted values end with ten 6s, so the 95th percentile is 6. Mirror for G→P.
    pred = batch(square((16, 16), 3, 2, 10))
    target = batch(square((16, 16), 3, 4, 10))
    np.testing.assert_allclose(hd95_per_image(pred, target, spacing=(1.0, 3.0)), [6.0])
    np.testing.assert_allclose(asd_per_image(pred, target, spacing=(1.0, 3.0)), [86 / 36])


def test_single_pixels_scale_with_spacing():
    # (2,3) vs (5,7): offsets 3 rows, 4 columns → 5 px; (2, 0.5) → √(6² + 2²) = √40.
    pred, target = np.zeros((1, 8, 10), np.int64), np.zeros((1, 8, 10), np.int64)
    pred[0, 2, 3] = target[0, 5, 7] = 1
    for spacing, expected in [((1.0, 1.0), 5.0), ((0.5, 0.5), 2.5), ((2.0, 0.5), math.sqrt(40))]:
        np.testing.assert_allclose(hd95_per_image(pred, target, spacing), [expected])
        np.testing.assert_allclose(asd_per_image(pred, target, spacing), [expected])


def test_point_inside_square_is_asymmetric():
    # G = 5×5 square (16 surface pixels), P = its centre pixel. P→G: {2}. G→P: offsets with
    # Chebyshev radius 2: 4×2, 8×√5, 4×√8. 95th pct of G→P (pos 14.25) = √8.
    target = batch(square((9, 9), 2, 2, 5))
    pred = torch.zeros_like(target)
    pred[0, 4, 4] = 1
    ring = 8 + 8 * SQRT5 + 8 * SQRT2
    np.testing.assert_allclose(hd95_per_image(pred, target), [2 * SQRT2])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [2.0])
    np.testing.assert_allclose(asd_per_image(pred, target), [(2 + ring) / 17])
    np.testing.assert_allclose(dice_per_image(pred, target), [2 / 26])


def test_foreground_on_the_image_border_is_surface():
    # P fills a 5×5 image: its surface is the outer ring (background assumed outside the image,
    # as scipy's binary_erosion in MONAI), not empty. G = centre pixel.
    pred = torch.ones(1, 5, 5, dtype=torch.long)
    target = torch.zeros_like(pred)
    target[0, 2, 2] = 1
    ring = 8 + 8 * SQRT5 + 8 * SQRT2
    np.testing.assert_allclose(hd95_per_image(pred, target), [2 * SQRT2])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [ring / 16])
    np.testing.assert_allclose(asd_per_image(pred, target), [(ring + 2) / 17])


def test_hd95_ignores_a_single_outlier_pixel():
    # P = G (10×10, 36 surface pixels) plus one stray pixel 7 rows below G's bottom edge.
    # P→G = {0×36, 7}: the 95th percentile (pos 34.2) is 0, the maximum would be 7.
    target = square((20, 20), 2, 2, 10)
    pred = target.copy()
    pred[18, 6] = 1
    pred, target = batch(pred), batch(target)
    np.testing.assert_allclose(hd95_per_image(pred, target), [0.0])
    np.testing.assert_allclose(asd_per_image(pred, target), [7 / 73])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [7 / 37])


def test_hd95_is_the_max_of_directed_percentiles_not_the_union_percentile():
    # One-pixel-thick lines (every pixel is surface): P = 2 pixels, G = 40 pixels, same row.
    # P→G = {0, 0}; G→P = {0, 0, 1, ..., 38}, whose 95th pct (pos 37.05) is 36.05. The
    # percentile of the 42-value union would be 35.95.
    pred, target = np.zeros((1, 3, 40), np.int64), np.zeros((1, 3, 40), np.int64)
    pred[0, 1, :2] = 1
    target[0, 1, :] = 1
    np.testing.assert_allclose(hd95_per_image(pred, target), [36.05])
    np.testing.assert_allclose(asd_per_image(pred, target), [741 / 42])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [0.0])
    np.testing.assert_allclose(dice_per_image(pred, target), [4 / 42])


def test_empty_mask_conventions():
    empty = np.zeros((8, 6), np.int64)
    blob = square((8, 6), 2, 2, 2)
    pred, target = batch(empty, blob, empty), batch(empty, empty, blob)
    np.testing.assert_allclose(dice_per_image(pred, target), [1.0, 0.0, 0.0])
    # Both empty → 0; exactly one empty → image diagonal hypot(8, 6) = 10 (in spacing units).
    np.testing.assert_allclose(hd95_per_image(pred, target), [0.0, 10.0, 10.0])
    np.testing.assert_allclose(asd_per_image(pred, target), [0.0, 10.0, 10.0])
    np.testing.assert_allclose(asd_per_image(pred, target, symmetric=False), [0.0, 10.0, 10.0])
    diagonal = math.hypot(8 * 0.5, 6 * 2.0)
    np.testing.assert_allclose(hd95_per_image(pred, target, (0.5, 2.0)), [0.0, diagonal, diagonal])


def test_batched_values_equal_single_image_values():
    # Image 1's target lies where image 0's prediction is: a nearest neighbour taken from the
    # wrong image would shrink image 0's distances.
    a, b = square((20, 20), 0, 0, 4), square((20, 20), 14, 14, 5)
    empty = np.zeros((20, 20), np.int64)
    pred, target = batch(a, b, empty, a), batch(b, a, a, b)
    hd, asd = hd95_per_image(pred, target), asd_per_image(pred, target)
    for i in range(len(pred)):
        assert hd[i] == pytest.approx(hd95_per_image(pred[i:i + 1], target[i:i + 1])[0])
        assert asd[i] == pytest.approx(asd_per_image(pred[i:i + 1], target[i:i + 1])[0])
    assert hd[0] > 14 and hd[0] == pytest.approx(hd[3])


def test_segmentation_sums_add_per_image_values():
    pred = batch(square((16, 16), 3, 2, 10), np.zeros((16, 16), np.int64))
    target = batch(square((16, 16), 3, 4, 10), square((16, 16), 0, 0, 3))
    sums = segmentation_sums(pred, target)
    assert sums["count"] == 2
    assert sums["dice"] == pytest.approx(2 * 80 / 200 + 0.0)
    assert sums["hd95"] == pytest.approx(2.0 + math.hypot(16, 16))
    assert sums["asd"] == pytest.approx(1.0 + math.hypot(16, 16))
    one_sided = segmentation_sums(pred, target, symmetric_asd=False)
    assert one_sided["asd"] == pytest.approx(asd_per_image(pred, target, symmetric=False).sum())


def _reference(p: np.ndarray, g: np.ndarray, spacing: tuple[float, float]):
    """MONAI's recipe per image: erosion XOR, EDT of the other surface's complement."""
    ep, eg = binary_erosion(p) ^ p, binary_erosion(g) ^ g
    d_pg = distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = distance_transform_edt(~ep, sampling=spacing)[eg]
    hd = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return hd, np.concatenate([d_pg, d_gp]).mean(), d_pg.mean()


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 2.3)])
def test_random_blobs_match_the_edt_recipe(spacing):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    masks = np.zeros((2, 24, 40, 40), np.int64)
    for m in masks.reshape(-1, 40, 40):
        for _ in range(rng.integers(1, 5)):
            cy, cx, r, squash = rng.uniform(0, 40), rng.uniform(0, 40), rng.uniform(1, 10), \
                rng.uniform(0.5, 2)
            m[(yy - cy) ** 2 + ((xx - cx) * squash) ** 2 < r * r] = 1
    pred, target = masks
    hd = hd95_per_image(pred, target, spacing)
    asd = asd_per_image(pred, target, spacing)
    asd1 = asd_per_image(pred, target, spacing, symmetric=False)
    for i in range(len(pred)):
        ref = _reference(pred[i] == 1, target[i] == 1, spacing)
        np.testing.assert_allclose([hd[i], asd[i], asd1[i]], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_label_maps_give_cpu_values():
    pred = batch(square((16, 16), 3, 2, 10))
    target = batch(square((16, 16), 3, 4, 10))
    assert segmentation_sums(pred.cuda(), target.cuda()) == segmentation_sums(pred, target)


def test_mismatched_shapes_and_bad_spacing_are_rejected():
    with pytest.raises(ValueError):
        dice_per_image(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError):
        hd95_per_image(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        asd_per_image(torch.ones(1, 4, 4), torch.ones(1, 4, 4), spacing=(1.0, 0.0))


# ------------------------------------------------------------------------------------ loss


def test_joint_loss_on_a_hand_computed_example():
    # Class-0 logits 0, class-1 logits (ln3, 0; −ln3, 0) → p1 = (3/4, 1/2; 1/4, 1/2).
    # Target (1, 0; 0, 1): CE = mean(−ln¾, −ln½, −ln¾, −ln½) = ln(8/3)/2.
    # Each class: Σpy = 1.25, Σp = 2, Σy = 2 → dice (2.5 + s)/(4 + s), loss 1 − that.
    log3 = math.log(3.0)
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[log3, 0.0], [-log3, 0.0]]]])
    target = torch.tensor([[[1, 0], [0, 1]]])
    s = 1e-5
    dice = 1 - (2.5 + s) / (4 + s)
    ce = math.log(8 / 3) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice, rel=1e-6)
    assert joint_loss(logits, target).item() == pytest.approx((ce + dice) / 2, rel=1e-6)


def test_soft_dice_is_near_zero_when_perfect_and_near_one_when_inverted():
    target = torch.randint(0, 2, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    confident = 30.0 * (2.0 * F.one_hot(target, 2).permute(0, 3, 1, 2).float() - 1.0)
    assert soft_dice_loss(confident, target).item() < 1e-6
    assert soft_dice_loss(-confident, target).item() > 1 - 1e-6


def _loop_soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official DiceLoss written out: one class at a time, sums over the whole batch."""
    probs = F.softmax(logits, dim=1)
    total = 0.0
    for c in range(logits.shape[1]):
        label = (target == c).float()
        intersect = torch.sum(probs[:, c] * label)
        total = total + (2 * intersect + 1e-5) / (probs[:, c].sum() + label.sum() + 1e-5)
    return 1 - total / logits.shape[1]


def test_soft_dice_matches_a_per_class_loop_with_batch_wide_sums():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 3, 6, 5, generator=gen)
    target = torch.randint(0, 3, (3, 6, 5), generator=gen)
    expected = _loop_soft_dice(logits, target)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    per_image = torch.stack([_loop_soft_dice(logits[i:i + 1], target[i:i + 1]) for i in range(3)])
    assert abs(per_image.mean().item() - expected.item()) > 1e-4  # pooling over the batch matters


def test_joint_loss_gradients_are_finite_and_nonzero():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 8, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8), generator=gen)
    loss = joint_loss(logits, target)
    loss.backward()
    expected = (F.cross_entropy(logits, target) + _loop_soft_dice(logits, target)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
