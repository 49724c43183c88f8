"""Dataset loading: bundled digits, fail-fast checks, and parsers of the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat
from sklearn.datasets import load_digits

from raysim.config import ConfigError
from raysim.data import (
    ArraySplit,
    DatasetNotFoundError,
    DatasetRequest,
    check_dataset,
    load_dataset,
)
from raysim.registry import DATASETS

# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_and_types() -> None:
    ds = load_dataset("digits")
    assert ds.spec.name == "digits"
    assert ds.spec.num_classes == 10
    assert ds.spec.input_shape == (1, 8, 8)
    assert ds.spec.scale == 16.0
    assert ds.spec.augment is None
    for split in (ds.train, ds.test):
        assert split.x.dtype == np.float32
        assert split.y.dtype == np.int64
        assert split.x.shape[1:] == (1, 8, 8)
        assert split.x.min() >= 0 and split.x.max() <= 16
    assert len(ds.train) + len(ds.test) == 1797
    assert abs(len(ds.test) / 1797 - 0.25) < 0.01


def test_digits_split_is_disjoint_and_stratified() -> None:
    ds = load_dataset("digits", test_fraction=0.25, split_seed=0)
    bunch = load_digits()
    full = np.concatenate([bunch.images.reshape(-1, 64), bunch.target[:, None]], axis=1)
    ours = np.concatenate(
        [
            np.concatenate([ds.train.x.reshape(-1, 64), ds.train.y[:, None]], axis=1),
            np.concatenate([ds.test.x.reshape(-1, 64), ds.test.y[:, None]], axis=1),
        ]
    )
    # Same multiset of (pixels, label) rows: train and test together are exactly the data set.
    np.testing.assert_array_equal(
        full[np.lexsort(full.T[::-1])], ours[np.lexsort(ours.T[::-1])].astype(full.dtype)
    )
    per_class = np.bincount(bunch.target)
    test_counts = np.bincount(ds.test.y, minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * per_class) <= 1)


def test_digits_split_seed_and_stats() -> None:
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=0)
    c = load_dataset("digits", split_seed=1)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert not np.array_equal(a.test.x, c.test.x)
    scaled = a.train.x / a.spec.scale
    assert a.spec.mean == pytest.approx((float(scaled.mean()),), rel=1e-5)
    assert a.spec.std == pytest.approx((float(scaled.std()),), rel=1e-5)
    small = load_dataset("digits", test_fraction=0.1)
    assert abs(len(small.test) / 1797 - 0.1) < 0.01
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


# --- check_dataset ---------------------------------------------------------------------------


def test_check_unknown_name_lists_datasets() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        check_dataset("imagenet", None, False)
    for name in DATASETS:
        assert name in str(info.value)


EMBEDDED = ("digits", "digits_domains", "synthetic_organ", "synthetic_nuclei")
# read from files under data.root (the bundled ones)
ROOTED = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "prostate_mri", "nuclei")
TINY_SITES = {"sites": 1, "train_per_site": 2, "val_per_site": 1, "test_per_site": 1,
              "image_size": 32}


@pytest.mark.parametrize("name", EMBEDDED)
@pytest.mark.parametrize("download", [False, True])
def test_check_embedded_datasets_need_no_root(name: str, download: bool, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative root would be read or written
    own = TINY_SITES if name.startswith("synthetic_") else {}
    check_dataset(name, None, download, **own)
    ds = load_dataset(name, None, download, **own)
    assert ds.spec.name == name and len(ds.train) > 0 and len(ds.test) > 0
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written


def test_every_bundled_dataset_is_its_own_plugin() -> None:
    """One registered object per dataset, each knowing its task without loading anything."""
    tasks = {name: DATASETS[name].task for name in (*EMBEDDED, *ROOTED)}
    assert {n for n, t in tasks.items() if t == "segmentation"} == {
        "synthetic_organ", "synthetic_nuclei", "prostate_mri", "nuclei"}
    assert len({id(DATASETS[name]) for name in tasks}) == len(tasks)


def test_a_dataset_key_is_parsed_by_its_own_config() -> None:
    with pytest.raises(ConfigError, match=r"^data.sites: must be >= 1$"):
        load_dataset("synthetic_nuclei", sites=0)
    with pytest.raises(ConfigError, match="unknown key 'data.sites' for dataset 'digits'"):
        load_dataset("digits", sites=2)
    request = DatasetRequest("mnist", root=None, download=True)
    with pytest.raises(DatasetNotFoundError, match="a directory to download into"):
        DATASETS["mnist"].check(request)


def test_digits_domains_is_wired_into_load_dataset() -> None:
    ds = load_dataset("digits_domains", test_fraction=0.2, split_seed=3)
    assert ds.spec.name == "digits_domains"
    assert ds.spec.domains == ("mnist", "usps", "svhn", "syn")
    assert ds.train.domain is not None and ds.test.domain is not None
    assert abs(len(ds.test) / 4 / 1797 - 0.2) < 0.01
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits_domains", test_fraction=0.0)


def test_single_domain_datasets_have_no_domains() -> None:
    ds = load_dataset("digits")
    assert ds.spec.domains == ()
    assert ds.train.domain is None and ds.test.domain is None


def test_array_split_checks_domain_length() -> None:
    x, y = np.zeros((3, 1, 2, 2)), np.zeros(3, dtype=np.int64)
    assert ArraySplit(x, y, np.array([0, 1, 1])).domain is not None
    with pytest.raises(ValueError, match="domain has 2 entries but y has 3"):
        ArraySplit(x, y, np.array([0, 1]))


@pytest.mark.parametrize("name", ROOTED)
@pytest.mark.parametrize("download", [False, True])
def test_check_missing_root_names_data_root(name: str, download: bool) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        check_dataset(name, None, download)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw"),
        ("fashionmnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_check_missing_files_names_expected_path(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        check_dataset(name, str(tmp_path), False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in message
    assert expected in message
    assert "data.root" in message
    assert "data.download: true" in message
    with pytest.raises(DatasetNotFoundError):
        load_dataset(name, str(tmp_path))
    # With download enabled the check defers to the download step instead of failing.
    check_dataset(name, str(tmp_path), True)


def test_check_cifar10_lists_missing_batches(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for f in ("data_batch_1", "data_batch_2", "test_batch"):
        (directory / f).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_3, data_batch_4"):
        check_dataset("cifar10", str(tmp_path), False)


# --- MNIST / FashionMNIST idx-ubyte ----------------------------------------------------------


def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_idx(raw: Path, files: dict[str, bytes], gz: bool) -> None:
    raw.mkdir(parents=True)
    for stem, payload in files.items():
        if gz:
            with gzip.open(raw / f"{stem}.gz", "wb") as f:
                f.write(payload)
        else:
            (raw / stem).write_bytes(payload)


@pytest.mark.parametrize(
    ("name", "folder", "gz"), [("mnist", "MNIST", False), ("fashionmnist", "FashionMNIST", True)]
)
def test_idx_roundtrip(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    y_tr = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    y_te = np.array([9, 2, 6], dtype=np.uint8)
    _write_idx(
        tmp_path / folder / "raw",
        {
            "train-images-idx3-ubyte": _idx_images(x_tr),
            "train-labels-idx1-ubyte": _idx_labels(y_tr),
            "t10k-images-idx3-ubyte": _idx_images(x_te),
            "t10k-labels-idx1-ubyte": _idx_labels(y_te),
        },
        gz=gz,
    )
    check_dataset(name, str(tmp_path), False)
    ds = load_dataset(name, str(tmp_path))
    assert ds.spec.input_shape == (1, 28, 28)
    assert ds.spec.scale == 255.0
    assert ds.train.x.dtype == np.uint8 and ds.train.y.dtype == np.int64
    assert ds.train.x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds.train.x[:, 0], x_tr)
    np.testing.assert_array_equal(ds.train.y, y_tr)
    np.testing.assert_array_equal(ds.test.x[:, 0], x_te)
    np.testing.assert_array_equal(ds.test.y, y_te)


def test_idx_truncated_file_is_rejected(tmp_path: Path) -> None:
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    y = np.zeros(2, dtype=np.uint8)
    _write_idx(
        tmp_path / "MNIST" / "raw",
        {
            "train-images-idx3-ubyte": _idx_images(x)[:-10],
            "train-labels-idx1-ubyte": _idx_labels(y),
            "t10k-images-idx3-ubyte": _idx_images(x),
            "t10k-labels-idx1-ubyte": _idx_labels(y),
        },
        gz=False,
    )
    with pytest.raises(ValueError, match="header says"):
        load_dataset("mnist", str(tmp_path))


# --- CIFAR pickle batches --------------------------------------------------------------------


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _assert_cifar_layout(x: np.ndarray, rows: np.ndarray) -> None:
    assert x.shape == (len(rows), 3, 32, 32)
    assert x.dtype == np.uint8
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    for n, c, h, w in [(0, 0, 0, 0), (0, 1, 5, 7), (len(rows) - 1, 2, 31, 30), (0, 2, 17, 3)]:
        assert x[n, c, h, w] == rows[n, c * 1024 + h * 32 + w]
    np.testing.assert_array_equal(x.reshape(len(rows), -1), rows)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_roundtrip(tmp_path: Path, bytes_keys: bool) -> None:
    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    rng = np.random.default_rng(1)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = _cifar_rows(rng, 2)
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        _dump(
            directory / f"data_batch_{i}",
            {
                key("batch_label"): f"training batch {i} of 5",
                key("labels"): labels,
                key("data"): rows,
                key("filenames"): ["a.png", "b.png"],
            },
        )
        train_rows.append(rows)
        train_labels.extend(labels)
    test_rows = _cifar_rows(rng, 3)
    _dump(
        directory / "test_batch",
        {
            key("batch_label"): "testing batch 1 of 1",
            key("labels"): [7, 0, 9],
            key("data"): test_rows,
            key("filenames"): ["c.png", "d.png", "e.png"],
        },
    )
    _dump(
        directory / "batches.meta",
        {
            key("label_names"): [f"c{i}" for i in range(10)],
            key("num_cases_per_batch"): 10000,
            key("num_vis"): 3072,
        },
    )
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.spec.num_classes == 10
    assert ds.spec.input_shape == (3, 32, 32)
    assert ds.spec.augment == "crop_flip"
    assert ds.spec.mean == (0.4914, 0.4822, 0.4465)
    assert ds.spec.std == (0.2023, 0.1994, 0.2010)
    _assert_cifar_layout(ds.train.x, np.concatenate(train_rows))
    np.testing.assert_array_equal(ds.train.y, train_labels)
    assert ds.train.y.dtype == np.int64
    _assert_cifar_layout(ds.test.x, test_rows)
    np.testing.assert_array_equal(ds.test.y, [7, 0, 9])


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    train_rows, test_rows = _cifar_rows(rng, 4), _cifar_rows(rng, 2)
    _dump(
        directory / "train",
        {
            "filenames": ["x"] * 4,
            "batch_label": "training batch 1 of 1",
            "fine_labels": [99, 0, 57, 12],
            "coarse_labels": [1, 2, 3, 4],
            "data": train_rows,
        },
    )
    _dump(
        directory / "test",
        {
            "filenames": ["y"] * 2,
            "batch_label": "testing batch 1 of 1",
            "fine_labels": [42, 88],
            "coarse_labels": [5, 6],
            "data": test_rows,
        },
    )
    _dump(
        directory / "meta",
        {
            "fine_label_names": [str(i) for i in range(100)],
            "coarse_label_names": [str(i) for i in range(20)],
        },
    )
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.spec.num_classes == 100
    assert ds.spec.augment == "crop_flip"
    _assert_cifar_layout(ds.train.x, train_rows)
    np.testing.assert_array_equal(ds.train.y, [99, 0, 57, 12])
    _assert_cifar_layout(ds.test.x, test_rows)
    np.testing.assert_array_equal(ds.test.y, [42, 88])


# --- SVHN .mat -------------------------------------------------------------------------------


def test_svhn_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x_tr = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    y_tr = np.array([[10], [1], [5], [9]], dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(32, 32, 3, 2), dtype=np.uint8)
    y_te = np.array([[3], [10]], dtype=np.uint8)
    savemat(str(tmp_path / "train_32x32.mat"), {"X": x_tr, "y": y_tr})
    savemat(str(tmp_path / "test_32x32.mat"), {"X": x_te, "y": y_te})
    ds = load_dataset("svhn", str(tmp_path))
    assert ds.spec.num_classes == 10
    assert ds.spec.input_shape == (3, 32, 32)
    assert ds.train.x.shape == (4, 3, 32, 32) and ds.train.x.dtype == np.uint8
    assert ds.train.x.flags["C_CONTIGUOUS"]
    for n, c, h, w in [(0, 0, 0, 0), (1, 2, 10, 20), (3, 1, 31, 0)]:
        assert ds.train.x[n, c, h, w] == x_tr[h, w, c, n]
    np.testing.assert_array_equal(ds.train.x, x_tr.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(ds.train.y, [0, 1, 5, 9])
    assert ds.train.y.dtype == np.int64
    np.testing.assert_array_equal(ds.test.x, x_te.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(ds.test.y, [3, 0])
