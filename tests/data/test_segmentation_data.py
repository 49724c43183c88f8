"""Segmentation data: the offline multi-site generator, and the prostate MRI and nuclei loaders
on real on-disk files written here (NIfTI volumes with nibabel, PNGs with Pillow)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysim.config import ConfigError
from raysim.data import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    check_dataset,
    load_dataset,
)
from raysim.data.medical import load_nuclei, load_prostate_mri
from raysim.data.synthetic_sites import (
    ORGAN_SLICES,
    SitesConfig,
    generate_site,
    load_synthetic,
    site_styles,
)
from raysim.run.validate import config_from_dict

# --- shared checks ---------------------------------------------------------------------------


def _check_layout(ds: Dataset, sites: int) -> None:
    """Every split: uint8 images and {0,1} masks of matching size, contiguous site blocks."""
    assert ds.spec.task == "segmentation" and ds.spec.num_classes == 2
    assert ds.val is not None
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.uint8 and split.y.dtype == np.uint8
        assert split.x.ndim == 4 and split.x.shape[1:] == ds.spec.input_shape
        assert split.y.shape == (len(split.x), *split.x.shape[2:])
        assert set(np.unique(split.y).tolist()) <= {0, 1}
        assert split.domain is not None and split.domain.dtype == np.int64
        assert np.all(np.diff(split.domain) >= 0), "each site must be one contiguous block"
        np.testing.assert_array_equal(np.unique(split.domain), np.arange(sites))
    assert len(ds.spec.domains) == sites


def _keys(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    return [xi.tobytes() + yi.tobytes() for xi, yi in zip(x, y)]


# --- ArraySplit and config -------------------------------------------------------------------


def test_array_split_checks_mask_size() -> None:
    x = np.zeros((2, 3, 8, 8), np.uint8)
    assert ArraySplit(x, np.zeros((2, 8, 8), np.uint8)).y.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="masks are 8x6 but images are 8x8"):
        ArraySplit(x, np.zeros((2, 8, 6), np.uint8))
    with pytest.raises(ValueError, match="y has 3"):
        ArraySplit(x, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        ArraySplit(x, np.zeros((2, 8), np.uint8))


def test_config_fields_and_validation() -> None:
    config = config_from_dict({
        "model": {"name": "unet"},
        "data": {"dataset": "synthetic_organ", "sites": 6, "image_size": 64},
    })
    assert config.data.params == SitesConfig(sites=6, image_size=64)
    assert config.data.val_fraction is None  # nuclei then holds out 0.2 of each train list
    nuclei = config_from_dict({"model": {"name": "unet"}, "data": {
        "dataset": "nuclei", "root": "data", "image_size": 64, "label_resize": "area"}})
    assert (nuclei.data.params.image_size, nuclei.data.params.label_resize) == (64, "area")
    organ, medical = {"dataset": "synthetic_organ"}, {"dataset": "nuclei", "root": "data"}
    bad = [
        ({**organ, "image_size": 40}, "data.image_size: must be a multiple of 16 and >= 32"),
        ({**organ, "image_size": 16}, "data.image_size: must be a multiple of 16 and >= 32"),
        ({**organ, "sites": 0}, "data.sites: must be >= 1"),
        ({**organ, "val_per_site": 0}, "data.val_per_site: must be >= 1"),
        ({**organ, "label_resize": "area"},
         "unknown key 'data.label_resize' for dataset 'synthetic_organ'"),
        ({**medical, "image_size": 100}, r"data.image_size: must be a multiple of 16 \(got 100\)"),
        ({**medical, "sites": 6}, "unknown key 'data.sites' for dataset 'nuclei'"),
        ({**organ, "synthetic": {"sites": 6}}, "data.synthetic.sites: moved to data.sites"),
        ({"val_fraction": 1.0}, "data.val_fraction: must be in"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": data, "model": {"name": "unet"}})


# --- synthetic sites -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organ() -> Dataset:
    return load_synthetic("organ", sites=4, train_per_site=40, val_per_site=8, test_per_site=30)


@pytest.fixture(scope="module")
def nuclei() -> Dataset:
    return load_synthetic("nuclei", sites=4, train_per_site=40, val_per_site=8, test_per_site=30)


@pytest.mark.parametrize("name", ["synthetic_organ", "synthetic_nuclei"])
def test_synthetic_layout_and_wiring(name: str) -> None:
    ds = load_dataset(name, sites=3, train_per_site=5, val_per_site=2, test_per_site=4,
                      image_size=48)
    _check_layout(ds, 3)
    assert ds.val is not None
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 6, 12)
    assert ds.spec.input_shape == (3, 48, 48)
    assert ds.spec.domains == ("site0", "site1", "site2")
    assert ds.spec.augment == ("rot_flip" if name == "synthetic_organ" else None)
    scaled = ds.train.x / 255.0
    assert ds.spec.mean == pytest.approx(tuple(scaled.mean(axis=(0, 2, 3))), rel=1e-6)
    assert ds.spec.std == pytest.approx(tuple(scaled.std(axis=(0, 2, 3))), rel=1e-6)
    check_dataset(name, None, False)  # embedded: no data.root needed


@pytest.mark.parametrize("flavour", ["organ", "nuclei"])
def test_synthetic_is_deterministic_and_never_repeats(flavour: str) -> None:
    kw = {"sites": 2, "train_per_site": 12, "val_per_site": 6, "test_per_site": 6}
    a = load_synthetic(flavour, seed=5, **kw)
    b = load_synthetic(flavour, seed=5, **kw)
    c = load_synthetic(flavour, seed=6, **kw)
    assert a.val is not None and b.val is not None
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)
    assert not np.array_equal(a.train.x, c.train.x)
    keys = [k for s in (a.train, a.val, a.test) for k in _keys(s.x, s.y)]
    assert len(set(keys)) == len(keys), "an image repeats within or across splits"
    # A site's samples do not depend on how many sites there are.
    more = load_synthetic(flavour, seed=5, **{**kw, "sites": 3})
    np.testing.assert_array_equal(more.train.x[: 2 * 12], a.train.x)


def test_site_styles_are_spread_and_stable() -> None:
    six = site_styles("organ", 6, seed=0)
    assert site_styles("organ", 3, seed=0) == six[:3]
    gammas = sorted(s.gamma for s in six)
    assert min(np.diff(np.log(gammas))) > 0.05, "two sites got nearly the same intensity curve"
    assert site_styles("organ", 6, seed=1) != six
    stains = [s.stain for s in site_styles("nuclei", 4, seed=0)]
    assert len(set(stains)) == 4


def _ref_organ_mask(shape: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent rasterisation (arctan/cos) and each pixel's signed distance to the edge."""
    rows, cols = np.indices((size, size), dtype=np.float64)
    dy, dx = rows - shape[0], cols - shape[1]
    theta = np.arctan2(dy, dx)
    boundary = 1.0 + sum(
        shape[3 + i] * np.cos(k * theta + shape[6 + i]) for i, k in enumerate((2, 3, 4))
    )
    margin = np.hypot(dy, dx) - shape[2] * boundary
    return margin < 0, margin


