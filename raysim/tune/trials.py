"""Sweeps on Ray Tune: each trial is one whole FL run that reports its metrics every round.

A trial reserves everything its run needs in one placement group (a bundle for the trial
driver, one for the server actor, one per worker); Tune captures the run's actors into it, so
concurrent trials never oversubscribe the cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysim.config import Config, ConfigError
from raysim.engine.cluster import connect, on_raysim_head
from raysim.engine.warm import ClusterPool, process_pool
from raysim.results.sinks import RunDirectory, Sink, extra_sinks
from raysim.run import execute, prepare, resume_run
from raysim.run.checkpoints import (
    checkpoint_dir,
    checkpoint_history,
    newest_complete,
    results_hash,
)
from raysim.tune.records import read_json
from raysim.tune.sweep import Sweep
from raysim.tune.sweep_report import write_report


@dataclass
class SweepOutcome:
    sweep_dir: Path
    table: Any  # pandas.DataFrame, one row per trial (see raysim.tune.sweep_report)
    results: Any  # ray.tune.ResultGrid
    best_config_path: Path | None
    plot_path: Path | None


class TuneReport(Sink):
    """Reports every round to Tune, with the run's checkpoint where one was written that
    round (so a failed or paused trial restores from it). Test metrics of the last evaluated
    round are carried forward (with `eval_every > 1`), so every report holds the sweep's
    metric."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}
        self.run_dir: Path | None = None

    def start(self, run: Any) -> None:
        self.run_dir = Path(run.run_dir)

    def log_round(self, result: Any) -> None:
        from ray import tune

        self.latest.update(result.metrics)
        checkpoint = None
        if result.checkpoint is not None and self.run_dir is not None:
            path = checkpoint_dir(self.run_dir, result.round)
            if path.is_dir():
                checkpoint = tune.Checkpoint.from_directory(str(path))
        tune.report({**self.latest, "round": result.round}, checkpoint=checkpoint)

    def replay(self, done: list) -> None:
        """The rounds a resumed trial had done, reported again: the resumed sweep's Tune
        experiment is a new one and has heard none of them."""
        for result in done:
            self.log_round(dataclasses.replace(result, checkpoint=None))


def trial_bundles(config: Config, driver_cpus: float = 0.0) -> list[dict[str, float]]:
    """The trial's placement group: driver first (may be empty), then server, then workers.
    Actors that request nothing need no bundle."""
    res = config.resources
    server = {"CPU": res.server.num_cpus, "GPU": res.server.num_gpus}
    worker = {"CPU": res.worker.num_cpus, "GPU": res.worker.num_gpus}
    bundles = [{"CPU": driver_cpus}, server, *[worker] * res.num_workers]
    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    children = [b for b in bundles[1:] if b]
    if not bundles[0] and not children:
        return [{"CPU": 0.001}]  # Ray needs one non-empty bundle
    return [bundles[0], *children]


