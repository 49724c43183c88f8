"""Partition files: which training samples each client holds, as a Parquet table, so a split
made by another tool (Flower Datasets, a paper's released split) runs exactly, and a raysim
split can be shared.

Schema: one row per (client, sample) pair.

    client  integer  the client id, 0 .. num_clients - 1 (every client has at least one row)
    index   integer  the sample's position in raysim's training split of the dataset (the
                     order `raysim partition` writes; for digits, the split after the seeded
                     test hold-out)

Rows may come in any order: a client's samples are used in index order. A sample listed for
two clients is refused unless the config says `data.partition.overlap: true`. raysim writes
the dataset's name and its number of training samples into the file's metadata
(`raysim.dataset`, `raysim.train_samples`), and refuses a file written for another size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.data.partition import ClientSplit, Partition, offsets_of

COLUMNS = ("client", "index")
META_DATASET, META_SAMPLES = b"raysim.dataset", b"raysim.train_samples"


def write_partition(partition: Partition, path: str | Path, train_samples: int,
                    dataset: str = "") -> Path:
    """`partition` of a training split of `train_samples` samples as a partition file (one
    row per client and sample, client-major)."""
    if partition.indices is None:
        raise ValueError("a dataset that generates its clients has no sample indices to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"client": pa.array(partition.owners(), pa.int64()),
                      "index": pa.array(partition.indices, pa.int64())})
    meta = {META_DATASET: dataset.encode(), META_SAMPLES: str(train_samples).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def read_partition(path: str | Path | None, num_samples: int, num_clients: int,
                   overlap: bool = False) -> ClientSplit:
    """The split a partition file holds, checked against the dataset (`num_samples` training
    samples) and the config (`num_clients`); ValueError names what is wrong."""
    if path is None:
        raise ValueError("kind 'file' needs data.partition.path: a Parquet file with columns "
                         "client, index")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"partition file {str(path)!r} not found")
    check_metadata(path, num_samples, num_clients, overlap)
    try:
        table = pq.read_table(path, columns=list(COLUMNS))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows > max_rows(num_samples, num_clients, overlap):  # the footer lied
        raise ValueError(f"{path}: holds {table.num_rows} rows, not the number its metadata "
                         "declares; write the file again")
    client, index = (_integers(table, name, path) for name in COLUMNS)
    if len(client) == 0:
        raise ValueError(f"{path}: has no rows")
    if index.min() < 0 or index.max() >= num_samples:
        bad = int(index[(index < 0) | (index >= num_samples)][0])
        raise ValueError(f"{path}: sample index {bad} is out of range: the training split has "
                         f"{num_samples} samples (0 .. {num_samples - 1})")
    if client.min() < 0:
        raise ValueError(f"{path}: client ids must be >= 0, found {int(client.min())}")
    found = int(client.max()) + 1
    if found != num_clients:
        raise ValueError(f"{path}: holds {found} clients, but num_clients={num_clients}: set "
                         f"data.partition.num_clients: {found}")
    order = np.lexsort((index, client))
    client, index = client[order], index[order]
    counts = np.bincount(client, minlength=found)
    if (counts == 0).any():
        raise ValueError(f"{path}: client {int(np.flatnonzero(counts == 0)[0])} has no rows "
                         "(every client needs at least one sample)")
    if not overlap:
        seen = np.bincount(index, minlength=num_samples)
        if (seen > 1).any():
            sample = int(np.flatnonzero(seen > 1)[0])
            owners = sorted(set(client[index == sample].tolist()))[:3]
            raise ValueError(f"{path}: sample {sample} belongs to clients "
                             f"{', '.join(map(str, owners))}; set data.partition.overlap: true "
                             "if clients may share samples")
    elif ((np.diff(index) == 0) & (np.diff(client) == 0)).any():
        raise ValueError(f"{path}: a client lists the same sample twice")
    return ClientSplit(offsets_of(counts), index)


def max_rows(num_samples: int, num_clients: int, overlap: bool) -> int:
    """The most rows a valid partition file can have: a row per sample, or with overlap a row
    per client and sample (a client lists a sample once)."""
    return num_samples * num_clients if overlap else num_samples


def check_metadata(path: Path, num_samples: int, num_clients: int, overlap: bool) -> None:
    """Refuse, from the Parquet footer alone (before any row is read), a file whose columns,
    row count or raysim metadata cannot fit this dataset and config; ValueError names the file
    and the key."""
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
    written_for = meta.get(META_SAMPLES)
    if written_for is not None:
        text = written_for.decode("utf-8", "replace")
        if not text.strip().isdigit():
            raise ValueError(f"{path}: metadata key {META_SAMPLES.decode()} is {text[:40]!r}, "
                             "not a number of training samples; write the file again with "
                             "raysim partition (or drop the key)")
        if int(text) != num_samples:
            raise ValueError(f"{path}: written for a training split of {int(text)} samples "
                             f"({dataset}), but this dataset has {num_samples}")
    limit = max_rows(num_samples, num_clients, overlap)
    if rows > limit:
        why = (f"{num_clients} clients × {num_samples} samples" if overlap else
               f"a row per sample of the {num_samples}-sample training split; with "
               "data.partition.overlap: true, a row per client and sample")
        raise ValueError(f"{path}: declares {rows:,} rows, more than a partition of this "
                         f"dataset can have ({limit:,}: {why}); it belongs to other data")


def _integers(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type):
        raise ValueError(f"{path}: column {name!r} must hold integers, not {column.type}")
    if column.null_count:
        raise ValueError(f"{path}: column {name!r} has {column.null_count} empty values")
    return column.to_numpy().astype(np.int64)
