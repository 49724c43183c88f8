"""Personalised evaluation's driver side (`evaluation.personal`): which clients are evaluated
in a round, how they are spread over the workers, and the reduction of their per-part metric
sums to per-client metrics and the round's summaries.

Each evaluated client's deployed model is scored on its own test part (and validation part):
per client `personal_test_<m>` = its sum of metric m over its part / its part's size. The round
then reports, per metric, the unweighted mean over the evaluated clients (`personal_test_<m>`),
the mean weighted by their parts' sizes (`_weighted`), the spread (`_std`, population), the
10th percentile (`_p10`, numpy's default linear interpolation: the worst-served clients), and
how many clients were evaluated (`personal_clients`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raysim.seeding import PERSONAL_SAMPLE, derive_seed

# (client id, {part: metric sums with "count"}), as the workers return them
ClientSums = tuple[int, dict[str, dict[str, float]]]


def evaluated_clients(seed: int, round_index: int, num_clients: int, clients: int) -> np.ndarray:
    """The clients evaluated after round `round_index`, sorted: every one (`clients` 0), or a
    uniform sample of `clients` from their own stream (O(clients) for a large federation)."""
    if not clients or clients >= num_clients:
        return np.arange(num_clients, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, PERSONAL_SAMPLE, round_index))
    return np.sort(rng.choice(num_clients, size=clients, replace=False)).astype(np.int64)


def contiguous_chunks(client_ids: np.ndarray, num_workers: int) -> list[list[int]]:
    """At most `num_workers` runs of consecutive evaluated clients (each client's scores do
    not depend on which worker computes them, so neither do the metrics)."""
    if len(client_ids) == 0:
        return []
    return [[int(c) for c in chunk]
            for chunk in np.array_split(client_ids, min(num_workers, len(client_ids)))]


def summarize(sums: Sequence[ClientSums]) -> tuple[list[tuple[int, str, float]],
                                                    dict[str, float]]:
    """Per client and part, each metric's sum over the part divided by the part's size, as
    (client id, `personal_<part>_<metric>`, value) rows in the order given; and the round's
    summaries of each over the evaluated clients: the mean, `_weighted` (by part size),
    `_std`, `_p10`, and `personal_clients`."""
    rows: list[tuple[int, str, float]] = []
    columns: dict[str, tuple[list[float], list[float]]] = {}  # name → (values, part sizes)
    for client, parts in sums:
        for part, totals in parts.items():
            count = totals["count"]
            for key, total in totals.items():
                if key == "count":
                    continue
                name = f"personal_{part}_{key}"
                rows.append((client, name, total / count))
                values, sizes = columns.setdefault(name, ([], []))
                values.append(total / count)
                sizes.append(count)
    out: dict[str, float] = {"personal_clients": float(len(sums))}
    for name, (values, sizes) in columns.items():
        v = np.asarray(values, dtype=np.float64)
        out[name] = float(np.mean(v))
        out[f"{name}_weighted"] = float(np.average(v, weights=np.asarray(sizes)))
        out[f"{name}_std"] = float(np.std(v))
        out[f"{name}_p10"] = float(np.percentile(v, 10))
    return rows, out
