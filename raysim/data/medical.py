"""Multi-site medical segmentation sets, read from the layouts their distributions use.

``prostate_mri``: the six-site T2 prostate MRI collection of SAML/HarmoFL, as FedBCS uses it::

    <root>/MRI/<site>/CaseXX.nii.gz               image volume
    <root>/MRI/<site>/CaseXX_segmentation.nii.gz  label volume (0 background, 1-2 prostate)
    <root>/MRI/<site>-dir.npy                     optional: the file names, in load order
    <root>/MRI/<site>-index.npy                   optional: a fixed permutation of the slices

for sites BIDMC, HK, I2CVB, ISBI, ISBI_1.5, UCL (those present are used). Volumes are read
with nibabel, whose arrays are (X, Y, Z); slice i is ``data[:, :, i].T``, i.e. rows are Y as
SimpleITK (and the official loader) reads them. Each volume is clipped at its 99th percentile
and min-max scaled to uint8 (truncated, as the official loader does); each slice i = 1..D-2
whose label is non-empty becomes one 2.5-D sample: slices (i-1, i, i+1) as three channels,
with the binarised label of slice i. Per site the slices are permuted (by ``<site>-index.npy``
when present, applied to the slices in ``<site>-dir.npy`` order, which then defines the cases;
else by a seeded permutation of the cases in name order) and split at slice level: train the
first 64 %, val the next 16 %, test the last 20 %, as HarmoFL does. The val split is what
model selection uses.

``nuclei``: the four-site histology nuclei set of FedBCS::

    <root>/{TCIA,CRC,KIRC,TNBC}/train.txt   lines "<image path> <label path>", relative to root
    <root>/{TCIA,CRC,KIRC,TNBC}/val.txt     the same; used as the TEST split, as in FedBCS

Images are read with Pillow and kept as RGB (the official code reads BGR with OpenCV and never
converts), resized if asked (bilinear with antialiasing for images, nearest for labels; the
official code resizes labels by area averaging, which leaves fractional boundary values), and
min-max stretched per image as MONAI's ``ScaleIntensity`` does. Labels > 0 are foreground, so
instance maps work. Our validation split is a seeded ``val_fraction`` of each site's training
list.
"""

from __future__ import annotations

import zlib
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
    channel_stats,
    needs_root,
)
from raysim.data.images import open_image

__all__ = [
    "NUCLEI_SITES",
    "NUCLEI_VAL_FRACTION",
    "PROSTATE_SITES",
    "MedicalConfig",
    "label_resize_of",
    "load_nuclei",
    "load_prostate_mri",
    "nuclei",
    "nuclei_missing",
    "nuclei_sites",
    "nuclei_val_fraction",
    "prostate_missing",
    "prostate_mri",
    "prostate_cases",
    "prostate_sites",
    "read_nuclei_list",
]

PROSTATE_SITES: tuple[str, ...] = ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL")
# Site ids as FedBCS names them; each site's folder is the upper-case name.
NUCLEI_SITES: tuple[str, ...] = ("tcia", "crc", "kirc", "tnbc")

_LABEL_SUFFIX = "_segmentation.nii.gz"
# Fixed stream tag so these draws never share random numbers with other uses of the seed.
_STREAM_TAG = 0x3ED1
_PROSTATE_LAYOUT = (
    "<root>/MRI/<site>/CaseXX.nii.gz with CaseXX_segmentation.nii.gz, for sites "
    f"{', '.join(PROSTATE_SITES)} (any subset; optional <site>-dir.npy and <site>-index.npy "
    "next to the site folders)"
)
_NUCLEI_LAYOUT = (
    "<root>/<SITE>/train.txt and val.txt for sites "
    f"{', '.join(s.upper() for s in NUCLEI_SITES)} (any subset), each line "
    "'<image path> <label path>' relative to data.root"
)


def _site_stream(seed: int, site: str) -> np.random.Generator:
    # Keyed by the site's name, so a site's split does not move when other sites are absent.
    return np.random.default_rng([seed, _STREAM_TAG, zlib.crc32(site.encode())])


