"""Each client's own training, validation and test parts, for personalised evaluation
(`evaluation.personal`): a client's model is scored on its own test part (PFLlib, HtFLlib,
FedProto), and selected on its own validation part.

split: fraction (PFLlib/HtFLlib). Client k's samples are split per class. Of a class with
n_c samples, round(n_c · test_fraction) go to the test part and round(n_c · val_fraction)
(at most what is left) to the validation part, the rest to training (rounding half up). Three
guarantees follow, each one sample moved within one class (the class with the most samples in
the part it leaves; the lowest label on ties): a client with >= 1 sample keeps a training
sample, one with >= 2 gets a test sample, and one with >= 3 a validation sample where
val_fraction > 0. Which samples of a class go where: client k's own random stream (SplitMix64
seeded by derive_seed(seed, PERSONAL_SPLIT) and k; counter-based, so 10^4 clients draw in one
vectorised call) gives one draw per sample, in the client's order; in draw order (ties by
position) the first go to test, the next to validation. So a client's parts depend only on its
own labels, the fractions, its id and the seed: `split_client` on the worker (for clients a
dataset generates, `Partition.generated`) gives the parts `split_personal` gives on the
driver.

split: test_set (FedProto). Every training sample stays. Client k with n_k training samples
gets a test part of round(n_k · f / (1 − f)) samples (at least 1; f = test_fraction) drawn from
the dataset's test split with k's own label distribution: per class in proportion to k's
training counts (largest remainder rounding, the lowest label on ties), without replacement
within a client (clients may share test samples); a class the test split holds fewer of than
asked gives all it holds. A validation part of round(n_k · val_fraction / (1 − f)) samples is
drawn the same way from the dataset's validation split. The draws come from client k's streams
of derive_seed(seed, PERSONAL_SPLIT, 1) (test) and (…, 2) (validation); a class whose draws
land twice on one sample draws again with numpy's choice without replacement.

A partition file may carry the parts itself (`raysim.data.partition_file`): they are used as
written, and the fractions are not applied.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raysim.config import Config, ConfigError, PersonalConfig
from raysim.data.partition import (
    ClientSplit,
    LabelCounts,
    Partition,
    PersonalParts,
    _as_labels,
    offsets_of,
    owners_of,
)
from raysim.registry import DATASETS
from raysim.seeding import PERSONAL_SPLIT, derive_seed

__all__ = [
    "PersonalParts",
    "check_personal_config",
    "check_personal_parts",
    "split_client",
    "split_personal",
]

TRAIN, VAL, TEST = 0, 1, 2
# sub-streams of a client's test_set draws (split: fraction uses the client's stream itself)
_TEST_DRAW, _VAL_DRAW = 1, 2


def split_client(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int,
                 client_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (train, val, test), each sorted, within ONE client's samples of these labels,
    stratified by class (the module docstring's rule), from client `client_id`'s stream of
    derive_seed(seed, PERSONAL_SPLIT). Used on the driver for in-memory data and on
    the worker for clients a dataset generates, so both give the same parts."""
    y = _as_labels(labels)
    owner = np.zeros(len(y), dtype=np.int64)
    part = _assign(y, owner, _client_bits(seed, offsets_of([len(y)]), client_id), test_fraction,
                   val_fraction)
    return tuple(np.flatnonzero(part == p) for p in (TRAIN, VAL, TEST))  # type: ignore[return-value]


