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
from raysim.data import DatasetNotFoundError, check_dataset
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
    classes = (hist > 0).sum(axis=1)
    return (
        f"{len(sizes)} clients, {int(sizes.sum())} train / "
        f"{len(task.dataset.test.y)} test samples; "
        f"client size min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}; "
        f"classes per client mean {classes.mean():.1f}"
    )


# --------------------------------------------------------------------------- Ray side


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")


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
        simulation.start()
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
    for sink in sinks:
        sink.finish(summary)
    return summary


def summarize(run: Run, results: list, startup: float, wall: float) -> dict[str, Any]:
    final: dict[str, float] = {}
    best = {"test_accuracy": None, "round": None}
    for result in results:
        final.update(result.metrics)
        acc = result.metrics.get("test_accuracy")
        if acc is not None and (best["test_accuracy"] is None or acc > best["test_accuracy"]):
            best = {"test_accuracy": acc, "round": result.round}
    return {
        "name": run.config.name,
        "algorithm": run.config.algorithm.name,
        "run_dir": str(run.run_dir),
        "rounds_completed": len(results),
        "final": final,
        "best": best,
        "wall_seconds": wall,
        "startup_seconds": startup,
        "round_seconds": [r.seconds for r in results],
        "clients_dropped": sum(len(r.failures) for r in results),
        "num_workers": run.config.resources.num_workers,
    }
