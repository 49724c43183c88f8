"""One experiment from a validated config to a run directory.

`prepare` does everything that can fail on user input (dataset files, partition feasibility,
the run directory) before Ray starts; `execute` starts or joins Ray, runs the simulation and
feeds the sinks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.config import Config, ConfigError, config_to_dict, dump_config, load_config
from raysim.data import DatasetFormatError, DatasetNotFoundError
from raysim.task import Task, build_task


@dataclass(frozen=True)
class Run:
    config: Config
    task: Task
    run_dir: Path
    history: tuple = ()  # RoundResults of the rounds a resumed run has done already
    restore: Any = None  # raysim.engine.simulation.Restore: where a resumed run starts


def build_checked_task(config: Config) -> Task:
    """The config's task, or a ConfigError for what the user must fix: missing or unusable
    dataset files, an infeasible partition or partition file."""
    from raysim.registry import DATASETS

    try:
        DATASETS[config.data.dataset].check(config.data)
    except DatasetNotFoundError as error:
        raise ConfigError(str(error)) from None
    except DatasetFormatError as error:  # a layout other than the one named
        raise ConfigError(f"data: {error}") from None
    from raysim.data.domain_split import DomainSelectionError

    try:
        return build_task(config)
    except DomainSelectionError as error:
        raise ConfigError(f"data.{error}") from None
    except DatasetFormatError as error:  # unusable file contents, named in the message
        raise ConfigError(f"data: {error}") from None
    except ValueError as error:  # an infeasible partition, e.g. too many clients for alpha
        raise ConfigError(f"data.partition: {error}") from None


def prepare(config: Config, run_dir: str | Path | None = None) -> Run:
    task = build_checked_task(config)
    run_dir = Path(run_dir) if run_dir else default_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    write_label_histograms(task, run_dir / "label_histograms.parquet")
    return Run(config=config, task=task, run_dir=run_dir)


def prepare_resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> Run:
    """A run directory's newest complete checkpoint as a `Run` that continues from it, or a
    ConfigError saying why it cannot: no run there, no usable checkpoint, or a config whose
    result keys differ from the checkpoint's."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a raysim run directory (no config.yaml); pass the "
                          "directory `raysim launch` printed")
    return resume_run(load_config(run_dir / "config.yaml", overrides), run_dir)


def resume_run(config: Config, run_dir: Path) -> Run:
    """`config` continued from the newest complete checkpoint in `run_dir` (see
    `prepare_resume`)."""
    from raysim.results.checkpoint import (
        RESULT_NEUTRAL,
        changed_keys,
        checkpoint_rounds,
        clean_partial,
        newest_complete,
        results_hash,
    )
    warnings: list[str] = []
    found = newest_complete(run_dir, warnings, check=check_state_files)
    for warning in warnings:
        print(f"raysim: warning: {warning}", file=sys.stderr)
    if found is None:
        what = "every checkpoint in it is damaged" if checkpoint_rounds(run_dir) else \
            "it has no checkpoint (runs write one every checkpoint.every rounds, after the " \
            "last round and on an interrupt)"
        raise ConfigError(f"{run_dir}: nothing to resume: {what}")
    saved = found.meta.get("config", {})
    if found.meta.get("results_hash") != results_hash(config):
        keys = changed_keys(saved, config_to_dict(config)) or ["(unknown)"]
        raise ConfigError(
            f"{found.path}: written by a different config: {', '.join(keys)} differ"
            f"{'s' if len(keys) == 1 else ''} from the checkpoint's; a resume may change only "
            f"{', '.join(RESULT_NEUTRAL)}")
    if saved.get("client_state", {}).get("store", "memory") != config.client_state.store:
        raise ConfigError(f"client_state.store: the checkpoint keeps client state in the "
                          f"{saved['client_state']['store']} store; resume with that store")
    if config.rounds <= found.round:
        raise ConfigError(f"rounds: the run is complete up to round {found.round} "
                          f"(rounds={config.rounds}); extend it with -o rounds=N")
    clean_partial(run_dir)
    run = prepare(config, run_dir)
    return dataclasses.replace(run, history=tuple(checkpoint_history(found)),
                               restore=restore_from(found, run_dir))


def checkpoint_history(found: Any) -> list:
    """The round results a checkpoint recorded (its metrics and failures tables)."""
    from raysim.results.records import from_parquet_bytes, results_from_tables

    return results_from_tables(from_parquet_bytes(found.read("metrics.parquet")),
                               from_parquet_bytes(found.read("failures.parquet")))


def default_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{name}-{stamp}", 1
    while path.exists():
        path, n = Path("runs") / f"{name}-{stamp}-{n}", n + 1
    return path


def write_label_histograms(task: Task, path: Path) -> None:
    """Per-client label counts, long format: client, label, count (the nonzero ones). A
    dataset that generates its clients has none until they train: no file."""
    counts = task.partition.label_counts
    if counts is None:
        return
    table = pa.table({
        "client": pa.array(counts.client, pa.int32()),
        "label": pa.array(counts.label, pa.int32()),
        "count": pa.array(counts.count, pa.int64()),
    })
    pq.write_table(table, path)


