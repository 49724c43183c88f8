"""Offline multi-site segmentation data: shared anatomy, a different "scanner" per site.

Real multi-site segmentation sets (prostate MRI from six hospitals, nuclei from four
histology labs) differ between sites mostly in how images look, not in what they show. This
generator reproduces that feature skew without any download, so segmentation methods can be run
and tested anywhere: every site draws its structures from one shared shape distribution, and
renders them through its own acquisition style (intensity curve, contrast, smooth
multiplicative bias field, noise, blur and, for the RGB flavour, stain colours and tint).

Two flavours:

* ``organ``: one smooth structure per image in a textured body with distractor structures,
  grey-scale, generated as small volumes per case and emitted 2.5-D (slices i-1, i, i+1 as
  three channels, the mask of slice i), like the prostate MRI loader.
* ``nuclei``: many small, partly touching ellipses in a textured stroma, coloured by a
  site-specific H&E-like stain model (Beer-Lambert mixing of two optical-density vectors).

Masks are rasterised from the sampled geometry before any style is applied (styles act on the
image only), so they are exact. Everything is numpy and deterministic in the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from raysim.config import ConfigError, require
from raysim.data.datasets import (
    MAX_GENERATED_BYTES,
    ArraySplit,
    Dataset,
    DatasetRequest,
    DatasetSpec,
    channel_stats,
    format_bytes,
    require_generated_fits,
)

__all__ = [
    "FLAVOURS",
    "ORGAN_SLICES",
    "SiteSamples",
    "SiteStyle",
    "SitesConfig",
    "SyntheticSites",
    "generate_site",
    "load_synthetic",
    "nuclei_mask",
    "organ_mask",
    "site_names",
    "site_styles",
]

FLAVOURS: tuple[str, ...] = ("organ", "nuclei")
ORGAN_SLICES = 12  # slices per generated organ case (volumes are ORGAN_SLICES x size x size)

# Fixed stream tag so the generator never shares random draws with other uses of the seed.
_STREAM_TAG = 0x5E65
_STYLE_STREAM = 7  # split streams are 0 (train), 1 (val), 2 (test)

# Standard H&E optical-density vectors (Ruifrok & Johnston, 2001), rows: haematoxylin, eosin.
_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner turns a clean rendering in [0, 1] into stored pixels.

    ``bias`` is the amplitude of a smooth log-multiplicative field whose fixed part points along
    ``bias_angle`` (a site signature, like a coil's sensitivity profile); ``blur`` is a Gaussian
    sigma in pixels at 64 x 64 (scaled with the image size). ``tint`` multiplies the RGB
    channels and ``stain`` holds the site's haematoxylin and eosin optical-density vectors and
    ``stain_strength`` their concentrations' scales; the grey flavour ignores all three.
    """

    gamma: float
    contrast: float
    brightness: float
    bias: float
    bias_angle: float
    noise: float
    blur: float
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stain: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (0.650, 0.704, 0.286),
        (0.072, 0.990, 0.105),
    )
    stain_strength: tuple[float, float] = (1.0, 1.0)


class SiteSamples(NamedTuple):
    """``images`` uint8 (N, 3, S, S), ``masks`` uint8 (N, S, S) in {0, 1}, and ``shapes``: per
    image the geometry the mask was rasterised from (see `organ_mask` and `nuclei_mask`)."""

    images: np.ndarray
    masks: np.ndarray
    shapes: list[np.ndarray]


def _flavour_id(flavour: str) -> int:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of: {', '.join(FLAVOURS)}")
    return FLAVOURS.index(flavour)


def site_names(sites: int) -> tuple[str, ...]:
    return tuple(f"site{i}" for i in range(sites))


