"""Types every layer shares: model weights, one round's result, the run's summary.

They sit at the bottom of the package (beside `raysim.config`), so the engine that produces a
round's result, the run that summarises it, and the sinks and reports that read both can name
them without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

Weights = dict[str, Tensor]

# The metric each task kind is judged by (higher is better); the run's headline is its test value.
HEADLINE_METRIC = {"classification": "accuracy", "segmentation": "dice"}
# Personalised evaluation's metrics: each client's deployed model on its own parts
PERSONAL_PREFIX = "personal_"


def metric_prefix(personal: bool) -> str:
    """`personal_` where the run evaluates personally (`evaluation.personal`), else ``."""
    return PERSONAL_PREFIX if personal else ""


def headline_metric(kind: str, personal: bool = False, split: str = "test") -> str:
    """The metric a run of task `kind` is judged by: `test_accuracy`, `test_dice`, or with
    personalised evaluation `personal_test_accuracy` (the mean over evaluated clients);
    `split="val"` names its validation counterpart, which selects the reported round."""
    return f"{metric_prefix(personal)}{split}_{HEADLINE_METRIC[kind]}"


@dataclass(frozen=True)
class RoundResult:
    """One finished round as the engine reports it."""

    round: int  # 1-based
    metrics: dict[str, float]  # client averages, test metrics when evaluated, timings
    failures: dict[int, str] = field(default_factory=dict)  # client id → reason it was dropped
    seconds: float = 0.0
    events: tuple[dict[str, Any], ...] = ()  # failure records: retries, drops, restarts, replays
    # the state files of a checkpoint after this round, when one was due (the run writes them)
    checkpoint: dict[str, bytes] | None = field(default=None, repr=False, compare=False)
    # seconds the clients spent in the method's client step, summed (the rest of
    # round_seconds × workers is the engine's: dispatch, data, weights, aggregation)
    train_seconds: float = field(default=0.0, compare=False)
    # personalised evaluation: (client id, metric, value) of every evaluated client, e.g.
    # (7, "personal_test_accuracy", 0.93); the round's summaries are in `metrics`
    client_metrics: tuple[tuple[int, str, float], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class RunSummary:
    """What a run reports when it ends (`summary.json`, every sink's `finish`)."""

    name: str
    algorithm: str
    run_dir: str
    status: str  # completed | interrupted | failed
    rounds_completed: int
    headline: str  # the metric the run is judged by, e.g. test_accuracy
    final: dict[str, float]  # the latest value of every metric
    best: dict[str, Any]  # the selected round: selected_by, round, its values
    protocol: str
    wall_seconds: float
    startup_seconds: float
    round_seconds: list[float]
    # per round: seconds the clients spent in the method's step (the rest is the engine's)
    client_train_seconds: list[float]
    clients_dropped: int
    failures: dict[str, int]  # failure records by kind
    actor_restarts: int
    num_workers: int
    launch_to_first_round_seconds: float | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)  # placement of each worker
    checkpoint: str | None = None  # the newest checkpoint written (None: none)
    checkpoints_written: list[dict[str, float]] = field(default_factory=list)
    peak_rss_mb: dict[str, Any] = field(default_factory=dict)
    startup_phases: dict[str, float] = field(default_factory=dict)
    warm_workers: bool = False  # the actors came from a warm pool (raysim.engine.warm)
    stop_reason: str | None = None  # why a failed run stopped

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `summary.json` (a run that did not fail has no `stop_reason`)."""
        out = dataclasses.asdict(self)
        if out["stop_reason"] is None:
            del out["stop_reason"]
        return out
