"""Every size a config or a data file declares is bounded before it is allocated: generated
datasets too large for memory, partition files whose footer declares millions of rows, image
decompression bombs and image caches that disagree with their key each end in one line naming
the key or the file (or, for a cache, a rebuild), never in gigabytes spent first."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import small_config
from PIL import Image

from raysim.cli.main import main
from raysim.config import ConfigError
from raysim.data import DatasetFormatError
from raysim.data.image_folder import CACHE_DIR, load_image_folder
from raysim.data.images import MAX_IMAGE_PIXELS, open_image
from raysim.data.partition_file import read_partition
from raysim.data.synthetic_fedprox import FedProxClients
from raysim.run import build_checked_task
from raysim.run.validate import config_from_dict

# ------------------------------------------------------------------------ generated datasets


def _fedprox(*overrides: str):
    raw = {"name": "bounds", "data": {"dataset": "synthetic_fedprox",
                                      "partition": {"kind": "natural", "num_clients": 100}},
           "model": {"name": "logreg"}, "clients_per_round": 2}
    return config_from_dict(raw, overrides)


def _organ(*overrides: str):
    raw = {"name": "bounds", "data": {"dataset": "synthetic_organ"}, "model": {"name": "unet"},
           "clients_per_round": 2}
    return config_from_dict(raw, overrides)


def _refused(config) -> str:
    with pytest.raises(ConfigError) as error:
        build_checked_task(config)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, message", [
    ("data.partition.num_clients=1000000000000",
     r"^data\.partition\.num_clients: 1,000,000,000,000 clients × 24 bytes .* would need "
     r"21\.8 TiB; at most 715,827,882 fit in the 16\.0 GiB"),
    ("data.test_per_client=10000000000",
     r"^data\.test_per_client: 10,000,000,000 samples × 100 test clients × 60 features would "
     r"need 436\.6 TiB; at most 357,913 fit"),
    ("data.size_min=100000000000", r"^data\.size_min: 100,000,000,000 samples .* at most "),
    # exp(1000) overflows: cast to int64 it was a negative size, found only at training time
    ("data.size_mu=1000", r"^data\.size_mu: client 0 would hold more samples than a float can "
     r"count: its size is ⌊LogNormal\(size_mu=1000\.0, size_sigma=2\.0\)⌋ \+ 50; .*lower "
     r"size_mu or size_sigma"),
    ("data.size_mu=20", r"^data\.size_mu: client \d+ would hold [\d.e+]+ samples × 60 features "
     r"\([\d.,]+ TiB\)"),
])
def test_a_generated_fedprox_set_too_large_names_the_key_and_the_bytes(override, message):
    assert _fedprox().data.partition.num_clients == 100  # the base itself is fine
    assert re.search(message, _refused(_fedprox(override)))


def test_fedprox_sizes_that_fit_are_drawn_as_before() -> None:
    """The bound checks the draws; it does not change them (valid runs stay bit-identical)."""
    clients = FedProxClients.build(1000, 1.0, 1.0, seed=3)
    rng = np.random.default_rng([3, 0x51])
    expected = rng.lognormal(4.0, 2.0, 1000).astype(np.int64) + 50
    np.testing.assert_array_equal(clients.sizes, expected)
    with pytest.raises(ValueError, match="a client of inf samples"):
        FedProxClients.build(3, 1.0, 1.0, size_mu=1000)  # refused on a worker too


@pytest.mark.parametrize("override, message", [
    ("data.image_size=1048576", "data.image_size: one image of 1048576 × 1048576 pixels × 3 "
     "channels would need 24.0 TiB while rendered; at most "),
    ("data.train_per_site=100000000", "data.train_per_site: 100,000,000 images of 64 × 64 "
     "pixels × 3 channels (float64 while rendered) would need 8.9 TiB; at most 174,762 fit"),
    ("data.sites=100000000", "data.sites: 100,000,000 sites × 48 train images of 64 × 64 "
     "pixels (3 channels and a mask, uint8) would need 71.5 TiB; at most 21,845 fit"),
])
def test_generated_sites_too_large_name_the_key(override, message) -> None:
    assert message in _refused(_organ(override))


def test_a_too_large_generated_set_is_one_line_from_the_cli(tmp_path, capsys) -> None:
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "synthetic_fedprox",
                                                "test_per_client": 10**10,
                                                "partition": {"kind": "natural"}},
                                       "model": {"name": "logreg"}}))
    out = tmp_path / "split.parquet"
    assert main(["partition", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysim: error: data.test_per_client: 10,000,000,000 samples")
    assert "\n" not in err and not out.exists()


# -------------------------------------------------------------------------- partition files


def _partition_config(path: Path, **keys):
    return small_config(**{"data.partition.kind": "file", "data.partition.path": str(path),
                           "data.partition.num_clients": 3, "clients_per_round": 2, **keys})


def test_a_small_file_declaring_millions_of_rows_is_refused_from_its_footer(tmp_path) -> None:
    """30 million rows in a few hundred KiB (constant columns compress to nothing): refused
    from the footer's row count, before a row is read into memory."""
    path = tmp_path / "bomb.parquet"
    chunk = pa.table({"client": pa.array(np.zeros(1_000_000, np.int64)),
                      "index": pa.array(np.zeros(1_000_000, np.int64))})
    with pq.ParquetWriter(path, chunk.schema) as writer:
        for _ in range(30):
            writer.write_table(chunk)
    del chunk
    assert path.stat().st_size < 4 * 2**20
    pool = pa.default_memory_pool()
    peak = pool.max_memory()
    message = _refused(_partition_config(path))
    assert message == (f"data.partition: {path}: declares 30,000,000 rows, more than a "
                       "partition of this dataset can have (1,347: a row per sample of the "
                       "1347-sample training split; with data.partition.overlap: true, a row "
                       "per client and sample); it belongs to other data")
    # reading its rows would have taken 480 MB of Arrow memory
    assert pool.max_memory() < peak + 64 * 2**20


