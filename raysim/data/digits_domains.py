"""``digits_domains``: a feature-skew benchmark rendered offline from the bundled 8x8 digits.

It stands in for the Digits benchmark (MNIST / USPS / SVHN / SYN, as used by FedHPro and FPL),
which needs four downloads: each source digit is upsampled to a smooth stroke mask and drawn
in the style of a domain, so the label semantics are shared while the pixel statistics differ.
Every sample is stored as uint8 (3, 32, 32), so one model serves all domains.

As in the real benchmark, domains share no training images: each training digit is drawn in
exactly one domain. Each test digit is drawn in every domain, so per-domain accuracies are
measured on the same digits and differ only by style.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetRequest,
    DatasetSpec,
    _read_bundled_digits,
    _test_fraction,
    stratified_split,
)

__all__ = ["DOMAINS", "digits_domains", "domain_layout", "load_digits_domains", "render_domain"]

DOMAINS: tuple[str, ...] = ("mnist", "usps", "svhn", "syn")

_SIZE = 32
# Fixed stream tag so the rendering never shares random draws with other uses of split_seed.
_RENDER_STREAM_TAG = 0xD161
_ASSIGN_STREAM = 2 * len(DOMAINS)  # streams 0..2D-1 render the (split, domain) blocks


def _stream(split_seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([split_seed, _RENDER_STREAM_TAG, stream])


def _upsample_matrix(size: int) -> np.ndarray:
    """(size, 8) matrix of 1-D cubic-spline upsampling (zero outside the image).

    The 2-D spline zoom is separable and linear, so ``A @ img @ A.T`` equals it exactly and
    costs two small matrix products per batch instead of a spline fit across the whole stack.
    """
    unit = np.eye(8)
    kw = {"order": 3, "mode": "grid-constant", "grid_mode": True}
    return np.stack([ndimage.zoom(e, size / 8, **kw) for e in unit], axis=1)


def _stroke_masks(src: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, 8, 8) values 0..16 -> (N, size, size) stroke masks in [0, 1].

    A smooth upsample alone leaves strokes as soft blobs, so the result is contrast stretched
    to give the solid strokes with short ramps of a pen scan.
    """
    up = _upsample_matrix(size)
    smooth = up @ (src[:, 0].astype(np.float64) / 16.0) @ up.T
    return np.clip((smooth - 0.2) / 0.5, 0.0, 1.0)


def _place(
    masks: np.ndarray,
    boxes: np.ndarray,
    shifts: np.ndarray,
    angles: np.ndarray | None = None,
    size: int = _SIZE,
) -> np.ndarray:
    """Draw square masks (N, S, S) into size x size frames, each as a (height, width) box from
    ``boxes`` (N, 2), centred at the frame centre + ``shifts`` (N, 2; rows, cols) and rotated by
    ``angles`` (N,) degrees.

    One ``map_coordinates`` call warps the whole batch: the sample index is an exact integer
    coordinate, so linear interpolation never mixes samples.
    """
    n, s_in = len(masks), masks.shape[1]
    theta = np.deg2rad(np.zeros(n) if angles is None else angles)
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    # Output -> input coordinates: undo the shift, the rotation, then the scale.
    matrix = (s_in / boxes)[:, :, None] * rot
    grid = np.indices((size, size), dtype=np.float64).reshape(2, -1) - (size - 1) / 2
    coords = matrix @ (grid[None] - shifts[:, :, None]) + (s_in - 1) / 2
    sample = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None], coords[:, 0].shape)
    out = ndimage.map_coordinates(
        masks, np.stack([sample, coords[:, 0], coords[:, 1]]), order=1, cval=0.0
    )
    return out.reshape(n, size, size)


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur of (N, H, W) with a per-image ``sigma`` (N,), zero outside the frame.

    Written as batched products with per-image Gaussian matrices, which is far faster than one
    ``gaussian_filter`` call per image at these sizes.
    """

    def kernel(length: int) -> np.ndarray:
        d = np.arange(length)[:, None] - np.arange(length)[None, :]
        k = np.exp(-0.5 * (d[None] / sigma[:, None, None]) ** 2)
        norm = np.exp(-0.5 * (np.arange(-length, length + 1)[None] / sigma[:, None]) ** 2)
        return k / norm.sum(axis=1)[:, None, None]

    return kernel(images.shape[1]) @ images @ kernel(images.shape[2])


def _grey(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) intensities in [0, 1] -> (N, 3, H, W), replicated to three channels."""
    return np.repeat(masks[:, None], 3, axis=1)