def _resize(
    x: np.ndarray, y: np.ndarray, size: int | None, label_resize: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize uint8 images (N, C, H, W) and masks (N, H, W) to size x size: images bilinear
    with antialiasing (area-like when shrinking), masks nearest so they stay binary, or with
    `label_resize="area"` as the FedBCS code does (MONAI `Resized`'s default area mode on the
    label, then `.long()`): the area mean truncated, so a pixel stays foreground only where its
    whole source area is (spec fedbcs §7.8)."""
    if size is None or x.shape[-2:] == (size, size):
        return x, y
    import torch
    import torch.nn.functional as F

    xt = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(x)).float(),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    yt = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(y))[:, None].float(),
        size=(size, size),
        mode="area" if label_resize == "area" else "nearest-exact",
    ).trunc()
    return (
        xt.round().clamp(0, 255).to(torch.uint8).numpy(),
        yt[:, 0].to(torch.uint8).numpy(),
    )


def _check_sizes(shape: tuple[int, ...], source: Path, first: tuple[tuple[int, ...], Path]) -> None:
    if shape != first[0]:
        raise DatasetFormatError(
            f"images differ in size: {first[0][0]}x{first[0][1]} in {first[1]} but "
            f"{shape[0]}x{shape[1]} in {source}; set data.image_size to resize every image to "
            "one square size"
        )


def _segmentation_spec(
    name: str, train: ArraySplit, sites: tuple[str, ...], augment: str | None
) -> DatasetSpec:
    mean, std = channel_stats(train.x, 255.0)
    return DatasetSpec(
        name=name,
        num_classes=2,
        input_shape=(int(train.x.shape[1]), int(train.x.shape[2]), int(train.x.shape[3])),
        mean=mean,
        std=std,
        scale=255.0,
        augment=augment,
        domains=sites,
        task="segmentation",
    )


def _concat(blocks: list[tuple[np.ndarray, np.ndarray, int]]) -> ArraySplit:
    return ArraySplit(
        np.concatenate([b[0] for b in blocks]),
        np.concatenate([b[1] for b in blocks]),
        np.concatenate([np.full(len(b[1]), b[2], dtype=np.int64) for b in blocks]),
    )


# ---------------------------------------------------------------------------------------------
# Prostate MRI
# ---------------------------------------------------------------------------------------------


def prostate_sites(root: Path) -> list[str]:
    """The known sites whose folder exists under ``<root>/MRI``, in canonical order."""
    return [s for s in PROSTATE_SITES if (root / "MRI" / s).is_dir()]


MAX_LISTED_FILES = 1_000_000  # a site's `-dir.npy` lists its volumes: a few dozen in practice


def load_npy(path: Path, max_items: int) -> np.ndarray:
    """The array in the .npy file `path`, read without pickle, once its header declares at
    most `max_items` items (a forged shape would otherwise be allocated before the read
    finds the data missing); DatasetFormatError naming the file."""
    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = header(stream)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which would need pickle")
        if int(np.prod(shape, dtype=object)) > max_items:
            raise ValueError(f"its header declares {shape} items, more than {max_items:,}")
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DatasetFormatError(f"{path}: not a usable numpy array ({error})") from None


def prostate_cases(root: Path, site: str) -> list[tuple[Path, Path]]:
    """(image, label) volume paths of one site, in load order: the order of ``<site>-dir.npy``
    when it exists (the official package's list, which its ``<site>-index.npy`` refers to),
    else by name. Raises DatasetNotFoundError if a listed or paired file is missing."""
    mri = root / "MRI"
    site_dir = mri / site
    listing = mri / f"{site}-dir.npy"
    if listing.is_file():
        names = [str(n) for n in load_npy(listing, MAX_LISTED_FILES).reshape(-1)]
        labels = [site_dir / n for n in names if n.lower().endswith(_LABEL_SUFFIX)]
        for label in labels:
            if not label.is_file():
                raise DatasetNotFoundError(
                    f"dataset 'prostate_mri': {label} is listed in {listing} but not found"
                )
    else:
        labels = sorted(p for p in site_dir.iterdir() if p.name.lower().endswith(_LABEL_SUFFIX))
    cases = []
    for label in labels:
        image = label.with_name(label.name[: -len(_LABEL_SUFFIX)] + ".nii.gz")
        if not image.is_file():
            raise DatasetNotFoundError(
                f"dataset 'prostate_mri': image volume {image} not found (the label volume "
                f"{label} has no image); expected {_PROSTATE_LAYOUT}"
            )
        cases.append((image, label))
    return cases


def _prostate_missing(root: Path) -> str | None:
    mri = root / "MRI"
    sites = prostate_sites(root)
    if not sites:
        return (
            f"dataset 'prostate_mri' not found: no site folder ({', '.join(PROSTATE_SITES)}) "
            f"under {mri}/; expected {_PROSTATE_LAYOUT} — put the site folders of the "
            "multi-site prostate MRI package under data.root/MRI/"
        )
    for site in sites:
        if not prostate_cases(root, site):
            return (
                f"dataset 'prostate_mri': site {site!r} ({mri / site}/) holds no "
                f"CaseXX{_LABEL_SUFFIX} label volumes — add its cases or remove the folder"
            )
    return None


def _read_volume(path: Path) -> np.ndarray:
    """A volume as SimpleITK would give it: (Z, Y, X), i.e. nibabel's (X, Y, Z) transposed."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetFormatError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data.transpose(2, 1, 0)


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    """Clip at the 99th percentile, min-max to [0, 255], truncate (the official conversion)."""
    v = volume.astype(np.float64)
    high, low = float(np.quantile(v, 0.99)), float(v.min())
    if high <= low:
        return np.zeros(v.shape, dtype=np.uint8)
    v = (np.minimum(v, high) - low) / (high - low)
    return (v * 255.0).astype(np.uint8)


def _read_prostate_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """2.5-D samples (K, 3, H, W) uint8 and binary masks (K, H, W) uint8 of one case."""
    image, label = _read_volume(image_path), _read_volume(label_path)
    if image.shape != label.shape:
        raise DatasetFormatError(
            f"{image_path} has shape {image.shape[::-1]} but its label volume {label_path} has "
            f"{label.shape[::-1]}"
        )
    if not np.issubdtype(label.dtype, np.integer) and not np.all(np.isfinite(label)):
        raise DatasetFormatError(f"{label_path}: label volume holds NaN or infinite values")
    bad = (label != 0) & (label != 1) & (label != 2)
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        raise DatasetFormatError(
            f"{label_path}: unexpected label values {values}; expected 0 (background) and 1 or "
            "2 (prostate)"
        )
    depth = image.shape[0]
    nonempty = label.reshape(depth, -1).any(axis=1)
    keep = np.flatnonzero(nonempty[1 : depth - 1]) + 1 if depth >= 3 else np.empty(0, np.int64)
    if len(keep) == 0:
        size = image.shape[1:]
        return np.empty((0, 3, *size), np.uint8), np.empty((0, *size), np.uint8)
    volume = _to_uint8(image)
    x = np.stack([volume[i - 1 : i + 2] for i in keep])
    y = (label[keep] > 0).astype(np.uint8)
    return x, y


def _slice_split(n: int) -> tuple[int, int]:
    """End of train and of val after HarmoFL's arithmetic: train 0.8·0.8·n, val to 0.8·n."""
    train_len = 0.8 * n * 0.8
    val_len = 0.8 * n - train_len
    return int(train_len), int(train_len + val_len)


def load_prostate_mri(root: str | Path, *, image_size: int | None = None, seed: int = 0,
                      label_resize: str = "nearest") -> Dataset:
    """Read every present site into 2.5-D slices split 64/16/20 % at slice level (see the
    module docstring); ``image_size`` resizes each slice to a square, None keeps it."""
    root = Path(root)
    message = _prostate_missing(root)
    if message is not None:
        raise DatasetNotFoundError(message)
    sites = prostate_sites(root)
    splits: tuple[list, list, list] = ([], [], [])
    first: tuple[tuple[int, ...], Path] | None = None
    for site_id, site in enumerate(sites):
        xs, ys = [], []
        for image_path, label_path in prostate_cases(root, site):
            x, y = _read_prostate_case(image_path, label_path)
            if len(y) == 0:
                continue
            x, y = _resize(x, y, image_size, label_resize)
            first = first or (x.shape[-2:], image_path)
            _check_sizes(x.shape[-2:], image_path, first)
            xs.append(x)
            ys.append(y)
        if not xs:
            raise DatasetFormatError(
                f"dataset 'prostate_mri': site {site!r} has no usable slice (no slice 1..D-2 "
                f"with a non-empty label) in {root / 'MRI' / site}"
            )
        x, y = np.concatenate(xs), np.concatenate(ys)
        index_file = root / "MRI" / f"{site}-index.npy"
        if index_file.is_file():
            order = np.asarray(load_npy(index_file, len(y))).reshape(-1)
            if not np.array_equal(np.sort(order), np.arange(len(y))):
                raise DatasetFormatError(
                    f"{index_file} is not a permutation of the site's {len(y)} slices; it "
                    f"belongs to other data (remove it to use a seeded permutation)"
                )
        else:
            order = _site_stream(seed, site).permutation(len(y))
        x, y = x[order], y[order]
        train_end, val_end = _slice_split(len(y))
        if train_end == 0 or val_end == train_end or val_end == len(y):
            raise DatasetFormatError(
                f"dataset 'prostate_mri': site {site!r} has only {len(y)} usable slices, too "
                "few to split into train, val and test"
            )
        for split, (lo, hi) in zip(splits, ((0, train_end), (train_end, val_end), (val_end, None))):
            split.append((x[lo:hi], y[lo:hi], site_id))
    train, val, test = (_concat(s) for s in splits)
    spec = _segmentation_spec("prostate_mri", train, tuple(sites), "rot_flip")
    return Dataset(spec=spec, train=train, test=test, val=val)


# ---------------------------------------------------------------------------------------------
# Histology nuclei
# ---------------------------------------------------------------------------------------------


def nuclei_sites(root: Path) -> list[str]:
    """The known sites whose folder (upper-case name) exists under ``root``."""
    return [s for s in NUCLEI_SITES if (root / s.upper()).is_dir()]


def read_nuclei_list(path: Path, root: Path) -> list[tuple[Path, Path]]:
    """(image, label) paths of a list file; DatasetNotFoundError naming any missing file."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"dataset 'nuclei': list file {path} not found; expected {_NUCLEI_LAYOUT}"
        )
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetFormatError(
                f"{path}, line {number}: expected '<image path> <label path>', got {line!r}"
            )
        pair = (root / fields[0], root / fields[1])
        for file in pair:
            if not file.is_file():
                raise DatasetNotFoundError(
                    f"dataset 'nuclei': {file} (listed in {path}, line {number}) not found"
                )
        pairs.append(pair)
    return pairs


def _nuclei_missing(root: Path) -> str | None:
    sites = nuclei_sites(root)
    if not sites:
        return (
            f"dataset 'nuclei' not found: no site folder "
            f"({', '.join(s.upper() for s in NUCLEI_SITES)}) under {root}/; expected "
            f"{_NUCLEI_LAYOUT}"
        )
    for site in sites:
        for name in ("train.txt", "val.txt"):
            try:
                read_nuclei_list(root / site.upper() / name, root)
            except DatasetNotFoundError as error:
                return str(error)
    return None


def _read_nuclei_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the first three channels, grey and palette images expanded."""
    with open_image(path) as img:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise DatasetFormatError(
                f"{path}: {img.mode} pixels are not supported; save the image as 8-bit RGB"
            )
        arr = np.asarray(img if img.mode in ("RGB", "RGBA") else img.convert("RGB"))
    return np.ascontiguousarray(arr[..., :3])


def _read_nuclei_label(path: Path) -> np.ndarray:
    """(H, W) uint8 mask: any value > 0 is a nucleus, so instance maps are accepted."""
    with open_image(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        colours = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]  # drop an alpha channel
        channels = range(1, colours.shape[2])
        if not all(np.array_equal(colours[..., 0], colours[..., c]) for c in channels):
            raise DatasetFormatError(
                f"{path}: label has {colours.shape[2]} channels that differ; expected a "
                "single-channel mask (or identical channels)"
            )
        arr = colours[..., 0]
    return (arr > 0).astype(np.uint8)


def _stretch(x: np.ndarray) -> np.ndarray:
    """Per-image min-max stretch of uint8 (N, C, H, W) to the full 0..255 range."""
    lo = x.min(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    hi = x.max(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.rint((x - lo) / span * 255.0).astype(np.uint8)


def _read_nuclei_pairs(
    pairs: list[tuple[Path, Path]],
    image_size: int | None,
    first: tuple[tuple[int, ...], Path] | None,
    label_resize: str = "nearest",
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, ...], Path] | None]:
    xs, ys = [], []
    for image_path, label_path in pairs:
        image, label = _read_nuclei_image(image_path), _read_nuclei_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetFormatError(
                f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]}"
            )
        x, y = _resize(image.transpose(2, 0, 1)[None], label[None], image_size, label_resize)
        first = first or (x.shape[-2:], image_path)
        _check_sizes(x.shape[-2:], image_path, first)
        xs.append(x)
        ys.append(y)
    return _stretch(np.concatenate(xs)), np.concatenate(ys), first


