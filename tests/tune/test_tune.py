"""Sweeps on Ray Tune, for real: tiny digits runs as trials, per-round reports, ASHA, the best
config, W&B runs per trial; and the sweep-file mistakes that stop a sweep before any trial."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import metrics_of

from raysim.cli.main import main
from raysim.results.metric_names import check_metric, default_mode
from raysim.run.checkpoints import newest_complete
from raysim.run.validate import load_config
from raysim.tune.sweep import load_sweep, parse_sweep
from raysim.tune.trials import run_sweep, trial_bundles

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "yaml" / "quickstart.yaml"
TINY = {  # seconds per trial: 12 clients, 4 per round, 1 local epoch, one worker per trial
    "clients_per_round": 4, "data.partition.num_clients": 12, "train.local_epochs": 1,
    "resources.num_workers": 1, "logging.progress": False,
}
# Where what a test checks is the sweep's (scheduling, resume), each run trains in its trial's
# process; the grid sweep runs its trials' workers as Ray actors.
IN_TRIAL = {**TINY, "resources.backend": "local"}


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, parts = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    pos = 7  # file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


class RunsCode:
    """Unpickles by running `code`."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def rows_of(run_dir: Path) -> dict:
    """A run directory's metrics.parquet as {(round, metric): value}, timings included."""
    table = pd.read_parquet(run_dir / "metrics.parquet")
    return {(r, m): v for r, m, v in zip(table["round"], table["metric"], table["value"])}