def _ref_nuclei_mask(shapes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.indices((size, size), dtype=np.float64)
    mask = np.zeros((size, size), bool)
    closest = np.full((size, size), np.inf)
    for cy, cx, a, b, angle in shapes:
        dy, dx = rows - cy, cols - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
        r = u * u + v * v - 1.0
        mask |= r <= 0
        closest = np.minimum(closest, np.abs(r))
    return mask, closest


@pytest.mark.parametrize("flavour", ["organ", "nuclei"])
def test_masks_are_exactly_the_rendered_geometry(flavour: str) -> None:
    style = site_styles(flavour, 3, seed=2)[1]
    samples = generate_site(flavour, style, 20, 64, np.random.default_rng(11))
    assert samples.images.shape == (20, 3, 64, 64) and samples.masks.shape == (20, 64, 64)
    assert len(samples.shapes) == 20
    for mask, shape in zip(samples.masks, samples.shapes):
        if flavour == "organ":
            expected, margin = _ref_organ_mask(shape[0], 64)
        else:
            expected, margin = _ref_nuclei_mask(shape, 64)
        differ = mask.astype(bool) != expected
        # Only a pixel centre lying on the boundary itself may round either way.
        assert np.all(np.abs(margin[differ]) < 1e-9)
        assert expected.sum() > 0


def _shift_contrast(x: np.ndarray, y: np.ndarray, shift: int) -> float:
    """Mean |inside - ring| intensity gap per image (the ring: pixels within 3 px outside the
    mask), with the mask moved by ``shift`` pixels along both axes."""
    grey = x.astype(np.float64).mean(axis=1)
    masks = np.roll(y.astype(bool), shift, axis=(1, 2))
    grown = masks.copy()
    for dr in range(-3, 4):
        for dc in range(-3, 4):
            grown |= np.roll(masks, (dr, dc), axis=(1, 2))
    gaps = []
    for g, m, ring in zip(grey, masks, grown & ~masks):
        if m.any() and ring.any():
            gaps.append(abs(g[m].mean() - g[ring].mean()))
    return float(np.mean(gaps))


@pytest.mark.parametrize("which", ["organ", "nuclei"])
def test_masks_line_up_with_the_image(which: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(which)
    aligned = _shift_contrast(ds.train.x, ds.train.y, 0)
    shifted = _shift_contrast(ds.train.x, ds.train.y, 5)
    assert aligned > 1.5 * shifted
    if which == "nuclei":  # haematoxylin-dark nuclei on lighter stroma, at every site
        for site in range(4):
            sel = ds.train.domain == site
            grey = ds.train.x[sel].astype(np.float64).mean(axis=1)
            fg = ds.train.y[sel].astype(bool)
            assert grey[fg].mean() < grey[~fg].mean() - 15


def _image_features(x: np.ndarray) -> np.ndarray:
    """Per-image channel means and stds plus a high-frequency (noise/blur) measure."""
    f = x.astype(np.float64) / 255.0
    high = np.abs(np.diff(f, axis=-1)).mean(axis=(1, 2, 3))
    return np.column_stack([f.mean(axis=(2, 3)), f.std(axis=(2, 3)), high])


@pytest.mark.parametrize("which", ["organ", "nuclei"])
def test_sites_differ_in_style(which: str, request: pytest.FixtureRequest) -> None:
    """Feature skew: a nearest-site-centroid rule on plain image statistics recognises the
    site of unseen test images, so sites differ far more than images within a site."""
    ds: Dataset = request.getfixturevalue(which)
    assert ds.train.domain is not None and ds.test.domain is not None
    train_f, test_f = _image_features(ds.train.x), _image_features(ds.test.x)
    scale = train_f.std(axis=0)
    centroids = np.stack([train_f[ds.train.domain == s].mean(0) for s in range(4)]) / scale
    dist = ((test_f / scale)[:, None] - centroids[None]) ** 2
    accuracy = float((dist.sum(-1).argmin(1) == ds.test.domain).mean())
    assert accuracy >= 0.9
    means = np.stack([ds.train.x[ds.train.domain == s].mean(axis=(0, 2, 3)) for s in range(4)])
    gaps = np.abs(means[:, None] - means[None]).max(-1)[~np.eye(4, dtype=bool)]
    assert gaps.min() > 5.0, "two sites have nearly the same mean intensity/colour"


def test_foreground_fractions(organ: Dataset, nuclei: Dataset) -> None:
    for ds, lo, hi in ((organ, 0.02, 0.2), (nuclei, 0.04, 0.3)):
        for split in (ds.train, ds.test):
            assert split.domain is not None
            for site in range(4):
                fraction = split.y[split.domain == site].mean()
                assert lo < fraction < hi
    assert organ.train.y.reshape(len(organ.train), -1).any(axis=1).all(), "2.5-D keeps only " \
        "slices that show the organ"


def test_organ_channels_are_neighbouring_slices(organ: Dataset) -> None:
    x = organ.train.x
    # Consecutive samples from one case: slice i's (i, i+1) are slice i+1's (i-1, i) channels.
    neighbours = [np.array_equal(x[k, 1:], x[k + 1, :2]) for k in range(len(x) - 1)]
    assert np.mean(neighbours) > 0.6
    assert not np.array_equal(x[0, 0], x[0, 1])
    assert ORGAN_SLICES >= 3


# --- prostate MRI ----------------------------------------------------------------------------

X_SIZE, Y_SIZE, DEPTH = 28, 32, 8
# Label present in slices 0, 2, 3, 5, 6, 7: of the inner slices 1..6, 2, 3, 5, 6 are kept.
LABELLED = (0, 2, 3, 5, 6, 7)
KEPT = (2, 3, 5, 6)


def _write_nifti(path: Path, volume: np.ndarray) -> None:
    nib.Nifti1Image(volume, np.eye(4)).to_filename(str(path))


def _make_case(rng: np.random.Generator, shape: tuple[int, int, int] = (X_SIZE, Y_SIZE, DEPTH)):
    """An (X, Y, Z) image with a few bright outliers and a label using values 0, 1 and 2."""
    image = rng.normal(300.0, 60.0, shape).astype(np.float32)
    image.flat[rng.integers(image.size, size=5)] = 5000.0
    label = np.zeros(shape, np.uint8)
    for z in LABELLED if shape[2] == DEPTH else range(shape[2]):
        x0, y0 = rng.integers(2, shape[0] - 10), rng.integers(2, shape[1] - 10)
        label[x0 : x0 + 8, y0 : y0 + 6, z] = 1
        label[x0 + 2 : x0 + 4, y0 + 1 : y0 + 3, z] = 2
    return image, label


def _expected_slices(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the loader must produce: rows are Y (nibabel's slice transposed), the volume clipped
    at its 99th percentile, min-max to 0..255 and truncated; labels > 0 are foreground."""
    v = image.astype(np.float64)
    high, low = np.quantile(v, 0.99), v.min()
    scaled = ((np.minimum(v, high) - low) / (high - low) * 255.0).astype(np.uint8)
    sl = [scaled[:, :, i].T for i in range(image.shape[2])]
    x = np.stack([np.stack([sl[i - 1], sl[i], sl[i + 1]]) for i in KEPT])
    y = np.stack([(label[:, :, i].T > 0).astype(np.uint8) for i in KEPT])
    return x, y


def _make_prostate(root: Path, cases: dict[str, int], seed: int = 0) -> dict[str, list]:
    """Write ``cases[site]`` cases per site; return each site's expected (x, y) per case."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {}
    for site, count in cases.items():
        folder = root / "MRI" / site
        folder.mkdir(parents=True)
        expected[site] = []
        for c in range(count):
            image, label = _make_case(rng)
            _write_nifti(folder / f"Case{c:02d}.nii.gz", image)
            _write_nifti(folder / f"Case{c:02d}_segmentation.nii.gz", label)
            expected[site].append(_expected_slices(image, label))
    return expected


def _split_lengths(n: int) -> tuple[int, int, int]:
    train = int(0.8 * n * 0.8)
    val = int(0.8 * n * 0.8 + (0.8 * n - 0.8 * n * 0.8))
    return train, val - train, n - val


def test_prostate_slices_masks_and_splits(tmp_path: Path) -> None:
    expected = _make_prostate(tmp_path, {"BIDMC": 3, "UCL": 4})
    check_dataset("prostate_mri", str(tmp_path), False)
    ds = load_dataset("prostate_mri", str(tmp_path))
    _check_layout(ds, 2)
    assert ds.val is not None
    assert ds.spec.domains == ("BIDMC", "UCL")  # canonical order, present sites only
    assert ds.spec.input_shape == (3, Y_SIZE, X_SIZE)
    assert ds.spec.augment == "rot_flip" and ds.spec.scale == 255.0
    for site_id, site in enumerate(ds.spec.domains):
        want = _keys(
            np.concatenate([c[0] for c in expected[site]]),
            np.concatenate([c[1] for c in expected[site]]),
        )
        parts = []
        for split in (ds.train, ds.val, ds.test):
            sel = split.domain == site_id
            parts.append(_keys(split.x[sel], split.y[sel]))
        assert tuple(len(p) for p in parts) == _split_lengths(len(want))
        got = [k for p in parts for k in p]
        assert sorted(got) == sorted(want), "slices, channels or masks differ from the files"
        assert len(set(got)) == len(got), "a slice appears in two splits"


def test_prostate_permutation_is_seeded(tmp_path: Path) -> None:
    _make_prostate(tmp_path, {"HK": 4})
    a = load_prostate_mri(tmp_path, seed=0)
    b = load_prostate_mri(tmp_path, seed=0)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    others = [load_prostate_mri(tmp_path, seed=s).train.x for s in (1, 2, 3)]
    assert any(not np.array_equal(a.train.x, o) for o in others)


def test_prostate_official_dir_and_index_files(tmp_path: Path) -> None:
    expected = _make_prostate(tmp_path, {"I2CVB": 3})
    mri = tmp_path / "MRI"
    # The listing fixes the case order (here reversed, images and labels interleaved) and the
    # index permutes the slices of that order.
    names = [f"Case{c:02d}{s}.nii.gz" for c in (2, 1, 0) for s in ("", "_segmentation")]
    np.save(mri / "I2CVB-dir.npy", np.array(names))
    n = 3 * len(KEPT)
    order = np.random.default_rng(9).permutation(n)
    np.save(mri / "I2CVB-index.npy", order)
    x = np.concatenate([expected["I2CVB"][c][0] for c in (2, 1, 0)])[order]
    y = np.concatenate([expected["I2CVB"][c][1] for c in (2, 1, 0)])[order]
    ds = load_prostate_mri(tmp_path, seed=123)
    assert ds.val is not None
    train, val, _ = _split_lengths(n)
    np.testing.assert_array_equal(ds.train.x, x[:train])
    np.testing.assert_array_equal(ds.val.y, y[train : train + val])
    np.testing.assert_array_equal(ds.test.x, x[train + val :])
    np.save(mri / "I2CVB-index.npy", np.arange(n - 1))
    with pytest.raises(DatasetFormatError, match="I2CVB-index.npy is not a permutation"):
        load_prostate_mri(tmp_path)


def test_prostate_resize_keeps_masks_binary_and_nearest(tmp_path: Path) -> None:
    expected = _make_prostate(tmp_path, {"ISBI": 3})
    ds = load_prostate_mri(tmp_path, image_size=16)
    assert ds.val is not None
    assert ds.spec.input_shape == (3, 16, 16)
    masks = np.concatenate([ds.train.y, ds.val.y, ds.test.y])
    assert masks.shape[1:] == (16, 16) and set(np.unique(masks).tolist()) == {0, 1}
    # Nearest (pixel-centre) sampling: output pixel i reads input pixel floor((i + 0.5) * scale).
    rows = np.floor((np.arange(16) + 0.5) * Y_SIZE / 16).astype(int)
    cols = np.floor((np.arange(16) + 0.5) * X_SIZE / 16).astype(int)
    want = np.concatenate([c[1] for c in expected["ISBI"]])[:, rows][:, :, cols]
    assert sorted(m.tobytes() for m in masks) == sorted(m.tobytes() for m in want)
    images = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
    assert images.dtype == np.uint8 and images.max() > 100


def test_prostate_mismatched_volumes_name_both_files(tmp_path: Path) -> None:
    folder = tmp_path / "MRI" / "BIDMC"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    image, label = _make_case(rng)
    _write_nifti(folder / "Case00.nii.gz", image)
    _write_nifti(folder / "Case00_segmentation.nii.gz", label[:, :, :-1])
    with pytest.raises(DatasetFormatError) as info:
        load_prostate_mri(tmp_path)
    assert "Case00.nii.gz" in str(info.value) and "Case00_segmentation.nii.gz" in str(info.value)


def test_prostate_unexpected_label_values_name_the_file(tmp_path: Path) -> None:
    _make_prostate(tmp_path, {"BIDMC": 2})
    folder = tmp_path / "MRI" / "BIDMC"
    _, label = _make_case(np.random.default_rng(4))
    label[1, 1, 2] = 7
    _write_nifti(folder / "Case01_segmentation.nii.gz", label)
    with pytest.raises(DatasetFormatError, match=r"Case01_segmentation\.nii\.gz.*\[7\]"):
        load_prostate_mri(tmp_path)


def test_prostate_missing_and_empty_sites(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        check_dataset("prostate_mri", None, True)
    with pytest.raises(DatasetNotFoundError, match=r"MRI/ does not exist.*BIDMC, HK"):
        check_dataset("prostate_mri", str(tmp_path), True)  # cannot be downloaded
    (tmp_path / "MRI" / "Other").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no site folder"):
        check_dataset("prostate_mri", str(tmp_path), False)
    _make_prostate(tmp_path, {"UCL": 2})
    (tmp_path / "MRI" / "HK").mkdir()
    with pytest.raises(DatasetNotFoundError, match="site 'HK'"):
        check_dataset("prostate_mri", str(tmp_path), False)
    with pytest.raises(DatasetNotFoundError, match="site 'HK'"):
        load_dataset("prostate_mri", str(tmp_path))
    (tmp_path / "MRI" / "HK").rmdir()
    (tmp_path / "MRI" / "UCL" / "Case01.nii.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"UCL/Case01\.nii\.gz not found"):
        check_dataset("prostate_mri", str(tmp_path), False)


def test_prostate_site_without_labelled_slices_is_named(tmp_path: Path) -> None:
    _make_prostate(tmp_path, {"BIDMC": 2})
    folder = tmp_path / "MRI" / "ISBI_1.5"
    folder.mkdir()
    image, label = _make_case(np.random.default_rng(1))
    label[:, :, 1:-1] = 0  # only the end slices, which have no neighbours, are labelled
    _write_nifti(folder / "Case00.nii.gz", image)
    _write_nifti(folder / "Case00_segmentation.nii.gz", label)
    with pytest.raises(DatasetFormatError, match="site 'ISBI_1.5' has no usable slice"):
        load_prostate_mri(tmp_path)


def test_prostate_native_sizes_must_agree(tmp_path: Path) -> None:
    _make_prostate(tmp_path, {"BIDMC": 2})
    folder = tmp_path / "MRI" / "HK"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for c in range(2):
        image, label = _make_case(rng, (X_SIZE + 4, Y_SIZE, DEPTH))
        _write_nifti(folder / f"Case{c:02d}.nii.gz", image)
        _write_nifti(folder / f"Case{c:02d}_segmentation.nii.gz", label)
    with pytest.raises(DatasetFormatError, match=r"differ in size.*HK/Case00.*data\.image_size"):
        load_prostate_mri(tmp_path)
    ds = load_prostate_mri(tmp_path, image_size=16)
    _check_layout(ds, 2)


# --- nuclei ----------------------------------------------------------------------------------

SIDE = 40


def _nuclei_pair(rng: np.random.Generator, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image spanning 0..255 (so the per-image stretch is the identity) and an instance
    map with values 0..3."""
    image = rng.integers(30, 220, (side, side, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    label = np.zeros((side, side), np.uint8)
    for inst in (1, 2, 3):
        r, c = rng.integers(0, side - 8, 2)
        label[r : r + 7, c : c + 5] = inst
    return image, label


def _make_nuclei(
    root: Path, sites: dict[str, tuple[int, int]], seed: int = 0
) -> dict[str, dict[str, list]]:
    """Write ``(train, test)`` image counts per site folder, with list files relative to root."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, list]] = {}
    for site, counts in sites.items():
        folder = root / site
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir()
        written[site] = {}
        for list_name, count in zip(("train", "val"), counts):
            lines, pairs = [], []
            for i in range(count):
                image, label = _nuclei_pair(rng)
                stem = f"{list_name}_{i}"
                Image.fromarray(image).save(folder / "images" / f"{stem}.png")
                Image.fromarray(label).save(folder / "labels" / f"{stem}.png")
                lines.append(f"{site}/images/{stem}.png {site}/labels/{stem}.png")
                pairs.append((image, label))
            (folder / f"{list_name}.txt").write_text("\n".join(lines) + "\n")
            written[site][list_name] = pairs
    return written


def test_nuclei_reads_rgb_binarises_and_splits(tmp_path: Path) -> None:
    written = _make_nuclei(tmp_path, {"TNBC": (10, 3), "KIRC": (6, 2)})
    check_dataset("nuclei", str(tmp_path), False)
    ds = load_dataset("nuclei", str(tmp_path), val_fraction=0.2)
    _check_layout(ds, 2)
    assert ds.val is not None
    assert ds.spec.domains == ("kirc", "tnbc")  # FedBCS's site order, present sites only
    assert ds.spec.input_shape == (3, SIDE, SIDE) and ds.spec.augment is None
    for site_id, folder in enumerate(("KIRC", "TNBC")):
        train = written[folder]["train"]
        splits = (("tr", ds.train), ("va", ds.val), ("te", ds.test))
        sel = {n: s.domain == site_id for n, s in splits}
        # val.txt is the test split, in list order, images as RGB channels-first.
        test = written[folder]["val"]
        np.testing.assert_array_equal(
            ds.test.x[sel["te"]], np.stack([im.transpose(2, 0, 1) for im, _ in test])
        )
        np.testing.assert_array_equal(ds.test.y[sel["te"]], np.stack([(lb > 0) for _, lb in test]))
        n_val = round(0.2 * len(train))
        assert (sel["va"].sum(), sel["tr"].sum()) == (n_val, len(train) - n_val)
        want = _keys(
            np.stack([im.transpose(2, 0, 1) for im, _ in train]),
            np.stack([(lb > 0).astype(np.uint8) for _, lb in train]),
        )
        got_train = _keys(ds.train.x[sel["tr"]], ds.train.y[sel["tr"]])
        got_val = _keys(ds.val.x[sel["va"]], ds.val.y[sel["va"]])
        assert sorted(got_train + got_val) == sorted(want)
        assert not set(got_train) & set(got_val)
        # The kept training images stay in list order.
        assert got_train == [k for k in want if k in set(got_train)]


def test_nuclei_validation_hold_out_is_seeded(tmp_path: Path) -> None:
    _make_nuclei(tmp_path, {"CRC": (10, 2)})
    a, b = load_nuclei(tmp_path, seed=0), load_nuclei(tmp_path, seed=0)
    assert a.val is not None and b.val is not None
    np.testing.assert_array_equal(a.val.x, b.val.x)
    others = [load_nuclei(tmp_path, seed=s).val for s in (1, 2, 3, 4)]
    assert any(o is not None and not np.array_equal(a.val.x, o.x) for o in others)
    assert len(load_nuclei(tmp_path, val_fraction=0.5).train) == 5


def test_nuclei_stretches_intensity_per_image(tmp_path: Path) -> None:
    folder = tmp_path / "TCIA"
    folder.mkdir()
    image = np.full((SIDE, SIDE, 3), 100, np.uint8)
    image[:20] = 150
    label = np.zeros((SIDE, SIDE), np.uint8)
    label[5:9, 5:9] = 1
    Image.fromarray(image).save(folder / "a.png")
    Image.fromarray(label).save(folder / "a_label.png")
    for list_name in ("train", "val"):
        (folder / f"{list_name}.txt").write_text("TCIA/a.png TCIA/a_label.png\n" * 3)
    ds = load_nuclei(tmp_path)
    assert set(np.unique(ds.test.x).tolist()) == {0, 255}
    assert np.all(ds.test.x[:, :, :20] == 255)


def test_nuclei_resize_is_nearest_for_labels(tmp_path: Path) -> None:
    written = _make_nuclei(tmp_path, {"TNBC": (5, 2)})
    ds = load_nuclei(tmp_path, image_size=16)
    assert ds.spec.input_shape == (3, 16, 16)
    idx = np.floor((np.arange(16) + 0.5) * SIDE / 16).astype(int)
    want = np.stack([(lb > 0)[idx][:, idx] for _, lb in written["TNBC"]["val"]]).astype(np.uint8)
    np.testing.assert_array_equal(ds.test.y, want)
    assert ds.test.x.shape == (2, 3, 16, 16)


def test_nuclei_grey_image_and_three_channel_label(tmp_path: Path) -> None:
    folder = tmp_path / "KIRC"
    folder.mkdir()
    grey = np.tile(np.arange(SIDE, dtype=np.uint8) * 6, (SIDE, 1))
    label = np.zeros((SIDE, SIDE, 3), np.uint8)
    label[10:15, 10:15] = 200  # identical channels: accepted
    Image.fromarray(grey).save(folder / "g.png")
    Image.fromarray(label).save(folder / "l.png")
    for list_name in ("train", "val"):
        (folder / f"{list_name}.txt").write_text("KIRC/g.png KIRC/l.png\n" * 2)
    ds = load_nuclei(tmp_path, val_fraction=0.5)
    assert ds.test.x.shape == (2, 3, SIDE, SIDE)
    assert np.array_equal(ds.test.x[0, 0], ds.test.x[0, 2])
    assert ds.test.y[0].sum() == 25
    label[10:15, 10:15, 1] = 0
    Image.fromarray(label).save(folder / "l.png")
    with pytest.raises(DatasetFormatError, match=r"l\.png: label has 3 channels that differ"):
        load_nuclei(tmp_path)


def test_nuclei_size_mismatch_names_both_files(tmp_path: Path) -> None:
    _make_nuclei(tmp_path, {"TNBC": (4, 2)})
    Image.fromarray(np.zeros((SIDE, SIDE - 4), np.uint8)).save(
        tmp_path / "TNBC" / "labels" / "train_2.png"
    )
    with pytest.raises(DatasetFormatError) as info:
        load_nuclei(tmp_path)
    assert "images/train_2.png" in str(info.value) and "labels/train_2.png" in str(info.value)


def test_nuclei_native_sizes_must_agree(tmp_path: Path) -> None:
    _make_nuclei(tmp_path, {"TNBC": (4, 2)})
    rng = np.random.default_rng(5)
    image, label = _nuclei_pair(rng, side=48)
    Image.fromarray(image).save(tmp_path / "TNBC" / "images" / "val_1.png")
    Image.fromarray(label).save(tmp_path / "TNBC" / "labels" / "val_1.png")
    with pytest.raises(DatasetFormatError, match=r"val_1\.png.*set data\.image_size"):
        load_nuclei(tmp_path)
    assert load_nuclei(tmp_path, image_size=32).test.x.shape == (2, 3, 32, 32)


def test_nuclei_missing_files_and_empty_sites(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        check_dataset("nuclei", None, False)
    with pytest.raises(DatasetNotFoundError, match=r"no site folder \(TCIA, CRC, KIRC, TNBC\)"):
        check_dataset("nuclei", str(tmp_path), True)
    _make_nuclei(tmp_path, {"CRC": (4, 2)})
    (tmp_path / "CRC" / "val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"CRC/val\.txt not found"):
        check_dataset("nuclei", str(tmp_path), False)
    (tmp_path / "CRC" / "val.txt").write_text("CRC/images/val_0.png CRC/labels/val_0.png\n")
    (tmp_path / "CRC" / "images" / "train_3.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"CRC/images/train_3\.png \(listed in .*line 4"):
        check_dataset("nuclei", str(tmp_path), False)
    with pytest.raises(DatasetNotFoundError, match=r"train_3\.png"):
        load_dataset("nuclei", str(tmp_path))
    (tmp_path / "CRC" / "train.txt").write_text("\n")
    with pytest.raises(DatasetFormatError, match="site 'crc' has 0 training"):
        load_nuclei(tmp_path)
    (tmp_path / "CRC" / "train.txt").write_text("CRC/images/train_0.png\n")
    with pytest.raises(DatasetFormatError, match=r"train\.txt, line 1: expected"):
        load_nuclei(tmp_path)
