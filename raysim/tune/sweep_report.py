"""What a sweep leaves behind: the trials table (printed, `trials.parquet`, `trials.csv`), the
best trial's config as a YAML `raysim launch` accepts, and a plot of the metric against each
swept heterogeneity key."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from raysim.config import dump_config
from raysim.run.validate import load_config
from raysim.tune.sweep import Sweep

HETEROGENEITY_PREFIX = "data."  # partition α, long-tail ρ, number of clients, domains, ...


def trials_table(sweep: Sweep, history: Any, results: Any, trials_dir: Path):
    """One row per trial: its swept values, status, rounds reported, final and best metric."""
    import pandas as pd

    errors = {}
    for result in results:
        if result.error is not None and result.path:
            text = str(result.error).strip().splitlines()
            errors[Path(result.path).name] = text[-1] if text else type(result.error).__name__
    metric, better = sweep.metric, (max if sweep.mode == "max" else min)
    rows = []
    for name, params in history.params.items():
        reports = [r for r in history.reports.get(name, []) if r.get(metric) is not None]
        values = [r[metric] for r in reports]
        best = better(values) if values else math.nan
        rows.append({
            "trial": name,
            **{key: params.get(key) for key in sweep.keys},
            "status": history.status.get(name, "ERROR" if name in errors else "UNKNOWN"),
            "rounds": len(history.reports.get(name, [])),
            f"final_{metric}": values[-1] if values else math.nan,
            f"best_{metric}": best,
            "best_round": next((r["round"] for r in reports if r[metric] == best), None),
            "error": errors.get(name, ""),
            "run_dir": str(trials_dir / name),
        })
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(rank_column(sweep), ascending=sweep.mode == "min",
                                  na_position="last", kind="stable").reset_index(drop=True)
    return table


def rank_column(sweep: Sweep) -> str:
    return f"{sweep.rank_by}_{sweep.metric}"


def format_table(table, sweep: Sweep) -> str:
    columns = ["trial", *sweep.keys, "status", "rounds", f"final_{sweep.metric}",
               f"best_{sweep.metric}", "best_round"]
    shown = table[columns].copy()
    for column in (f"final_{sweep.metric}", f"best_{sweep.metric}"):
        shown[column] = [f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else "-"
                         for v in shown[column]]
    shown["best_round"] = [str(int(v)) if v == v and v is not None else "-"
                           for v in shown["best_round"]]
    return shown.to_string(index=False)


def write_best_config(sweep: Sweep, table, path: Path) -> Path | None:
    """The best trial's full config (defaults included), checked to load back as it was."""
    ranked = table.dropna(subset=[rank_column(sweep)])
    if ranked.empty:
        return None
    best = ranked.iloc[0]
    params = {key: _plain(best[key]) for key in sweep.keys}
    config = dataclasses.replace(sweep.trial_config(params), name=f"{sweep.name}_best")
    text = dump_config(config)
    varied = ", ".join(f"{k}={v}" for k, v in params.items())
    header = (f"# Best trial of sweep {sweep.name} by {sweep.rank_by} {sweep.metric} "
              f"({best[rank_column(sweep)]:.4f}): {best['trial']}\n# {varied}\n")
    path.write_text(header + text)
    if dump_config(load_config(path)) != text:
        print(f"raysim: warning: {path} does not load back to the trial's config",
              file=sys.stderr)
    return path


def plot_against_heterogeneity(sweep: Sweep, table, path: Path) -> Path | None:
    """The final metric against each swept `data.*` key (every swept key when none is), one
    line per algorithm when the algorithm is swept. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("raysim: warning: matplotlib is not installed: no sweep plot "
              "(pip install matplotlib)", file=sys.stderr)
        return None
    keys = [k for k in sweep.keys if k.startswith(HETEROGENEITY_PREFIX)] or \
        [k for k in sweep.keys if k != "algorithm.name"] or list(sweep.keys)
    column = f"final_{sweep.metric}"
    data = table.dropna(subset=[column])
    if data.empty:
        return None
    groups = sorted(data["algorithm.name"].unique()) if "algorithm.name" in sweep.keys \
        and "algorithm.name" not in keys else [None]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data[key])
        order = sorted(data[key].unique(), key=lambda v: (isinstance(v, str), v))
        position = {v: v if numeric else i for i, v in enumerate(order)}
        for group in groups:
            rows = data if group is None else data[data["algorithm.name"] == group]
            means = rows.groupby(key)[column].mean()
            (line,) = ax.plot([position[v] for v in means.index], means.values, marker="o",
                              label=group or sweep.metric)
            ax.scatter([position[v] for v in rows[key]], rows[column], s=14, alpha=0.4,
                       color=line.get_color())
        if numeric and min(order) > 0 and max(order) / min(order) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order])
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {sweep.metric}")
        ax.grid(alpha=0.3)
    if groups != [None]:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{sweep.name}\n(points: trials; lines: their mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(sweep: Sweep, history: Any, results: Any, sweep_dir: Path, trials_dir: Path,
                 plot: bool = True):
    """Print and save the trials table; write the best config and (with `plot`) the plot."""
    table = trials_table(sweep, history, results, trials_dir)
    if table.empty:
        print("raysim: no trial ran", file=sys.stderr)
        return table, None, None
    print(format_table(table, sweep))
    table.to_parquet(sweep_dir / "trials.parquet", index=False)
    table.to_csv(sweep_dir / "trials.csv", index=False)
    failed = int((table["status"] == "ERROR").sum())
    if failed:
        print(f"raysim: warning: {failed} of {len(table)} trials failed; see the error column "
              f"of {sweep_dir / 'trials.csv'}", file=sys.stderr)
    best_path = write_best_config(sweep, table, sweep_dir / "best_config.yaml")
    if not plot:
        return table, best_path, None
    plot_name = f"{sweep.metric.replace('/', '_')}_vs_heterogeneity.png"
    plot_path = plot_against_heterogeneity(sweep, table, sweep_dir / plot_name)
    return table, best_path, plot_path


def _plain(value: Any) -> Any:
    """numpy scalars (from the table) as plain Python values, for YAML."""
    return value.item() if hasattr(value, "item") else value
