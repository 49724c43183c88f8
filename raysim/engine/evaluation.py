"""Evaluation (test split, and the validation split where a dataset has one) spread over the
workers: fixed batches (so metrics do not depend on the pool size), per-domain grouping, and the
reduction of per-batch sums to metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raysim.data.domain_split import UNSEEN

EVAL_BATCH = 128  # fixed test batches, so metrics do not depend on how they are spread


def eval_batches(
    domains: np.ndarray | None, num_samples: int, batch_size: int = EVAL_BATCH
) -> list[tuple[int, list]]:
    """Fixed ranges [start, stop) of at most `batch_size` samples, grouped by domain
    (one group, id -1, without domains). Domains must be contiguous blocks of the test split."""
    if domains is None:
        blocks = [(-1, 0, num_samples)]
    else:
        change = np.flatnonzero(np.diff(domains)) + 1
        starts, stops = np.r_[0, change], np.r_[change, num_samples]
        blocks = [(int(domains[a]), int(a), int(b)) for a, b in zip(starts, stops)]
        if len({d for d, _, _ in blocks}) != len(blocks):
            raise ValueError("test samples of one domain must be contiguous")
    return [(d, [(s, min(s + batch_size, b)) for s in range(a, b, batch_size)])
            for d, a, b in blocks]


def reduce_eval(sums: Sequence[dict[str, float]], split: str = "test") -> dict[str, float]:
    """Per-batch metric sums (in batch order) → `<split>_<metric>`, each divided by the count."""
    count = sum(s["count"] for s in sums)
    keys = [k for k in sums[0] if k != "count"]
    return {f"{split}_{k}": float(np.sum([s[k] for s in sums], dtype=np.float64)) / count
            for k in keys}


def reduce_domain_eval(
    groups: list[tuple[str, list[dict[str, float]]]], split: str = "test"
) -> dict[str, float]:
    """Per-domain metrics (`test_accuracy/<domain>`) and their unweighted mean (`test_accuracy`),
    so every domain (site) counts the same whatever its test size. The `unseen` split (domains
    held out of training) is named `test_accuracy/unseen/<domain>` and `test_accuracy/unseen`."""
    if split == UNSEEN:
        return {_unseen_name(k): v for k, v in reduce_domain_eval(groups, "test").items()}
    if len(groups) == 1 and groups[0][0] == "":
        return reduce_eval(groups[0][1], split)
    per_domain = {name: reduce_eval(sums, split) for name, sums in groups}
    out = {f"{k}/{name}": v for name, metrics in per_domain.items() for k, v in metrics.items()}
    for key in next(iter(per_domain.values())):
        out[key] = float(np.mean([metrics[key] for metrics in per_domain.values()]))
    return out


def _unseen_name(key: str) -> str:
    metric, _, domain = key.partition("/")
    return f"{metric}/unseen/{domain}" if domain else f"{metric}/unseen"
