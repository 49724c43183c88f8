"""One experiment from a validated config to a run directory.

`prepare` does everything that can fail on user input (dataset files, partition feasibility,
the run directory) before Ray starts; `execute` starts or joins Ray, runs the simulation and
feeds the sinks.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.config import Config, ConfigError, dump_config
from raysim.data import DatasetFormatError, DatasetNotFoundError, check_dataset
from raysim.task import Task, build_task


@dataclass(frozen=True)
class Run:
    config: Config
    task: Task
    run_dir: Path


def prepare(config: Config, run_dir: str | Path | None = None) -> Run:
    data = config.data
    try:
        check_dataset(data.dataset, data.root, data.download)
    except DatasetNotFoundError as error:
        raise ConfigError(str(error)) from None
    try:
        task = build_task(config)
    except DatasetFormatError as error:  # unusable file contents, named in the message
        raise ConfigError(f"data: {error}") from None
    except ValueError as error:  # an infeasible partition, e.g. too many clients for alpha
        raise ConfigError(f"data.partition: {error}") from None
    run_dir = Path(run_dir) if run_dir else default_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    write_label_histograms(task, run_dir / "label_histograms.parquet")
    return Run(config=config, task=task, run_dir=run_dir)


def default_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{name}-{stamp}", 1
    while path.exists():
        path, n = Path("runs") / f"{name}-{stamp}-{n}", n + 1
    return path


def write_label_histograms(task: Task, path: Path) -> None:
    """Per-client label counts, long format: client, label, count."""
    hist = task.partition.histograms
    clients, labels = (grid.ravel() for grid in np.indices(hist.shape))
    table = pa.table({
        "client": pa.array(clients, pa.int32()),
        "label": pa.array(labels, pa.int32()),
        "count": pa.array(hist[clients, labels], pa.int64()),
    })
    pq.write_table(table, path)


def describe_partition(task: Task) -> str:
    sizes, hist = task.partition.sizes, task.partition.histograms
    dataset = task.dataset
    val = f"{len(dataset.val.y)} val / " if dataset.val is not None else ""
    text = (
        f"{len(sizes)} clients, {int(sizes.sum())} train / {val}"
        f"{len(dataset.test.y)} test samples; "
        f"client size min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"
    )
    if task.info.kind == "segmentation":  # the histogram counts images without/with foreground
        return f"{text}; sites {', '.join(dataset.spec.domains)}"
    return f"{text}; classes per client mean {(hist > 0).sum(axis=1).mean():.1f}"


# --------------------------------------------------------------------------- Ray side


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local Ray."""
    from raysim.cluster import connect

    connect(address)


def fit_resources(config: Config, cluster: dict[str, float]) -> tuple[Config, list[str]]:
    """Adapt the resource request to the cluster: GPUs requested on a cluster without any fall
    back to CPU, and the pool shrinks to what fits. Results do not depend on the pool size."""
    res, notes = config.resources, []
    worker, server = res.worker, res.server
    if (worker.num_gpus > 0 or server.num_gpus > 0) and cluster.get("GPU", 0) == 0:
        notes.append("the cluster reports no GPU: workers and server run on CPU")
        worker = dataclasses.replace(worker, num_gpus=0.0)
        server = dataclasses.replace(server, num_gpus=0.0)
    fits = [res.num_workers]
    if worker.num_cpus > 0:
        fits.append(math.floor((cluster.get("CPU", 0) - server.num_cpus) / worker.num_cpus))
    if worker.num_gpus > 0:
        fits.append(math.floor((cluster.get("GPU", 0) - server.num_gpus) / worker.num_gpus))
    num_workers = min(fits)
    if num_workers < 1:
        raise ConfigError(
            f"resources: one worker needs {worker.num_cpus} CPU / {worker.num_gpus} GPU beside the "
            f"server's {server.num_cpus} CPU / {server.num_gpus} GPU; the cluster has "
            f"{cluster.get('CPU', 0)} CPU / {cluster.get('GPU', 0)} GPU"
        )
    if num_workers < res.num_workers:
        notes.append(f"only {num_workers} of resources.num_workers={res.num_workers} fit")
    resources = dataclasses.replace(res, num_workers=num_workers, worker=worker, server=server)
    return dataclasses.replace(config, resources=resources), notes


def execute(
    run: Run, sinks: Iterable[Any] = (), address: str | None = None,
    launched_at: float | None = None,
) -> dict[str, Any]:
    """Run the simulation; returns the summary (also given to every sink's `finish`).

    `launched_at` (a `time.perf_counter()` reading, default: now) is where the reported time to
    the first round starts counting; the CLI passes its own start.
    """
    import ray

    from raysim.cluster import placement_notes
    from raysim.engine.simulation import Simulation

    started = time.perf_counter()
    launched_at = started if launched_at is None else launched_at
    init_ray(address)
    config, notes = fit_resources(run.config, ray.cluster_resources())
    for note in notes:
        print(f"raysim: warning: {note}", file=sys.stderr)
    run = dataclasses.replace(run, config=config)
    simulation = Simulation(config, run.task)
    sinks = list(sinks)
    for sink in sinks:
        sink.start(run)
    results = []
    try:
        workers = simulation.start()
        for note in placement_notes(workers):
            print(f"raysim: warning: {note}", file=sys.stderr)
        startup = time.perf_counter() - started
        for result in simulation.rounds():
            results.append(result)
            if len(results) == 1:
                first_round = time.perf_counter() - launched_at
            for sink in sinks:
                sink.log_round(result)
    finally:
        simulation.shutdown()
    summary = summarize(run, results, startup, time.perf_counter() - launched_at)
    summary["launch_to_first_round_seconds"] = first_round
    summary["workers"] = workers
    for sink in sinks:
        sink.finish(summary)
    return summary


HEADLINE_METRIC = {"classification": "accuracy", "segmentation": "dice"}  # higher is better


def select_best(results: list, metric: str) -> dict[str, Any]:
    """The round to report: the best `val_<metric>` where the dataset has a validation split,
    else the best `test_<metric>` (which then is selection on the test set, and says so)."""
    has_val = any(f"val_{metric}" in r.metrics for r in results)
    selected_by = f"val_{metric}" if has_val else f"test_{metric}"
    best: dict[str, Any] = {"selected_by": selected_by, "round": None, f"test_{metric}": None}
    for result in results:
        value = result.metrics.get(selected_by)
        if value is not None and (best["round"] is None or value > best[selected_by]):
            best = {"selected_by": selected_by, "round": result.round, selected_by: value,
                    f"test_{metric}": result.metrics.get(f"test_{metric}")}
    return best


def summarize(run: Run, results: list, startup: float, wall: float) -> dict[str, Any]:
    final: dict[str, float] = {}
    for result in results:
        final.update(result.metrics)
    metric = HEADLINE_METRIC[run.task.info.kind]
    return {
        "name": run.config.name,
        "algorithm": run.config.algorithm.name,
        "run_dir": str(run.run_dir),
        "rounds_completed": len(results),
        "headline": f"test_{metric}",
        "final": final,
        "best": select_best(results, metric),
        "wall_seconds": wall,
        "startup_seconds": startup,
        "round_seconds": [r.seconds for r in results],
        "clients_dropped": sum(len(r.failures) for r in results),
        "num_workers": run.config.resources.num_workers,
    }
