"""Pictures of runs: a metric per round for one or several run directories (`raysim plot`),
and the small `curves.png` every launch leaves in its run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from raysim.config import ConfigError

SERIES_SEPARATOR = "/"  # test_accuracy/svhn: one series per domain or site


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run directory's metrics.parquet as {metric: [(round, value), ...]} in round order."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a raysim run directory (no metrics.parquet); pass a "
                          "directory `raysim launch` printed")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in pq.read_table(path).to_pylist():
        series.setdefault(row["metric"], []).append((int(row["round"]), float(row["value"])))
    return {name: sorted(points) for name, points in series.items()}


def headline(run_dir: Path, metrics: dict) -> str:
    """The run's headline test metric (summary.json says which), else the first one found."""
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        name = json.loads(summary.read_text()).get("headline")
        if name in metrics:
            return name
    for name in ("test_accuracy", "test_dice", "personal_test_accuracy", "personal_test_dice",
                 "train_loss"):
        if name in metrics:
            return name
    return sorted(metrics)[0]


def plot_runs(run_dirs: list[Path], metric: str | None, out: Path,
              per_series: bool = True) -> Path:
    """One PNG of `metric` per round (default: the first run's headline metric) for every run,
    with the per-domain / per-site series of that metric dashed beside it when there is one
    run. ConfigError: a directory that is not a run, or a metric a run does not have."""
    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]
    metric = metric or headline(*runs[0])
    for run_dir, metrics in runs:
        if metric not in metrics:
            have = ", ".join(sorted(m for m in metrics if SERIES_SEPARATOR not in m))
            raise ConfigError(f"{run_dir}: has no metric {metric!r}; it has: {have}")
    plt, fig, ax = _figure()
    for i, (run_dir, metrics) in enumerate(runs):
        color = f"C{i % 10}"
        rounds, values = zip(*metrics[metric])
        ax.plot(rounds, values, color=color, marker="." if len(rounds) < 40 else None,
                label=run_dir.name)
        if per_series and len(runs) == 1:
            parts = sorted(m for m in metrics if m.startswith(metric + SERIES_SEPARATOR))
            for j, name in enumerate(parts):
                rounds, values = zip(*metrics[name])
                ax.plot(rounds, values, color=f"C{(j + 1) % 10}", linestyle="--", linewidth=1,
                        label=name.split(SERIES_SEPARATOR, 1)[1])
    return _save(plt, fig, ax, metric, out)


def write_curves(run_dir: Path) -> Path | None:
    """`curves.png` in the run directory: its headline metric (and per-domain series) per
    round. None when matplotlib is missing or the run logged nothing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    if not read_metrics(run_dir):
        return None
    return plot_runs([run_dir], None, Path(run_dir) / "curves.png")


def plot_bands(curves: dict[str, list[list[tuple[int, float]]]], metric: str, out: Path,
               title: str | None = None) -> Path:
    """One line per label: the mean over its runs (seeds) of `metric` per round, with a band of
    ± one standard deviation; `curves[label]` holds each run's (round, value) points."""
    import numpy as np

    plt, fig, ax = _figure()
    for i, (label, runs) in enumerate(curves.items()):
        by_round: dict[int, list[float]] = {}
        for points in runs:
            for r, value in points:
                by_round.setdefault(r, []).append(value)
        rounds = np.array(sorted(by_round))
        if not len(rounds):
            continue
        mean = np.array([np.mean(by_round[r]) for r in rounds])
        std = np.array([np.std(by_round[r]) for r in rounds])
        color = f"C{i % 10}"
        ax.plot(rounds, mean, color=color, label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, ax, metric, out)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    return plt, fig, ax


def _save(plt, fig, ax, metric: str, out: Path) -> Path:
    ax.set(xlabel="round", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


MAX_PARTITION_CLIENTS = 200  # a figure of more clients shows the first ones


def write_partition_figure(task, out: Path) -> Path | None:
    """`partition.png`: clients × classes, a dot per class a client holds (area ∝ its count),
    coloured by the client's domain where the dataset has domains. None for generated clients
    (no labels known before training) or without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None

    partition, dataset = task.partition, task.dataset
    counts = partition.label_counts
    if counts is None or dataset.train is None:
        return None
    shown = min(partition.num_clients, MAX_PARTITION_CLIENTS)
    keep = counts.client < shown
    clients, labels, sizes = counts.client[keep], counts.label[keep], counts.count[keep]
    names = dataset.spec.domains
    plt, fig, ax = _figure()
    fig.set_size_inches(min(3 + 0.12 * shown, 16), 2 + 0.25 * dataset.spec.num_classes)
    area = 120 * sizes / max(int(sizes.max(initial=1)), 1)
    if names and dataset.train.domain is not None and partition.indices is not None:
        first = partition.indices[partition.offsets[:-1][:shown].clip(
            max=len(partition.indices) - 1)]
        domain_of = dataset.train.domain[first]
        for d, name in enumerate(names):
            mine = domain_of[clients] == d
            if mine.any():
                ax.scatter(clients[mine], labels[mine], s=area[mine], color=f"C{d % 10}",
                           label=name, alpha=0.8, linewidths=0)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.scatter(clients, labels, s=area, color="C0", alpha=0.8, linewidths=0)
    more = f" (first {shown} of {partition.num_clients})" if shown < partition.num_clients else ""
    ax.set(xlabel=f"client{more}", ylabel="class", title="samples per client and class")
    ax.set_yticks(range(dataset.spec.num_classes))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