def write_sweep(folder: Path, **fields) -> Path:
    spec = {"name": "tiny", "experiment": str(QUICKSTART), "overrides": {**TINY, "rounds": 3},
            "metric": "test_accuracy", **fields}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tune_error(path: Path, capsys) -> str:
    assert main(["tune", str(path), "--out", str(path.parent / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error: "), err
    return err[0]


@pytest.mark.slow
def test_grid_sweep_reports_every_round_and_writes_the_best_config(
        ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    path = write_sweep(tmp_path, search={"data.partition.alpha": {"grid": [0.3, 3.0]}},
                       overrides={**TINY, "rounds": 3, "logging.wandb.mode": "offline",
                                  "logging.wandb.tags": ["ci"]})
    outcome = run_sweep(load_sweep(path), tmp_path / "out")

    # Tune saw one report per round from each trial.
    assert len(outcome.results) == 2 and not outcome.results.errors
    for result in outcome.results:
        assert list(result.metrics_dataframe["round"]) == [1, 2, 3]
        assert result.metrics_dataframe["test_accuracy"].notna().all()

    table = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert sorted(table["data.partition.alpha"]) == [0.3, 3.0]
    assert list(table["rounds"]) == [3, 3] and set(table["status"]) == {"TERMINATED"}
    assert table.equals(outcome.table)
    assert (tmp_path / "out" / "trials.csv").is_file()
    assert (tmp_path / "out" / "test_accuracy_vs_heterogeneity.png").stat().st_size > 0

    # The best config loads as an experiment and holds the winning trial's values.
    winner = table.loc[table["final_test_accuracy"].idxmax()]
    best = load_config(outcome.best_config_path)
    assert best.data.partition.params.alpha == winner["data.partition.alpha"]
    assert best.rounds == 3 and best.data.partition.num_clients == 12
    assert best.logging.wandb.group is None  # the trials' W&B grouping is not carried over

    # Each trial wrote its own run directory and one offline W&B run, grouped by the sweep.
    for name in table["trial"]:
        run_dir = tmp_path / "out" / "trials" / name
        accuracy = pd.read_parquet(run_dir / "metrics.parquet").query("metric == 'test_accuracy'")
        assert list(accuracy["round"]) == [1, 2, 3]
        (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        records = wandb_records(record)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.display_name, list(run.tags)) == ("tiny", name, ["ci"])
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json
                       for item in r.history.item}
                history[int(row["_step"])] = row
        logged = [float(history[step]["test_accuracy"]) for step in (1, 2, 3)]
        assert logged == list(accuracy["value"])
        assert any(key.startswith("label_histograms/") for key in history[0])  # a table


@pytest.mark.slow
def test_asha_stops_a_trial_that_does_not_learn(ray_session, tmp_path):
    # One trial at a time, the good one first: by its first round the near-zero learning rate
    # is already behind, and ASHA (grace period 1 round) stops it there.
    path = write_sweep(
        tmp_path, search={"train.lr": {"grid": [0.05, 1e-7]}}, metric="train_loss",
        mode="min", max_concurrent_trials=1, overrides={**IN_TRIAL, "rounds": 4},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    outcome = run_sweep(load_sweep(path), tmp_path / "out")
    rounds = dict(zip(outcome.table["train.lr"], outcome.table["rounds"]))
    assert rounds[0.05] == 4
    assert rounds[1e-7] < 4
    reported = {r.config["train.lr"]: len(r.metrics_dataframe) for r in outcome.results}
    assert reported == rounds


def test_unknown_search_key_is_named_with_a_suggestion(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"data.partiton.alpha": {"grid": [0.1, 1.0]}})
    error = tune_error(path, capsys)
    assert "unknown key 'data.partiton' for dataset 'digits'; did you mean 'data.partition'?" \
        in error


def test_empty_search_space(tmp_path, capsys):
    assert "search: empty search space" in tune_error(write_sweep(tmp_path, search={}), capsys)


def test_per_key_draws_give_each_key_its_own_values_and_grids_still_multiply_them(
        tmp_path, capsys):
    search = {"train.lr": {"loguniform": [0.001, 0.1]}, "train.momentum": {"uniform": [0, 0.9]},
              "data.partition.alpha": {"grid": [0.1, 1.0]}}
    sweep = load_sweep(write_sweep(tmp_path, search=search, num_samples=3, seed=7,
                                   draws="per_key"))
    points = sweep.drawn_points()
    assert [sorted(p) for p in points] == [["train.lr", "train.momentum"]] * 3
    alone = load_sweep(write_sweep(tmp_path, search={"train.lr": search["train.lr"]},
                                   num_samples=3, seed=7, draws="per_key"))
    assert [p["train.lr"] for p in alone.drawn_points()] == [p["train.lr"] for p in points]
    assert len({p["train.momentum"] for p in points}) == 3
    assert all(0.001 <= p["train.lr"] <= 0.1 and 0 <= p["train.momentum"] <= 0.9
               for p in points)
    assert load_sweep(write_sweep(tmp_path, search=search, seed=7)).drawn_points() == []
    assert "draws: must be one of tune, per_key (got 'paired')" in tune_error(
        write_sweep(tmp_path, search=search, draws="paired"), capsys)


def test_metric_that_no_algorithm_reports(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"train.lr": {"grid": [0.01]}}, metric="test_acuracy")
    error = tune_error(path, capsys)
    assert "no algorithm reports 'test_acuracy'; did you mean 'test_accuracy'?" in error


def test_metric_missing_for_one_searched_algorithm(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"algorithm.name": {"grid": ["fedproto", "fedavg"]}},
                       metric="anchor_cosine",
                       overrides={**TINY, "rounds": 3, "diagnostics.anchors": True})
    assert "'anchor_cosine' is not reported by fedavg (in" in tune_error(path, capsys)
    path = write_sweep(tmp_path, search={"algorithm.name": {"grid": ["fedproto"]}},
                       metric="anchor_cosine")
    assert "need diagnostics.anchors: true" in tune_error(path, capsys)


def test_sampled_bounds_are_validated(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"train.lr": {"uniform": [0, 0.1]}})
    error = tune_error(path, capsys)
    assert "search point train.lr=0.0: train.lr: must be > 0" in error
    path = write_sweep(tmp_path, search={"data.partition.num_clients": {"randint": [2, 20]}})
    assert "clients_per_round: 4 > data.partition.num_clients (2)" in tune_error(path, capsys)


def test_misspelt_override_and_impossible_grace_period(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"train.lr": {"grid": [0.01]}},
                       overrides={"train.lrr": 0.1})
    assert "overrides: unknown key 'train.lrr'; did you mean 'train.lr'?" in \
        tune_error(path, capsys)
    path = write_sweep(tmp_path, search={"train.lr": {"grid": [0.01]}},
                       scheduler={"name": "asha", "grace_period": 5})
    assert "scheduler.grace_period: 5 > rounds (3)" in tune_error(path, capsys)


def test_sweep_larger_than_the_cluster(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, search={"train.lr": {"grid": [0.01, 0.05]}},
                       overrides={**TINY, "resources.num_workers": 3})
    error = tune_error(path, capsys)
    assert "resources: one trial needs 3 CPU" in error and "the cluster has 2 CPU" in error
    assert not (tmp_path / "out" / "trials").exists()