def load_nuclei(
    root: str | Path,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_resize: str = "nearest",
) -> Dataset:
    """Read every present site: train from ``train.txt`` less a seeded ``val_fraction`` held out
    as val (0: the whole list trains, as in the official code, and there is no val split), test
    from ``val.txt`` (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    message = _nuclei_missing(root)
    if message is not None:
        raise DatasetNotFoundError(message)
    sites = nuclei_sites(root)
    splits: tuple[list, list, list] = ([], [], [])
    first: tuple[tuple[int, ...], Path] | None = None
    for site_id, site in enumerate(sites):
        folder = root / site.upper()
        train_pairs = read_nuclei_list(folder / "train.txt", root)
        test_pairs = read_nuclei_list(folder / "val.txt", root)
        n = len(train_pairs)
        n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
        if not test_pairs or n - n_val < 1:
            raise DatasetFormatError(
                f"dataset 'nuclei': site {site!r} has {n} training and {len(test_pairs)} test "
                f"images ({folder / 'train.txt'}, {folder / 'val.txt'}); it needs at least 2 "
                "training images (some are held out for validation) and 1 test image"
            )
        perm = _site_stream(seed, site).permutation(n)
        # Both parts keep the list's order, which the official training loop follows.
        held = np.sort(perm[:n_val])
        kept = np.sort(perm[n_val:])
        x_tr, y_tr, first = _read_nuclei_pairs(train_pairs, image_size, first, label_resize)
        x_te, y_te, first = _read_nuclei_pairs(test_pairs, image_size, first, label_resize)
        splits[0].append((x_tr[kept], y_tr[kept], site_id))
        splits[1].append((x_tr[held], y_tr[held], site_id))
        splits[2].append((x_te, y_te, site_id))
    train, val, test = (_concat(s) for s in splits)
    if val_fraction == 0:
        val = None
    spec = _segmentation_spec("nuclei", train, tuple(sites), None)
    return Dataset(spec=spec, train=train, test=test, val=val)


def prostate_missing(root: Path) -> str | None:
    """A not-found message if prostate_mri's files are absent under ``root``, else None."""
    if not (root / "MRI").is_dir():
        return (
            f"dataset 'prostate_mri' not found: {root / 'MRI'}/ does not exist; expected "
            f"{_PROSTATE_LAYOUT} — put the site folders under data.root/MRI/"
        )
    return _prostate_missing(root)


