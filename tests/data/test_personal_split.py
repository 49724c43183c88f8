"""Each client's own train/val/test parts (`raysim.data.personal`): disjoint, covering,
stratified, seeded, the same on the driver and on a worker; FedProto's test_set draws follow
each client's labels; partition files carry the parts; too-small clients get one line."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_config

from raysim.config import ConfigError, PersonalConfig
from raysim.data.partition import Partition, make_partition
from raysim.data.partition_file import read_partition, write_partition
from raysim.data.personal import check_personal_parts, split_client, split_personal

NUM_CLASSES = 10


def _dirichlet(num_clients: int = 60, samples: int = 6000, seed: int = 0):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, samples)
    partition = make_partition(labels, NUM_CLASSES, kind="dirichlet", num_clients=num_clients,
                               seed=seed, params={"alpha": 0.5})
    return partition, labels


def _clients(split: Partition):
    """Per client: (train, val, test) index arrays (val empty without validation parts)."""
    parts = split.personal
    return [(split.indices_of(k), parts.val_of(k) if parts.has_val else np.empty(0, int),
             parts.test_of(k)) for k in range(split.num_clients)]


def test_fraction_parts_are_disjoint_cover_each_client_and_are_stratified() -> None:
    partition, labels = _dirichlet()
    config = PersonalConfig(test_fraction=0.25, val_fraction=0.15)
    split = split_personal(partition, labels, config, seed=1)
    assert split.personal.test_source == "train" and split.personal.val_source == "train"
    for k, (train, val, test) in enumerate(_clients(split)):
        held = partition.indices_of(k)
        together = np.concatenate([train, val, test])
        assert len(together) == len(held)  # disjoint ...
        np.testing.assert_array_equal(np.sort(together), held)  # ... and covering
        for part in (train, val, test):
            assert (np.diff(part) > 0).all()  # each part sorted
        for c in np.unique(labels[held]):
            n_c = int((labels[held] == c).sum())
            assert abs((labels[test] == c).sum() - n_c * 0.25) <= 1, (k, c)
            assert abs((labels[val] == c).sum() - n_c * 0.15) <= 1, (k, c)
    # training label counts are those of the training parts
    owners = np.repeat(np.arange(split.num_clients), split.sizes)
    expected = np.zeros((split.num_clients, NUM_CLASSES), int)
    np.add.at(expected, (owners, labels[split.indices]), 1)
    np.testing.assert_array_equal(split.histograms, expected)


def test_split_is_seeded_and_a_worker_gets_the_drivers_parts() -> None:
    partition, labels = _dirichlet()
    config = PersonalConfig(test_fraction=0.3, val_fraction=0.1)
    split = split_personal(partition, labels, config, seed=5)
    again = split_personal(partition, labels, config, seed=5)
    other = split_personal(partition, labels, config, seed=6)
    np.testing.assert_array_equal(split.indices, again.indices)
    np.testing.assert_array_equal(split.personal.test_indices, again.personal.test_indices)
    assert not np.array_equal(split.personal.test_indices, other.personal.test_indices)
    for k, (train, val, test) in enumerate(_clients(split)):
        held = partition.indices_of(k)
        got = split_client(labels[held], 0.3, 0.1, seed=5, client_id=k)
        for mine, theirs in zip(got, (train, val, test), strict=True):
            np.testing.assert_array_equal(held[mine], theirs)
    # a client's parts depend on its id, not on its place among the others
    first = split_client(labels[partition.indices_of(3)], 0.3, 0.1, seed=5, client_id=3)
    moved = split_client(labels[partition.indices_of(3)], 0.3, 0.1, seed=5, client_id=4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, moved, strict=True))


@pytest.mark.parametrize("labels, test_fraction, val_fraction, sizes", [
    ([4], 0.1, 0.0, (1, 0, 0)),  # one sample: it trains
    ([1, 1], 0.1, 0.0, (1, 0, 1)),  # round(2 · 0.1) = 0 test samples, raised to 1
    ([0, 1], 0.3, 0.6, (1, 0, 1)),  # with 2 samples training and test come first
    ([0, 1, 2], 0.1, 0.1, (1, 1, 1)),  # 3 singleton classes: one of each part
    ([0] * 10 + [1], 0.1, 0.1, (9, 1, 1)),  # 10 · (0.1, 0.1) and the rest
    ([0, 0, 0, 0, 1], 0.1, 0.1, (3, 1, 1)),  # both from training, from the largest class
    ([0] * 10 + [1] * 10, 0.1, 0.15, (14, 4, 2)),  # per class 10 · 0.15 rounds to 2 (half up)
    ([0] * 45, 0.7, 0.0, (13, 0, 32)),  # 45 · 0.7 is 31.499999999999996 in floats: 31.5
])
def test_small_clients_keep_a_training_and_get_a_test_sample(labels, test_fraction,
                                                             val_fraction, sizes) -> None:
    train, val, test = split_client(np.array(labels), test_fraction, val_fraction, 0, 0)
    assert (len(train), len(val), len(test)) == sizes


def test_test_set_draws_follow_each_clients_label_distribution() -> None:
    partition, labels = _dirichlet(num_clients=40, samples=3000)
    rng = np.random.default_rng(9)
    test_labels = rng.integers(0, NUM_CLASSES, 2000)
    val_labels = rng.integers(0, NUM_CLASSES, 700)
    config = PersonalConfig(split="test_set", test_fraction=0.2, val_fraction=0.1)
    split = split_personal(partition, labels, config, seed=2, test_labels=test_labels,
                           val_labels=val_labels)
    np.testing.assert_array_equal(split.indices, partition.indices)  # training unchanged
    assert split.personal.test_source == "test" and split.personal.val_source == "val"
    for k in range(split.num_clients):
        train_counts = np.bincount(labels[partition.indices_of(k)], minlength=NUM_CLASSES)
        for drawn, pool, share in ((split.personal.test_of(k), test_labels, 0.2 / 0.8),
                                   (split.personal.val_of(k), val_labels, 0.1 / 0.8)):
            n = int(train_counts.sum())
            wanted = max(1, int(np.floor(n * share + 0.5)))
            # largest remainder, written out: floor shares, then the largest remainders
            exact = wanted * train_counts / n
            quota = np.floor(exact).astype(int)
            order = sorted(range(NUM_CLASSES), key=lambda c: (-(exact[c] - quota[c]), c))
            for c in order[:wanted - quota.sum()]:
                quota[c] += 1
            assert len(np.unique(drawn)) == len(drawn) == wanted  # no sample twice
            np.testing.assert_array_equal(np.bincount(pool[drawn], minlength=NUM_CLASSES),
                                          quota)
            assert not np.bincount(pool[drawn], minlength=NUM_CLASSES)[train_counts == 0].any()
    again = split_personal(partition, labels, config, seed=2, test_labels=test_labels,
                           val_labels=val_labels)
    np.testing.assert_array_equal(again.personal.test_indices, split.personal.test_indices)


def test_test_set_takes_all_of_a_class_the_test_split_lacks_and_draws_uniformly() -> None:
    labels = np.array([0] * 30 + [1] * 30)
    partition = make_partition(labels, 2, kind="iid", num_clients=1, seed=0)
    test_labels = np.array([0] * 3 + [1] * 100)  # class 0: 3 in the test split, 10 asked
    config = PersonalConfig(split="test_set", test_fraction=0.25)
    split = split_personal(partition, labels, config, seed=0, test_labels=test_labels)
    drawn = split.personal.test_of(0)
    assert (test_labels[drawn] == 0).sum() == 3 and (test_labels[drawn] == 1).sum() == 10
    # over many clients each test sample of class 1 is drawn about equally often
    many = make_partition(np.repeat([1], 4000), 2, kind="iid", num_clients=400, seed=0)
    split = split_personal(many, np.repeat([1], 4000), config, seed=0,
                           test_labels=np.ones(20, int))
    hits = np.bincount(split.personal.test_indices, minlength=20)  # 400 clients × 3 of 20
    assert hits.sum() == 1200 and hits.min() > 30 and hits.max() < 90


def test_too_small_clients_get_one_line_with_counts_and_fix() -> None:
    labels = np.arange(7)

    def clients(*offsets: int) -> Partition:
        return Partition(offsets=np.array(offsets), indices=np.arange(7), num_classes=7)

    with pytest.raises(ConfigError) as error:
        split_personal(clients(0, 1, 2, 7), labels, PersonalConfig(test_fraction=0.25), seed=0)
    assert str(error.value) == (
        "evaluation.personal: 2 of 3 clients get no test sample (the smallest of them holds "
        "1 sample); every client needs 2 samples: use fewer clients "
        "(data.partition.num_clients) or a partition with a minimum size")
    with pytest.raises(ConfigError, match="2 of 3 clients get no validation sample .* set "
                       "evaluation.personal.val_fraction: 0"):
        split_personal(clients(0, 2, 4, 7), labels,
                       PersonalConfig(test_fraction=0.25, val_fraction=0.1), seed=0)
    # generated clients are split on the workers: checked by their sizes, returned as they are
    with pytest.raises(ConfigError, match=r"1 of 3 clients hold fewer than 2 samples "
                       r"\(smallest: 1\)"):
        check_personal_parts(Partition.of_sizes(np.array([50, 1, 80]), 10), PersonalConfig())
    generated = Partition.of_sizes(np.array([50, 3, 80]), 10)
    assert split_personal(generated, np.empty(0, int), PersonalConfig(val_fraction=0.1),
                          0) is generated
    with pytest.raises(ConfigError, match="split: test_set draws each client's test part"):
        split_personal(generated, np.empty(0, int), PersonalConfig(split="test_set"), 0)


def test_config_errors_name_the_key_before_any_data_work() -> None:
    with pytest.raises(ConfigError, match="evaluation.personal.split: test_set .* and "
                       "synthetic_fedprox generates .* use split: fraction"):
        small_config(**{"data.dataset": "synthetic_fedprox", "data.partition.kind": "natural",
                        "model.name": "mlp", "algorithm.name": "fedper",
                        "evaluation.personal.split": "test_set"})
    labels = np.arange(40) % 4
    partition = make_partition(labels, 4, kind="iid", num_clients=4, seed=0)
    with pytest.raises(ConfigError, match="val_fraction: split: test_set draws validation "
                       "parts from the dataset's validation split, and it has none; set "
                       r"data.val_fraction"):
        split_personal(partition, labels, PersonalConfig(split="test_set", val_fraction=0.1),
                       0, test_labels=labels)


def test_ten_thousand_clients_split_in_well_under_a_second() -> None:
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, 500_000)
    partition = make_partition(labels, NUM_CLASSES, kind="iid", num_clients=10_000, seed=0)
    config = PersonalConfig(test_fraction=0.25, val_fraction=0.1)
    split_personal(partition, labels, config, seed=0)  # warm caches
    start = time.perf_counter()
    split = split_personal(partition, labels, config, seed=1)
    assert time.perf_counter() - start < 1.0
    assert split.sizes.sum() + len(split.personal.test_indices) + len(
        split.personal.val_indices) == 500_000


# --------------------------------------------------------------------------- partition files


@pytest.mark.parametrize("kind", ["fraction", "test_set"])
def test_a_partition_file_round_trips_the_parts(tmp_path, kind) -> None:
    partition, labels = _dirichlet(num_clients=20, samples=1500)
    test_labels = np.arange(500) % NUM_CLASSES
    config = PersonalConfig(split=kind, test_fraction=0.2,
                            val_fraction=0.1 if kind == "fraction" else 0.0)
    split = split_personal(partition, labels, config, seed=3, test_labels=test_labels)
    path = write_partition(split, tmp_path / "p.parquet", 1500, "toy", test_samples=500)
    # rows in any order
    table = pq.read_table(path)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pq.write_table(shuffled.replace_schema_metadata(table.schema.metadata), path)
    read = make_partition(labels, NUM_CLASSES, kind="file", num_clients=20, seed=0,
                          params={"path": str(path)})
    kept = split_personal(read, labels, config, seed=99, test_labels=test_labels)
    np.testing.assert_array_equal(kept.offsets, split.offsets)
    np.testing.assert_array_equal(kept.indices, split.indices)
    np.testing.assert_array_equal(kept.histograms, split.histograms)
    for name in ("test_source", "test_offsets", "test_indices", "val_source", "val_offsets",
                 "val_indices"):
        np.testing.assert_array_equal(getattr(kept.personal, name),
                                      getattr(split.personal, name))
    other = PersonalConfig(split="test_set" if kind == "fraction" else "fraction")
    with pytest.raises(ConfigError, match="set evaluation.personal.split: " + kind):
        split_personal(read, labels, other, 0, test_labels=test_labels)


def test_an_old_file_without_a_part_column_still_loads(tmp_path) -> None:
    path = tmp_path / "old.parquet"
    pq.write_table(pa.table({"client": np.array([0, 0, 1, 2]), "index": np.array([3, 0, 1, 2])}),
                   path)
    split = read_partition(path, num_samples=4, num_clients=3)
    assert split.personal is None
    np.testing.assert_array_equal(split.offsets, [0, 2, 3, 4])
    np.testing.assert_array_equal(split.indices, [0, 3, 1, 2])


def _parts_file(tmp_path, client, index, part, **metadata) -> str:
    path = tmp_path / "parts.parquet"
    table = pa.table({"client": np.array(client), "index": np.array(index),
                      "part": pa.array(part, pa.string())})
    pq.write_table(table.replace_schema_metadata(metadata or None), path)
    return str(path)


@pytest.mark.parametrize("rows, metadata, message", [
    (([0, 0, 1], [0, 0, 1], ["train", "test", "train"]), {},
     "client 0 lists sample 0 twice"),
    (([0, 0, 1], [0, 1, 2], ["train", "exam", "train"]), {},
     "column 'part' holds 'exam'; its values are train, val or test"),
    (([0, 0, 1], [0, 1, 2], ["train", "test", "test"]), {},
     "client 1 has no training rows"),
    (([0, 0, 1], [0, 1, 2], ["train", "test", "train"]), {"raysim.test_source": "test"},
     "its test parts index the test split: give that split's size in the metadata key "
     "raysim.test_samples"),
    (([0, 0, 1], [0, 9, 2], ["train", "test", "train"]),
     {"raysim.test_source": "test", "raysim.test_samples": "5"},
     "sample index 9 is out of range: the test split of its test parts has 5 samples"),
])
def test_bad_parts_in_a_file_get_one_line(tmp_path, rows, metadata, message) -> None:
    path = _parts_file(tmp_path, *rows, **metadata)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_partition(path, num_samples=4, num_clients=2)


def test_raysim_partition_writes_the_parts_and_kind_file_runs_them_again(tmp_path,
                                                                        capsys) -> None:
    from raysim.cli.main import main
    from raysim.run import prepare

    personal = {"algorithm.name": "fedper", "evaluation.personal.split": "test_set",
                "evaluation.personal.val_fraction": 0.1, "data.val_fraction": 0.1}
    out = tmp_path / "split.parquet"
    assert main(["partition", "yaml/quickstart.yaml", "--out", str(out),
                 *(f"-o{k}={v}" for k, v in personal.items())]) == 0
    assert "rows: client, index, part" in capsys.readouterr().out
    meta = pq.read_table(out).schema.metadata
    assert meta[b"raysim.test_source"] == b"test" and meta[b"raysim.val_source"] == b"val"
    common = {**personal, "data.partition.num_clients": 50}
    drawn = prepare(small_config(**common, seed=0), tmp_path / "drawn").task.partition
    # another seed would draw other test parts: the file's are kept
    read = prepare(small_config(**common, seed=1, **{"data.partition.kind": "file",
                                                     "data.partition.path": str(out)}),
                   tmp_path / "read").task.partition
    for name in ("test_offsets", "test_indices", "val_offsets", "val_indices"):
        np.testing.assert_array_equal(getattr(read.personal, name),
                                      getattr(drawn.personal, name))
    np.testing.assert_array_equal(read.indices, drawn.indices)
