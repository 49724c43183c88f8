"""Datasets as in-memory arrays and seeded client partitioners, each a plug-in with a frozen
Config of its own keys."""

from raysim.data.datasets import (
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetRequest,
    DatasetSpec,
    check_dataset,
    load_dataset,
)
from raysim.data.partition import (
    ClientSplit,
    Partition,
    PartitionRequest,
    long_tail_indices,
    make_partition,
)

__all__ = [
    "ArraySplit",
    "ClientSplit",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetRequest",
    "DatasetSpec",
    "Partition",
    "PartitionRequest",
    "check_dataset",
    "load_dataset",
    "long_tail_indices",
    "make_partition",
]