def bundle_totals(bundles: list[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for bundle in bundles:
        for key, value in bundle.items():
            totals[key] += value
    return dict(totals)


def on_cpu(config: Config) -> Config:
    res = config.resources
    resources = dataclasses.replace(
        res, worker=dataclasses.replace(res.worker, num_gpus=0.0),
        server=dataclasses.replace(res.server, num_gpus=0.0))
    return dataclasses.replace(config, resources=resources)


def check_fits(sweep: Sweep, configs: list[Config], cluster: dict[str, float]) -> None:
    """ConfigError if one trial's placement group needs more than the whole cluster has."""
    for config in configs:
        need = bundle_totals(trial_bundles(config, sweep.trial_driver_cpus))
        short = {k: v for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
        if short:
            res = config.resources
            have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in short)
            wanted = ", ".join(f"{v:g} {k}" for k, v in short.items())
            raise ConfigError(
                f"resources: one trial needs {wanted} (trial driver {sweep.trial_driver_cpus:g} "
                f"CPU + server {res.server.num_cpus:g} CPU/{res.server.num_gpus:g} GPU + "
                f"{res.num_workers} workers × {res.worker.num_cpus:g} CPU/"
                f"{res.worker.num_gpus:g} GPU) but the cluster has {have}; lower "
                "resources.num_workers or the per-actor requests"
            )


def trial_config(sweep: Sweep, params: dict[str, Any], cpu_only: bool) -> Config:
    config = sweep.trial_config(params)
    return on_cpu(config) if cpu_only else config


def run_trial(params: dict[str, Any], *, sweep: Sweep, trials_dir: str, cpu_only: bool,
              resumed: bool = False, warm: bool = True) -> None:
    """One Tune trial: a whole FL run, logged to its own run directory (and W&B run). In a
    resumed sweep (`resumed`) a trial goes on from its run directory's newest checkpoint."""
    from ray import tune

    name = tune.get_context().get_trial_name()
    config = trial_config(sweep, params, cpu_only)
    settings = config.logging
    config = dataclasses.replace(config, name=name, logging=dataclasses.replace(
        settings, progress=False, wandb=dataclasses.replace(settings.wandb, group=sweep.name)))
    run_dir = Path(trials_dir) / name
    report = TuneReport()
    restored = tune.get_checkpoint()
    left_off = trial_left_off(config, run_dir) if resumed and restored is None else None
    if restored is not None:  # a restarted trial goes on from its last checkpoint
        run = restore_trial(config, run_dir, restored)
        if run is None:
            return
    elif left_off is not None:
        run, done = left_off
        report.replay(done)
        if run is None:  # it had finished
            return
    else:
        run = prepare(config, run_dir)
    sinks: list[Sink] = [RunDirectory(run.run_dir), report, *extra_sinks(config, run.run_dir)]
    # Tune gives this process to the next trial with the same resources (reuse_actors):
    # the workers and server wait here for it, warm
    execute(run, sinks, pool=process_pool() if warm else None, warm=warm)


def trial_left_off(config: Config, run_dir: Path) -> tuple[Any, list] | None:
    """Where a resumed sweep's trial left off, from its run directory alone: the run that goes
    on from its newest complete checkpoint (None when the trial had finished) and the rounds
    done before it. None when there is nothing of this trial to go on from: no checkpoint, or
    one written by another configuration (the trial then starts over)."""

    found = newest_complete(run_dir)
    if found is None or found.meta.get("results_hash") != results_hash(config):
        return None
    if found.round >= config.rounds:
        return None, checkpoint_history(found)
    run = resume_run(config, run_dir)
    return run, list(run.history)


def restore_trial(config: Config, run_dir: Path, checkpoint: Any) -> Any:
    """The trial's run continued from the checkpoint Tune kept (copied into the run directory
    when it is not there, e.g. on another node)."""
    import json
    import shutil

    with checkpoint.as_directory() as source:
        round_index = json.loads((Path(source) / "meta.json").read_text())["round"]
        target = checkpoint_dir(run_dir, round_index)
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target)
    newest = newest_complete(run_dir)  # the run may have written one Tune never heard of
    if newest is not None and newest.round >= config.rounds:  # finished: nothing left to run
        return None
    return resume_run(config, run_dir)


def trial_namer(sweep: Sweep):
    def name(trial: Any) -> str:
        return f"{sweep.name}_{trial.trial_id.rsplit('_', 1)[-1]}"

    return name


def make_history_callback(sweep: Sweep, announce: bool = True):
    """A Tune callback (built lazily: Tune is imported only for sweeps) that keeps every
    trial's reports, parameters and final status on the driver; with `announce`, one line per
    trial start and end."""
    from ray import tune

    namer = trial_namer(sweep)

    class TrialHistory(tune.Callback):
        def __init__(self) -> None:
            self.reports: dict[str, list[dict[str, Any]]] = defaultdict(list)
            self.params: dict[str, dict[str, Any]] = {}
            self.status: dict[str, str] = {}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            params = {k: trial.config.get(k) for k in sweep.keys}
            self.params[namer(trial)] = params
            self._say(f"{namer(trial)} started: {_describe(params)}")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.reports[namer(trial)].append(
                {"round": result.get("round"), sweep.metric: result.get(sweep.metric)})

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            name = namer(trial)
            self.status[name] = "TERMINATED"
            reports = self.reports.get(name, [])
            value = next((r[sweep.metric] for r in reversed(reports)
                          if r.get(sweep.metric) is not None), None)
            rounds = sweep.trial_config(self.params[name]).rounds
            stopped = f", stopped by ASHA (of {rounds})" if len(reports) < rounds else ""
            shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
            self._say(f"{name} done: {len(reports)} rounds{stopped}, {sweep.metric} {shown}")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            name = namer(trial)
            self.params.setdefault(name, {k: trial.config.get(k) for k in sweep.keys})
            self.status[name] = "ERROR"
            self._say(f"{name} failed: see {trial.error_file}")

        def _say(self, text: str) -> None:
            if announce:
                print(f"raysim: {text}", flush=True)

    return TrialHistory()


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


SWEEP_SOURCE = "sweep_source.json"  # where `raysim tune --resume` finds the sweep file


def source_of(sweep_dir: Path) -> Path:
    """The sweep file a sweep directory was started from, for `raysim tune --resume`."""
    record = Path(sweep_dir) / SWEEP_SOURCE
    if not record.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {SWEEP_SOURCE}); pass the "
                          "directory `raysim tune` printed")
    fix = "start the sweep again from its file (raysim tune SWEEP.yaml --out DIR)"
    return Path(read_json(record, {"path": str}, fix)["path"])


