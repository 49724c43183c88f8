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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.data import safe_pickle

if TYPE_CHECKING:
    from raysim.config import SyntheticConfig

__all__ = [
    "DATASETS",
    "ArraySplit",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "channel_stats",
    "check_dataset",
    "dataset_task",
    "load_dataset",
    "with_validation",
]

DATASETS: tuple[str, ...] = (
    "digits",
    "digits_domains",
    "mnist",
    "fashionmnist",
    "cifar10",
    "cifar100",
    "svhn",
    "synthetic_organ",
    "synthetic_nuclei",
    "prostate_mri",
    "nuclei",
)
# Built from scikit-learn's bundled digits or generated offline, so they need no data.root.
_EMBEDDED = ("digits", "digits_domains", "synthetic_organ", "synthetic_nuclei")
_SYNTHETIC = {"synthetic_organ": "organ", "synthetic_nuclei": "nuclei"}
# Read from their distributions' layouts; there is nothing official to download.
_MEDICAL = ("prostate_mri", "nuclei")


def dataset_task(name: str) -> str:
    """"segmentation" or "classification", known from the name alone (before loading)."""
    return "segmentation" if name in _SYNTHETIC or name in _MEDICAL else "classification"

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
    (an object with `sizes`, the (num_clients,) sample counts, and `client(k) -> (x, y)`)."""

    spec: DatasetSpec
    train: ArraySplit | None
    test: ArraySplit
    val: ArraySplit | None = None
    clients: Any = None
    # test samples of domains held out of training (data.test_domains; raysim.data.domain_split)
    unseen: ArraySplit | None = None


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message says what to put where."""


class DatasetFormatError(ValueError):
    """Dataset files exist but their contents are unusable; the message names the file."""


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


def _missing_message(name: str, root: Path) -> str | None:
    """Return a not-found message if ``name``'s files are absent under ``root``, else None."""
    if name in _IDX_DIRS:
        directory = root / _IDX_DIRS[name] / "raw"
        missing = [s for s in _IDX_FILES if _idx_path(directory, s) is None]
        if missing:
            return (
                f"dataset {name!r} not found: expected {directory}/ ({', '.join(_IDX_FILES)}; "
                f".gz variants accepted), missing {', '.join(missing)} — put the idx-ubyte files "
                f"under data.root/{_IDX_DIRS[name]}/raw/, or set data.download: true"
            )
    elif name == "cifar10":
        directory = root / _CIFAR10_DIR
        missing = [f for f in _CIFAR10_FILES if not (directory / f).is_file()]
        if missing:
            return (
                f"dataset 'cifar10' not found: expected {directory}/ (data_batch_1..5, "
                f"test_batch, batches.meta), missing {', '.join(missing)} — extract "
                "cifar-10-python.tar.gz into data.root, or set data.download: true"
            )
    elif name == "cifar100":
        directory = root / _CIFAR100_DIR
        missing = [f for f in _CIFAR100_FILES if not (directory / f).is_file()]
        if missing:
            return (
                f"dataset 'cifar100' not found: expected {directory}/ (train, test, meta), "
                f"missing {', '.join(missing)} — extract cifar-100-python.tar.gz into "
                "data.root, or set data.download: true"
            )
    elif name == "svhn":
        missing = [f for f in _SVHN_FILES if not (root / f).is_file()]
        if missing:
            return (
                f"dataset 'svhn' not found: expected {root}/ (train_32x32.mat, test_32x32.mat), "
                f"missing {', '.join(missing)} — put the .mat files directly in data.root, "
                "or set data.download: true"
            )
    return None