def _vec3(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


def _spread(sites: int, offset: float, step: float) -> np.ndarray:
    """Kronecker sequence frac(offset + i * step): values in [0, 1) that stay well spread for
    any number of sites, and site i's value does not depend on how many sites there are."""
    return np.mod(offset + np.arange(sites) * step, 1.0)


def site_styles(flavour: str, sites: int, seed: int = 0) -> list[SiteStyle]:
    """One style per site, deterministic in ``seed``.

    Each parameter walks its own low-discrepancy sequence over its range (irrational steps,
    seeded offsets), so any two sites differ clearly in several parameters at once rather than
    by chance draws that may land close together.
    """
    fid = _flavour_id(flavour)
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    rng = np.random.default_rng([seed, _STREAM_TAG, fid, _STYLE_STREAM])
    offsets = rng.random(8)
    steps = np.mod(np.sqrt([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0]), 1.0)
    u = [_spread(sites, o, s) for o, s in zip(offsets, steps)]

    def lerp(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * values

    gamma = np.exp(lerp(u[0], math.log(0.6), math.log(1.8)))
    contrast = lerp(u[1], 0.65, 1.2)
    brightness = lerp(u[2], -0.08, 0.08)
    bias = lerp(u[3], 0.05, 0.4)
    bias_angle = lerp(u[4], 0.0, 2.0 * math.pi)
    noise = lerp(u[5], 0.01, 0.06)
    blur = lerp(u[6], 0.0, 1.3)
    strength = lerp(u[7], 0.7, 1.3)
    styles = []
    for i in range(sites):
        site_rng = np.random.default_rng([seed, _STREAM_TAG, fid, _STYLE_STREAM, i])
        tint = (1.0, 1.0, 1.0)
        stain = (_vec3(_HE[0]), _vec3(_HE[1]))
        stain_strength = (1.0, 1.0)
        if flavour == "nuclei":
            vectors = _HE + site_rng.normal(0.0, 0.12, _HE.shape)
            vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
            stain = (_vec3(vectors[0]), _vec3(vectors[1]))
            tint = _vec3(1.0 + site_rng.normal(0.0, 0.05, 3))
            stain_strength = (float(strength[i]), float(site_rng.uniform(0.6, 1.4)))
        styles.append(
            SiteStyle(
                gamma=float(gamma[i]),
                contrast=float(contrast[i]),
                brightness=float(brightness[i]),
                bias=float(bias[i]),
                bias_angle=float(bias_angle[i]),
                noise=float(noise[i]),
                blur=float(blur[i]),
                tint=tint,
                stain=stain,
                stain_strength=stain_strength,
            )
        )
    return styles


# ---------------------------------------------------------------------------------------------
# Numerical building blocks
# ---------------------------------------------------------------------------------------------


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) smoothstep interpolation from a lattice of cells + 1 knots spanning
    the image; ``M @ coarse @ M.T`` upsamples a batch of lattices in two small products."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
    t = pos - lo
    w = t * t * (3.0 - 2.0 * t)
    m = np.zeros((size, cells + 1))
    m[np.arange(size), lo] = 1.0 - w
    m[np.arange(size), lo + 1] += w
    return m


def _field(
    rng: np.random.Generator, lead: tuple[int, ...], size: int, cells: int | tuple[int, int]
) -> np.ndarray:
    """Smooth random fields (*lead, size, size), each with zero mean and unit std."""
    cy, cx = (cells, cells) if isinstance(cells, int) else cells
    coarse = rng.standard_normal((*lead, cy + 1, cx + 1))
    f = _interp_matrix(size, cy) @ coarse @ _interp_matrix(size, cx).T
    f -= f.mean(axis=(-2, -1), keepdims=True)
    return f / np.maximum(f.std(axis=(-2, -1), keepdims=True), 1e-8)


def _slice_fields(
    rng: np.random.Generator, slices: int, size: int, cells: int, turn: float
) -> np.ndarray:
    """(slices, size, size) unit-variance fields that change smoothly from slice to slice:
    a rotation between two independent fields, by ``turn`` radians per slice."""
    a, b = _field(rng, (2,), size, cells)
    t = turn * np.arange(slices)[:, None, None]
    return np.cos(t) * a + np.sin(t) * b


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blur; rows renormalised so edges are not darkened."""
    if sigma < 0.2:
        return np.eye(size)
    d = np.arange(size)[:, None] - np.arange(size)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (rows, cols), each (size, size) float64."""
    rows, cols = np.indices((size, size), dtype=np.float64)
    return rows, cols


def _bias_field(
    style: SiteStyle, rng: np.random.Generator, lead: tuple[int, ...], size: int
) -> np.ndarray:
    """Log-multiplicative bias: the site's fixed gradient plus a smooth random part."""
    rows, cols = _grid(size)
    ramp = (np.cos(style.bias_angle) * cols + np.sin(style.bias_angle) * rows) / size - 0.5
    random = _field(rng, lead, size, 2)
    return np.exp(style.bias * (1.6 * ramp + 0.6 * random))


def _acquire(
    clean: np.ndarray, style: SiteStyle, rng: np.random.Generator, bias: np.ndarray
) -> np.ndarray:
    """Apply a site's scanner to clean images (..., S, S) in [0, 1]: bias field, blur,
    intensity curve (contrast, brightness, gamma), additive noise; returns uint8."""
    size = clean.shape[-1]
    x = (clean * bias).astype(np.float32)
    k = _blur_matrix(size, style.blur * size / 64.0).astype(np.float32)
    x = k @ x @ k.T
    x = np.clip((x - 0.5) * style.contrast + 0.5 + style.brightness, 0.0, 1.0)
    x **= np.float32(style.gamma)
    x += np.float32(style.noise) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Organ flavour (2.5-D, grey)
# ---------------------------------------------------------------------------------------------

_HARMONICS = (2, 3, 4)


def organ_mask(shape: np.ndarray, size: int) -> np.ndarray:
    """Rasterise one organ slice ``(cy, cx, r, a2, a3, a4, p2, p3, p4)`` as a bool (size, size)
    mask: pixel centres with distance to (cy, cx) below r * (1 + sum_k a_k cos(k theta + p_k))."""
    return _organ_masks(np.asarray(shape, dtype=np.float64)[None], size)[0]


def _organ_masks(shapes: np.ndarray, size: int) -> np.ndarray:
    """`organ_mask` for a stack of shapes (D, 9) at once: (D, size, size).

    cos(k theta + p) is evaluated as Re(e^{ik theta} e^{ip}) with e^{i theta} = (dx + i dy) / d,
    so the harmonics cost multiplications rather than an arctan and a cosine each.
    """
    rows, cols = _grid(size)
    col = shapes.T[:, :, None, None]  # parameters as (9, D, 1, 1)
    dy, dx = rows - col[0], cols - col[1]
    dist = np.hypot(dy, dx)
    unit = np.where(dist > 0, (dx + 1j * dy) / np.where(dist > 0, dist, 1.0), 1.0)
    boundary = np.ones(dist.shape)
    power = np.ones(dist.shape, dtype=np.complex128)
    h = len(_HARMONICS)
    for k in range(1, max(_HARMONICS) + 1):
        power = power * unit
        if k in _HARMONICS:
            i = _HARMONICS.index(k)
            boundary += col[3 + i] * (power * np.exp(1j * col[3 + h + i])).real
    return dist < col[2] * boundary


def _ellipses(
    rng: np.random.Generator, count: int, size: int, body: tuple[float, float, float, float]
) -> list[tuple[float, float, float, float, float]]:
    """Random distractor ellipses (cy, cx, semi-axis a, semi-axis b, angle) inside the body."""
    by, bx, ry, rx = body
    out = []
    for _ in range(count):
        radius = rng.uniform(0.0, 0.7)
        phi = rng.uniform(0.0, 2.0 * math.pi)
        cy, cx = by + radius * ry * math.sin(phi), bx + radius * rx * math.cos(phi)
        a = rng.uniform(0.06, 0.16) * size
        out.append((cy, cx, a, a * rng.uniform(0.5, 1.0), rng.uniform(0.0, math.pi)))
    return out


def _ellipse_inside(rows: np.ndarray, cols: np.ndarray, e: tuple | np.ndarray) -> np.ndarray:
    """Pixel centres (rows, cols) inside ellipse(s) ``e = (cy, cx, a, b, angle)``; the five
    entries may be arrays that broadcast against the coordinates."""
    cy, cx, a, b, angle = e
    dy, dx = rows - cy, cols - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return u * u + v * v <= 1.0


def _organ_case(
    style: SiteStyle, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: styled uint8 volume (D, S, S), its bool masks (D, S, S), and the per-slice
    organ geometry (D, 9)."""
    d = ORGAN_SLICES
    z = np.arange(d, dtype=np.float64)
    rows, cols = _grid(size)

    # Anatomy shared by all sites: body, tissue texture, distractors, the organ.
    body = (
        size / 2 + rng.uniform(-0.03, 0.03) * size,
        size / 2 + rng.uniform(-0.03, 0.03) * size,
        rng.uniform(0.38, 0.45) * size,
        rng.uniform(0.42, 0.48) * size,
    )
    in_body = ((rows - body[0]) / body[2]) ** 2 + ((cols - body[1]) / body[3]) ** 2 <= 1.0
    level = rng.uniform(0.35, 0.5)
    tissue = (
        level
        + 0.07 * _slice_fields(rng, d, size, 4, 0.15)
        + 0.05 * _slice_fields(rng, d, size, max(size // 8, 4), 0.35)
    )
    clean = np.where(in_body, tissue, 0.04 + 0.01 * _slice_fields(rng, d, size, 8, 0.3))
    for e in _ellipses(rng, int(rng.integers(2, 5)), size, body):
        z0, half = rng.uniform(0, d - 1), rng.uniform(3.0, 8.0)
        delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.25)
        inside = _ellipse_inside(rows, cols, e) & in_body
        present = np.abs(z - z0) < half
        clean = np.where(inside[None] & present[:, None, None], clean + delta, clean)

    zc = (d - 1) / 2 + rng.uniform(-1.0, 1.0)
    half_extent = rng.uniform(4.5, 6.5)
    profile = np.sqrt(np.clip(1.0 - ((z - zc) / half_extent) ** 2, 0.0, 1.0)) ** 0.6
    r0 = rng.uniform(0.12, 0.2) * size
    centre = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    drift = rng.uniform(-0.01, 0.01, 2) * size
    amps = rng.uniform(0.0, 0.12, len(_HARMONICS)) / np.sqrt(_HARMONICS)
    phase0 = rng.uniform(0.0, 2.0 * math.pi, len(_HARMONICS))
    turn = rng.uniform(-0.1, 0.1, len(_HARMONICS))
    shapes = np.empty((d, 3 + 2 * len(_HARMONICS)))
    shapes[:, 0] = centre[0] + drift[0] * (z - zc)
    shapes[:, 1] = centre[1] + drift[1] * (z - zc)
    shapes[:, 2] = r0 * profile
    shapes[:, 3 : 3 + len(_HARMONICS)] = amps
    shapes[:, 3 + len(_HARMONICS) :] = phase0 + turn * (z - zc)[:, None]
    masks = _organ_masks(shapes, size)

    # Moderate contrast to the surroundings, its own texture and an inner zone, so a threshold
    # alone does not separate it from tissue and distractors.
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.18)
    organ = (
        level + delta
        + 0.06 * _slice_fields(rng, d, size, 6, 0.3)
        + 0.04 * _slice_fields(rng, d, size, max(size // 8, 4), 0.35)
    )
    inner = shapes.copy()
    inner[:, 2] *= rng.uniform(0.4, 0.6)
    inner_masks = _organ_masks(inner, size)
    organ = organ + np.where(inner_masks, rng.uniform(-0.08, 0.08), 0.0)
    clean = np.where(masks, organ, clean)

    bias = _bias_field(style, rng, (1,), size)  # one field per case, shared by its slices
    return _acquire(np.clip(clean, 0.0, 1.0), style, rng, bias), masks, shapes


def _organ_site(
    style: SiteStyle, count: int, size: int, rng: np.random.Generator
) -> SiteSamples:
    images, masks, shapes = [], [], []
    total = 0
    while total < count:
        volume, vol_masks, vol_shapes = _organ_case(style, size, rng)
        # 2.5-D: slice i with its neighbours as channels, only slices showing the organ.
        for i in range(1, ORGAN_SLICES - 1):
            if total == count:
                break
            if not vol_masks[i].any():
                continue
            images.append(volume[i - 1 : i + 2])
            masks.append(vol_masks[i])
            shapes.append(vol_shapes[i : i + 1])
            total += 1
    return SiteSamples(np.stack(images), np.stack(masks).astype(np.uint8), shapes)


# ---------------------------------------------------------------------------------------------
# Nuclei flavour (RGB, H&E-like)
# ---------------------------------------------------------------------------------------------


def nuclei_mask(shapes: np.ndarray, size: int) -> np.ndarray:
    """Rasterise nuclei ``(M, 5)`` rows ``(cy, cx, a, b, angle)`` as a bool (size, size) mask:
    the union of the ellipses ((dx cos + dy sin) / a)^2 + ((-dx sin + dy cos) / b)^2 <= 1."""
    rows, cols = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    for e in shapes:
        mask |= _ellipse_inside(rows, cols, tuple(e))
    return mask


_NUCLEUS_MAX_AXIS = 4.6  # largest semi-axis, pixels at 64 x 64


def _sample_nuclei(rng: np.random.Generator, size: int) -> np.ndarray:
    """(M, 5) nuclei: a Poisson number, varied size and orientation, about a third placed
    against the previous nucleus so touching and clustered nuclei are common."""
    scale = size / 64.0
    count = max(3, int(rng.poisson(rng.uniform(10.0, 28.0) * scale * scale)))
    a = rng.uniform(2.2, _NUCLEUS_MAX_AXIS, count) * scale
    b = a * rng.uniform(0.55, 1.0, count)
    free = rng.uniform(-a[:, None], size - 1 + a[:, None], (count, 2))
    touching = rng.random(count) < 0.35
    touching[0] = False
    phi = rng.uniform(0.0, 2.0 * math.pi, count)
    gap = 0.5 * (a + b) * rng.uniform(0.85, 1.0, count)
    centres = free.copy()
    for i in np.flatnonzero(touching):
        reach = gap[i] + 0.5 * (a[i - 1] + b[i - 1])
        centres[i] = centres[i - 1] + reach * np.array([math.sin(phi[i]), math.cos(phi[i])])
    return np.column_stack([centres, a, b, rng.uniform(0.0, math.pi, count)])


def _haze(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size) unlabelled haematoxylin: soft, out-of-focus blobs that look somewhat
    like nuclei but have no sharp edge, so darkness alone does not give the mask."""
    scale = size / 64.0
    k = max(1, int(round(4 * scale * scale)))
    centres = rng.uniform(0.0, size - 1.0, (n, k, 2))
    sigma = rng.uniform(2.0, 4.5, (n, k, 2)) * scale
    amplitude = rng.uniform(0.2, 0.55, (n, k)) * (rng.random((n, k)) < 0.7)
    axis = np.arange(size, dtype=np.float64)
    gy = np.exp(-0.5 * ((axis - centres[..., :1]) / sigma[..., :1]) ** 2)  # (n, k, size)
    gx = np.exp(-0.5 * ((axis - centres[..., 1:]) / sigma[..., 1:]) ** 2)
    # Axis-aligned Gaussians are separable: the sum over blobs is one small product per image.
    return np.einsum("nks,nkt->nst", amplitude[..., None] * gy, gx)


def _nuclei_site(
    style: SiteStyle, count: int, size: int, rng: np.random.Generator
) -> SiteSamples:
    n = count
    # Stroma: eosin with fibre-like anisotropic texture and white gaps; faint haematoxylin.
    fibre = _field(rng, (n,), size, (max(size // 16, 2), max(size // 4, 4)))
    flip = rng.random(n) < 0.5
    fibre[flip] = fibre[flip].transpose(0, 2, 1)
    eosin = 0.45 + 0.15 * _field(rng, (n,), size, 4) + 0.12 * fibre
    gaps = _field(rng, (n,), size, 3)
    threshold = rng.uniform(0.8, 1.6, (n, 1, 1))
    eosin = eosin * (1.0 - 0.85 / (1.0 + np.exp(-6.0 * (gaps - threshold))))
    haem = 0.1 + 0.05 * _field(rng, (n,), size, max(size // 8, 4))
    haem = np.ascontiguousarray(haem + _haze(rng, n, size))
    chromatin = 1.0 + 0.2 * _field(rng, (n,), size, max(size // 4, 4))

    shapes = [_sample_nuclei(rng, size) for _ in range(n)]
    # Rasterise every nucleus of the batch at once inside a box around its centre that holds
    # the largest possible ellipse, then scatter the covered pixels into the images.
    nuclei = np.concatenate(shapes)
    owner = np.repeat(np.arange(n), [len(s) for s in shapes])
    darkness = rng.uniform(0.55, 1.6, len(nuclei))  # pale to dark nuclei
    reach = int(math.ceil(_NUCLEUS_MAX_AXIS * size / 64.0)) + 1
    offsets = np.arange(-reach, reach + 1)
    box_rows = np.floor(nuclei[:, 0]).astype(np.int64)[:, None] + offsets  # (K, L)
    box_cols = np.floor(nuclei[:, 1]).astype(np.int64)[:, None] + offsets
    params = tuple(nuclei[:, i, None, None] for i in range(5))
    inside = _ellipse_inside(
        box_rows[:, :, None].astype(np.float64), box_cols[:, None, :].astype(np.float64), params
    )
    inside &= ((box_rows >= 0) & (box_rows < size))[:, :, None]
    inside &= ((box_cols >= 0) & (box_cols < size))[:, None, :]
    k, i, j = np.nonzero(inside)
    flat = (owner[k] * size + box_rows[k, i]) * size + box_cols[k, j]
    masks = np.zeros((n, size, size), dtype=bool)
    masks.reshape(-1)[flat] = True
    haem_flat = haem.reshape(-1)
    np.maximum.at(haem_flat, flat, darkness[k] * chromatin.reshape(-1)[flat])
    eosin = np.where(masks, 0.15 * eosin, eosin)

    stain = np.asarray(style.stain) * np.asarray(style.stain_strength)[:, None]
    density = haem[:, None] * stain[0][None, :, None, None]
    density = density + np.clip(eosin, 0.0, None)[:, None] * stain[1][None, :, None, None]
    clean = np.exp(-density) * np.asarray(style.tint)[None, :, None, None]
    bias = _bias_field(style, rng, (n, 1), size)
    images = _acquire(np.clip(clean, 0.0, 1.0), style, rng, bias)
    return SiteSamples(images, masks.astype(np.uint8), shapes)


# ---------------------------------------------------------------------------------------------
# Data set assembly
# ---------------------------------------------------------------------------------------------


def generate_site(
    flavour: str, style: SiteStyle, count: int, size: int, rng: np.random.Generator
) -> SiteSamples:
    """``count`` images of ``size`` x ``size`` rendered in ``style``; all randomness from
    ``rng``. Organ shapes are one (1, 9) row per image, nuclei shapes (M, 5)."""
    _flavour_id(flavour)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if flavour == "organ":
        return _organ_site(style, count, size, rng)
    return _nuclei_site(style, count, size, rng)


def load_synthetic(
    flavour: str,
    *,
    sites: int = 4,
    train_per_site: int = 48,
    val_per_site: int = 12,
    test_per_site: int = 24,
    image_size: int = 64,
    seed: int = 0,
) -> Dataset:
    """Train, val and test splits for every site, each split in contiguous site blocks.

    Every (site, split) pair has its own random stream, so no image repeats across splits and a
    site's samples do not change when other sites or splits change size.
    """
    fid = _flavour_id(flavour)
    styles = site_styles(flavour, sites, seed)
    counts = (train_per_site, val_per_site, test_per_site)
    splits = []
    for split_id, count in enumerate(counts):
        xs, ys = [], []
        for site, style in enumerate(styles):
            rng = np.random.default_rng([seed, _STREAM_TAG, fid, split_id, site])
            samples = generate_site(flavour, style, count, image_size, rng)
            xs.append(samples.images)
            ys.append(samples.masks)
        domain = np.repeat(np.arange(sites, dtype=np.int64), count)
        splits.append(ArraySplit(np.concatenate(xs), np.concatenate(ys), domain))
    train, val, test = splits
    mean, std = channel_stats(train.x, 255.0)
    spec = DatasetSpec(
        name=f"synthetic_{flavour}",
        num_classes=2,
        input_shape=(3, image_size, image_size),
        mean=mean,
        std=std,
        scale=255.0,
        # Like the prostate slices it imitates, the organ set is trained with rotations and
        # flips; the nuclei set, like the official histology pipeline, without augmentation.
        augment="rot_flip" if flavour == "organ" else None,
        domains=site_names(sites),
        task="segmentation",
    )
    return Dataset(spec=spec, train=train, test=test, val=val)


def check_sizes(own: SitesConfig) -> None:
    """ConfigError naming the key, before anything is rendered, when a site's images of one
    split (rendered as float64, 3 channels) or a whole split (uint8 images and masks) would
    not fit in memory."""
    size = own.image_size
    rendered = 3 * size * size * 8  # bytes of one image while it is rendered
    if rendered > MAX_GENERATED_BYTES:
        most = math.isqrt(MAX_GENERATED_BYTES // 24) // 16 * 16
        raise ConfigError(f"data.image_size: one image of {size} × {size} pixels × 3 channels "
                          f"would need {format_bytes(rendered)} while rendered; at most {most}")
    for split in ("train", "val", "test"):
        key = f"{split}_per_site"
        count = getattr(own, key)
        require_generated_fits(f"data.{key}", count, rendered,
                               f"images of {size} × {size} pixels × 3 channels (float64 "
                               "while rendered)")
        require_generated_fits("data.sites", own.sites, count * 4 * size * size,
                               f"sites × {count} {split} images of {size} × {size} pixels "
                               "(3 channels and a mask, uint8)")


@dataclass(frozen=True)
class SitesConfig:
    """The keys of `synthetic_organ` and `synthetic_nuclei` (under `data`): how many sites and
    images per site and split."""

    sites: int = 4
    train_per_site: int = 48
    val_per_site: int = 12
    test_per_site: int = 24
    image_size: int = 64  # square; a multiple of 16 so a 4-level U-Net divides it evenly

    def __post_init__(self) -> None:
        require(self.sites >= 1, "sites", "must be >= 1")
        require(self.train_per_site >= 1, "train_per_site", "must be >= 1")
        require(self.val_per_site >= 1, "val_per_site", "must be >= 1")
        require(self.test_per_site >= 1, "test_per_site", "must be >= 1")
        require(self.image_size >= 32 and self.image_size % 16 == 0, "image_size",
                f"must be a multiple of 16 and >= 32 (got {self.image_size})")


@dataclass(frozen=True)
class SyntheticSites:
    """The `synthetic_organ` / `synthetic_nuclei` plug-ins: generated offline, no root."""

    flavour: str  # one of FLAVOURS
    task = "segmentation"
    Config = SitesConfig

    def check(self, request: DatasetRequest) -> None:
        check_sizes(request.params)  # generated: nothing to find on disk, only its sizes

    def load(self, request: DatasetRequest) -> Dataset:
        own = request.params
        return load_synthetic(self.flavour, sites=own.sites, train_per_site=own.train_per_site,
                              val_per_site=own.val_per_site, test_per_site=own.test_per_site,
                              image_size=own.image_size, seed=request.split_seed)


synthetic_organ = SyntheticSites("organ")
synthetic_nuclei = SyntheticSites("nuclei")
