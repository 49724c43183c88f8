"""The other digit domains of the Digits benchmark (MNIST, USPS, SVHN, SynthDigits, MNIST-M), as
their common distributions lay them out in `data.root`:

- `usps`: `usps.bz2` (train, 7,291) and `usps.t.bz2` (test, 2,007), the LIBSVM files of the
  LIBSVM data page that torchvision's `USPS` reads (`label index:value ...`, 256 values in
  [−1, 1], labels 1–10 for digits 0–9); 1×16×16. `data.download: true` fetches them.
- `synth_digits` (SynthDigits / SYN numbers, Ganin & Lempitsky 2015): `synth_train_32x32.mat`
  and `synth_test_32x32.mat` in SVHN's format (`X` 32×32×3×N, `y` N×1), or Digit-Five's
  `syn_number.mat` (`train_data` N×32×32×3, `train_label`, `test_data`, `test_label`); 3×32×32.
- `mnist_m` (MNIST-M, Ganin et al. 2016): the original archive extracted, `mnist_m/` (or
  `data.root` itself) holding `mnist_m_train/`, `mnist_m_test/` of PNGs and
  `mnist_m_train_labels.txt`, `mnist_m_test_labels.txt` (`<file> <label>` per line); 3×28×28.

MATLAB files are read with scipy (data only); nothing read here can run code.
"""

from __future__ import annotations

import bz2
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetRequest,
    DatasetSpec,
    channel_stats,
)
from raysim.data.images import open_image

USPS_FILES = ("usps.bz2", "usps.t.bz2")
SYNTH_SVHN_FORM = ("synth_train_32x32.mat", "synth_test_32x32.mat")
SYNTH_DIGIT_FIVE = "syn_number.mat"
MNIST_M_PARTS = ("mnist_m_train", "mnist_m_test")


def found_in(root: Path) -> str:
    """What a folder holds, for a not-found message (a few names)."""
    if not root.is_dir():
        return f"{root} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    return f"it holds {shown}" if names else "it is empty"


# ----------------------------------------------------------------------------------- USPS


def read_usps(path: Path) -> ArraySplit:
    """One LIBSVM file: (N, 1, 16, 16) uint8 images (value v ↦ ⌊(v + 1) / 2 · 255⌋ in float32,
    as torchvision's `USPS`) and labels 0–9."""
    images, labels = [], []
    with bz2.open(path, "rt") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                label = int(float(fields[0])) - 1
                pixels = np.zeros(256, np.float32)
                for item in fields[1:]:
                    index, value = item.split(":")
                    pixels[int(index) - 1] = float(value)
            except (ValueError, IndexError):
                raise DatasetFormatError(f"{path}:{number}: not a LIBSVM line "
                                         "(label index:value ...)") from None
            if not 0 <= label <= 9:
                raise DatasetFormatError(f"{path}:{number}: label {label + 1} is not 1–10")
            images.append(pixels)
            labels.append(label)
    if not images:
        raise DatasetFormatError(f"{path}: holds no samples")
    x = ((np.clip(np.stack(images), -1, 1) + 1) / 2 * 255).astype(np.uint8)
    return ArraySplit(x.reshape(-1, 1, 16, 16), np.array(labels, dtype=np.int64))


def _usps_missing(root: Path) -> str | None:
    missing = [f for f in USPS_FILES if not (root / f).is_file()]
    if missing:
        return (f"dataset 'usps' not found: expected {root}/ (usps.bz2, usps.t.bz2), missing "
                f"{', '.join(missing)} ({found_in(root)}) — put the LIBSVM files in data.root, "
                "or set data.download: true")
    return None


def load_usps(root: Path) -> tuple[ArraySplit, ArraySplit]:
    return read_usps(root / USPS_FILES[0]), read_usps(root / USPS_FILES[1])


# ---------------------------------------------------------------------------- SynthDigits


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(str(path))
    except Exception as error:  # scipy raises several kinds for a file that is not MATLAB
        raise DatasetFormatError(f"{path}: not a readable MATLAB file: {error}") from None


def _digits_from(path: Path, x: Any, y: Any, layout: str) -> ArraySplit:
    x, y = np.asarray(x), np.asarray(y).reshape(-1).astype(np.int64)
    if layout == "svhn":  # X is H × W × C × N; digit 0 is stored as 10
        x = x.transpose(3, 2, 0, 1)
        y = np.where(y == 10, 0, y)
    else:  # N × H × W × C
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or len(x) != len(y) or y.min() < 0 or y.max() > 9:
        raise DatasetFormatError(f"{path}: expected 3-channel images with one label 0–9 each "
                                 f"(got images {x.shape}, {len(y)} labels)")
    return ArraySplit(np.ascontiguousarray(x, dtype=np.uint8), y)


