"""The per-round metrics a run reports, by name, so a sweep's metric can be checked before any
trial starts.

Every run reports the engine's metrics; evaluated rounds add `test_<m>` (and `val_<m>` where
the dataset has a validation split), per domain as `test_<m>/<domain>`; methods with class
anchors add the anchor diagnostics; each method may add its own (client metrics as they are,
server metrics as `server_<name>`), which it declares in its `reported_metrics` class
attribute.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from raysim.algorithm import ClassAnchors
from raysim.config import ConfigError
from raysim.registry import algorithm_class, algorithm_names

EVALUATION = ("accuracy", "loss", "dice", "hd95", "asd")  # test_<m>, val_<m>, <...>/<domain>
EVALUATION_SPLITS = ("test", "val")
ENGINE = ("train_loss", "train_steps", "samples", "clients_ok", "clients_failed",
          "round_seconds", "samples_per_second")
ANCHOR_DIAGNOSTICS = ("anchor_cosine", "anchor_self_accuracy", "anchor_interclass_cosine")
LOWER_IS_BETTER = ("loss", "hd95", "asd", "seconds")


def evaluation_metrics() -> list[str]:
    return [f"{split}_{name}" for split in EVALUATION_SPLITS for name in EVALUATION]


def algorithm_metrics(name: str, anchors: bool = True) -> list[str]:
    """What the algorithm `name` reports besides the engine and evaluation metrics (with the
    anchor diagnostics where it has anchors and they are switched on)."""

    algorithm = algorithm_class(name)
    names = list(algorithm.reported_metrics)
    if anchors and issubclass(algorithm, ClassAnchors):
        names += ANCHOR_DIAGNOSTICS
    return names


def reportable(algorithm: str, anchors: bool = True) -> list[str]:
    return [*evaluation_metrics(), *ENGINE, *algorithm_metrics(algorithm, anchors)]


def check_metric(metric: str, configs: Iterable[Any]) -> None:
    """ConfigError unless every config's algorithm reports `metric`."""

    base = _without_domain(metric)
    configs = list(configs)
    algorithms = sorted({config.algorithm.name for config in configs})
    missing = sorted({c.algorithm.name for c in configs
                      if base not in reportable(c.algorithm.name, c.diagnostics.anchors)})
    if not missing:
        return
    known = sorted({m for name in algorithms for m in reportable(name)})
    if all(base not in reportable(name) for name in _all_algorithms(algorithms)):
        close = difflib.get_close_matches(base, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known)}"
        raise ConfigError(f"metric: no algorithm reports {metric!r}; {hint}")
    hint = "; the anchor diagnostics need diagnostics.anchors: true" \
        if base in ANCHOR_DIAGNOSTICS else ""
    raise ConfigError(f"metric: {metric!r} is not reported by {', '.join(missing)} "
                      f"(in this sweep's search space){hint}")


def default_mode(metric: str) -> str:
    base = _without_domain(metric)
    return "min" if any(base.endswith(word) for word in LOWER_IS_BETTER) else "max"


def _without_domain(metric: str) -> str:
    """`test_accuracy/svhn` → `test_accuracy` (per-domain evaluation metrics only)."""
    head, sep, _ = metric.partition("/")
    return head if sep and head in evaluation_metrics() else metric


def _all_algorithms(extra: Sequence[str]) -> list[str]:

    return sorted({*algorithm_names(), *extra})