def test_algorithm_search_validates_each_algorithm_with_its_own_params(tmp_path):
    raw = {"experiment": str(QUICKSTART), "overrides": {"algorithm.name": "fedprox",
                                                        "algorithm.mu": 0.5},
           "search": {"algorithm.name": {"grid": ["fedavg", "fedprox", "fedproto"]}},
           "algorithm_params": {"fedproto": {"lam": 2.0}}}
    sweep = parse_sweep(raw, tmp_path)
    configs = {c.algorithm.name: c.algorithm.params for c in sweep.validate()}
    assert configs["fedprox"].mu == 0.5  # the base's own algorithm keeps its keys
    assert configs["fedproto"].lam == 2.0
    assert not hasattr(configs["fedavg"], "mu")
    raw["search"] = {"algorithm.name": {"grid": ["fedavg", "fedprox"]},
                     "algorithm.mu": {"grid": [0.1]}}
    with pytest.raises(ValueError, match="algorithm.name=fedavg.*unknown key 'algorithm.mu'"):
        parse_sweep(raw, tmp_path).validate()


def test_reportable_metrics_include_segmentation_and_domains():
    config = load_config(QUICKSTART)
    for metric in ("test_accuracy", "val_dice", "test_hd95", "test_asd", "test_accuracy/svhn",
                   "train_loss", "samples_per_second"):
        check_metric(metric, [config])
    assert default_mode("test_hd95") == "min" and default_mode("val_dice") == "max"


def test_trial_placement_group_has_driver_server_and_worker_bundles():
    config = load_config(QUICKSTART, ["resources.num_workers=4", "resources.worker.num_gpus=0.25",
                                      "resources.server.num_cpus=1"])
    assert trial_bundles(config, driver_cpus=0.5) == [
        {"CPU": 0.5}, {"CPU": 1.0}, *[{"CPU": 1.0, "GPU": 0.25}] * 4]
    assert trial_bundles(load_config(QUICKSTART))[0] == {}  # the driver reserves nothing


def test_bundled_sweeps_are_valid():
    for path in sorted((ROOT / "yaml" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.search and sweep.validation_points()


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_its_trials_from_their_checkpoints(ray_session, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from raysim.results.sinks import RunDirectory
    from raysim.run import execute, prepare

    path = write_sweep(tmp_path, overrides={**IN_TRIAL, "rounds": 6, "checkpoint.every": 2},
                       search={"train.lr": {"grid": [0.05, 0.1]}}, max_concurrent_trials=1)
    out = tmp_path / "out"
    # the sweep's drivers join the tests' Ray (its token is the local one)
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sweep = subprocess.Popen([sys.executable, "-m", "raysim.cli", "tune", str(path), "--out",
                              str(out)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("trials/*/checkpoints/round-000002/MANIFEST.json")):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read()
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)  # Tune stops the sweep and saves its state
    sweep.communicate(timeout=120)
    # What each trial had done: a trial that goes on keeps these rows (their timings too)
    before = {run_dir.name: (newest_complete(run_dir).round, rows_of(run_dir))
              for run_dir in (out / "trials").iterdir() if newest_complete(run_dir)}
    assert before
    # Tune's saved experiment is a pickle; resuming never loads it (this one would leave a file)
    marker = tmp_path / "unpickled"
    saved = out / "tune" / "tuner.pkl"
    assert saved.is_file()
    saved.write_bytes(pickle.dumps(RunsCode(f"open({str(marker)!r}, 'w').close()")))
    # resumed in this process, on the tests' Ray (the sweep above was a `raysim` of its own)
    assert main(["tune", "--resume", str(out)]) == 0
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    # Tune heard every round of every trial once, the ones done before the resume included
    for results in out.glob("tune/*/result.json"):
        rounds = [json.loads(line)["round"] for line in results.read_text().splitlines()]
        assert rounds == [1, 2, 3, 4, 5, 6], rounds
    # a trial that had a checkpoint went on from it: its earlier rounds are the same rows,
    # timings included (a trial run again would have measured other seconds)
    for name, (done, rows) in before.items():
        after = rows_of(out / "trials" / name)
        checkpointed = {key: value for key, value in rows.items() if key[0] <= done}
        assert any(key[1] == "round_seconds" for key in checkpointed)
        assert {key: after[key] for key in checkpointed} == checkpointed
    assert not marker.exists()
    for run_dir in (out / "trials").iterdir():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds_completed"] == 6
        # whether it was cut short or not, each trial equals its config run in one go
        config = load_config(run_dir / "config.yaml")
        execute(prepare(config, tmp_path / run_dir.name), [RunDirectory(tmp_path / run_dir.name)])
        assert metrics_of(run_dir) == metrics_of(tmp_path / run_dir.name)