def test_overlap_bounds_rows_by_clients_times_samples(tmp_path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"client": np.zeros(10, np.int64),
                             "index": np.arange(10, dtype=np.int64)}), path)
    with pytest.raises(ValueError, match=r"declares 10 rows, more than a partition of this "
                       r"dataset can have \(9: 3 clients × 3 samples\)"):
        read_partition(path, num_samples=3, num_clients=3, overlap=True)


@pytest.mark.parametrize("metadata, message", [
    ({"raysim.train_samples": "lots", "raysim.dataset": "digits"},
     "metadata key raysim.train_samples is 'lots', not a number of training samples; write "
     "the file again with raysim partition (or drop the key)"),
    ({"raysim.train_samples": "-5"}, "metadata key raysim.train_samples is '-5', not a number"),
    ({"raysim.train_samples": "60000", "raysim.dataset": b"\xff\xfemnist"},
     "written for a training split of 60000 samples (\ufffd\ufffdmnist), but this dataset has "
     "1347"),
])
def test_forged_metadata_names_the_file_and_the_key(tmp_path, metadata, message) -> None:
    path = tmp_path / "forged.parquet"
    table = pa.table({"client": np.array([0, 1, 2], np.int64),
                      "index": np.array([0, 1, 2], np.int64)})
    meta = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in metadata.items()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    refused = _refused(_partition_config(path))
    assert refused.startswith(f"data.partition: {path}: {message}")


def test_a_column_of_text_is_refused_from_the_schema(tmp_path) -> None:
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"client": ["a", "b", "c"], "index": [0, 1, 2]}), path)
    assert _refused(_partition_config(path)).endswith(
        f"{path}: column 'client' must hold integers, not string")


# --------------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header declares width × height RGB pixels (decoded,
    3 bytes each), with one compressed row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", row)
                     + _chunk(b"IEND", b""))
    return path


