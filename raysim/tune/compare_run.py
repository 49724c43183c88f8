"""`raysim compare` on Ray Tune: for each method, its tuning sweep (the comparison's budget over
its own search space), then its best configuration rerun on every seed. Both are ordinary
sweeps (`raysim.tune.trials.run_sweep`), so concurrent trials share the cluster through
placement groups and every trial leaves a run directory.

A comparison directory records the comparison it holds (`comparison.json`), so `--resume`
finishes one that was cut short (an interrupt, a preempted head node): methods whose seed runs
all finished are kept as they are, a method whose tuning finished only reruns its seeds, and a
method cut short in its tuning is tuned again from the start. Every method's draws come from the
comparison's seed, so a resumed comparison reports what an uninterrupted one would."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysim.config import ConfigError
from raysim.results.compare_report import write_compare_report
from raysim.tune.compare import Comparison, Method, tuned_values
from raysim.tune.records import read_json, read_table, read_yaml_record
from raysim.tune.trials import run_sweep

COMPARISON_RECORD = "comparison.json"  # what a comparison directory was run with


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

    def finished(self, seeds: tuple[int, ...]) -> bool:
        """Nothing is left to run: every trial failed, or every seed run has a summary."""
        return bool(self.error) or sorted(s for s, _ in self.seed_runs) == sorted(seeds)


def run_comparison(comparison: Comparison, out_dir: Path, address: str | None = None,
                   verbose: int = 0, resume: bool = False, warm: bool = True) -> Any:
    """Tune and rerun every method, then write the report (`raysim.results.compare_report`);
    returns what `write_compare_report` returns. With `resume`, what `out_dir` already holds of
    this comparison is kept (see the module's docstring). `warm`: as for `run_sweep`."""

    out_dir = Path(out_dir).resolve()
    check_directory(comparison, out_dir, resume)
    write_record(comparison, out_dir)
    outcomes = []
    for method in comparison.methods:
        base = out_dir / "methods" / method.label
        stored = stored_outcome(comparison, method, base) if resume else None
        if stored is not None and stored.finished(comparison.seeds):
            print(f"raysim: {comparison.name}: {method.label}: finished before, kept", flush=True)
            outcomes.append(stored)
            continue
        if stored is None:
            if base.exists():
                print(f"raysim: {comparison.name}: {method.label}: its tuning was cut short; "
                      "tuning it again", flush=True)
                shutil.rmtree(base)
            outcome = tune_method(comparison, method, base, address, verbose, warm)
        else:  # tuned before; its seed runs were cut short
            outcome = dataclasses.replace(stored, seed_runs=[], seeds_seconds=0.0)
            shutil.rmtree(base / "seeds", ignore_errors=True)
        if not outcome.error:
            rerun_on_seeds(comparison, outcome, base, address, verbose, warm)
        outcomes.append(outcome)
    return write_compare_report(comparison, outcomes, out_dir)


def tune_method(comparison: Comparison, method: Method, base: Path, address: str | None,
                verbose: int, warm: bool = True) -> MethodOutcome:
    """The method's tuning sweep under the comparison's budget, and its best trial's values
    (or, when no trial reported the selection metric, why there are none)."""

    outcome = MethodOutcome(method, tuning_dir=base / "tuning")
    print(f"raysim: {comparison.name}: tuning {method.label}: {comparison.trials} trials over "
          f"{', '.join(method.search)}, ranked by the best {comparison.selection_metric}",
          flush=True)
    started = time.perf_counter()
    tuning = run_sweep(comparison.tuning_sweep(method), outcome.tuning_dir, address, verbose,
                       plot=False, warm=warm)
    outcome.tuning_seconds = time.perf_counter() - started
    outcome.trials_run = len(tuning.table)
    rank = f"best_{comparison.selection_metric}"
    ranked = tuning.table.dropna(subset=[rank]) if len(tuning.table) else tuning.table
    if ranked.empty:
        outcome.error = (f"no trial reported {comparison.selection_metric}; see "
                         f"{outcome.tuning_dir / 'trials.csv'}")
        print(f"raysim: {comparison.name}: {method.label}: {outcome.error}", flush=True)
    else:
        outcome.tuned = tuned_values(method, ranked.iloc[0])
    return outcome


def rerun_on_seeds(comparison: Comparison, outcome: MethodOutcome, base: Path,
                   address: str | None, verbose: int, warm: bool = True) -> None:
    """The tuned configuration on every seed of the comparison, recorded in `outcome`."""

    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in outcome.tuned.items())
    print(f"raysim: {comparison.name}: {outcome.method.label} tuned: {shown}; rerunning on "
          f"seeds {', '.join(map(str, comparison.seeds))}", flush=True)
    started = time.perf_counter()
    seeds = run_sweep(comparison.seed_sweep(outcome.method, outcome.tuned), base / "seeds",
                      address, verbose, plot=False, warm=warm)
    outcome.seeds_seconds = time.perf_counter() - started
    rows = seeds.table
    if len(rows):
        rows = rows[rows["status"] != "ERROR"]
    outcome.seed_runs = sorted((int(row["seed"]), Path(row["run_dir"]))
                               for _, row in rows.iterrows())


