"""What a comparison leaves behind: the table (printed, `table.md`, `results.csv`: test mean ±
std over seeds at each run's validation-selected round, and the tuned values), every seed run's
per-round metrics (`compare.parquet`), their curves with seed bands (`curves.png`), the tuned
configuration of each method (`best/<method>.yaml`) and `summary.json`."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysim.results.plots import SERIES_SEPARATOR, plot_bands, read_metrics


@dataclass
class CompareReport:
    out_dir: Path
    table: str  # the markdown table
    summary: dict[str, Any]


def seed_result(run_dir: Path, metrics: dict, selection: str, test: str) -> dict[str, Any]:
    """One seed run at its validation-selected round: that round, the validation value, the
    test metric and its per-domain / per-site parts there, and the final test metric."""
    summary = json.loads((run_dir / "summary.json").read_text())
    selected = summary["best"]["round"]
    at = {name: dict(points).get(selected) for name, points in metrics.items()
          if name == test or name.startswith(test + SERIES_SEPARATOR)}
    final = metrics.get(test, [(None, math.nan)])[-1][1]
    return {"round": selected, selection: summary["best"].get(selection), **at,
            f"final_{test}": final, "rounds": summary["rounds_completed"],
            "status": summary.get("status", "completed")}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_compare_report(comparison: Any, outcomes: list, out_dir: Path) -> CompareReport:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    selection, test = comparison.selection_metric, comparison.test_metric
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, long_rows, curves, methods = [], [], {}, {}
    for outcome in outcomes:
        label = outcome.method.label
        curves[label] = []
        for seed, run_dir in outcome.seed_runs:
            metrics = read_metrics(run_dir)
            result = seed_result(run_dir, metrics, selection, test)
            rows.append({"method": label, "seed": seed, **result, "run_dir": str(run_dir)})
            curves[label].append(metrics.get(test, []))
            long_rows += [{"method": label, "seed": seed, "round": r, "metric": name,
                           "value": value} for name, points in metrics.items()
                          for r, value in points]
        tuned_config = outcome.tuning_dir / "best_config.yaml" if outcome.tuning_dir else None
        if tuned_config is not None and tuned_config.is_file():
            (out_dir / "best").mkdir(exist_ok=True)
            shutil.copyfile(tuned_config, out_dir / "best" / f"{label}.yaml")
        mine = [r for r in rows if r["method"] == label]
        mean, std = mean_std([r.get(test) for r in mine])
        parts = sorted({k for r in mine for k in r if k.startswith(test + SERIES_SEPARATOR)})
        methods[label] = {
            "algorithm": outcome.method.algorithm, "tuned": outcome.tuned,
            "search": outcome.method.search, "trials": outcome.trials_run,
            "seeds": [r["seed"] for r in mine], f"{test}_mean": mean, f"{test}_std": std,
            "parts": {p.split(SERIES_SEPARATOR, 1)[1]: mean_std([r.get(p) for r in mine])[0]
                      for p in parts},
            "tuning_seconds": outcome.tuning_seconds, "seeds_seconds": outcome.seeds_seconds,
            "error": outcome.error,
            # seed runs fault tolerance stopped early: reported at their best validation round
            "stopped": [f"seed {r['seed']} {r['status']} after round {r['rounds']}"
                        for r in mine if r["status"] != "completed"],
        }
    pd.DataFrame(rows).to_csv(out_dir / "results.csv", index=False)
    schema = pa.schema([("method", pa.string()), ("seed", pa.int64()), ("round", pa.int64()),
                        ("metric", pa.string()), ("value", pa.float64())])
    pq.write_table(pa.Table.from_pylist(long_rows, schema=schema), out_dir / "compare.parquet")
    if any(curves.values()):
        plot_bands({k: v for k, v in curves.items() if v}, test, out_dir / "curves.png",
                   title=f"{comparison.name}: {test}, mean ± std over seeds")
    summary = {
        "name": comparison.name, "task": comparison.task, "selected_by": selection,
        "reported": test, "selected_on_test": selection == test,
        "trials_per_method": comparison.trials,
        "draws": comparison.draws,
        "scheduler": vars(comparison.scheduler), "seeds": list(comparison.seeds),
        "methods": methods,
        "wall_seconds": sum(m["tuning_seconds"] + m["seeds_seconds"] for m in methods.values()),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = markdown_table(summary)
    (out_dir / "table.md").write_text(table + "\n")
    print(table)
    return CompareReport(out_dir, table, summary)


def markdown_table(summary: dict[str, Any]) -> str:
    """Methods as rows: test mean ± std (%) at the validation-selected round, each part's mean,
    the tuned values, trials, minutes spent and the seed runs fault tolerance stopped early
    (they count, at their best validation round); a line below says so where the selection
    was made on the test split instead."""
    test = summary["reported"]
    parts = sorted({p for m in summary["methods"].values() for p in m["parts"]})
    head = ["method", f"{test} (%)", *parts, "tuned", "trials", "minutes", "runs stopped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in summary["methods"].items():
        mean, std = m[f"{test}_mean"], m[f"{test}_std"]
        if not math.isnan(mean):
            cell = f"{100 * mean:.1f} ± {100 * std:.1f}"
        else:
            cell = "failed" if m.get("error") or m.get("seeds") is None else "no seed run yet"
        tuned = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in m["tuned"].items())
        minutes = (m["tuning_seconds"] + m["seeds_seconds"]) / 60
        lines.append("| " + " | ".join([
            label, cell, *(f"{100 * m['parts'][p]:.1f}" if p in m["parts"] else "-"
                           for p in parts),
            tuned or "-", str(m["trials"]), f"{minutes:.1f}",
            "; ".join(m.get("stopped", [])) or "-"]) + " |")
    if summary.get("selected_on_test"):
        lines += ["", f"Trials and rounds were selected on the test split ({test}): the "
                      "clients have no validation parts (set evaluation.personal.val_fraction "
                      "to select on validation)."]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