def split_personal(partition: Partition, train_labels: np.ndarray, personal: PersonalConfig,
                   seed: int, test_labels: np.ndarray | None = None,
                   val_labels: np.ndarray | None = None) -> Partition:
    """The partition whose (offsets, indices) are the clients' TRAINING parts, with `.personal`
    set (the module docstring's rules for split: fraction and split: test_set); checked with
    `check_personal_parts`. `train_labels`, `test_labels`, `val_labels`: a label per sample of
    the dataset's splits (test_labels is needed by split: test_set, val_labels by its
    validation parts).

    A dataset that generates its clients (`partition.generated`) is returned unchanged, with
    `.personal` None: each worker splits the samples it generates with `split_client`; the
    sizes stay the generated counts (they only balance work). A partition file's own parts
    (`partition.personal` already set) are checked against the config and kept."""
    if partition.generated:
        if personal.split == "test_set":
            raise ConfigError(_test_set_generated("this dataset"))
        check_personal_parts(partition, personal)
        return partition
    if partition.personal is not None:
        _check_file_parts(partition.personal, personal, test_labels, val_labels)
        check_personal_parts(partition, personal)
        return partition
    y = _as_labels(train_labels)
    if personal.split == "fraction":
        result = _split_fraction(partition, y, personal, seed)
    else:
        result = _split_test_set(partition, y, personal, seed, test_labels, val_labels)
    check_personal_parts(result, personal)
    return result


def check_personal_parts(partition: Partition, personal: PersonalConfig) -> None:
    """ConfigError (one line) when some clients get no training or no test sample (or no
    validation sample where asked): how many clients of how many, the smallest such client's
    size, and the fix. A generated partition is checked by its sizes (the split's guarantees
    need 2 samples a client, 3 with validation)."""
    k = partition.num_clients
    want_val = personal.val_fraction > 0
    if partition.generated:
        need = 3 if want_val else 2
        short = partition.sizes < need
        if short.any():
            raise ConfigError(
                f"evaluation.personal: {int(short.sum())} of {k} clients hold fewer than {need} "
                f"samples (smallest: {int(partition.sizes.min())}), too few for a training and a "
                f"test{' and a validation' if want_val else ''} part; raise the dataset's "
                "smallest client size (synthetic_fedprox: data.size_min)"
                f"{', or set evaluation.personal.val_fraction: 0' if want_val else ''}")
        return
    parts = partition.personal
    if parts is None:
        raise ValueError("this partition has no personal parts: split it with split_personal")
    train = partition.sizes
    test = np.diff(parts.test_offsets)
    val = np.diff(parts.val_offsets) if parts.val_offsets is not None else np.zeros_like(train)
    total = train + (test if parts.test_source == "train" else 0) + (
        val if parts.val_source == "train" else 0)
    test_set = parts.test_source != "train"
    for part, empty in (("training", train == 0), ("test", test == 0),
                        ("validation", (val == 0) if want_val else None)):
        if empty is None or not empty.any():
            continue
        count, smallest = int(empty.sum()), int(total[empty].min())
        if test_set and part != "training":
            fix = ("their classes are missing from the dataset's "
                   f"{'test' if part == 'test' else 'validation'} split; raise "
                   f"evaluation.personal.{'test' if part == 'test' else 'val'}_fraction or use "
                   "split: fraction")
        elif part == "training":
            fix = "lower evaluation.personal.test_fraction/val_fraction"
        else:
            fix = (f"every client needs {2 if part == 'test' else 3} samples: use fewer clients "
                   "(data.partition.num_clients) or a partition with a minimum size"
                   + ("" if part == "test" else ", or set evaluation.personal.val_fraction: 0"))
        raise ConfigError(f"evaluation.personal: {count} of {k} clients get no {part} sample "
                          f"(the smallest of them holds {smallest} sample"
                          f"{'s' * (smallest != 1)}); {fix}")


def check_personal_config(config: Config) -> None:
    """What the config alone shows cannot split (before the data is loaded): split: test_set
    draws each client's test part by its labels, which a dataset that generates its clients
    knows only on the workers."""
    personal = config.evaluation.personal
    if personal is None or personal.split != "test_set":
        return
    if getattr(DATASETS[config.data.dataset], "generates_clients", False):
        raise ConfigError(_test_set_generated(config.data.dataset))


def _test_set_generated(dataset: str) -> str:
    return ("evaluation.personal.split: test_set draws each client's test part from the test "
            f"split by the client's labels, and {dataset} generates its clients' samples on the "
            "workers, where their labels are known; use split: fraction")