def comparison_record(comparison: Comparison) -> dict[str, Any]:
    """Everything that decides a comparison's results, as JSON: the shared part (setting,
    budget, seeds) and each method's definition by label."""
    shared = {key: value for key, value in dataclasses.asdict(comparison).items()
              if key != "methods"}
    methods = {m.label: {"algorithm": m.algorithm, "search": m.search}
               for m in comparison.methods}
    return json.loads(json.dumps({"shared": shared, "methods": methods}, default=str))


def check_directory(comparison: Comparison, out_dir: Path, resume: bool) -> None:
    """A new comparison needs a directory of its own; a resumed one the directory of the same
    comparison (methods may be added to it, not changed)."""
    record = out_dir / COMPARISON_RECORD
    if not resume:
        if (out_dir / "methods").exists():
            raise ConfigError(f"{out_dir} already holds a comparison: add --resume to finish "
                              "it, or choose another --out")
        return
    if not record.is_file():
        raise ConfigError(f"compare --resume: {out_dir} holds no {COMPARISON_RECORD}; give the "
                          "directory a comparison wrote with --out")
    stored, current = _read_record(record), comparison_record(comparison)
    changed = sorted(key for key in stored["shared"].keys() | current["shared"].keys()
                     if stored["shared"].get(key) != current["shared"].get(key))
    if changed:
        raise ConfigError(f"compare --resume: {out_dir} was run with other {', '.join(changed)}; "
                          "resume it with the file and overrides it was started with, or "
                          "choose another --out")
    for label, method in current["methods"].items():
        if label in stored["methods"] and stored["methods"][label] != method:
            raise ConfigError(f"compare --resume: method {label} differs from the one {out_dir} "
                              f"was run with; give it another label, or remove "
                              f"{out_dir / 'methods' / label} to run it again")


def _read_record(record: Path) -> dict:
    return read_json(record, {"shared": dict, "methods": dict},
                     "remove it to resume with the comparison file given now, or choose another "
                     "--out")


def write_record(comparison: Comparison, out_dir: Path) -> None:
    """The comparison's record, keeping the methods an earlier run of it had."""
    record = out_dir / COMPARISON_RECORD
    current = comparison_record(comparison)
    if record.is_file():
        current["methods"] = {**_read_record(record)["methods"], **current["methods"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(current, indent=2) + "\n")


def outcomes_in(comparison: Comparison, out_dir: Path) -> list[MethodOutcome]:
    """What a comparison directory holds, method by method, also when the comparison was cut
    short: each method whose tuning sweep finished, with its seed runs that have a summary."""
    outcomes = (stored_outcome(comparison, method, Path(out_dir) / "methods" / method.label)
                for method in comparison.methods)
    return [outcome for outcome in outcomes if outcome is not None]


def stored_outcome(comparison: Comparison, method: Method, base: Path) -> MethodOutcome | None:
    """One method's directory as it stands: None until its tuning sweep finished, else its
    tuned values and its seed runs that have a summary (fault tolerance may have stopped one
    early: the report says so). Minutes are the runs' own wall time (start-up of their sweeps
    not included)."""
    trials = base / "tuning" / "trials.csv"
    if not trials.is_file():
        return None
    rank = f"best_{comparison.selection_metric}"
    fix = f"remove {base} to tune {method.label} again (compare --resume)"
    table = read_table(trials, (rank, *method.search), fix).dropna(subset=[rank])
    outcome = MethodOutcome(method, tuning_dir=base / "tuning", trials_run=len(table))
    if table.empty:
        outcome.error = f"no trial reported {comparison.selection_metric}"
        return outcome
    outcome.tuned = tuned_values(method, table.sort_values(rank, ascending=False,
                                                           kind="stable").iloc[0])
    seconds = {"wall_seconds": int | float}
    for summary_path in sorted((base / "tuning" / "trials").glob("*/summary.json")):
        outcome.tuning_seconds += read_json(summary_path, seconds, fix)["wall_seconds"]
    for summary_path in sorted((base / "seeds" / "trials").glob("*/summary.json")):
        rerun = f"remove {summary_path.parent} to rerun that seed (compare --resume)"
        summary = read_json(summary_path, seconds, rerun)
        config = read_yaml_record(summary_path.parent / "config.yaml", {"seed": int}, rerun)
        outcome.seed_runs.append((config["seed"], summary_path.parent))
        outcome.seeds_seconds += summary["wall_seconds"]
    outcome.seed_runs.sort()
    return outcome
