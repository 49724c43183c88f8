"""The rendered four-domain digits: layout of the splits, determinism, and that the domains
really differ in the ways the real MNIST / USPS / SVHN / SYN benchmark does."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.data import Dataset, load_dataset
from raysim.data.datasets import _read_bundled_digits, stratified_split
from raysim.data.digits_domains import DOMAINS, domain_layout, load_digits_domains, render_domain

MNIST, USPS, SVHN, SYN = range(4)
Layout = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return load_dataset("digits_domains", test_fraction=0.25, split_seed=0)


@pytest.fixture(scope="module")
def layout() -> Layout:
    _, y = _read_bundled_digits()
    return domain_layout(y, 0.25, 0)


def _block(split_domain: np.ndarray, values: np.ndarray, d: int) -> np.ndarray:
    return values[split_domain == d]


def test_spec_shapes_and_dtypes(ds: Dataset) -> None:
    assert ds.spec.name == "digits_domains"
    assert ds.spec.num_classes == 10
    assert ds.spec.input_shape == (3, 32, 32)
    assert ds.spec.scale == 255.0
    assert ds.spec.augment is None
    assert ds.spec.domains == DOMAINS == ("mnist", "usps", "svhn", "syn")
    for split in (ds.train, ds.test):
        assert split.x.dtype == np.uint8 and split.x.shape[1:] == (3, 32, 32)
        assert split.y.dtype == np.int64
        assert split.domain is not None and split.domain.dtype == np.int64
    scaled = ds.train.x / 255.0
    assert ds.spec.mean == pytest.approx(tuple(scaled.mean(axis=(0, 2, 3))), rel=1e-6)
    assert ds.spec.std == pytest.approx(tuple(scaled.std(axis=(0, 2, 3))), rel=1e-6)


def test_splits_are_contiguous_domain_blocks(ds: Dataset) -> None:
    for split in (ds.train, ds.test):
        assert split.domain is not None
        assert np.all(np.diff(split.domain) >= 0), "domain 0 first, one block per domain"
        np.testing.assert_array_equal(np.unique(split.domain), np.arange(4))


def test_train_domains_share_no_source_digit(ds: Dataset, layout: Layout) -> None:
    tr_src, tr_dom, _, _ = layout
    _, y = _read_bundled_digits()
    tr_idx, _ = stratified_split(y, 0.25, 0)
    # Each training source digit is rendered exactly once, so domains are disjoint.
    np.testing.assert_array_equal(np.sort(tr_src), tr_idx)
    np.testing.assert_array_equal(ds.train.y, y[tr_src])
    np.testing.assert_array_equal(ds.train.domain, tr_dom)
    # Stratified: every domain holds a quarter (+-1) of every class.
    counts = np.stack(
        [np.bincount(ds.train.y[ds.train.domain == d], minlength=10) for d in range(4)]
    )
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)


def test_every_test_digit_appears_in_every_domain(ds: Dataset, layout: Layout) -> None:
    _, _, te_src, te_dom = layout
    _, y = _read_bundled_digits()
    _, te_idx = stratified_split(y, 0.25, 0)
    assert ds.test.domain is not None
    sizes = np.bincount(ds.test.domain)
    np.testing.assert_array_equal(sizes, [len(te_idx)] * 4)
    for d in range(4):
        np.testing.assert_array_equal(_block(te_dom, te_src, d), te_idx)
        np.testing.assert_array_equal(_block(ds.test.domain, ds.test.y, d), y[te_idx])


def _block_means(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32) -> (N, 64): 4x4 block means, roughly the 8x8 source grid."""
    return images.reshape(len(images), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(images), -1)


@pytest.mark.parametrize("domain", [MNIST, USPS])
def test_images_are_drawn_from_their_source_digit(ds: Dataset, layout: Layout, domain: int) -> None:
    # Ties the layout to the pixels: each grey image correlates with its own source digit far
    # better than with another sample's.
    tr_src, tr_dom, _, _ = layout
    x, _ = _read_bundled_digits()
    assert ds.train.domain is not None
    img = _block_means(ds.train.x[ds.train.domain == domain, 0].astype(np.float64))
    src = x[tr_src[tr_dom == domain]].reshape(len(img), -1).astype(np.float64)

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))

    own = corr(img, src).mean()
    other = corr(img, np.roll(src, 1, axis=0)).mean()
    assert own > 0.7
    assert own > other + 0.25


def test_render_is_deterministic_in_split_seed(ds: Dataset) -> None:
    again = load_digits_domains(test_fraction=0.25, split_seed=0)
    for a, b in ((ds.train, again.train), (ds.test, again.test)):
        assert a.x.tobytes() == b.x.tobytes()
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.domain, b.domain)
    other = load_digits_domains(test_fraction=0.25, split_seed=1)
    assert not np.array_equal(ds.train.x, other.train.x)
    assert not np.array_equal(ds.test.x, other.test.x)
    # The style itself is random too, not only which digits land in which split.
    x, _ = _read_bundled_digits()
    a = render_domain(x[:50], SVHN, np.random.default_rng(0))
    b = render_domain(x[:50], SVHN, np.random.default_rng(1))
    assert not np.array_equal(a, b)


def test_domains_differ_in_colour_sharpness_and_background(ds: Dataset) -> None:
    x = ds.test.x.astype(np.float64)
    dom = ds.test.domain
    assert dom is not None

    def per_domain(stat: np.ndarray) -> np.ndarray:
        return np.array([stat[dom == d].mean() for d in range(4)])

    # Saturation: spread across the RGB channels is zero for grey domains.
    saturation = per_domain(x.std(axis=1).mean(axis=(1, 2)))
    assert saturation[MNIST] < 1e-9 and saturation[USPS] < 1e-9
    assert saturation[SVHN] > 10 and saturation[SYN] > 10
    # High-frequency energy: squared differences, because a blur keeps an edge's total rise
    # (so absolute differences barely drop) but spreads it over more pixels.
    energy = per_domain((np.diff(x, axis=3) ** 2).mean(axis=(1, 2, 3)))
    assert energy[USPS] < 0.6 * energy[MNIST]
    # Backgrounds: black for mnist, coloured for svhn.
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], axis=2)
    border_mean = per_domain(border.mean(axis=(1, 2)))
    assert border_mean[MNIST] < 5
    assert border_mean[SVHN] > 60


def test_render_domain_edge_cases() -> None:
    x, _ = _read_bundled_digits()
    empty = render_domain(x[:0], SYN, np.random.default_rng(0))
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == np.uint8
    with pytest.raises(ValueError, match=r"domain must be in \[0, 4\)"):
        render_domain(x[:2], 4, np.random.default_rng(0))