def run_sweep(sweep: Sweep, sweep_dir: Path, address: str | None = None,
              verbose: int = 0, resume: bool = False,
              source: Path | None = None, plot: bool = True, warm: bool = True) -> SweepOutcome:
    """Run every trial of `sweep` on the cluster at `address` (default: a local Ray) and write
    the trials table, the best config and the plot into `sweep_dir`. `verbose` is Ray Tune's
    console output (0: one raysim line per trial start and end instead). With `resume`, an
    interrupted sweep in `sweep_dir` goes on from its trials' run directories alone (Tune's
    saved state is never read): finished trials stay and report their rounds again, unfinished
    and failed ones continue from their newest raysim checkpoint. `plot`: draw the metric
    against the swept heterogeneity keys. `warm`: a trial's process and actors go on to the
    next trial with the same resources (False: every trial starts its own)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    configs = sweep.validate()
    connect(address)
    if on_raysim_head(address):  # its parked warm pools hold CPUs the trials need
        dropped = ClusterPool().drop()
        if dropped:
            print(f"raysim: the cluster's {dropped} warm actor(s) stopped to make room for "
                  "the trials", file=sys.stderr)
    cluster = ray.cluster_resources()
    cpu_only = cluster.get("GPU", 0) == 0 and any(
        c.resources.worker.num_gpus > 0 or c.resources.server.num_gpus > 0 for c in configs)
    if cpu_only:
        print("raysim: warning: the cluster reports no GPU: every trial's workers and server run "
              "on CPU", file=sys.stderr)
        configs = [on_cpu(c) for c in configs]
    check_fits(sweep, configs, cluster)

    sweep_dir = sweep_dir.resolve()
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, trials_dir=str(trials_dir),
                             cpu_only=cpu_only, resumed=resume, warm=warm),
        resources=lambda params: tune.PlacementGroupFactory(
            trial_bundles(trial_config(sweep, params, cpu_only), sweep.trial_driver_cpus)),
    )
    scheduler = None
    if sweep.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="round", max_t=max(c.rounds for c in configs),
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor)
    # The metric may be missing until the first evaluated round (eval_every > 1).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    history = make_history_callback(sweep, announce=verbose == 0)
    if resume:
        # Tune's saved experiment is a pickle, and nothing read from disk may run code: it is
        # never loaded. The sweep starts again with the same draws (its seed gives the same
        # trial names and parameters), and each trial goes on from its own run directory.
        shutil.rmtree(sweep_dir / "tune", ignore_errors=True)
    if source is not None:
        (sweep_dir / SWEEP_SOURCE).write_text(json.dumps({"path": str(Path(source).resolve())}))
    tuner = tune.Tuner(
        trainable,
        param_space={dim.key: dim.tune_domain() for dim in sweep.search},
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
            num_samples=sweep.num_samples,
            # a finished trial's process and placement group go to the next trial with the
            # same resources, with the actors it created (warm: raysim.engine.warm)
            reuse_actors=warm,
            # The generator itself limits concurrency (Tune ignores max_concurrent_trials
            # when it is given a generator).
            search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                             points_to_evaluate=sweep.drawn_points(),
                                             max_concurrent=sweep.max_concurrent_trials or 0),
            trial_name_creator=trial_namer(sweep), trial_dirname_creator=trial_namer(sweep),
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sweep_dir), verbose=verbose, callbacks=[history],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )
    results = tuner.fit()
    table, best_path, plot_path = write_report(sweep, history, results, sweep_dir, trials_dir,
                                               plot)
    return SweepOutcome(sweep_dir, table, results, best_path, plot_path)
