"""A run's summary: the round it reports (selected on validation) and what it cost. With
`evaluation.personal` the run is judged by its clients' own models on their own test parts
(`personal_test_<m>`), selected on their validation parts where they have them."""

from __future__ import annotations

from typing import Any

from raysim.results.metric_names import PERSONAL_SUMMARIES
from raysim.types import HEADLINE_METRIC, RunSummary, headline_metric, metric_prefix


def select_best(results: list, metric: str, protocol: str = "default",
                prefix: str = "") -> dict[str, Any]:
    """The round to report: the best `<prefix>val_<metric>` where there is a validation split
    (or, with `prefix="personal_"`, validation parts), else (or under the official protocol,
    which reports the maximum over rounds) the best `<prefix>test_<metric>`, which then is
    selection on the test set, and says so. Personalised summaries of the selected round
    (`_weighted`, `_std`, `_p10`) come with its test value."""
    test, val = f"{prefix}test_{metric}", f"{prefix}val_{metric}"
    has_val = any(val in r.metrics for r in results)
    selected_by = val if has_val and protocol != "official" else test
    best: dict[str, Any] = {"selected_by": selected_by, "round": None, test: None}
    for result in results:
        value = result.metrics.get(selected_by)
        if value is not None and (best["round"] is None or value > best[selected_by]):
            best = {"selected_by": selected_by, "round": result.round, selected_by: value,
                    test: result.metrics.get(test),
                    **{test + s: result.metrics[test + s] for s in PERSONAL_SUMMARIES
                       if test + s in result.metrics}}
    return best


def summarize(run: Any, results: list, startup: float, wall: float, *, status: str,
              **measured: Any) -> RunSummary:
    """The summary of `run` (a `raysim.run.Run`) after `results`; `measured`: the other
    `RunSummary` fields the executing loop measured (placement, checkpoints, memory, phases)."""
    final: dict[str, float] = {}
    for result in results:
        final.update(result.metrics)
    metric = HEADLINE_METRIC[run.task.info.kind]
    personal = run.config.evaluation.personal is not None
    kinds = [e["kind"] for r in results for e in r.events]
    return RunSummary(
        name=run.config.name,
        algorithm=run.config.algorithm.name,
        run_dir=str(run.run_dir),
        rounds_completed=len(results),
        headline=headline_metric(run.task.info.kind, personal),
        final=final,
        best=select_best(results, metric, run.config.evaluation.protocol,
                         metric_prefix(personal)),
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