# --------------------------------------------------------------------------- split: fraction


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _bits(stream_seed: int, client: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Uniform uint64 draws: draw `position` of client `client`'s SplitMix64 stream, the
    stream seeded by `stream_seed` (a derive_seed) and the client id. Counter-based, so every
    client's draws come from one vectorised call, and a client's draws never depend on which
    other clients are split with it (a numpy generator per client would cost 10^4 clients a
    third of a second)."""
    client_seed = _mix(np.uint64(stream_seed) ^ _mix((client.astype(np.uint64) + np.uint64(1))
                                                      * _GOLDEN))
    return _mix(client_seed + (position.astype(np.uint64) + np.uint64(1)) * _GOLDEN)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """[0, 1) floats from uint64 draws (their top 53 bits)."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _client_bits(seed: int, offsets: np.ndarray, first_client: int = 0) -> np.ndarray:
    """One draw per sample of clients laid out by CSR `offsets` (client ids from
    `first_client`), each client's from its own stream of derive_seed(seed, PERSONAL_SPLIT)."""
    owner = owners_of(offsets)
    position = np.arange(len(owner), dtype=np.int64) - offsets[owner]
    return _bits(derive_seed(seed, PERSONAL_SPLIT), owner + first_client, position)


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # the tolerance rounds 10 · 0.15 (1.4999999999999998 in floats) to 2, as written
    return np.floor(x + (0.5 + 1e-9)).astype(np.int64)


def _assign(labels: np.ndarray, owner: np.ndarray, draws: np.ndarray, test_fraction: float,
            val_fraction: float) -> np.ndarray:
    """The part (TRAIN, VAL, TEST) of each sample; `owner` (the client of each sample) is
    non-decreasing. One row per (client, class) holds the counts of the three parts."""
    part = np.full(len(labels), TRAIN, dtype=np.int8)
    if not len(labels):
        return part
    # by client, class, then the draw's top 32 bits (ties by position): one stable sort of
    # one integer, several times faster than a lexsort, and the same wherever it runs
    group = (owner * (int(labels.max()) + 1) + labels).astype(np.uint64)
    top = draws >> np.uint64(32)
    if int(group.max()) < 2**32:
        order = np.argsort((group << np.uint64(32)) | top, kind="stable")
    else:
        order = np.lexsort((top, group))
    o, y = owner[order], labels[order]
    start = np.flatnonzero(np.r_[True, (o[1:] != o[:-1]) | (y[1:] != y[:-1])])
    n = np.diff(np.r_[start, len(order)])
    test = np.minimum(_round_half_up(n * test_fraction), n)
    val = np.minimum(_round_half_up(n * val_fraction), n - test)
    counts = np.stack([n - test - val, val, test])
    _guarantee(counts, o[start], val_fraction > 0)
    rank = np.arange(len(order)) - np.repeat(start, n)
    test_end = np.repeat(counts[TEST], n)
    val_end = test_end + np.repeat(counts[VAL], n)
    part[order] = np.where(rank < test_end, TEST, np.where(rank < val_end, VAL, TRAIN))
    return part


def _guarantee(counts: np.ndarray, row_client: np.ndarray, want_val: bool) -> None:
    """Move single samples between parts (in place) so that a client of n >= 1 samples keeps
    a training sample, n >= 2 gets a test sample and n >= 3 a validation sample (if asked)."""
    first = np.flatnonzero(np.r_[True, row_client[1:] != row_client[:-1]])
    group = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(row_client)]))

    def totals() -> np.ndarray:
        return np.add.reduceat(counts, first, axis=1)

    train, val, test = totals()
    n = train + val + test
    _move(counts, group, (train == 0) & (n >= 1), np.where(val >= test, VAL, TEST), TRAIN)
    train, val, test = totals()
    _move(counts, group, (test == 0) & (n >= 2), np.where(train >= 2, TRAIN, VAL), TEST)
    if want_val:
        train, val, test = totals()
        _move(counts, group, (val == 0) & (n >= 3), np.where(train >= 2, TRAIN, TEST), VAL)


