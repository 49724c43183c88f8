"""Partition files: which training samples each client holds, as a Parquet table, so a split
made by another tool (Flower Datasets, a paper's released split) runs exactly, and a raysim
split can be shared.

Schema: one row per (client, sample) pair.

    client  integer  the client id, 0 .. num_clients - 1 (every client has at least one
                     training row)
    index   integer  the sample's position in raysim's training split of the dataset (the
                     order `raysim partition` writes; for digits, the split after the seeded
                     test hold-out); for a row of a part whose source is another split (below),
                     its position in that split
    part    string   optional: train (the default; a file without the column holds only
                     training rows), val or test: the client's own validation and test parts
                     for personalised evaluation (`evaluation.personal`, `raysim.data.personal`)

Rows may come in any order: a client's samples are used in index order. A sample listed for
two clients is refused unless the config says `data.partition.overlap: true`. raysim writes
the dataset's name and its number of training samples into the file's metadata
(`raysim.dataset`, `raysim.train_samples`), and refuses a file written for another size.

Where the test (validation) parts come from another split, the metadata says so:
`raysim.test_source: test` (`raysim.val_source: val`; both default to `train`, the training
split, whose samples a client's parts then share with no other of its parts), with that
split's size in `raysim.test_samples` (`raysim.val_samples`). Such parts are what
`split: test_set` (FedProto) draws, from the dataset's test split; clients may share those
samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.data.partition import (
    ClientSplit,
    Partition,
    PersonalParts,
    offsets_of,
    owners_of,
)

COLUMNS = ("client", "index")
PART = "part"
PARTS = ("train", "val", "test")  # the codes 0, 1, 2 of the part column's values
META_DATASET, META_SAMPLES = b"raysim.dataset", b"raysim.train_samples"
# per personal part: the split its indices point into, and that split's size
META_SOURCE = {"val": b"raysim.val_source", "test": b"raysim.test_source"}
META_SIZE = {"val": b"raysim.val_samples", "test": b"raysim.test_samples"}
SOURCES = {"val": ("train", "val"), "test": ("train", "test")}


def write_partition(partition: Partition, path: str | Path, train_samples: int,
                    dataset: str = "", test_samples: int | None = None,
                    val_samples: int | None = None) -> Path:
    """`partition` of a training split of `train_samples` samples as a partition file (one
    row per client and sample, client-major). With personal parts (`partition.personal`) a
    `part` column follows, and the sizes of the splits they index (`test_samples`,
    `val_samples`: needed where that is not the training split) go into the metadata."""
    if partition.indices is None:
        raise ValueError("a dataset that generates its clients has no sample indices to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {META_DATASET: dataset.encode(), META_SAMPLES: str(train_samples).encode()}
    parts = partition.personal
    if parts is None:
        table = pa.table({"client": pa.array(partition.owners(), pa.int64()),
                          "index": pa.array(partition.indices, pa.int64())})
    else:
        rows = [(PARTS.index("train"), partition.offsets, partition.indices)]
        for name, source, offsets, indices, size in (
                ("test", parts.test_source, parts.test_offsets, parts.test_indices,
                 test_samples),
                ("val", parts.val_source, parts.val_offsets, parts.val_indices, val_samples)):
            if offsets is None or source is None:
                continue
            rows.append((PARTS.index(name), offsets, indices))
            meta[META_SOURCE[name]] = source.encode()
            if source != "train":
                if size is None:
                    raise ValueError(f"the {name} parts index the {source} split: give its "
                                     f"size ({name}_samples)")
                meta[META_SIZE[name]] = str(size).encode()
        rows.sort(key=lambda row: row[0])  # train, val, test
        table = pa.table({
            "client": pa.array(np.concatenate([owners_of(o) for _, o, _ in rows]), pa.int64()),
            "index": pa.array(np.concatenate([i for _, _, i in rows]), pa.int64()),
            PART: pa.DictionaryArray.from_arrays(
                pa.array(np.concatenate([np.full(len(i), code, np.int8)
                                         for code, _, i in rows])), pa.array(PARTS))})
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def read_partition(path: str | Path | None, num_samples: int, num_clients: int,
                   overlap: bool = False) -> ClientSplit:
    """The split a partition file holds, with the clients' personal parts where it has a
    `part` column, checked against the dataset (`num_samples` training samples) and the config
    (`num_clients`); ValueError names what is wrong."""
    if path is None:
        raise ValueError("kind 'file' needs data.partition.path: a Parquet file with columns "
                         "client, index")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"partition file {str(path)!r} not found")
    sources = check_metadata(path, num_samples, num_clients, overlap)
    try:
        table = pq.read_table(path, columns=list(COLUMNS) + ([PART] if sources else []))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows > max_rows(num_samples, num_clients, overlap, sources):  # footer lied
        raise ValueError(f"{path}: holds {table.num_rows} rows, not the number its metadata "
                         "declares; write the file again")
    client, index = (_integers(table, name, path) for name in COLUMNS)
    if len(client) == 0:
        raise ValueError(f"{path}: has no rows")
    part = _part_codes(table, path) if sources else np.zeros(len(client), np.int8)
    # rows whose index is a position in the training split, and the size of each row's split
    in_train = np.ones(len(client), dtype=bool)
    bound = np.full(len(client), num_samples, dtype=np.int64)
    for name, (source, size) in (sources or {}).items():
        if source != "train":
            rows = part == PARTS.index(name)
            in_train[rows], bound[rows] = False, size
    bad = (index < 0) | (index >= bound)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        name = PARTS[part[row]]
        split = ("training split" if in_train[row] else f"{sources[name][0]} split of its "
                 f"{name} parts")
        raise ValueError(f"{path}: sample index {int(index[row])} is out of range: the {split} "
                         f"has {bound[row]} samples (0 .. {bound[row] - 1})")
    if client.min() < 0:
        raise ValueError(f"{path}: client ids must be >= 0, found {int(client.min())}")
    found = int(client.max()) + 1
    if found != num_clients:
        raise ValueError(f"{path}: holds {found} clients, but num_clients={num_clients}: set "
                         f"data.partition.num_clients: {found}")
    order = np.lexsort((index, part, client))
    client, index, part, in_train = client[order], index[order], part[order], in_train[order]
    training = part == PARTS.index("train")
    counts = np.bincount(client[training], minlength=found)
    if (counts == 0).any():
        raise ValueError(f"{path}: client {int(np.flatnonzero(counts == 0)[0])} has no "
                         f"{'training ' if sources else ''}rows (every client needs at least "
                         "one training sample)")
    _refuse_repeats(path, client, index, part, in_train, num_samples, overlap)
    split = ClientSplit(offsets_of(counts), index[training])
    if not sources or (part == PARTS.index("train")).all():
        return split

    def rows_of(name: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = part == PARTS.index(name)
        return offsets_of(np.bincount(client[chosen], minlength=found)), index[chosen]

    has_val = (part == PARTS.index("val")).any()
    val_offsets, val_indices = rows_of("val") if has_val else (None, None)
    personal = PersonalParts(sources["test"][0], *rows_of("test"),
                             sources["val"][0] if has_val else None, val_offsets, val_indices)
    return ClientSplit(split.offsets, split.indices, personal)


def _refuse_repeats(path: Path, client: np.ndarray, index: np.ndarray, part: np.ndarray,
                    in_train: np.ndarray, num_samples: int, overlap: bool) -> None:
    """A client lists a sample once (across its parts of one split); without `overlap`, a
    training-split sample belongs to one client. Rows come sorted by client, part, index."""
    split_part = np.where(in_train, -1, part)  # a training-split sample: once over all parts
    by_split = np.lexsort((index, split_part, client))
    key = np.stack([client, split_part, index])[:, by_split]
    twice = (np.diff(key, axis=1) == 0).all(axis=0)
    if twice.any():
        row = by_split[int(np.flatnonzero(twice)[0])]
        raise ValueError(f"{path}: client {int(client[row])} lists sample {int(index[row])} "
                         "twice (a sample belongs to one of its parts, once)")
    if overlap:
        return
    seen = np.bincount(index[in_train], minlength=num_samples)
    if (seen > 1).any():
        sample = int(np.flatnonzero(seen > 1)[0])
        owners = sorted(set(client[in_train & (index == sample)].tolist()))[:3]
        raise ValueError(f"{path}: sample {sample} belongs to clients "
                         f"{', '.join(map(str, owners))}; set data.partition.overlap: true "
                         "if clients may share samples")


def max_rows(num_samples: int, num_clients: int, overlap: bool,
             sources: dict[str, tuple[str, int]] | None = None) -> int:
    """The most rows a valid partition file can have: a row per sample, or with overlap a row
    per client and sample (a client lists a sample once); personal parts from another split
    add a row per client and sample of that split."""
    rows = num_samples * num_clients if overlap else num_samples
    return rows + sum(num_clients * size for source, size in (sources or {}).values()
                      if source != "train")


def check_metadata(path: Path, num_samples: int, num_clients: int, overlap: bool
                   ) -> dict[str, tuple[str, int]] | None:
    """Refuse, from the Parquet footer alone (before any row is read), a file whose columns,
    row count or raysim metadata cannot fit this dataset and config; ValueError names the file
    and the key. Returns where its personal parts' indices point, {part: (source split, its
    size)} (None: no part column)."""
    try:
        metadata = pq.ParquetFile(path).metadata
        schema = metadata.schema.to_arrow_schema()
        rows = max(metadata.num_rows, sum(metadata.row_group(i).num_rows
                                          for i in range(metadata.num_row_groups)))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: lacks the column{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}; a partition file has columns client, index "
                         "(one row per client and sample)")
    for name in COLUMNS:
        kind = schema.field(name).type
        if not pa.types.is_integer(kind):
            raise ValueError(f"{path}: column {name!r} must hold integers, not {kind}")
    meta = schema.metadata or {}
    dataset = meta.get(META_DATASET, b"?").decode("utf-8", "replace")[:80]
    written_for = _number(meta, META_SAMPLES, path, "training samples")
    if written_for is not None and written_for != num_samples:
        raise ValueError(f"{path}: written for a training split of {written_for} samples "
                         f"({dataset}), but this dataset has {num_samples}")
    sources = None
    if PART in schema.names:
        kind = schema.field(PART).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column {PART!r} must hold strings (train, val, test), "
                             f"not {kind}")
        sources = {name: _source(meta, name, path) for name in ("val", "test")}
    limit = max_rows(num_samples, num_clients, overlap, sources)
    if rows > limit:
        why = (f"{num_clients} clients × {num_samples} samples" if overlap else
               f"a row per sample of the {num_samples}-sample training split; with "
               "data.partition.overlap: true, a row per client and sample")
        if limit > max_rows(num_samples, num_clients, overlap):
            why += "; plus a row per client and sample of the splits its parts come from"
        raise ValueError(f"{path}: declares {rows:,} rows, more than a partition of this "
                         f"dataset can have ({limit:,}: {why}); it belongs to other data")
    return sources


def _number(meta: dict, key: bytes, path: Path, what: str) -> int | None:
    written = meta.get(key)
    if written is None:
        return None
    text = written.decode("utf-8", "replace")
    if not text.strip().isdigit():
        raise ValueError(f"{path}: metadata key {key.decode()} is {text[:40]!r}, not a number "
                         f"of {what}; write the file again with raysim partition (or drop the "
                         "key)")
    return int(text)


def _source(meta: dict, name: str, path: Path) -> tuple[str, int]:
    """Where part `name`'s indices point (metadata `raysim.<name>_source`), and that split's
    size (`raysim.<name>_samples`; the training split's checked elsewhere: 0 here)."""
    key = META_SOURCE[name]
    source = meta.get(key, b"train").decode("utf-8", "replace")
    if source not in SOURCES[name]:
        raise ValueError(f"{path}: metadata key {key.decode()} is {source[:40]!r}; it names the "
                         f"split the {name} parts index: {' or '.join(SOURCES[name])}")
    if source == "train":
        return source, 0
    size = _number(meta, META_SIZE[name], path, f"{source} samples")
    if size is None:
        raise ValueError(f"{path}: its {name} parts index the {source} split: give that "
                         f"split's size in the metadata key {META_SIZE[name].decode()}")
    return source, size


def _part_codes(table: pa.Table, path: Path) -> np.ndarray:
    """The `part` column as codes (PARTS' positions)."""
    column = table.column(PART)
    if column.null_count:
        raise ValueError(f"{path}: column {PART!r} has {column.null_count} empty values")
    encoded = column.cast(pa.string()).combine_chunks().dictionary_encode()
    values = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    known = np.array([PARTS.index(v) if v in PARTS else -1 for v in values], dtype=np.int8)
    if (known < 0).any():
        bad = values[int(np.flatnonzero(known < 0)[0])]
        raise ValueError(f"{path}: column {PART!r} holds {str(bad)[:40]!r}; its values are "
                         "train, val or test")
    return known[codes]


def _integers(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type):
        raise ValueError(f"{path}: column {name!r} must hold integers, not {column.type}")
    if column.null_count:
        raise ValueError(f"{path}: column {name!r} has {column.null_count} empty values")
    return column.to_numpy().astype(np.int64)
