"""`data.dataset: image_folder`: multi-domain image classification as PACS, Office-Caltech-10,
Office-Home and DomainNet are distributed, one folder per domain and per class:

    root/<domain>/<class>/<image>.{jpg,jpeg,png,bmp}

Every domain must hold the same classes (class ids follow their sorted names). A domain's
train/test split is the dataset's own where it ships split files, `root/<domain>_train.txt` and
`root/<domain>_test.txt` (DomainNet's form: one `<domain>/<class>/<file> <label>` per line; the
class is read from the path), else a seeded stratified `data.test_fraction` of each class.

Images are decoded once, converted to RGB and resized to `data.image_size` (default 32) square
with bilinear filtering, into uint8 arrays. The arrays are cached beside the data in
`root/.raysim-cache/` as a NumPy `.npz` (read back without pickle), keyed by the size and by
every file's path, size and modification time, so the next run starts in seconds and a changed
file is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysim.config import require
from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetRequest,
    DatasetSpec,
)
from raysim.data.images import open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_SIZE = 32
CACHE_DIR = ".raysim-cache"
LAYOUT = "root/<domain>/<class>/<image>.jpg (or .png), e.g. PACS/photo/dog/001.jpg"
SPLIT_SEED_TAG = 0x1F0  # the data-side stream of image_folder's per-domain splits


@dataclass(frozen=True)
class FolderLayout:
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]  # domain → [(path relative to root, class id)]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_layout(root: Path) -> FolderLayout:
    """The domains, the shared class list and every image; DatasetNotFoundError or
    DatasetFormatError saying what was found where the layout differs."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset 'image_folder' not found: {root} is not a folder; "
                                   f"expected {LAYOUT}")
    domains = _subfolders(root)
    if _images(root):
        raise DatasetFormatError(f"{root} holds image files itself ({_images(root)[0].name}); "
                                 f"image_folder expects {LAYOUT}")
    if not domains:
        raise DatasetNotFoundError(f"dataset 'image_folder': {root} has no domain folders; "
                                   f"expected {LAYOUT}")
    classes_of: dict[str, list[str]] = {}
    files: dict[str, list[tuple[str, int]]] = {}
    for domain in domains:
        class_dirs = _subfolders(domain)
        if not class_dirs:
            found = _images(domain)
            what = (f"images directly in it ({found[0].name}): that is one domain's "
                    "root/<class>/ layout one level too high" if found else "no class folders")
            raise DatasetFormatError(f"{domain} has {what}; image_folder expects {LAYOUT}")
        classes_of[domain.name] = [c.name for c in class_dirs]
    reference = next(iter(classes_of))
    for name in classes_of:
        for a, b in ((reference, name), (name, reference)):
            missing = sorted(set(classes_of[a]) - set(classes_of[b]))
            if missing:
                raise DatasetFormatError(
                    f"class {missing[0]!r} is in domain {a!r} ({root / a / missing[0]}) but not "
                    f"in domain {b!r}; every domain must hold the same classes")
    classes = tuple(classes_of[reference])
    for domain in domains:
        files[domain.name] = []
        for label, name in enumerate(classes):
            images = _images(domain / name)
            if not images:
                raise DatasetFormatError(f"{domain / name} holds no images "
                                         f"({', '.join(IMAGE_SUFFIXES)})")
            files[domain.name] += [(str(p.relative_to(root)), label) for p in images]
    return FolderLayout(tuple(d.name for d in domains), classes, files)


def _split_file_paths(root: Path, domain: str, part: str) -> set[str] | None:
    path = root / f"{domain}_{part}.txt"
    if not path.is_file():
        return None
    return {line.split()[0] for line in path.read_text().splitlines() if line.strip()}


def split_domain(root: Path, domain: str, files: list[tuple[str, int]], test_fraction: float,
                 seed: int) -> tuple[list[int], list[int]]:
    """Positions in `files` of the domain's train and test images."""
    train_list, test_list = (_split_file_paths(root, domain, p) for p in ("train", "test"))
    if train_list is not None and test_list is not None:
        train = [i for i, (path, _) in enumerate(files) if path in train_list]
        test = [i for i, (path, _) in enumerate(files) if path in test_list]
        return train, test
    import zlib

    rng = np.random.default_rng([seed, SPLIT_SEED_TAG, zlib.crc32(domain.encode())])
    labels = np.array([label for _, label in files])
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = max(1, int(round(test_fraction * len(members)))) if len(members) > 1 else 0
        test += members[:n_test].tolist()
        train += members[n_test:].tolist()
    return sorted(train), sorted(test)