def describe_partition(task: Task) -> str:
    partition, dataset = task.partition, task.dataset
    sizes = partition.sizes
    val = f"{len(dataset.val.y)} val / " if dataset.val is not None else ""
    text = (
        f"{len(sizes)} clients, {int(sizes.sum())} train / {val}"
        f"{len(dataset.test.y)} test samples; "
        f"client size min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"
    )
    if partition.generated:
        return f"{text}; each client's samples generated when it trains"
    if task.info.kind == "segmentation":  # the histogram counts images without/with foreground
        return f"{text}; sites {', '.join(dataset.spec.domains)}"
    classes = len(partition.label_counts.count) / partition.num_clients
    return f"{text}; classes per client mean {classes:.1f}"


# --------------------------------------------------------------------------- Ray side


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local Ray."""
    from raysim.cli.cluster import connect

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

    Checkpoints are written as the rounds come (`checkpoint.every`, the last round) and when
    the run is interrupted (SIGINT/SIGTERM: the round in flight finishes first) or stopped by
    `fault_tolerance`; the summary's `status` says which: completed, interrupted or failed.
    `launched_at` (a `time.perf_counter()` reading, default: now) is where the reported time to
    the first round starts counting; the CLI passes its own start.
    """
    from raysim.cli.cluster import placement_notes
    from raysim.engine.simulation import RunStopped, Simulation

    started = time.perf_counter()
    launched_at = started if launched_at is None else launched_at
    # where start-up goes: seconds from launch to each point (summary["startup_phases"])
    phases = {"prepared": started - launched_at}
    config = run.config
    if config.resources.backend == "ray":
        import ray

        # Everything the driver imports later is imported now, before it joins the cluster:
        # a Ray job's working directory (this code) may be gone from disk once it has.
        import raysim.engine.remote
        import raysim.results.checkpoint
        import raysim.results.records  # noqa: F401

        init_ray(address)
        phases["ray_ready"] = time.perf_counter() - launched_at
        config, notes = fit_resources(run.config, ray.cluster_resources())
        for note in notes:
            print(f"raysim: warning: {note}", file=sys.stderr)
    run = dataclasses.replace(run, config=config)
    simulation = Simulation(config, run.task, run_dir=str(run.run_dir), restore=run.restore,
                            load_checkpoint=lambda: load_restore(run.run_dir, config))
    sinks = list(sinks)
    for sink in sinks:
        sink.start(run)
    results = list(run.history)
    saved = CheckpointWriter(run, simulation)
    status, stop_reason, first_round, workers, memory = "completed", None, None, [], {}
    try:
        with Interrupts(simulation, run.run_dir) as interrupts:
            workers = simulation.start()
            phases["actors_ready"] = time.perf_counter() - launched_at
            for note in placement_notes(workers):
                print(f"raysim: warning: {note}", file=sys.stderr)
            startup = time.perf_counter() - started
            try:
                for result in simulation.rounds():
                    # the checkpoint's files are written, not kept: a run keeps its records only
                    results.append(dataclasses.replace(result, checkpoint=None))
                    if first_round is None:
                        first_round = phases["first_round"] = time.perf_counter() - launched_at
                    if result.checkpoint is not None:  # before the sinks: Tune reports it
                        saved.write(result.round, result.checkpoint, results)
                    for sink in sinks:
                        sink.log_round(result)
            except RunStopped as stop:
                status, stop_reason = "failed", str(stop)
                print(f"raysim: error: {stop}", file=sys.stderr)
                done = [r for r in results if r.round <= stop.round]
                saved.write_now(stop.round, done)
            if interrupts.count:
                status = "interrupted"
                if results:
                    saved.write_now(results[-1].round, results)
            memory = peak_memory(simulation)
    finally:
        simulation.shutdown()
    summary = summarize(run, results, startup, time.perf_counter() - launched_at)
    summary.update(status=status, launch_to_first_round_seconds=first_round, workers=workers,
                   checkpoint=str(saved.last) if saved.last else None,
                   checkpoints_written=saved.written, peak_rss_mb=memory,
                   startup_phases=phases)
    if stop_reason:
        summary["stop_reason"] = stop_reason
    for sink in sinks:
        sink.finish(summary)
    return summary


def peak_memory(simulation: Any) -> dict[str, Any]:
    """Peak resident memory (MiB) of the driver, the server actor and each worker so far."""
    from raysim.engine.worker import peak_rss_mb

    try:
        *workers, server = simulation.describe()
    except simulation.backend.errors:  # an actor died at the very end: report what is known
        return {"driver": peak_rss_mb()}
    return {"driver": peak_rss_mb(), "server": server["peak_rss_mb"],
            "workers": [w["peak_rss_mb"] for w in workers]}


