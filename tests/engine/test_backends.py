"""The backends the round loop talks to: the in-process one runs each call at once and keeps
its outcome (an error included) in the ref; the Ray one reports dead actors; and the two give
the same round, bit for bit, for the same clients, however they are spread over workers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config

from raysim.engine.backends import LocalActor, LocalBackend, LocalRef, RayBackend, make_backend
from raysim.task import build_task


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add(self, a: int, b: int) -> int:
        self.calls.append((a, b))
        return a + b

    def fail(self) -> None:
        raise ValueError("no such client")


def test_a_local_call_runs_at_once_and_refs_passed_on_are_resolved():
    backend = LocalBackend()
    counter = Counter()
    actor = LocalActor(counter)
    first = actor.add.remote(1, 2)
    assert counter.calls == [(1, 2)] and isinstance(first, LocalRef)
    second = actor.add.remote(first, backend.put(10))  # refs as arguments, as Ray allows
    assert counter.calls[-1] == (3, 10)
    assert backend.get(second) == 13 and backend.get([first, second]) == [3, 13]
    assert backend.get(7) == 7  # a plain value is its own result


def test_a_local_error_waits_in_its_ref_until_the_result_is_used():
    backend = LocalBackend()
    actor = LocalActor(Counter())
    ref = actor.fail.remote()  # the caller goes on, as with a Ray ref
    assert not backend.succeeded(ref) and backend.succeeded(actor.add.remote(1, 1))
    with pytest.raises(ValueError, match="no such client"):
        backend.get(ref)
    with pytest.raises(ValueError, match="no such client"):
        actor.add.remote(ref, 1).result()  # a call given a failed ref fails with its error
    # no actor can die in-process: every error is the method's, raised to the caller
    assert backend.errors == () and backend.alive(actor)


def test_local_sharing_is_the_objects_themselves():
    dataset, split = object(), object()
    assert LocalBackend().share(dataset, split) == (dataset, split)
    assert isinstance(make_backend("local"), LocalBackend)


class ImportedRay(AssertionError):
    """A run on the local backend imported Ray."""


def test_a_local_run_never_imports_ray(tmp_path):
    script = f"""
import json, sys
from conftest import small_config
from raysim.engine.simulation import Simulation
from raysim.run import prepare
config = small_config(**{{"resources.backend": "local", "rounds": 1}})
simulation = Simulation(config, prepare(config, {str(tmp_path)!r}).task)
simulation.start()
results = list(simulation.rounds())
print(json.dumps({{"clients_ok": results[-1].metrics["clients_ok"],
                  "ray": sorted(m for m in sys.modules if m.split(".")[0] == "ray")}}))
"""
    tests = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(tests)})
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["clients_ok"] == 4
    if outcome["ray"]:
        raise ImportedRay(f"imported {outcome['ray'][:3]}")


def one_round(backend, groups: list[list[int]], spare: list | None = None):
    """Round 1 of the small config through `backend`: one worker per group and a server, as
    the simulation drives them. The server's report and its weights after the round. With
    `spare`, the first worker is put there instead of being ended (a test kills it)."""
    config = small_config(**{"algorithm.name": "test_algorithms:Counting"})
    task = build_task(config)
    partition = task.partition
    shared = backend.share(task.dataset, (partition.offsets, partition.indices))
    workers = [backend.worker(config, shared, task.info) for _ in groups]
    server = backend.server(config, (task.info, None, None), False)
    try:
        broadcast = server.broadcast.remote(1)
        refs = [worker.train.remote(broadcast, 1, group, server.states_for.remote(group))
                for worker, group in zip(workers, groups)]
        report = backend.get(server.aggregate.remote(1, sum(map(len, groups)), True, *refs))
        weights = backend.get(server.weights.remote())
    finally:
        if spare is not None:
            spare.append(workers.pop(0))
        for actor in [*workers, server]:
            backend.kill(actor)
    timings = {"client_seconds": {}, "train_seconds": 0.0, "server_seconds": 0.0}
    return dataclasses.replace(report, **timings), weights


@pytest.fixture(scope="module")
def ray_round(ray_session):
    """Round 1 on two Ray workers ([8, 2] and [11, 5]): the report, the weights, and its first
    worker, left alive for the dead-actor test (one actor start fewer)."""
    spare: list = []
    try:
        report, weights = one_round(RayBackend(), [[8, 2], [11, 5]], spare)
        yield report, weights, spare[0]
    finally:
        for worker in spare:  # where that test did not end it
            RayBackend().kill(worker)


@pytest.mark.slow
def test_ray_and_in_process_give_the_same_round_for_the_same_clients(ray_round):
    clients = [2, 5, 8, 11]
    local_report, local_weights = one_round(LocalBackend(), [clients])
    ray_report, ray_weights, _ = ray_round
    assert ray_report == local_report  # metrics, failures, the checkpoint's files
    assert local_report.metrics["clients_ok"] == 4 and local_report.checkpoint
    assert local_report.metrics["participations"] == 1.0
    assert list(ray_weights) == list(local_weights)
    assert all(torch.equal(ray_weights[k], local_weights[k]) for k in local_weights)


@pytest.mark.slow
def test_ray_reports_a_killed_actor_and_the_lost_results(ray_round):
    backend = make_backend("ray")
    assert isinstance(backend, RayBackend)
    worker = ray_round[2]  # a worker actor holding its dataset, idle
    pid = backend.get(worker.ping.remote())
    assert pid != os.getpid() and backend.alive(worker)
    assert backend.succeeded(worker.ping.remote())
    value = backend.put({"w": torch.arange(3)})
    assert torch.equal(backend.get(value)["w"], torch.arange(3))
    backend.kill(worker)
    # the kill is asynchronous: a ping that times out meanwhile reads as a busy, live actor
    deadline = time.monotonic() + 60
    while backend.alive(worker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not backend.alive(worker)
    lost = worker.ping.remote()  # a call to the dead actor: its result never comes
    assert not backend.succeeded(lost)
    with pytest.raises(backend.errors):
        backend.get(lost)