def decode(root: Path, path: str, size: int) -> np.ndarray:
    """(3, size, size) uint8 RGB; DatasetFormatError naming the file it cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_image(root / path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except DatasetFormatError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetFormatError(f"cannot decode image {root / path}: "
                                 f"{type(error).__name__}: {error}") from None


def _cache_key(root: Path, layout: FolderLayout, size: int) -> str:
    digest = hashlib.sha256(json.dumps([size, layout.classes]).encode())
    for domain in layout.domains:
        for path, label in layout.files[domain]:
            stat = os.stat(root / path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decoded_images(root: Path, layout: FolderLayout, size: int) -> np.ndarray:
    """Every image of the layout, in layout order, as (N, 3, size, size) uint8: from the cache
    when it matches, else decoded (and cached where the folder is writable)."""
    cache = root / CACHE_DIR / f"image_folder-{size}-{_cache_key(root, layout, size)}.npz"
    paths = [path for domain in layout.domains for path, _ in layout.files[domain]]
    if cache.is_file():
        stored = read_cache(cache, (len(paths), 3, size, size))
        if stored is not None:
            return stored
    x = np.stack([decode(root, path, size) for path in paths]) if paths else \
        np.zeros((0, 3, size, size), np.uint8)
    try:
        cache.parent.mkdir(exist_ok=True)
        partial = cache.with_suffix(".partial.npz")
        np.savez(partial, x=x)
        partial.replace(cache)
    except OSError:
        pass  # a read-only data folder: decoded every run
    return x


def read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The (N, 3, size, size) uint8 images cached in `path`, or None (decode them again) when
    the file is damaged or does not hold exactly `shape` uint8 pixels, as its key says it
    does. The array's header is checked before anything is read into memory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            (member,) = archive.infolist()  # ValueError: not the one array a cache holds
            if member.filename != "x.npy":
                return None
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                stored_shape, fortran, dtype = header(stream)
                if (tuple(stored_shape) != shape or fortran or dtype != np.uint8
                        or member.file_size != stream.tell() + int(np.prod(shape))):
                    return None
        with np.load(path, allow_pickle=False) as stored:
            x = stored["x"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return x if x.shape == shape and x.dtype == np.uint8 else None


def load_image_folder(root: str | Path, *, image_size: int | None = None,
                      test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    root = Path(root)
    size = image_size or DEFAULT_SIZE
    layout = read_layout(root)
    x = decoded_images(root, layout, size)
    train_parts, test_parts, offset = [], [], 0
    for domain_id, domain in enumerate(layout.domains):
        files = layout.files[domain]
        labels = np.array([label for _, label in files], dtype=np.int64)
        train, test = split_domain(root, domain, files, test_fraction, seed)
        if not train or not test:
            raise DatasetFormatError(f"domain {domain!r} has {len(train)} training and "
                                     f"{len(test)} test images; it needs at least one of each")
        block = x[offset:offset + len(files)]
        for part, positions in ((train_parts, train), (test_parts, test)):
            part.append((block[positions], labels[positions],
                         np.full(len(positions), domain_id, dtype=np.int64)))
        offset += len(files)
    train, test = (ArraySplit(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
                   for parts in (train_parts, test_parts))
    spec = DatasetSpec(name="image_folder", num_classes=len(layout.classes),
                       input_shape=(3, size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       scale=255.0, augment=None, domains=layout.domains)
    return Dataset(spec=spec, train=train, test=test)


@dataclass(frozen=True)
class ImageFolderConfig:
    """The keys of `image_folder` (under `data`)."""

    image_size: int | None = None  # images resized to this square; None: DEFAULT_SIZE

    def __post_init__(self) -> None:
        require(self.image_size is None or (self.image_size >= 16 and self.image_size % 16 == 0),
                "image_size", f"must be a multiple of 16 (got {self.image_size})")


class ImageFolderDataset:
    """The plug-in (`raysim.datasets` entry point `image_folder`)."""

    task = "classification"
    Config = ImageFolderConfig

    def check(self, request: DatasetRequest) -> None:
        if not request.root:
            raise DatasetNotFoundError(f"dataset 'image_folder' needs data.root: a folder "
                                       f"{LAYOUT}")
        read_layout(Path(request.root))  # layout errors before any decoding

    def load(self, request: DatasetRequest) -> Dataset:
        return load_image_folder(request.root, image_size=request.params.image_size,
                                 test_fraction=request.test_fraction)


image_folder = ImageFolderDataset()

