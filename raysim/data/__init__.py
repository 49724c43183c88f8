"""Datasets as in-memory arrays and seeded client partitioners."""

from raysim.data.datasets import (
    DATASETS,
    ArraySplit,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetSpec,
    check_dataset,
    load_dataset,
)
from raysim.data.partition import (
    PARTITION_KINDS,
    WITHIN_DOMAIN_KINDS,
    Partition,
    long_tail_indices,
    make_partition,
    partition_dirichlet,
    partition_dirichlet_equal,
    partition_domains,
    partition_iid,
    partition_quantity,
    partition_shards,
)

__all__ = [
    "DATASETS",
    "PARTITION_KINDS",
    "WITHIN_DOMAIN_KINDS",
    "ArraySplit",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Partition",
    "check_dataset",
    "load_dataset",
    "long_tail_indices",
    "make_partition",
    "partition_dirichlet",
    "partition_dirichlet_equal",
    "partition_domains",
    "partition_iid",
    "partition_quantity",
    "partition_shards",
]
