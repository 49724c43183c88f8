"""Partition files (a client → sample table) and natural partitions: a split written by
`raysim partition` runs exactly again, one made elsewhere runs as written, and bad files get
one line naming the problem."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_rounds, small_config, without_timing

from raysim.config import ConfigError
from raysim.data import ArraySplit, Dataset, DatasetSpec
from raysim.data.partition import ClientSplit, LabelCounts
from raysim.run import prepare


def test_raysim_partition_writes_the_split_and_kind_file_runs_it_again(tmp_path,
                                                                        capsys) -> None:
    """`raysim partition` → file → kind file gives the same partition and the same run."""
    from raysim.cli.main import main

    out = tmp_path / "split.parquet"
    code = main(["partition", "yaml/quickstart.yaml", "-o", "data.partition.alpha=0.3",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "wrote" in printed.out and "kind: file" in printed.out
    table = pq.read_table(out)
    assert table.column_names == ["client", "index"]
    assert table.schema.metadata[b"raysim.train_samples"] == b"1347"

    drawn = prepare(small_config(**{"data.partition.num_clients": 50,
                                    "data.partition.alpha": 0.3, "seed": 0}),
                    tmp_path / "drawn").task.partition
    read = prepare(small_config(**{"data.partition.kind": "file",
                                   "data.partition.path": str(out),
                                   "data.partition.num_clients": 50}),
                   tmp_path / "read").task.partition
    np.testing.assert_array_equal(read.offsets, drawn.offsets)
    np.testing.assert_array_equal(read.indices, drawn.indices)
    np.testing.assert_array_equal(read.histograms, drawn.histograms)


def test_a_file_runs_the_same_rounds_as_the_split_it_holds(tmp_path) -> None:
    config = small_config(**{"resources.backend": "local", "rounds": 2})
    run = prepare(config, tmp_path / "drawn")
    from raysim.data.partition_file import write_partition

    path = write_partition(run.task.partition, tmp_path / "p.parquet", 1347, "digits")
    # rows in any order: the file is shuffled before it is read back
    table = pq.read_table(path)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pq.write_table(shuffled.replace_schema_metadata(table.schema.metadata), path)
    from_file = small_config(**{"resources.backend": "local", "rounds": 2,
                                "data.partition.kind": "file", "data.partition.path": str(path)})
    drawn, w1, _ = run_rounds(config, tmp_path / "a")
    read, w2, _ = run_rounds(from_file, tmp_path / "b")
    assert without_timing(drawn) == without_timing(read)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def _file(tmp_path, client, index, **metadata) -> str:
    path = tmp_path / "bad.parquet"
    table = pa.table({"client": pa.array(client, pa.int64()), "index": pa.array(index, pa.int64())})
    if metadata:
        table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in
                                               metadata.items()})
    pq.write_table(table, path)
    return str(path)


def _error(path: str, **overrides) -> str:
    config = small_config(**{"data.partition.kind": "file", "data.partition.path": path,
                             "data.partition.num_clients": 3, "clients_per_round": 2,
                             **overrides})
    with pytest.raises(ConfigError) as error:
        prepare(config)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_partition_files_get_one_line(tmp_path) -> None:
    three = [0, 0, 1, 2]
    assert "sample index 1347 is out of range: the training split has 1347 samples" in \
        _error(_file(tmp_path, three, [0, 1, 2, 1347]))
    assert "sample 2 belongs to clients 1, 2; set data.partition.overlap: true" in \
        _error(_file(tmp_path, three, [0, 1, 2, 2]))
    assert "holds 3 clients, but num_clients=4: set data.partition.num_clients: 3" in \
        _error(_file(tmp_path, three, [0, 1, 2, 3]), **{"data.partition.num_clients": 4})
    assert "client 1 has no rows" in _error(_file(tmp_path, [0, 2, 2], [0, 1, 2]))
    assert "written for a training split of 60000 samples (mnist), but this dataset has 1347" \
        in _error(_file(tmp_path, three, [0, 1, 2, 3], **{"raysim.train_samples": "60000",
                                                          "raysim.dataset": "mnist"}))
    no_index = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"client": [0, 1, 2], "sample": [0, 1, 2]}), no_index)
    assert "lacks the column index; a partition file has columns client, index" in \
        _error(str(no_index))
    assert "not found" in _error(str(tmp_path / "missing.parquet"))
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("client,index\n0,1\n")
    assert "not a readable Parquet file" in _error(str(not_parquet))


def test_overlap_allows_shared_samples_when_declared(tmp_path) -> None:
    path = _file(tmp_path, [0, 0, 1, 2], [0, 1, 1, 2])
    partition = prepare(small_config(**{"data.partition.kind": "file",
                                        "data.partition.path": path,
                                        "data.partition.num_clients": 3,
                                        "data.partition.overlap": True,
                                        "clients_per_round": 2}),
                        tmp_path / "run").task.partition
    assert partition.sizes.tolist() == [2, 1, 1]
    assert partition.indices_of(1).tolist() == [1]


def test_kind_file_without_a_path_names_the_key() -> None:
    with pytest.raises(ConfigError, match="data.partition.path: kind 'file' reads a partition "
                       "file: set data.partition.path"):
        small_config(**{"data.partition.kind": "file"})


def test_label_counts_are_sparse_rows() -> None:
    split = ClientSplit.from_owner(np.array([2, 0, 2, 1, 0]), 3)
    np.testing.assert_array_equal(split.offsets, [0, 2, 3, 5])
    np.testing.assert_array_equal(split.indices, [1, 4, 3, 0, 2])
    counts = LabelCounts.of(np.array([0, 0, 1, 2, 2]), np.array([3, 3, 1, 0, 4]), 5)
    assert counts.client.tolist() == [0, 1, 2, 2]
    assert counts.label.tolist() == [3, 1, 0, 4]
    assert counts.count.tolist() == [2, 1, 1, 1]


class Writers:
    """A dataset whose samples carry the id of the client (writer) that made them."""

    task = "classification"

    def check(self, data):
        pass

    def load(self, data) -> Dataset:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 255, (60, 1, 8, 8)).astype(np.uint8)
        spec = DatasetSpec("writers", 3, (1, 8, 8), (0.5,), (0.25,), 255.0, None)
        train = ArraySplit(x, np.arange(60) % 3, client=np.repeat(np.arange(6), 10)[::-1])
        return Dataset(spec, train, ArraySplit(x[:9], np.arange(9) % 3))


writers = Writers()


def test_natural_partition_follows_the_client_ids_of_the_samples(tmp_path) -> None:
    config = small_config(**{"data.dataset": "test_partition_files:writers",
                             "data.partition.kind": "natural",
                             "data.partition.num_clients": 6, "clients_per_round": 2})
    partition = prepare(config, tmp_path).task.partition
    assert partition.sizes.tolist() == [10] * 6
    assert partition.indices_of(0).tolist() == list(range(50, 60))  # ids were reversed
    with pytest.raises(ConfigError, match="belong to 6 clients, but num_clients=5: set "
                       "data.partition.num_clients: 6"):
        prepare(small_config(**{"data.dataset": "test_partition_files:writers",
                                "data.partition.kind": "natural",
                                "data.partition.num_clients": 5, "clients_per_round": 2}))
    with pytest.raises(ConfigError, match="needs a dataset whose samples carry a client id"):
        prepare(small_config(**{"data.partition.kind": "natural"}))


def test_more_clients_than_the_driver_can_partition_is_refused_before_ray() -> None:
    with pytest.raises(ConfigError, match=r"num_clients=100000000000 needs about .* GiB in the "
                       r"driver .* use a dataset that generates its clients"):
        prepare(small_config(**{"data.partition.num_clients": 10**11}))


def test_raysim_partition_of_a_generated_dataset_is_one_error(capsys, tmp_path) -> None:
    from raysim.cli.main import main

    code = main(["partition", "yaml/synthetic_fedprox/fedavg.yaml", "--out",
                 str(tmp_path / "x.parquet")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raysim: error: data.dataset: synthetic_fedprox generates each client's "
                   "samples: there is no sample index to write"]
    assert not (tmp_path / "x.parquet").exists()