def check_dataset(name: str, root: str | None, download: bool) -> None:
    """Fail fast, before any work is scheduled, if a dataset cannot be loaded as configured."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if name in _EMBEDDED:
        return
    if name in _MEDICAL:
        from raysim.data.medical import missing_message

        if root is None:
            raise DatasetNotFoundError(
                f"dataset {name!r} needs data.root (a directory holding its files); set "
                "data.root in the config (it cannot be downloaded automatically)"
            )
        message = missing_message(name, Path(root))
        if message is not None:
            raise DatasetNotFoundError(message)
        return
    if root is None:
        action = "to download into" if download else "holding its files"
        raise DatasetNotFoundError(
            f"dataset {name!r} needs data.root (a directory {action}); set data.root in the "
            "config" + ("" if download else ", and data.download: true to fetch it there")
        )
    if download:
        return
    message = _missing_message(name, Path(root))
    if message is not None:
        raise DatasetNotFoundError(message)


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
            raise DatasetNotFoundError(_missing_message(name, root) or f"missing {stem}")
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


_SPECS = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 255.0, None),
    "fashionmnist": DatasetSpec("fashionmnist", 10, (1, 28, 28), (0.2860,), (0.3530,), 255.0, None),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 255.0, "crop_flip"),
    "cifar100": DatasetSpec(
        "cifar100", 100, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 255.0, "crop_flip"
    ),
    # Horizontal flips would change digit identity, so SVHN gets no augmentation.
    "svhn": DatasetSpec(
        "svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 255.0, None
    ),
}

_LOADERS: dict[str, Callable[[Path], tuple[ArraySplit, ArraySplit]]] = {
    "mnist": lambda root: _load_idx("mnist", root),
    "fashionmnist": lambda root: _load_idx("fashionmnist", root),
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
}


def _download(name: str, root: Path) -> None:
    """Fetch the official files into ``root`` in the layout the parsers above expect."""
    from torchvision import datasets as tvd

    target = str(root)
    if name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(target, split=split, download=True)
        return
    cls = {
        "mnist": tvd.MNIST,
        "fashionmnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    for train in (True, False):
        cls(target, train=train, download=True)


def load_dataset(
    name: str,
    root: str | None = None,
    download: bool = False,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    *,
    synthetic: SyntheticConfig | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.2,
    label_resize: str = "nearest",
) -> Dataset:
    """Load a dataset fully into memory.

    ``test_fraction`` only applies to ``digits`` and ``digits_domains``, which have no official
    test split. ``split_seed`` seeds every data-side draw (held-out splits, rendering, the
    synthetic sites, the medical sets' slice permutation and validation hold-out); it is
    separate from the run seed so the data never moves between runs. ``synthetic`` sizes the
    ``synthetic_*`` sets (defaults: ``SyntheticConfig()``); ``image_size`` resizes the medical
    sets' images to a square (None keeps the native size; ``label_resize`` resamples their masks:
    nearest or area) and ``val_fraction`` is the share of each nuclei site's training list held
    out for validation (0: none).
    """
    check_dataset(name, root, download)
    if name in _SYNTHETIC:
        from raysim.data.synthetic_sites import load_synthetic

        if synthetic is None:
            from raysim.config import SyntheticConfig

            synthetic = SyntheticConfig()
        return load_synthetic(
            _SYNTHETIC[name],
            sites=synthetic.sites,
            train_per_site=synthetic.train_per_site,
            val_per_site=synthetic.val_per_site,
            test_per_site=synthetic.test_per_site,
            image_size=synthetic.image_size,
            seed=split_seed,
        )
    if name in _MEDICAL:
        from raysim.data.medical import load_nuclei, load_prostate_mri

        assert root is not None  # guaranteed by check_dataset
        if name == "prostate_mri":
            return load_prostate_mri(root, image_size=image_size, seed=split_seed,
                                     label_resize=label_resize)
        return load_nuclei(root, image_size=image_size, val_fraction=val_fraction,
                           seed=split_seed, label_resize=label_resize)
    if name in _EMBEDDED:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if name == "digits":
            return _load_digits(test_fraction, split_seed)
        # Imported here: that module builds on this one and pulls in scipy.ndimage.
        from raysim.data.digits_domains import load_digits_domains

        return load_digits_domains(test_fraction, split_seed)
    assert root is not None  # guaranteed by check_dataset
    root_path = Path(root)
    if download and _missing_message(name, root_path) is not None:
        root_path.mkdir(parents=True, exist_ok=True)
        _download(name, root_path)
        message = _missing_message(name, root_path)
        if message is not None:
            raise DatasetNotFoundError(f"download finished but files are still missing: {message}")
    train, test = _LOADERS[name](root_path)
    return Dataset(spec=_SPECS[name], train=train, test=test)
