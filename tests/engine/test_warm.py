"""Warm workers: a run reloads the actors a finished run left (in this process for a sweep's
trials, on the cluster `raysim up` started for launches) and gives the cold run's bits."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import metrics_of, small_config, without_timing

from raysim.engine.head import process_alive
from raysim.engine.remote import Reloadable
from raysim.engine.warm import Pool, PoolBook, PoolShape, ProcessPool


class _Cycle:
    pass


class _FrozenRun(Reloadable):
    """A run that leaves a reference cycle and freezes the heap, as the actors do."""

    def __init__(self) -> None:
        self.cycle = _Cycle()
        self.cycle.me = self.cycle
        gc.freeze()


def test_a_reload_frees_what_the_last_run_left_frozen():
    run = _FrozenRun()
    last = weakref.ref(run.cycle)
    try:
        run.reload()
        assert last() is None  # collected, not kept frozen for the pool's lifetime
        assert run.cycle is not None and run.cycle.me is run.cycle
    finally:
        gc.unfreeze()


def shape(workers=2, cpus=1.0):
    return PoolShape(workers, (cpus, 0.0), (0.0, 0.0), False)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_book_lends_a_parked_pool_of_the_same_shape_only():
    book = PoolBook()
    me = ("host-a", os.getpid())
    assert book.lend(shape(), "digits / cnn", me).pool is None  # nothing parked yet
    book.give(Pool(shape(), ["w0", "w1"], "s", "digits / cnn"))

    lent = book.lend(shape(), "digits / cnn", me)
    assert (lent.pool.workers, lent.pool.server, lent.note) == (["w0", "w1"], "s", None)
    # lent: a second run of the same shape starts its own pool, and says why
    busy = book.lend(shape(), "digits / cnn", ("host-b", 1))
    assert busy.pool is None and busy.retired == []
    assert busy.note == (f"the warm pool is in use by another run (process {os.getpid()} on "
                         "host-a): this run starts a pool of its own")
    book.give(lent.pool)
    assert len(book.pools) == 1  # given back, not added twice

    # another dataset or model: the same processes reload, with a line saying so
    other = book.lend(shape(), "mnist_5k / mlp", me)
    assert other.pool.workers == ["w0", "w1"]
    assert other.note == ("the warm workers held digits / cnn; they reload with mnist_5k / mlp "
                          "(the same processes, no new start)")
    book.give(other.pool)

    # another shape: the parked actors go (they hold the resources), a fresh pool starts
    fresh = book.lend(shape(workers=3), "digits / cnn", me)
    assert fresh.pool is None and fresh.retired == ["w0", "w1", "s"] and book.pools == []
    assert fresh.note == ("the warm pool has 2 worker(s) × 1 CPU/0 GPU, server 0 CPU/0 GPU; "
                          "this run asks for 3 worker(s) × 1 CPU/0 GPU, server 0 CPU/0 GPU: a "
                          "fresh pool starts")


def test_a_pool_lent_to_a_driver_that_died_is_parked_again():
    import socket

    book = PoolBook()
    book.give(Pool(shape(), ["w0", "w1"], "s", "digits / cnn"))
    assert book.lend(shape(), "digits / cnn", (socket.gethostname(), dead_pid())).pool
    # its driver is gone (kill -9): the next run gets the pool
    again = book.lend(shape(), "digits / cnn", (socket.gethostname(), os.getpid()))
    assert again.pool is not None and again.pool.workers == ["w0", "w1"]
    assert book.drop() == [] and book.drop(parked_only=False) == ["w0", "w1", "s"]


def run_with_pool(config, tmp_path, name, pool):
    from raysim.engine.simulation import Simulation
    from raysim.run import prepare

    run = prepare(config, tmp_path / name)
    simulation = Simulation(config, run.task, pool=pool)
    simulation.start()
    try:
        results = list(simulation.rounds())
        weights = simulation.global_weights()
        simulation.pids = [actor["pid"] for actor in simulation.describe()]
    finally:
        simulation.shutdown()
    return simulation, without_timing(results), weights


@pytest.mark.slow
def test_warm_actors_give_the_cold_runs_bits(ray_session, tmp_path):
    import torch

    fedavg = small_config(rounds=2)
    fedprox = small_config(rounds=2, **{"algorithm.name": "fedprox", "algorithm.mu": 0.01,
                                        "data.partition.alpha": 0.3, "seed": 5})
    cold, cold_metrics, cold_weights = run_with_pool(fedavg, tmp_path, "cold", None)
    pool = ProcessPool()  # its actors hold the session's CPUs until dropped
    try:
        # another method, partition and seed fills the pool (the same dataset and model)
        first, _, _ = run_with_pool(fedprox, tmp_path, "first", pool)
        assert not first.warm and first.pool_note is None and len(pool.book.pools) == 1
        again, again_metrics, again_weights = run_with_pool(fedavg, tmp_path, "again", pool)
        assert again.warm and again.pool_note is None
        assert again.pids == first.pids  # the same processes
        # a parked actor dies: the next run starts its own, and they replace the dead pool
        ray_session.kill(pool.book.pools[0].workers[0])
        third, third_metrics, _ = run_with_pool(fedavg, tmp_path, "third", pool)
        assert not third.warm and third.pool_note == "a warm actor had died: a fresh pool starts"
        assert third_metrics == cold_metrics
        assert not set(third.pids) & set(first.pids)  # new processes
        assert len(pool.book.pools) == 1  # the dead pool replaced, not kept beside
    finally:
        for actor in pool.book.drop():
            ray_session.kill(actor)
    assert again_metrics == cold_metrics
    assert all(torch.equal(again_weights[k], cold_weights[k]) for k in cold_weights)


def raysim(*args, env, check=True):
    done = subprocess.run([str(Path(sys.executable).parent / "raysim"), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_launches_on_a_raysim_up_cluster_are_warm_after_the_first(tmp_path):
    env = {**os.environ, "RAYSIM_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "rounds": 2, "clients_per_round": 4,
        "data": {"partition": {"num_clients": 12}}, "train": {"local_epochs": 1},
        "logging": {"progress": False, "curves": False}}))

    up = raysim("up", "--num-cpus", "3", env=env)
    try:
        record = json.loads((tmp_path / "home" / "cluster.json").read_text())
        assert up.stdout.startswith(f"raysim: Ray cluster up at {record['address']} (3 CPUs")
        again = raysim("up", env=env, check=False)
        assert again.returncode == 2 and again.stderr.splitlines() == [
            f"raysim: error: up: a cluster started by `raysim up` is already running at "
            f"{record['address']} (process {record['pid']}, since {record['started']}); "
            "`raysim launch` joins it by itself; stop it with `raysim down`"]

        runs = [tmp_path / "cold", tmp_path / "warm"]
        for run_dir in runs:
            raysim("launch", str(config), "--run-dir", str(run_dir), env=env)
        cold, warm = (json.loads((d / "summary.json").read_text()) for d in runs)
        assert (cold["warm_workers"], warm["warm_workers"]) == (False, True)
        # the same worker processes, and the same bits
        assert [w["pid"] for w in warm["workers"]] == [w["pid"] for w in cold["workers"]]
        assert metrics_of(runs[1]) == metrics_of(runs[0])
        assert pq.read_table(runs[1] / "metrics.parquet").num_rows > 0
    finally:
        down = raysim("down", env=env, check=False)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"raysim: stopped the Ray cluster at {record['address']} and its " \
        "warm workers\n"
    assert not Path(record["temp_dir"]).exists()
    assert not process_alive(record["pid"])
    nothing = raysim("down", env=env, check=False)
    assert nothing.returncode == 2 and nothing.stderr == (
        "raysim: error: down: no cluster started by `raysim up` is running; nothing to stop\n")