def _move(counts: np.ndarray, group: np.ndarray, clients: np.ndarray, donor: np.ndarray,
          to: int) -> None:
    """For each client (group) in the mask `clients`: one sample from part donor[client] to
    part `to`, in its row (class) with the most donor samples, the lowest label on ties."""
    rows = np.flatnonzero(clients[group])
    if not len(rows):
        return
    g = group[rows]
    have = counts[donor[g], rows]
    order = np.lexsort((-have, g))  # stable: equal counts keep label order
    chosen = rows[order[np.r_[True, g[order][1:] != g[order][:-1]]]]
    counts[donor[group[chosen]], chosen] -= 1
    counts[to, chosen] += 1


def _split_fraction(partition: Partition, labels: np.ndarray, personal: PersonalConfig,
                    seed: int) -> Partition:
    owner, indices = partition.owners(), partition.indices
    k = partition.num_clients
    draws = _client_bits(seed, partition.offsets)
    part = _assign(labels[indices], owner, draws, personal.test_fraction, personal.val_fraction)

    def take(which: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.flatnonzero(part == which)  # client-major, each client's sorted
        return offsets_of(np.bincount(owner[chosen], minlength=k)), indices[chosen]

    train_offsets, train_indices = take(TRAIN)
    test_offsets, test_indices = take(TEST)
    val_offsets, val_indices = take(VAL) if personal.val_fraction > 0 else (None, None)
    parts = PersonalParts("train", test_offsets, test_indices,
                          "train" if val_offsets is not None else None, val_offsets,
                          val_indices)
    return _with_training(partition, ClientSplit(train_offsets, train_indices, parts), labels)


def _with_training(partition: Partition, split: ClientSplit, labels: np.ndarray) -> Partition:
    """`partition` training on `split`'s samples (label counts of those), with its parts. The
    clients' domains stay those of all their samples."""
    counts = LabelCounts.of(owners_of(split.offsets), labels[split.indices],
                            partition.num_classes)
    return dataclasses.replace(partition, offsets=split.offsets, indices=split.indices,
                               label_counts=counts, personal=split.personal)


# --------------------------------------------------------------------------- split: test_set


def _split_test_set(partition: Partition, labels: np.ndarray, personal: PersonalConfig,
                    seed: int, test_labels: np.ndarray | None,
                    val_labels: np.ndarray | None) -> Partition:
    if test_labels is None:
        raise ValueError("split: test_set needs the test split's labels (test_labels)")
    f, v = personal.test_fraction, personal.val_fraction
    counts = LabelCounts.of(partition.owners(), labels[partition.indices],
                            partition.num_classes)
    sizes = partition.sizes
    test_offsets, test_indices = _draw_like(counts, sizes, _at_least_one(sizes * f / (1 - f)),
                                            _as_labels(test_labels), seed, _TEST_DRAW)
    val_source = val_offsets = val_indices = None
    if v > 0:
        if val_labels is None:
            raise ConfigError(
                "evaluation.personal.val_fraction: split: test_set draws validation parts from "
                "the dataset's validation split, and it has none; set data.val_fraction (e.g. "
                "0.1) to hold one out, or val_fraction: 0")
        val_source = "val"
        val_offsets, val_indices = _draw_like(counts, sizes,
                                              _at_least_one(sizes * v / (1 - f)),
                                              _as_labels(val_labels), seed, _VAL_DRAW)
    parts = PersonalParts("test", test_offsets, test_indices, val_source, val_offsets,
                          val_indices)
    return dataclasses.replace(partition, personal=parts)


def _at_least_one(x: np.ndarray) -> np.ndarray:
    return np.maximum(_round_half_up(x), 1)


def _draw_like(counts: LabelCounts, sizes: np.ndarray, wanted: np.ndarray, pool: np.ndarray,
               seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Per client k, `wanted[k]` positions in `pool` (labels of a split) with k's label
    distribution (`counts`), distinct within k; CSR (offsets, indices), each client's sorted."""
    num_clients = len(sizes)
    c, label, n = counts.client, counts.label, counts.count
    if not len(c):
        return offsets_of(np.zeros(num_clients, np.int64)), np.empty(0, np.int64)
    # largest remainder: floor shares, then one more to the rows with the largest remainders
    numerator = wanted[c] * n
    quota, remainder = numerator // sizes[c], numerator % sizes[c]
    first = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    short = np.zeros(num_clients, dtype=np.int64)
    short[c[first]] = wanted[c[first]] - np.add.reduceat(quota, first)
    order = np.lexsort((label, -remainder, c))
    rank = np.arange(len(c)) - np.repeat(first, np.diff(np.r_[first, len(c)]))
    quota[order] += (rank < short[c[order]]).astype(np.int64)
    # the pool's samples of each class, contiguous; a class holds at most what it has
    available = np.bincount(pool, minlength=int(label.max()) + 1)
    class_start = offsets_of(available)[:-1]
    members = np.argsort(pool, kind="stable")
    quota = np.minimum(quota, available[label])
    # one uniform key per drawn sample, client-major, from the client's own stream
    row = np.repeat(np.arange(len(c)), quota)
    owner = c[row]
    per_client = offsets_of(np.bincount(owner, minlength=num_clients))
    position = np.arange(len(row), dtype=np.int64) - per_client[owner]
    keys = _uniform(_bits(derive_seed(seed, PERSONAL_SPLIT, stream), owner, position))
    pick = (keys * available[label[row]]).astype(np.int64)
    # a row whose keys land twice on one sample draws again, without replacement
    by_row = np.lexsort((pick, row))
    same = (np.diff(row[by_row]) == 0) & (np.diff(pick[by_row]) == 0)
    clashes = np.unique(row[by_row][1:][same])
    row_start = offsets_of(quota)
    for r in clashes:
        rng = np.random.default_rng(derive_seed(seed, PERSONAL_SPLIT, stream, c[r], label[r]))
        pick[row_start[r]:row_start[r + 1]] = rng.choice(available[label[r]], size=quota[r],
                                                         replace=False)
    chosen = members[class_start[label[row]] + pick]
    order = np.lexsort((chosen, owner))
    return per_client, chosen[order].astype(np.int64)


# --------------------------------------------------------------------------- partition files


def _check_file_parts(parts: PersonalParts, personal: PersonalConfig,
                      test_labels: np.ndarray | None, val_labels: np.ndarray | None) -> None:
    """A partition file's own parts against the config and the dataset's split sizes."""
    source = "train" if personal.split == "fraction" else "test"
    if parts.test_source != source:
        other = "test_set" if parts.test_source == "test" else "fraction"
        raise ConfigError(f"evaluation.personal.split: the partition file's test parts index "
                          f"the {parts.test_source} split, as split: {other} does; set "
                          f"evaluation.personal.split: {other}")
    if parts.has_val != (personal.val_fraction > 0):
        raise ConfigError(
            "evaluation.personal.val_fraction: the partition file holds validation parts; set "
            "val_fraction > 0 (the file's parts are used as written)" if parts.has_val else
            "evaluation.personal.val_fraction: the partition file holds no validation parts; "
            "set val_fraction: 0, or write the file with them")
    for name, source_of, indices, split_labels in (
            ("test", parts.test_source, parts.test_indices, test_labels),
            ("validation", parts.val_source, parts.val_indices, val_labels)):
        if indices is None or source_of == "train" or not len(indices):
            continue  # training-split positions are checked when the file is read
        if split_labels is None:
            raise ConfigError(f"data.partition.path: the file's {name} parts index the "
                              f"dataset's {source_of} split, and it has none")
        if int(indices.max()) >= len(split_labels):
            raise ConfigError(
                f"data.partition.path: {name} sample index {int(indices.max())} is out of "
                f"range: the {source_of} split has {len(split_labels)} samples")
