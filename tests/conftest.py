"""One local Ray for the whole session (2 CPUs, like CI), real torch, small data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Tests are laid out by package (tests/engine/, tests/run/, ...). Test-only methods and sinks are
# named by module path (`test_algorithms:Counting`) in configs that worker processes and CLI
# subprocesses resolve, and a few tests share helpers across folders: every folder is on the path.
FOLDERS = [str(TESTS), *sorted(str(p) for p in TESTS.iterdir()
                               if p.is_dir() and not p.name.startswith((".", "_")))]
sys.path[:0] = [f for f in FOLDERS if f not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*FOLDERS, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Torch on one thread for a test: workers in this process train with one, so the
    references computed in the test sum in their order (and tiny tensors gain nothing from a
    second thread on a loaded machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides):
    """A seconds-long digits run: 12 clients, 4 per round, 3 rounds, 1 local epoch."""
    from raysim.run.validate import config_from_dict

    raw = {
        "name": "test",
        "seed": 3,
        "rounds": 3,
        "clients_per_round": 4,
        # dirichlet's default alpha (0.5); left unset so an override may switch the kind
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "num_clients": 12}},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "resources": {"num_workers": 2, "worker": {"num_cpus": 1}},
        "logging": {"progress": False},
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])


def in_one_process(config):
    """`config` on the local backend, which gives the Ray backend's bits (test_engine checks
    it): for runs whose point is not Ray, and for the undisturbed runs faults are held to."""
    import dataclasses

    return dataclasses.replace(config, resources=dataclasses.replace(config.resources,
                                                                     backend="local"))


TIMING = {"round_seconds", "samples_per_second"}  # the only metrics that differ between runs


def run_rounds(config, tmp_path, num_workers=None, on_round=None):
    """All rounds of `config` (on the session's Ray, or in this process with the local
    backend): results, final weights, client states of clients 0–11. `on_round(simulation,
    r)` runs after each round (fault tests kill actors)."""
    from raysim.engine.simulation import Simulation
    from raysim.run import prepare

    run = prepare(config, tmp_path / f"run{num_workers}")
    simulation = Simulation(config, run.task, num_workers=num_workers)
    simulation.start()
    try:
        results = []
        for result in simulation.rounds():
            results.append(result)
            if on_round is not None:
                on_round(simulation, result.round)
        weights = simulation.global_weights()
        states = simulation.backend.get(simulation.server.states_for.remote(list(range(12))))
    finally:
        simulation.shutdown()
    return results, weights, states


def grouped_against_one_by_one(tmp_path, keys, workers=(1, 2), size=4):
    """`small_config(**keys)` in this process with client groups of `size`, once per worker
    count in `workers` (asserted to give the same bits), and one client at a time: the
    grouped run's results and the largest gap of a global weight between the two."""
    import torch

    def run(group, count):
        config = in_one_process(small_config(**{**keys, "train.client_group": group}))
        return run_rounds(config, tmp_path / f"K{group}-{count}", num_workers=count)

    (results, weights, _), *others = [run(size, count) for count in workers]
    for other_results, other_weights, _ in others:
        assert without_timing(other_results) == without_timing(results)
        assert all(torch.equal(other_weights[n], weights[n]) for n in weights)
    _, alone, _ = run(1, 2)
    return results, max((alone[n].double() - weights[n].double()).abs().max().item()
                        for n in alone if alone[n].is_floating_point())


def without_timing(results):
    return [{k: v for k, v in r.metrics.items() if k not in TIMING} for r in results]


def metrics_of(run_dir: Path) -> dict:
    """A run directory's metrics.parquet as {(round, metric): value}, timings left out."""
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(run_dir) / "metrics.parquet").to_pylist()
    return {(r["round"], r["metric"]): r["value"] for r in rows if r["metric"] not in TIMING}


def without_ray_settings(site: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment for a `raysim` process of its own: none of Ray's settings (it starts or
    joins a cluster as its command says), `site` first on PYTHONPATH, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def raysim_at_once(*commands: list[str], env: dict | list[dict], timeout: float = 300) -> list:
    """Each command in a `raysim` process of its own, all at once (most of each one's time is
    importing, which the cores share); their results (CompletedProcess) in order. `env`: one
    for every command, or one each."""
    envs = env if isinstance(env, list) else [env] * len(commands)
    started = [subprocess.Popen([sys.executable, "-m", "raysim.cli", *command], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=each,
                                cwd=ROOT) for command, each in zip(commands, envs, strict=True)]
    results = []
    for process in started:
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results
