"""Executing a prepared run: join or start Ray, run the rounds, feed the sinks, write the
checkpoints as they come, and summarise."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from raysim.engine.cluster import (
    cluster_address,
    connect,
    fit_resources,
    on_raysim_head,
    placement_notes,
)
from raysim.engine.simulation import ClusterFailed, RunStopped, Simulation
from raysim.engine.warm import ClusterPool, WarmPool
from raysim.engine.worker import peak_rss_mb
from raysim.registry import SHIPPED_ENV
from raysim.run.checkpoints import CheckpointWriter, load_restore
from raysim.run.interrupts import Interrupts
from raysim.run.plugins import plugin_packages, shipped_entry_points
from raysim.run.prepare import Run
from raysim.run.summary import summarize
from raysim.types import RunSummary


def execute(
    run: Run, sinks: Iterable[Any] = (), address: str | None = None,
    launched_at: float | None = None, pool: WarmPool | None = None, warm: bool = True,
) -> RunSummary:
    """Run the simulation; returns the summary (also given to every sink's `finish`).

    Checkpoints are written as the rounds come (`checkpoint.every`, the last round) and when
    the run is interrupted (SIGINT/SIGTERM: the round in flight finishes first) or stopped by
    `fault_tolerance`; the summary's `status` says which: completed, interrupted or failed.
    `launched_at` (a `time.perf_counter()` reading, default: now) is where the reported time to
    the first round starts counting; the CLI passes its own start. `pool`: where the run's
    actors come from and go back to (`raysim.engine.warm`); on the cluster `raysim up`
    started, its warm pool unless `warm` is False (fresh actors, ended with the run).
    """
    started = time.perf_counter()
    launched_at = started if launched_at is None else launched_at
    # where start-up goes: seconds from launch to each point (summary.startup_phases)
    phases = {"prepared": started - launched_at}
    config = run.config
    if config.resources.backend == "ray":
        import ray  # the local backend runs without it

        # Everything the driver imports later is imported now, before it joins the cluster:
        # a Ray job's working directory (this code) may be gone from disk once it has.
        import raysim.engine.remote  # noqa: F401

        # a joined cluster's workers get the run's plug-in packages; local ones import them here
        if cluster_address(address):
            shipped = json.dumps(shipped_entry_points(config))
            packages = plugin_packages(config)
            connect(address, packages, {SHIPPED_ENV: shipped})
            # a warm actor has the packages of the run that created it: plug-ins start cold
            if pool is None and warm and on_raysim_head(address) and not packages:
                pool = ClusterPool()
        else:
            dashboard = connect(address, resources=config.resources)
            if dashboard:
                print(f"raysim: Ray dashboard at {dashboard}", file=sys.stderr)
        phases["ray_ready"] = time.perf_counter() - launched_at
        config, notes = fit_resources(run.config, ray.cluster_resources())
        for note in notes:
            print(f"raysim: warning: {note}", file=sys.stderr)
    run = dataclasses.replace(run, config=config)
    simulation = Simulation(config, run.task, run_dir=str(run.run_dir), restore=run.restore,
                            load_checkpoint=lambda: load_restore(run.run_dir, config),
                            pool=pool)
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
            if simulation.pool_note:
                print(f"raysim: {simulation.pool_note}", file=sys.stderr)
            for note in placement_notes(workers):
                print(f"raysim: warning: {note}", file=sys.stderr)
            startup = time.perf_counter() - started
            try:
                for result in simulation.rounds():
                    # the checkpoint's files are written, not kept: a run keeps its records only;
                    # per-client rows only for the newest round (the sinks wrote the others)
                    if results and results[-1].client_metrics:
                        results[-1] = dataclasses.replace(results[-1], client_metrics=())
                    results.append(dataclasses.replace(result, checkpoint=None))
                    if first_round is None:
                        first_round = phases["first_round"] = time.perf_counter() - launched_at
                    # before the sinks (Tune reports it); once in place it does not raise,
                    # so the round's rows follow, and a resume restores them from it if the
                    # driver dies in between
                    if result.checkpoint is not None:
                        saved.write(result.round, result.checkpoint, results)
                    for sink in sinks:
                        sink.log_round(result)
            except RunStopped as stop:
                status, stop_reason = "failed", str(stop)
                print(f"raysim: error: {stop}", file=sys.stderr)
                done = [r for r in results if r.round <= stop.round]
                if not isinstance(stop, ClusterFailed):  # else no server is left to ask
                    saved.write_now(stop.round, done)
            if interrupts.count and not simulation.cluster_failed:
                status = "interrupted"
                if results:
                    saved.write_now(results[-1].round, results)
            memory = peak_memory(simulation)
    finally:
        simulation.shutdown()
    summary = summarize(
        run, results, startup, time.perf_counter() - launched_at, status=status,
        launch_to_first_round_seconds=first_round, workers=workers,
        checkpoint=str(saved.last) if saved.last else None, checkpoints_written=saved.written,
        peak_rss_mb=memory, startup_phases=phases, stop_reason=stop_reason,
        warm_workers=simulation.warm)
    for sink in sinks:
        sink.finish(summary)
    return summary


def peak_memory(simulation: Any) -> dict[str, Any]:
    """Peak resident memory (MiB) of the driver, the server actor and each worker so far;
    with workers on GPUs, each one's GPU memory too (`raysim.engine.worker.gpu_memory_mb`)."""
    if getattr(simulation, "cluster_failed", False):  # the actors went with the cluster
        return {"driver": peak_rss_mb()}
    try:
        *workers, server = simulation.describe()
    except simulation.backend.errors:  # an actor died at the very end: report what is known
        return {"driver": peak_rss_mb()}
    memory = {"driver": peak_rss_mb(), "server": server["peak_rss_mb"],
              "workers": [w["peak_rss_mb"] for w in workers]}
    if any(w.get("gpu_mb") for w in workers):
        memory["workers_gpu"] = [w.get("gpu_mb") for w in workers]
    return memory
