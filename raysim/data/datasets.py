"""Datasets as in-memory numpy arrays, read straight from their standard on-disk formats.

Classification sets store int64 labels per image; segmentation sets (``DatasetSpec.task ==
"segmentation"``) store a uint8 {0, 1} mask per image and a site id per sample.

Keeping whole splits in memory lets the simulator hand clients cheap index views and lets
partitioning work on plain label arrays. The files are parsed here rather than through
torchvision's dataset classes because those verify md5 sums of the archives on every load,
which rejects re-packed or partially copied data and costs time; torchvision is used only to
download.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from raysim.config import DATASET, ConfigError, config_class, parse_params
from raysim.data import safe_pickle
from raysim.registry import DATASETS, resolve_config

__all__ = [
    "ArraySplit",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetRequest",
    "DatasetSpec",
    "channel_stats",
    "check_dataset",
    "load_dataset",
    "needs_root",
    "with_validation",
]

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ArraySplit:
    """One split: images ``x`` as (N, C, H, W); ``y`` int64 labels (N,) or, for segmentation,
    uint8 masks (N, H, W) in {0, 1}; and, for multi-domain datasets, an int64 domain id per
    sample (an index into ``DatasetSpec.domains``); for datasets with natural clients, the
    client id of each sample (what partition kind ``natural`` splits by)."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray | None = None
    client: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")
        if self.y.ndim == 3 and self.y.shape[1:] != self.x.shape[-2:]:
            raise ValueError(
                f"masks are {self.y.shape[1]}x{self.y.shape[2]} but images are "
                f"{self.x.shape[-2]}x{self.x.shape[-1]}"
            )
        if self.y.ndim not in (1, 3):
            raise ValueError(f"y must be labels (N,) or masks (N, H, W), got shape {self.y.shape}")
        if self.domain is not None and len(self.domain) != len(self.y):
            raise ValueError(f"domain has {len(self.domain)} entries but y has {len(self.y)}")
        if self.client is not None and len(self.client) != len(self.y):
            raise ValueError(f"client has {len(self.client)} entries but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset, and how to normalise stored pixels."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    augment: str | None
    # Domain names, indexed by domain id; empty for single-domain datasets.
    domains: tuple[str, ...] = ()
    # "classification" (a label per image) or "segmentation" (a mask per image, pixel classes).
    task: str = "classification"


@dataclass(frozen=True)
class Dataset:
    """A dataset's spec with its train and test splits and, where the dataset defines one, a
    validation split for model selection (the test split is never used to select).

    A dataset with any number of clients (`synthetic_fedprox`) has no train split in memory:
    `clients` generates each client's samples on the worker when the client is sampled
    (an object with `sizes`, the (num_clients,) sample counts, and `client(k) -> (x, y)`;
    optionally `many(ids)`, the same for a worker's group of clients at once)."""

    spec: DatasetSpec
    train: ArraySplit | None
    test: ArraySplit
    val: ArraySplit | None = None
    clients: Any = None
    # test samples of domains held out of training (data.test_domains; raysim.data.domain_split)
    unseen: ArraySplit | None = None


@dataclass(frozen=True)
class DatasetRequest:
    """What a dataset plug-in's `check` and `load` receive: the run's core `data` keys, the
    plug-in's own `Config` (`params`, parsed from its keys under `data`), and what other
    sections imply for the data."""

    dataset: str
    params: Any = None  # the plug-in's Config instance
    root: str | None = None
    download: bool = False
    test_fraction: float = 0.25
    val_fraction: float | None = None  # None: the dataset's default
    num_clients: int = 1  # data.partition.num_clients (for datasets that generate clients)
    protocol: str = "default"  # evaluation.protocol
    # seeds every data-side draw (held-out splits, rendering, generated sites); separate from
    # the run seed so the data never moves between runs
    split_seed: int = 0


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message says what to put where."""


class DatasetFormatError(ValueError):
    """Dataset files exist but their contents are unusable; the message names the file."""


# A generated dataset whose arrays would exceed this, one array at a time, is refused before
# anything is generated: a size key off by a few zeros would otherwise exhaust the memory of
# the driver or of a worker partway through a run.
MAX_GENERATED_BYTES = 16 * 2**30


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError  # unreachable


def require_generated_fits(key: str, value: float, bytes_each: int, what: str) -> None:
    """ConfigError naming `key` when `value` of `what` (`bytes_each` bytes each) exceed
    MAX_GENERATED_BYTES; the message says what they would need and the most that fit."""
    need = value * bytes_each
    if need > MAX_GENERATED_BYTES:
        most = MAX_GENERATED_BYTES // bytes_each
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.3g}"
        raise ConfigError(f"{key}: {shown} {what} would need {format_bytes(need)}; at most "
                          f"{most:,} fit in the {format_bytes(MAX_GENERATED_BYTES)} raysim "
                          "generates in one array")


# ---------------------------------------------------------------------------------------------
# Expected on-disk layouts
# ---------------------------------------------------------------------------------------------

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_DIRS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_FILES = ("train", "test", "meta")
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_missing(name: str, root: Path) -> str | None:
    directory = root / _IDX_DIRS[name] / "raw"
    missing = [s for s in _IDX_FILES if _idx_path(directory, s) is None]
    if not missing:
        return None
    return (
        f"dataset {name!r} not found: expected {directory}/ ({', '.join(_IDX_FILES)}; "
        f".gz variants accepted), missing {', '.join(missing)} — put the idx-ubyte files "
        f"under data.root/{_IDX_DIRS[name]}/raw/, or set data.download: true"
    )


def _cifar10_missing(root: Path) -> str | None:
    directory = root / _CIFAR10_DIR
    missing = [f for f in _CIFAR10_FILES if not (directory / f).is_file()]
    if not missing:
        return None
    return (
        f"dataset 'cifar10' not found: expected {directory}/ (data_batch_1..5, "
        f"test_batch, batches.meta), missing {', '.join(missing)} — extract "
        "cifar-10-python.tar.gz into data.root, or set data.download: true"
    )


def _cifar100_missing(root: Path) -> str | None:
    directory = root / _CIFAR100_DIR
    missing = [f for f in _CIFAR100_FILES if not (directory / f).is_file()]
    if not missing:
        return None
    return (
        f"dataset 'cifar100' not found: expected {directory}/ (train, test, meta), "
        f"missing {', '.join(missing)} — extract cifar-100-python.tar.gz into "
        "data.root, or set data.download: true"
    )


def _svhn_missing(root: Path) -> str | None:
    missing = [f for f in _SVHN_FILES if not (root / f).is_file()]
    if not missing:
        return None
    return (
        f"dataset 'svhn' not found: expected {root}/ (train_32x32.mat, test_32x32.mat), "
        f"missing {', '.join(missing)} — put the .mat files directly in data.root, "
        "or set data.download: true"
    )


def needs_root(request: DatasetRequest, downloadable: bool) -> Path:
    """`data.root` as a path, or DatasetNotFoundError saying to set it."""
    if request.root is not None:
        return Path(request.root)
    name = request.dataset
    if not downloadable:
        raise DatasetNotFoundError(
            f"dataset {name!r} needs data.root (a directory holding its files); set "
            "data.root in the config (it cannot be downloaded automatically)"
        )
    action = "to download into" if request.download else "holding its files"
    raise DatasetNotFoundError(
        f"dataset {name!r} needs data.root (a directory {action}); set data.root in the "
        "config" + ("" if request.download else ", and data.download: true to fetch it there")
    )


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx-ubyte file (big-endian header: 2 zero bytes, dtype code, ndim, dims)."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: header says {dims} ({count} bytes) but found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_idx(name: str, root: Path) -> tuple[ArraySplit, ArraySplit]:
    directory = root / _IDX_DIRS[name] / "raw"
    arrays = []
    for stem in _IDX_FILES:
        path = _idx_path(directory, stem)
        if path is None:
            raise DatasetNotFoundError(_idx_missing(name, root) or f"missing {stem}")
        arrays.append(_read_idx(path))
    x_tr, y_tr, x_te, y_te = arrays
    return (
        ArraySplit(x_tr[:, None, :, :], y_tr.astype(np.int64)),
        ArraySplit(x_te[:, None, :, :], y_te.astype(np.int64)),
    )


def _get(batch: dict[Any, Any], key: str) -> Any:
    # Files pickled under Python 2 and loaded with encoding="latin1" have str keys; some
    # re-pickled copies keep bytes keys. Accept both.
    if key in batch:
        return batch[key]
    return batch.get(key.encode())


def _read_cifar_batch(name: str, path: Path, label_key: str, num_classes: int) -> ArraySplit:
    """One CIFAR python-format batch; any unreadable, corrupt or unexpected content becomes one
    DatasetFormatError naming the file, so a bad root is a one-line config error."""
    try:
        with open(path, "rb") as f:
            batch = safe_pickle.load(f, encoding="latin1")
    except safe_pickle.UnsafePickleError as error:
        raise DatasetFormatError(
            f"{name}: {path}: refuses to load: the file references {error.global_name} "
            "(a pickle that could run code), not a CIFAR batch"
        ) from None
    except OSError as error:
        raise DatasetFormatError(f"{name}: {path}: cannot read it: {error.strerror}") from None
    except Exception as error:  # any parse failure (EOFError, UnpicklingError, ...) = bad file
        detail = " ".join(str(error).split()) or type(error).__name__
        raise DatasetFormatError(
            f"{name}: {path}: not a CIFAR batch file (truncated or corrupted: {detail})"
        ) from None

    def bad(why: str) -> DatasetFormatError:
        return DatasetFormatError(f"{name}: {path}: not a CIFAR batch file ({why})")

    if not isinstance(batch, dict):
        raise bad(f"expected a dict of 'data' and '{label_key}', got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, label_key)
    if data is None or labels is None:
        missing = [k for k, v in (("data", data), (label_key, labels)) if v is None]
        raise bad(f"no {' or '.join(repr(k) for k in missing)} entry")
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise bad(f"'data' must be a uint8 array of N rows × 3072 values, got {got}")
    if not isinstance(labels, list | tuple | np.ndarray):
        raise bad(f"{label_key!r} must be a list of ints, got {type(labels).__name__}")
    y = np.asarray(labels)
    if y.ndim != 1 or (len(y) and y.dtype.kind not in "iu"):
        raise bad(f"{label_key!r} must be a flat list of ints")
    if len(y) != len(data):
        raise bad(f"{label_key!r} has {len(y)} entries but 'data' has {len(data)} rows")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise bad(f"{label_key!r} must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    return ArraySplit(data.reshape(-1, 3, 32, 32), y.astype(np.int64))


def _concat(splits: list[ArraySplit]) -> ArraySplit:
    return ArraySplit(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


def _load_cifar10(root: Path) -> tuple[ArraySplit, ArraySplit]:
    directory = root / _CIFAR10_DIR

    def read(file: str) -> ArraySplit:
        return _read_cifar_batch("cifar10", directory / file, "labels", 10)

    train = _concat([read(f"data_batch_{i}") for i in range(1, 6)])
    return train, read("test_batch")


def _load_cifar100(root: Path) -> tuple[ArraySplit, ArraySplit]:
    directory = root / _CIFAR100_DIR

    def read(file: str) -> ArraySplit:
        return _read_cifar_batch("cifar100", directory / file, "fine_labels", 100)

    return read("train"), read("test")


def _read_svhn(path: Path) -> ArraySplit:
    from scipy.io import loadmat

    mat = loadmat(str(path))
    x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    return ArraySplit(x, y)


def _load_svhn(root: Path) -> tuple[ArraySplit, ArraySplit]:
    return _read_svhn(root / "train_32x32.mat"), _read_svhn(root / "test_32x32.mat")


def _read_bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits.csv.gz (1797 × 64 pixels + label), read without importing
    scikit-learn, which would add seconds to every start-up."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)


def channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``x / scale`` for (N, C, H, W) arrays, in chunks so large
    uint8 image sets are never converted to float all at once."""
    n, channels = len(x), x.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    step = max(1, (1 << 24) // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, n, step):
        chunk = x[start : start + step].astype(np.float64) / scale
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk * chunk).sum(axis=(0, 2, 3))
    count = max(1, n * x.shape[2] * x.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded round(n_c · test_fraction) of the samples go to the test split."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(len(members) * test_fraction))])
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


_VAL_STREAM = 0x7A1


def with_validation(dataset: Dataset, fraction: float, split_seed: int = 0) -> Dataset:
    """`dataset` with a seeded share `fraction` of its training split held out as the
    validation split, stratified by class (and by domain where samples have one). The data
    seed, not the run seed: the split is the same for every run."""
    train = dataset.train
    strata = train.y.astype(np.int64)
    if train.domain is not None:
        strata = strata * (int(train.domain.max()) + 1) + train.domain
    keep, held = stratified_split(strata, fraction, _VAL_STREAM + split_seed)

    def part(idx: np.ndarray) -> ArraySplit:
        return ArraySplit(train.x[idx], train.y[idx],
                          None if train.domain is None else train.domain[idx],
                          None if train.client is None else train.client[idx])

    return dataclasses.replace(dataset, train=part(keep), val=part(held))


def _load_digits(test_fraction: float, split_seed: int) -> Dataset:
    x, y = _read_bundled_digits()
    tr_idx, te_idx = stratified_split(y, test_fraction, split_seed)
    train = ArraySplit(x[tr_idx], y[tr_idx])
    test = ArraySplit(x[te_idx], y[te_idx])
    scaled = train.x.astype(np.float64) / 16.0
    spec = DatasetSpec(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
        scale=16.0,
        augment=None,
    )
    return Dataset(spec=spec, train=train, test=test)


def _torchvision_download(dataset: str, root: Path) -> None:
    """Fetch the official files of torchvision's `dataset` class into ``root``, in the layout
    the parsers above expect."""
    from torchvision import datasets as tvd

    cls = getattr(tvd, dataset)
    if dataset == "SVHN":
        for split in ("train", "test"):
            cls(str(root), split=split, download=True)
        return
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _test_fraction(request: DatasetRequest) -> float:
    if not 0.0 < request.test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {request.test_fraction}")
    return request.test_fraction


class Digits:
    """`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images, real data), a
    seeded stratified `data.test_fraction` held out as the test split. Needs no root."""

    task = "classification"

    def check(self, request: DatasetRequest) -> None:
        pass  # bundled with scikit-learn

    def load(self, request: DatasetRequest) -> Dataset:
        return _load_digits(_test_fraction(request), request.split_seed)


@dataclass(frozen=True)
class FileDataset:
    """A classification set read from its distribution's files in `data.root`, which
    torchvision can download there (`data.download: true`)."""

    spec: DatasetSpec
    missing: Callable[[Path], str | None]  # root → what is missing, or None
    read: Callable[[Path], tuple[ArraySplit, ArraySplit]]  # root → (train, test)
    download_files: Callable[[Path], None]
    task: str = "classification"

    def check(self, request: DatasetRequest) -> None:
        root = needs_root(request, downloadable=True)
        if request.download:
            return
        message = self.missing(root)
        if message is not None:
            raise DatasetNotFoundError(message)

    def load(self, request: DatasetRequest) -> Dataset:
        root = needs_root(request, downloadable=True)
        if request.download and self.missing(root) is not None:
            root.mkdir(parents=True, exist_ok=True)
            self.download_files(root)
            message = self.missing(root)
            if message is not None:
                raise DatasetNotFoundError(
                    f"download finished but files are still missing: {message}")
        train, test = self.read(root)
        return Dataset(spec=self.spec, train=train, test=test)


digits = Digits()
mnist = FileDataset(
    DatasetSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 255.0, None),
    partial(_idx_missing, "mnist"), partial(_load_idx, "mnist"),
    partial(_torchvision_download, "MNIST"))
fashionmnist = FileDataset(
    DatasetSpec("fashionmnist", 10, (1, 28, 28), (0.2860,), (0.3530,), 255.0, None),
    partial(_idx_missing, "fashionmnist"), partial(_load_idx, "fashionmnist"),
    partial(_torchvision_download, "FashionMNIST"))
cifar10 = FileDataset(
    DatasetSpec("cifar10", 10, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 255.0, "crop_flip"),
    _cifar10_missing, _load_cifar10, partial(_torchvision_download, "CIFAR10"))
cifar100 = FileDataset(
    DatasetSpec("cifar100", 100, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 255.0, "crop_flip"),
    _cifar100_missing, _load_cifar100, partial(_torchvision_download, "CIFAR100"))
# Horizontal flips would change digit identity, so SVHN gets no augmentation.
svhn = FileDataset(
    DatasetSpec("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                255.0, None),
    _svhn_missing, _load_svhn, partial(_torchvision_download, "SVHN"))


# --------------------------------------------------------------------------- by registered name


def _registered(name: str, root: str | None = None, download: bool = False,
                    test_fraction: float = 0.25, split_seed: int = 0, *,
                    val_fraction: float | None = None, protocol: str = "default",
                    num_clients: int = 1, **params: Any) -> tuple[Any, DatasetRequest]:
    """The registered dataset `name` and a request for it, its own keys `params` parsed
    with its Config (a ConfigError names a bad one)."""
    try:
        plugin = DATASETS[name]
    except KeyError as error:  # RegistryError: unknown (with the known names), or broken
        raise ValueError(str(error)) from None
    own = parse_params(config_class(plugin), params, "data", resolve_config,
                       f"{DATASET} {name!r}")
    return plugin, DatasetRequest(name, own, root, download, test_fraction, val_fraction,
                                  num_clients, protocol, split_seed)


def check_dataset(name: str, root: str | None = None, download: bool = False,
                  **keys: Any) -> None:
    """Fail fast, before any work is scheduled, if the registered dataset `name` cannot be
    loaded as configured (DatasetNotFoundError says what to put where)."""
    plugin, request = _registered(name, root, download, **keys)
    plugin.check(request)


def load_dataset(name: str, root: str | None = None, download: bool = False,
                 test_fraction: float = 0.25, split_seed: int = 0, **keys: Any) -> Dataset:
    """The registered dataset `name`, checked and loaded fully into memory. ``split_seed``
    seeds every data-side draw; the keyword arguments are `DatasetRequest`'s other fields
    (val_fraction, protocol, num_clients) and the dataset's own keys (e.g. sites=3)."""
    plugin, request = _registered(name, root, download, test_fraction, split_seed, **keys)
    plugin.check(request)
    return plugin.load(request)