def nuclei_missing(root: Path) -> str | None:
    """A not-found message if nuclei's files are absent under ``root``, else None."""
    return _nuclei_missing(root)


# ---------------------------------------------------------------------------------------------
# Plug-ins
# ---------------------------------------------------------------------------------------------

RESIZE_LABELS = ("nearest", "area")
NUCLEI_VAL_FRACTION = 0.2  # nuclei's default validation share of each site's train list


@dataclass(frozen=True)
class MedicalConfig:
    """The keys of `prostate_mri` and `nuclei` (under `data`)."""

    image_size: int | None = None  # resize to this square; None = native
    # how resized masks are resampled: nearest (stays binary) or area (the FedBCS code's MONAI
    # `Resized` default: area means truncated to 0/1 as its `.long()` casts do, which erodes
    # boundaries); None: nearest, or area under evaluation.protocol: official
    label_resize: str | None = None

    def __post_init__(self) -> None:
        require(self.image_size is None or (self.image_size >= 16 and self.image_size % 16 == 0),
                "image_size", f"must be a multiple of 16 (got {self.image_size})")
        require(self.label_resize in (None, *RESIZE_LABELS), "label_resize",
                f"choose nearest or area (got {self.label_resize!r})")


def label_resize_of(request: DatasetRequest) -> str:
    """The mask resampling a run uses: the configured one, else what its protocol implies."""
    configured = request.params.label_resize
    if configured is not None:
        return configured
    return "area" if request.protocol == "official" else "nearest"