class CheckpointWriter:
    """Writes the run's checkpoints: the server actor's files plus the driver's records."""

    def __init__(self, run: Run, simulation: Any) -> None:
        self.run, self.simulation = run, simulation
        self.last: Path | None = None
        self.written: list[dict[str, float]] = []  # round, seconds, bytes of each one
        self.last_round = run.restore.round if run.restore is not None else None

    def write(self, round_index: int, files: dict[str, bytes], results: list) -> None:
        from raysim.results.checkpoint import META, meta_for, write_checkpoint
        from raysim.results.records import failures_table, metrics_table, to_parquet_bytes

        done = [r for r in results if r.round <= round_index]
        files = {**files,
                 "metrics.parquet": to_parquet_bytes(metrics_table(done)),
                 "failures.parquet": to_parquet_bytes(failures_table(
                     [e for r in done for e in r.events])),
                 META: json.dumps(meta_for(self.run.config, round_index), indent=1).encode()}
        start = time.perf_counter()
        self.last, pruned = write_checkpoint(self.run.run_dir, round_index, files,
                                             self.run.config.checkpoint.keep)
        self.written.append({"round": round_index, "seconds": time.perf_counter() - start,
                             "bytes": sum(len(data) for data in files.values())})
        self.last_round = round_index
        for r in pruned:
            self.simulation.release_checkpoint(r)

    def write_now(self, round_index: int, results: list) -> None:
        """A checkpoint after `round_index`, unless that round has one already."""
        if round_index < 1 or round_index == self.last_round:
            return
        self.write(round_index, self.simulation.snapshot(round_index), results)


class Interrupts:
    """SIGINT / SIGTERM during a run: the first lets the round in flight finish, then the run
    checkpoints and ends (`count` > 0); a second exits at once with 130 (the last complete
    checkpoint still resumes). Only the main thread can take signals (not a Tune trial)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, simulation: Any, run_dir: Path) -> None:
        self.simulation, self.run_dir = simulation, run_dir
        self.count = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.simulation.request_stop()
            print(f"\nraysim: {name}: finishing the round in flight, then writing a checkpoint "
                  "(again to stop at once)", file=sys.stderr, flush=True)
            return
        print(f"\nraysim: {name} again: stopped at once; continue from the last complete "
              f"checkpoint with: raysim resume {self.run_dir}", file=sys.stderr, flush=True)
        os._exit(130)


def load_restore(run_dir: Path, config: Config) -> Any:
    """The newest complete checkpoint of `run_dir` as a `Restore` (None: there is none)."""
    from raysim.results.checkpoint import newest_complete

    warnings: list[str] = []
    found = newest_complete(run_dir, warnings)
    for warning in warnings:
        print(f"raysim: warning: {warning}", file=sys.stderr)
    return None if found is None else restore_from(found, run_dir)


def check_state_files(found: Any) -> None:
    """Decode every state file of a checkpoint (before any Ray work): anything but raysim's
    safetensors state, a pickle payload included, raises StateFormatError naming the file."""
    from raysim.results.state_io import StateFormatError, unpack

    for name in found.names():
        if name.endswith(".safetensors"):
            try:
                unpack(found.read(name))
            except StateFormatError as error:
                raise StateFormatError(f"{name}: {error}") from None


def restore_from(found: Any, run_dir: Path) -> Any:
    """A verified checkpoint as the server's `Restore`: its state files, and for a disk store
    the index of every other kept checkpoint (whose files the store must keep)."""
    from raysim.engine.client_store import INDEX_FILE
    from raysim.engine.simulation import Restore
    from raysim.results.checkpoint import checkpoint_rounds, verify

    state_files = [n for n in found.names() if n.endswith(".safetensors")]
    files = {name: found.read(name) for name in state_files}
    others = {}
    if INDEX_FILE in files:
        for r, path in checkpoint_rounds(run_dir):
            if r != found.round and (path / INDEX_FILE).is_file() and verify(path) is None:
                others[r] = {INDEX_FILE: (path / INDEX_FILE).read_bytes()}
        others[found.round] = {INDEX_FILE: files[INDEX_FILE]}
    return Restore(found.round, files, others)


HEADLINE_METRIC = {"classification": "accuracy", "segmentation": "dice"}  # higher is better


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


def summarize(run: Run, results: list, startup: float, wall: float) -> dict[str, Any]:
    final: dict[str, float] = {}
    for result in results:
        final.update(result.metrics)
    metric = HEADLINE_METRIC[run.task.info.kind]
    kinds = [e["kind"] for r in results for e in r.events]
    return {
        "name": run.config.name,
        "algorithm": run.config.algorithm.name,
        "run_dir": str(run.run_dir),
        "rounds_completed": len(results),
        "headline": f"test_{metric}",
        "final": final,
        "best": select_best(results, metric, run.config.evaluation.protocol),
        "protocol": run.config.evaluation.protocol,
        "wall_seconds": wall,
        "startup_seconds": startup,
        "round_seconds": [r.seconds for r in results],
        # per round: seconds the clients spent in the method's step (the rest is the engine's)
        "client_train_seconds": [r.train_seconds for r in results],
        "clients_dropped": sum(len(r.failures) for r in results),
        "failures": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "actor_restarts": sum(kind.endswith("_restarted") for kind in kinds),
        "num_workers": run.config.resources.num_workers,
    }