def _synth_missing(root: Path) -> str | None:
    if all((root / f).is_file() for f in SYNTH_SVHN_FORM) or (root / SYNTH_DIGIT_FIVE).is_file():
        return None
    return (f"dataset 'synth_digits' not found in {root}/: expected synth_train_32x32.mat and "
            f"synth_test_32x32.mat (SVHN's format), or {SYNTH_DIGIT_FIVE} (Digit-Five); "
            f"{found_in(root)}")


def load_synth_digits(root: Path) -> tuple[ArraySplit, ArraySplit]:
    if all((root / f).is_file() for f in SYNTH_SVHN_FORM):
        parts = []
        for name in SYNTH_SVHN_FORM:
            mat = _loadmat(root / name)
            if "X" not in mat or "y" not in mat:
                raise DatasetFormatError(f"{root / name}: has no X and y (SVHN's format)")
            parts.append(_digits_from(root / name, mat["X"], mat["y"], "svhn"))
        return parts[0], parts[1]
    path = root / SYNTH_DIGIT_FIVE
    mat = _loadmat(path)
    keys = ("train_data", "train_label", "test_data", "test_label")
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetFormatError(f"{path}: has no {', '.join(missing)} (Digit-Five's keys)")
    return (_digits_from(path, mat["train_data"], mat["train_label"], "nhwc"),
            _digits_from(path, mat["test_data"], mat["test_label"], "nhwc"))


# -------------------------------------------------------------------------------- MNIST-M


def _mnist_m_dir(root: Path) -> Path:
    return root / "mnist_m" if (root / "mnist_m").is_dir() else root


def _mnist_m_missing(root: Path) -> str | None:
    folder = _mnist_m_dir(root)
    missing = [p for part in MNIST_M_PARTS for p in (part, f"{part}_labels.txt")
               if not (folder / p).exists()]
    if missing:
        return (f"dataset 'mnist_m' not found: expected {folder}/ with mnist_m_train/, "
                "mnist_m_test/ and their _labels.txt files (the extracted mnist_m.tar.gz), "
                f"missing {', '.join(missing)}; {found_in(folder)}")
    return None


def read_mnist_m(folder: Path, part: str) -> ArraySplit:
    from PIL import UnidentifiedImageError

    listing = folder / f"{part}_labels.txt"
    images, labels = [], []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.partition(" ")
        if not label.strip().isdigit() or not 0 <= int(label) <= 9:
            raise DatasetFormatError(f"{listing}:{number}: expected `<file> <label 0-9>`")
        path = folder / part / name
        try:
            with open_image(path) as image:
                images.append(np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetFormatError(f"cannot decode image {path}: {error}") from None
        labels.append(int(label))
    return ArraySplit(np.stack(images), np.array(labels, dtype=np.int64))


def load_mnist_m(root: Path) -> tuple[ArraySplit, ArraySplit]:
    folder = _mnist_m_dir(root)
    return read_mnist_m(folder, MNIST_M_PARTS[0]), read_mnist_m(folder, MNIST_M_PARTS[1])


# -------------------------------------------------------------------------------- plug-ins


@dataclass(frozen=True)
class DigitFiles:
    """A digit set read from files in `data.root` (the `raysim.datasets` plug-in)."""

    name: str
    missing: Any  # root → a not-found message, or None
    read: Any  # root → (train, test)
    download: Any = None  # root → None, fetching the files (torchvision)
    task: str = "classification"

    def check(self, request: DatasetRequest) -> None:
        if not request.root:
            raise DatasetNotFoundError(f"dataset {self.name!r} needs data.root (a folder "
                                       "holding its files)")
        if request.download and self.download is not None:
            return
        message = self.missing(Path(request.root))
        if message is not None:
            raise DatasetNotFoundError(message)

    def load(self, request: DatasetRequest) -> Dataset:
        root = Path(request.root)
        if request.download and self.download is not None and self.missing(root) is not None:
            root.mkdir(parents=True, exist_ok=True)
            self.download(root)
        train, test = self.read(root)
        mean, std = channel_stats(train.x, 255.0)
        spec = DatasetSpec(self.name, 10, tuple(train.x.shape[1:]), mean, std, 255.0, None)
        return Dataset(spec=spec, train=train, test=test)


def _download_usps(root: Path) -> None:
    from torchvision import datasets as tvd

    for train in (True, False):
        tvd.USPS(str(root), train=train, download=True)


usps = DigitFiles("usps", _usps_missing, load_usps, _download_usps)
synth_digits = DigitFiles("synth_digits", _synth_missing, load_synth_digits)
mnist_m = DigitFiles("mnist_m", _mnist_m_missing, load_mnist_m)