def nuclei_val_fraction(request: DatasetRequest) -> float:
    """The share of each nuclei site's train list held out: the configured one, else none
    under the official protocol (it trains on the whole list), else NUCLEI_VAL_FRACTION."""
    if request.val_fraction is not None:
        return request.val_fraction
    return 0.0 if request.protocol == "official" else NUCLEI_VAL_FRACTION


class ProstateMRI:
    """The `prostate_mri` plug-in: read from `data.root` (nothing to download)."""

    task = "segmentation"
    Config = MedicalConfig

    def check(self, request: DatasetRequest) -> None:
        message = prostate_missing(needs_root(request, downloadable=False))
        if message is not None:
            raise DatasetNotFoundError(message)

    def load(self, request: DatasetRequest) -> Dataset:
        return load_prostate_mri(needs_root(request, downloadable=False),
                                 image_size=request.params.image_size, seed=request.split_seed,
                                 label_resize=label_resize_of(request))


class Nuclei:
    """The `nuclei` plug-in: read from `data.root` (nothing to download)."""

    task = "segmentation"
    Config = MedicalConfig

    def check(self, request: DatasetRequest) -> None:
        message = nuclei_missing(needs_root(request, downloadable=False))
        if message is not None:
            raise DatasetNotFoundError(message)

    def load(self, request: DatasetRequest) -> Dataset:
        return load_nuclei(needs_root(request, downloadable=False),
                           image_size=request.params.image_size,
                           val_fraction=nuclei_val_fraction(request), seed=request.split_seed,
                           label_resize=label_resize_of(request))


prostate_mri = ProstateMRI()
nuclei = Nuclei()
