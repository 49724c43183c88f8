"""`raysim compare` on Ray Tune: for each method, its tuning sweep (the comparison's budget over
its own search space), then its best configuration rerun on every seed. Both are ordinary
sweeps (`raysim.tune.trials.run_sweep`), so concurrent trials share the cluster through
placement groups and every trial leaves a run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysim.tune.compare import Comparison, Method, tuned_values


@dataclass
class MethodOutcome:
    method: Method
    tuned: dict[str, Any] = field(default_factory=dict)  # the swept values of the best trial
    tuning_dir: Path | None = None
    seed_runs: list[tuple[int, Path]] = field(default_factory=list)  # (seed, run directory)
    trials_run: int = 0
    tuning_seconds: float = 0.0
    seeds_seconds: float = 0.0
    error: str = ""  # why the method has no result (every trial failed)


def run_comparison(comparison: Comparison, out_dir: Path, address: str | None = None,
                   verbose: int = 0) -> Any:
    """Tune and rerun every method, then write the report (`raysim.results.compare_report`);
    returns what `write_compare_report` returns."""
    from raysim.results.compare_report import write_compare_report
    from raysim.tune.trials import run_sweep

    out_dir = Path(out_dir).resolve()
    outcomes = []
    for method in comparison.methods:
        outcome = MethodOutcome(method, tuning_dir=out_dir / "methods" / method.label / "tuning")
        keys = ", ".join(method.search)
        print(f"raysim: {comparison.name}: tuning {method.label}: {comparison.trials} trials "
              f"over {keys}, ranked by the best {comparison.selection_metric}", flush=True)
        started = time.perf_counter()
        tuning = run_sweep(comparison.tuning_sweep(method), outcome.tuning_dir, address,
                           verbose, plot=False)
        outcome.tuning_seconds = time.perf_counter() - started
        outcome.trials_run = len(tuning.table)
        rank = f"best_{comparison.selection_metric}"
        ranked = tuning.table.dropna(subset=[rank]) if len(tuning.table) else tuning.table
        if ranked.empty:
            outcome.error = f"no trial reported {comparison.selection_metric}; see " \
                f"{outcome.tuning_dir / 'trials.csv'}"
            print(f"raysim: {comparison.name}: {method.label}: {outcome.error}", flush=True)
            outcomes.append(outcome)
            continue
        outcome.tuned = tuned_values(method, ranked.iloc[0])
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in outcome.tuned.items())
        print(f"raysim: {comparison.name}: {method.label} tuned: {shown}; rerunning on seeds "
              f"{', '.join(map(str, comparison.seeds))}", flush=True)
        started = time.perf_counter()
        seeds = run_sweep(comparison.seed_sweep(method, outcome.tuned),
                          out_dir / "methods" / method.label / "seeds", address, verbose,
                          plot=False)
        outcome.seeds_seconds = time.perf_counter() - started
        rows = seeds.table
        if len(rows):
            rows = rows[rows["status"] != "ERROR"]
        outcome.seed_runs = sorted((int(row["seed"]), Path(row["run_dir"]))
                                   for _, row in rows.iterrows())
        outcomes.append(outcome)
    return write_compare_report(comparison, outcomes, out_dir)


def outcomes_in(comparison: Comparison, out_dir: Path) -> list[MethodOutcome]:
    """What a comparison directory holds, method by method, also when the comparison was cut
    short: each method whose tuning sweep finished, with its seed runs that have a summary
    (fault tolerance may have stopped one early: the report says so). Minutes are then the runs'
    own wall time (start-up of their sweeps not included)."""
    import json

    import pandas as pd

    outcomes = []
    rank = f"best_{comparison.selection_metric}"
    for method in comparison.methods:
        base = Path(out_dir) / "methods" / method.label
        trials = base / "tuning" / "trials.csv"
        if not trials.is_file():
            continue
        table = pd.read_csv(trials).dropna(subset=[rank])
        outcome = MethodOutcome(method, tuning_dir=base / "tuning", trials_run=len(table))
        if table.empty:
            outcome.error = f"no trial reported {comparison.selection_metric}"
            outcomes.append(outcome)
            continue
        outcome.tuned = tuned_values(method, table.sort_values(rank, ascending=False,
                                                               kind="stable").iloc[0])
        for summary_path in sorted((base / "tuning" / "trials").glob("*/summary.json")):
            outcome.tuning_seconds += json.loads(summary_path.read_text())["wall_seconds"]
        for summary_path in sorted((base / "seeds" / "trials").glob("*/summary.json")):
            summary = json.loads(summary_path.read_text())
            config = _read_yaml(summary_path.parent / "config.yaml")
            outcome.seed_runs.append((int(config["seed"]), summary_path.parent))
            outcome.seeds_seconds += summary["wall_seconds"]
        outcome.seed_runs.sort()
        outcomes.append(outcome)
    return outcomes


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
