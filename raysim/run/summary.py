"""A run's summary: the round it reports (selected on validation) and what it cost."""

from __future__ import annotations

from typing import Any

from raysim.types import HEADLINE_METRIC, RunSummary


def select_best(results: list, metric: str, protocol: str = "default") -> dict[str, Any]:
    """The round to report: the best `val_<metric>` where the dataset has a validation split,
    else (or under the official protocol, which reports the maximum over rounds) the best
    `test_<metric>`, which then is selection on the test set, and says so."""
    has_val = any(f"val_{metric}" in r.metrics for r in results)
    selected_by = f"val_{metric}" if has_val and protocol != "official" else f"test_{metric}"
    best: dict[str, Any] = {"selected_by": selected_by, "round": None, f"test_{metric}": None}
    for result in results:
        value = result.metrics.get(selected_by)
        if value is not None and (best["round"] is None or value > best[selected_by]):
            best = {"selected_by": selected_by, "round": result.round, selected_by: value,
                    f"test_{metric}": result.metrics.get(f"test_{metric}")}
    return best


def summarize(run: Any, results: list, startup: float, wall: float, *, status: str,
              **measured: Any) -> RunSummary:
    """The summary of `run` (a `raysim.run.Run`) after `results`; `measured`: the other
    `RunSummary` fields the executing loop measured (placement, checkpoints, memory, phases)."""
    final: dict[str, float] = {}
    for result in results:
        final.update(result.metrics)
    metric = HEADLINE_METRIC[run.task.info.kind]
    kinds = [e["kind"] for r in results for e in r.events]
    return RunSummary(
        name=run.config.name,
        algorithm=run.config.algorithm.name,
        run_dir=str(run.run_dir),
        rounds_completed=len(results),
        headline=f"test_{metric}",
        final=final,
        best=select_best(results, metric, run.config.evaluation.protocol),
        protocol=run.config.evaluation.protocol,
        wall_seconds=wall,
        startup_seconds=startup,
        round_seconds=[r.seconds for r in results],
        # per round: seconds the clients spent in the method's step (the rest is the engine's)
        client_train_seconds=[r.train_seconds for r in results],
        clients_dropped=sum(len(r.failures) for r in results),
        failures={kind: kinds.count(kind) for kind in sorted(set(kinds))},
        actor_restarts=sum(kind.endswith("_restarted") for kind in kinds),
        num_workers=run.config.resources.num_workers,
        status=status,
        **measured,
    )