def _contrasting_colours(
    n: int, rng: np.random.Generator, gap: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) background and foreground colours whose brightness differs by ``gap``.

    The digit is darker or lighter than the background at random, flipped where that would
    leave [0, 1], so the digit always stays readable without a fixed polarity to learn.
    """
    bg_level = rng.uniform(0.1, 0.9, n)
    delta = rng.uniform(*gap, n) * rng.choice([-1.0, 1.0], n)
    fg_level = bg_level + delta
    out = (fg_level < 0.0) | (fg_level > 1.0)
    fg_level[out] = bg_level[out] - delta[out]

    def tint(level: np.ndarray) -> np.ndarray:
        chroma = rng.normal(0.0, 0.18, (n, 3))
        return np.clip(level[:, None] + chroma - chroma.mean(axis=1, keepdims=True), 0.0, 1.0)

    return tint(bg_level), tint(fg_level)


def _composite(background: np.ndarray, fg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint colour ``fg`` (N, 3) over ``background`` (N, 3, H, W) with coverage (N, H, W)."""
    a = alpha[:, None]
    return background * (1.0 - a) + fg[:, :, None, None] * a


def _render_mnist(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White strokes on black, digit 28x28 centred (+-1 px), varying stroke weight."""
    n = len(src)
    drawn = _place(_stroke_masks(src, _SIZE), np.full((n, 2), 28.0), rng.uniform(-1, 1, (n, 2)))
    # A gamma below 1 thickens the stroke ramps, above 1 thins them.
    return _grey(np.clip(drawn, 0.0, 1.0) ** rng.uniform(0.7, 1.4, (n, 1, 1)))


def _render_usps(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 scan that the digit (nearly) fills, blurred, then enlarged: blocky and soft."""
    n = len(src)
    side = rng.uniform(14.0, 16.0, n)
    small = _place(
        _stroke_masks(src, _SIZE),
        np.stack([side, side], 1),
        rng.uniform(-0.5, 0.5, (n, 2)),
        size=16,
    )
    low = _blur(small, rng.uniform(0.6, 1.0, n))
    big = ndimage.zoom(low, (1, 2, 2), order=1, grid_mode=True, mode="nearest")
    # USPS scans are normalised to full range, so the blur must not dim the digit.
    peak = big.max(axis=(1, 2), keepdims=True)
    return _grey(big / np.maximum(peak, 1e-6))


def _render_svhn(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tall digit in a coloured, textured, noisy crop with neighbouring digits cut off at
    the edges, like house-number photos."""
    n = len(src)
    masks = _stroke_masks(src, _SIZE)
    bg, fg = _contrasting_colours(n, rng, (0.3, 0.5))
    # Low-frequency texture, mostly brightness (shading, wall texture) with some colour.
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, 4, _SIZE, _SIZE)), (0, 0, 4, 4))
    smooth /= smooth.std(axis=(2, 3), keepdims=True)
    texture = smooth[:, :1] + 0.4 * smooth[:, 1:]
    texture *= rng.uniform(0.04, 0.1, (n, 1, 1, 1))
    background = bg[:, :, None, None] + texture

    boxes = np.stack([rng.uniform(22.0, 28.0, n), rng.uniform(16.0, 21.0, n)], 1)
    shifts = rng.uniform(-1.5, 1.5, (n, 2))
    drawn = _place(masks, boxes, shifts)
    for side in (-1.0, 1.0):
        present = rng.random(n) < 0.5
        others = masks[rng.integers(n, size=n)]
        gap = side * boxes[:, 1] * rng.uniform(0.95, 1.2, n)
        neighbour = _place(others, boxes, shifts + np.stack([np.zeros(n), gap], 1))
        drawn = np.where(present[:, None, None], np.maximum(drawn, neighbour), drawn)
    img = _composite(background, fg, _blur(drawn, rng.uniform(0.3, 0.8, n)))
    return img + rng.normal(0.0, 1.0, img.shape) * rng.uniform(0.01, 0.05, (n, 1, 1, 1))


def _render_syn(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat or gradient colour backgrounds, varying stroke weight, jittered pose, slight blur:
    like the synthetic digits rendered from fonts."""
    n = len(src)
    masks = _stroke_masks(src, _SIZE)
    bg, fg = _contrasting_colours(n, rng, (0.35, 0.55))
    # Gradient along a random direction towards a nearby colour; flat for half the samples.
    phi = rng.uniform(0.0, 2.0 * np.pi, n)[:, None, None]
    rows, cols = np.indices((_SIZE, _SIZE)) / (_SIZE - 1) - 0.5
    ramp = (np.cos(phi) * cols + np.sin(phi) * rows)[:, None] + 0.5
    far = np.clip(bg + rng.normal(0.0, 0.2, (n, 3)), 0.0, 1.0)
    flat = rng.random(n) < 0.5
    far[flat] = bg[flat]
    background = bg[:, :, None, None] * (1.0 - ramp) + far[:, :, None, None] * ramp

    # Stroke weight: erode, keep or dilate, grouped so each morphology runs once per batch.
    op, width = rng.integers(3, size=n), rng.integers(2, 4, size=n)
    for code, morph in ((0, ndimage.grey_erosion), (2, ndimage.grey_dilation)):
        for w in (2, 3):
            sel = (op == code) & (width == w)
            if sel.any():
                masks[sel] = morph(masks[sel], size=(1, w, w))
    side = 28.0 * rng.uniform(0.8, 1.1, n)
    drawn = _place(
        masks, np.stack([side, side], 1), rng.uniform(-2.0, 2.0, (n, 2)), rng.uniform(-15, 15, n)
    )
    return _composite(background, fg, _blur(drawn, rng.uniform(0.3, 0.7, n)))


_RENDERERS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _render_mnist,
    _render_usps,
    _render_svhn,
    _render_syn,
)


def render_domain(src: np.ndarray, domain: int, rng: np.random.Generator) -> np.ndarray:
    """Draw (N, 1, 8, 8) source digits (values 0..16) in one domain's style as uint8
    (N, 3, 32, 32); every random choice comes from ``rng``."""
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain must be in [0, {len(DOMAINS)}), got {domain}")
    if len(src) == 0:
        return np.empty((0, 3, _SIZE, _SIZE), dtype=np.uint8)
    img = _RENDERERS[domain](src, rng)
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _assign_domains(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One domain per sample: each class's shuffled samples are dealt round-robin from a random
    starting domain, so every domain gets a quarter (+-1) of every class."""
    num_domains = len(DOMAINS)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (np.arange(len(members)) + rng.integers(num_domains)) % num_domains
    return out


def domain_layout(
    labels: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which source digit and domain each stored sample comes from.

    Returns ``(train_source, train_domain, test_source, test_domain)``: indices into the
    bundled digits and domain ids, both splits ordered in contiguous domain blocks (domain 0
    first). Training digits appear in one domain each; every test digit appears in every
    domain, in the same order within each block.
    """
    tr_idx, te_idx = stratified_split(labels, test_fraction, split_seed)
    assigned = _assign_domains(labels[tr_idx], _stream(split_seed, _ASSIGN_STREAM))
    order = np.argsort(assigned, kind="stable")  # keeps source order within a block
    num_domains = len(DOMAINS)
    return (
        tr_idx[order],
        assigned[order],
        np.tile(te_idx, num_domains),
        np.repeat(np.arange(num_domains, dtype=np.int64), len(te_idx)),
    )


def _render_split(
    x: np.ndarray, source: np.ndarray, domain: np.ndarray, split_seed: int, first_stream: int
) -> np.ndarray:
    blocks = [
        render_domain(x[source[domain == d]], d, _stream(split_seed, first_stream + d))
        for d in range(len(DOMAINS))
    ]
    return np.concatenate(blocks)


def load_digits_domains(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """Render all four domains of both splits in memory; deterministic in ``split_seed``."""
    x, y = _read_bundled_digits()
    tr_src, tr_dom, te_src, te_dom = domain_layout(y, test_fraction, split_seed)
    train = ArraySplit(_render_split(x, tr_src, tr_dom, split_seed, 0), y[tr_src], tr_dom)
    test = ArraySplit(_render_split(x, te_src, te_dom, split_seed, len(DOMAINS)), y[te_src], te_dom)
    scaled = train.x / 255.0
    spec = DatasetSpec(
        name="digits_domains",
        num_classes=10,
        input_shape=(3, _SIZE, _SIZE),
        mean=tuple(float(m) for m in scaled.mean(axis=(0, 2, 3))),
        std=tuple(float(v) for v in scaled.std(axis=(0, 2, 3))),
        scale=255.0,
        augment=None,
        domains=DOMAINS,
    )
    return Dataset(spec=spec, train=train, test=test)


class DigitsDomains:
    """The `digits_domains` plug-in: rendered offline, so it needs no root; a seeded
    stratified `data.test_fraction` of the source digits is the test split."""

    task = "classification"

    def check(self, request: DatasetRequest) -> None:
        pass  # rendered from the bundled digits

    def load(self, request: DatasetRequest) -> Dataset:
        return load_digits_domains(_test_fraction(request), request.split_seed)


digits_domains = DigitsDomains()