# below Pillow's own limits, between its warning and its error, beyond its error
@pytest.mark.parametrize("side", [9000, 11000, 100000])
def test_a_png_bomb_is_refused_from_its_header(tmp_path, side) -> None:
    bomb = png_bomb(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 200
    with pytest.raises(DatasetFormatError) as error:
        with open_image(bomb) as image:
            image.load()
    message = str(error.value)
    declared = (f"it declares {side} × {side} pixels" if side < 12000 else
                "it declares more than 178,956,970 pixels")
    assert message.startswith(f"image {bomb} is too large to decode ({declared}; ")
    assert f"at most {MAX_IMAGE_PIXELS:,} pixels, e.g. 8192 × 8192): a decompression bomb" \
        in message
    assert "\n" not in message


def test_an_image_within_the_limit_opens(tmp_path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(np.full((8, 12, 3), 7, np.uint8)).save(path)
    with open_image(path) as image:
        assert np.asarray(image.convert("RGB")).shape == (8, 12, 3)


def _folder(root: Path, per_class: int = 2) -> Path:
    for domain in ("a", "b"):
        for label, name in enumerate(("cat", "dog")):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((10, 10, 3), 40 * label + 10 * i + 100 * (domain == "b"),
                                 np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_png_bomb_in_an_image_folder_is_one_line_and_nothing_is_cached(tmp_path,
                                                                       capsys) -> None:
    root = _folder(tmp_path / "images")
    bomb = png_bomb(root / "b" / "dog" / "9.png", 100000, 100000)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "image_folder", "root": str(root), "image_size": 16,
                 "partition": {"kind": "domains", "num_clients": 2}},
        "clients_per_round": 2}))
    out = tmp_path / "split.parquet"
    assert main(["partition", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raysim: error: data: image {bomb} is too large to decode (")
    assert "\n" not in err
    assert not out.exists() and not (root / CACHE_DIR).exists()


def _cache_of(root: Path) -> Path:
    (cache,) = (root / CACHE_DIR).glob("image_folder-16-*.npz")
    return cache


@pytest.mark.parametrize("forge", ["fewer", "dtype", "shape", "header", "pickle", "truncated"])
def test_an_image_cache_that_disagrees_with_its_key_is_rebuilt(tmp_path, forge) -> None:
    root = _folder(tmp_path / "images")
    first = load_image_folder(root, image_size=16)
    cache = _cache_of(root)
    good = np.load(cache, allow_pickle=False)["x"]
    assert good.shape == (8, 3, 16, 16)
    if forge == "fewer":  # a cache holding fewer images than its key says
        np.savez(cache.with_suffix(".tmp.npz"), x=good[:5])
    elif forge == "dtype":
        np.savez(cache.with_suffix(".tmp.npz"), x=good.astype(np.float32))
    elif forge == "shape":
        np.savez(cache.with_suffix(".tmp.npz"), x=good.reshape(8, 3, 32, 8))
    elif forge == "pickle":  # an object array: loading it would need pickle
        np.savez(cache.with_suffix(".tmp.npz"), x=np.array([{"a": 1}] * 8, dtype=object))
    if forge in ("fewer", "dtype", "shape", "pickle"):
        cache.with_suffix(".tmp.npz").replace(cache)
    elif forge == "header":  # the header declares 10^12 images; the data is the real 8
        data = cache.read_bytes()
        declared, forged = b"(8, 3, 16, 16)", b"(99999999999,)"  # 100 GB, the same length
        assert declared in data and len(forged) == len(declared)
        cache.write_bytes(data.replace(declared, forged))
    else:
        cache.write_bytes(cache.read_bytes()[:300])
    again = load_image_folder(root, image_size=16)
    np.testing.assert_array_equal(again.train.x, first.train.x)
    np.testing.assert_array_equal(again.test.x, first.test.x)
    # the rebuilt cache is whole again
    np.testing.assert_array_equal(np.load(_cache_of(root), allow_pickle=False)["x"], good)


def test_a_numpy_file_with_a_forged_shape_is_refused_from_its_header(tmp_path) -> None:
    from raysim.data.medical import load_npy

    path = tmp_path / "Site-index.npy"
    np.save(path, np.arange(12, dtype=np.int64))
    np.testing.assert_array_equal(load_npy(path, 12), np.arange(12))
    data = path.read_bytes()
    # the header's padding absorbs the longer shape: the same length, the same 96 bytes of data
    declared, forged = b"(12,), }   ", b"(99999,), }"
    assert declared in data and len(forged) == len(declared)
    path.write_bytes(data.replace(declared, forged))
    with pytest.raises(DatasetFormatError, match=rf"^{re.escape(str(path))}: not a usable "
                       r"numpy array \(its header declares \(99999,\) items, more than 12\)$"):
        load_npy(path, 12)
    objects = tmp_path / "Site-dir.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFormatError, match="it holds Python objects, which would need "
                       "pickle"):
        load_npy(objects, 10)
