"""Durable runs on a real Ray: resume after `kill -9` of the driver is bit-exact for every kind
of state, dead worker and server actors are replaced without changing a bit, interrupts
checkpoint and exit 130, clients are retried and dropped with records, and damaged or foreign
checkpoints are refused without running anything."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from conftest import in_one_process, metrics_of, run_rounds, small_config, without_timing

from raysim.config import ConfigError, config_to_dict
from raysim.engine.client_store import INDEX_FILE, DiskStore, MemoryStore
from raysim.engine.server import SERVER_FILE
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare, prepare_resume
from raysim.run.checkpoints import MANIFEST, newest_complete, write_checkpoint
from raysim.run.validate import config_from_dict, load_config
from raysim.state_io import StateFormatError, pack, unpack

ROOT = Path(__file__).resolve().parents[2]

TINY_FEDHPRO = {"hp_steps": 3, "meta_steps": 5, "crt_epochs": 3, "batch_real": 8,
                "meta_length": 5}
METHODS = {
    "fedavg": {"algorithm": {"name": "fedavg"}},
    "moon": {"algorithm": {"name": "moon"}},  # client state: the previous local model
    "fedproto": {"algorithm": {"name": "fedproto"}},
    "fedtgp": {"algorithm": {"name": "fedtgp", "server_epochs": 5}},  # trained server module
    "fedhpro_official": {"algorithm": {"name": "fedhpro", **TINY_FEDHPRO}},
    "fedhpro_paper": {"algorithm": {"name": "fedhpro_paper", **TINY_FEDHPRO}},
    "fedbcs": {  # kept Adam moments per client
        "data": {"dataset": "synthetic_organ",
                 "partition": {"kind": "domains", "num_clients": 4},
                 "sites": 4, "train_per_site": 6, "val_per_site": 2, "test_per_site": 2,
                 "image_size": 32},
        "model": {"name": "unet", "width": 4},
        "clients_per_round": 3, "eval_batch_size": 4,
        "algorithm": {"name": "fedbcs"},
        "train": {"optimizer": "adam", "lr": 0.003, "momentum": 0.0, "batch_size": 4,
                  "keep_optimizer_state": True},
    },
}

# clients trained in groups of 2 (vectorised): the same bits across a resume
GROUPED = {"fedprox_grouped": {"algorithm": {"name": "fedprox"},
                               "train": {"client_group": 2}}}


def tiny_raw(method: str, rounds: int = 6) -> dict:
    raw = config_to_dict(small_config(rounds=rounds))
    raw["checkpoint"] = {"every": 2, "keep": 2}
    raw["resources"]["num_workers"] = 1  # results do not depend on it; starts are cheaper
    for key, value in {**METHODS, **GROUPED}[method].items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "algorithm" \
            else value
    return raw


def final_state(run_dir: Path):
    found = newest_complete(run_dir)
    return found.round, unpack(found.read(SERVER_FILE))


def assert_same_state(a, b) -> None:
    assert type(a) is type(b)
    flat_a, flat_b = pack(a), pack(b)
    assert flat_a == flat_b  # every tensor, every number, bit for bit


def session_env() -> dict:
    """Subprocess drivers join the tests' Ray (their token is the local one)."""
    return {**os.environ, "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raysim.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=session_env(), **kwargs)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended before {path} appeared:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def reference_run(raw: dict, run_dir: Path) -> dict:
    """The undisturbed run, in this process (the local backend gives the Ray backend's bits:
    test_engine checks it)."""
    config = config_from_dict(raw, ["resources.backend=local"])
    execute(prepare(config, run_dir), [RunDirectory(run_dir)])
    return metrics_of(run_dir)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """`reference(method)`: the undisturbed run of `tiny_raw(method)`, made once for the
    module's tests: its run directory (read only: a test that cuts it copies it) and metrics."""
    folder, made = tmp_path_factory.mktemp("references"), {}

    def reference(method: str) -> tuple[Path, dict]:
        if method not in made:
            made[method] = folder / method, reference_run(tiny_raw(method), folder / method)
        return made[method]

    return reference


# ------------------------------------------------------------------ resume after kill -9


@pytest.mark.slow
@pytest.mark.parametrize("method", [*METHODS, *GROUPED])
def test_every_kind_of_state_resumes_from_a_checkpoint_bit_exactly(ray_session, tmp_path,
                                                                   method, references):
    """The undisturbed run cut back to its round-4 checkpoint (the round-6 one deleted, as if
    the driver died before writing it) and resumed gives that run's metrics and final server
    state: every kind of method state round-trips through a checkpoint. The richest server
    resumes on Ray, across backends (FedBCS's clients do so in the kill -9 test below); the
    others in this process, which is quicker."""
    reference_dir, expected = references(method)
    run_dir = tmp_path / "cut"
    shutil.copytree(reference_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "round-000006")
    (run_dir / "summary.json").unlink()
    backend = "ray" if method == "fedhpro_paper" else "local"
    run = prepare_resume(run_dir, [f"resources.backend={backend}"])
    assert len(run.history) == 4
    execute(run, [RunDirectory(run_dir)])
    assert metrics_of(run_dir) == expected
    (r1, state), (r2, reference) = final_state(run_dir), final_state(reference_dir)
    assert r1 == r2 == 6
    assert_same_state(state, reference)


def kill_9_after_round_2(config_file: Path, run_dir: Path) -> None:
    """`raysim launch` of `config_file` in a process of its own, killed with SIGKILL as soon as
    its round-2 checkpoint is complete (mid-run: no summary.json)."""
    driver = cli("launch", str(config_file), "--run-dir", str(run_dir), "--quiet")
    wait_for(run_dir / "checkpoints" / "round-000002" / MANIFEST, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # it really died mid-run


@pytest.mark.slow
# the richest clients (kept Adam moments)
@pytest.mark.parametrize("method", ["fedbcs"])
def test_resume_after_kill_9_of_the_driver_is_bit_exact(ray_session, tmp_path, method,
                                                        references, capsys):
    from raysim.cli.main import main

    reference_dir, expected = references(method)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_raw(method)))
    run_dir = tmp_path / "killed"
    kill_9_after_round_2(config_file, run_dir)
    # `raysim resume` in this process, on the tests' Ray (the killed driver was a process)
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert "resuming after round" in capsys.readouterr().out
    assert metrics_of(run_dir) == expected
    (r1, state), (r2, reference) = final_state(run_dir), final_state(reference_dir)
    assert r1 == r2 == 6
    assert_same_state(state, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 6


@pytest.mark.slow
def test_resume_extends_a_completed_run_like_a_longer_one(ray_session, tmp_path, references):
    # in one process: resuming on Ray is the tests above and below
    short = config_from_dict(tiny_raw("moon", rounds=3), ["resources.backend=local"])
    execute(prepare(short, tmp_path / "run"), [RunDirectory(tmp_path / "run")])
    execute(prepare_resume(tmp_path / "run", ["rounds=6"]), [RunDirectory(tmp_path / "run")])
    long, expected = references("moon")  # the six-round run
    # round 3 was the last round of the short run and so was evaluated there; otherwise equal
    assert metrics_of(tmp_path / "run") == expected
    assert_same_state(final_state(tmp_path / "run")[1], final_state(long)[1])


# ------------------------------------------------------------------ dead actors


# MOON (client states on the server), a checkpoint every 4 rounds (the server's restart point)
KILLED = {"rounds": 10, "algorithm.name": "moon", "checkpoint.every": 4}


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    """The undisturbed run of KILLED, in this process: results, weights, client states."""
    return run_rounds(in_one_process(small_config(**KILLED)), tmp_path_factory.mktemp("calm"))


@pytest.mark.slow
def test_chaos_three_worker_kills_give_the_undisturbed_run(ray_session, tmp_path, calm):
    expected, weights, states = calm
    chooser = random.Random(7)
    kill_after = {2, 5, 8}

    def kill_a_worker(simulation, r):
        if r in kill_after:  # round r+1 is in flight: the worker dies mid-round
            pids = [w["pid"] for w in simulation.describe()[:-1]]
            os.kill(chooser.choice(pids), signal.SIGKILL)

    results, killed_weights, killed_states = run_rounds(small_config(**KILLED),
                                                        tmp_path / "chaos",
                                                        on_round=kill_a_worker)
    assert without_timing(results) == without_timing(expected)
    assert all(torch.equal(weights[k], killed_weights[k]) for k in weights)
    assert pack(states) == pack(killed_states)
    restarts = [e for r in results for e in r.events if e["kind"] == "worker_restarted"]
    assert len(restarts) == 3
    assert {e["round"] for e in restarts} <= {3, 4, 6, 7, 9, 10}


@pytest.mark.slow
def test_a_killed_server_is_recreated_from_its_checkpoint_and_replays(ray_session, tmp_path,
                                                                      calm):
    expected, weights, states = calm

    def kill_the_server(simulation, r):
        if r == 6:
            os.kill(simulation.describe()[-1]["pid"], signal.SIGKILL)

    # one worker (the undisturbed run had two: the same bits)
    results, got_weights, got_states = run_rounds(small_config(**KILLED), tmp_path / "chaos",
                                                  num_workers=1, on_round=kill_the_server)
    assert without_timing(results) == without_timing(expected)
    assert all(torch.equal(weights[k], got_weights[k]) for k in weights)
    assert pack(states) == pack(got_states)  # MOON's client states came back from round 4
    kinds = [e["kind"] for r in results for e in r.events]
    assert kinds == ["server_restarted", "rounds_replayed"]
    replay = next(e for r in results for e in r.events if e["kind"] == "rounds_replayed")
    # the server died in round 7 or 8 (whichever it was running): rounds since 4 were replayed
    assert replay["round"] in (7, 8)
    assert replay["reason"] == f"rounds 5-{replay['round'] - 1} replayed from checkpoint 4"


# ------------------------------------------------------------------ clients that fail


@pytest.mark.slow
def test_a_client_that_fails_once_is_retried_to_the_same_result(tmp_path, monkeypatch):
    # in one process (retries on Ray: the failure records below)
    from test_algorithms import FailsOnceOnClientZero

    monkeypatch.setattr(FailsOnceOnClientZero, "attempted", set())  # a fresh process's
    plain = small_config(rounds=4)
    flaky = small_config(**{"rounds": 4, "algorithm.name": "test_algorithms:FailsOnceOnClientZero"})
    expected, weights, _ = run_rounds(in_one_process(plain), tmp_path / "plain")
    results, got, _ = run_rounds(in_one_process(flaky), tmp_path / "flaky")
    assert without_timing(results) == without_timing(expected)
    assert all(torch.equal(weights[k], got[k]) for k in weights)
    retried = [e for r in results for e in r.events]
    assert retried and all(e["kind"] == "client_retried" and e["client"] == 0
                           and e["attempt"] == 1 and "first attempt fails" in e["reason"]
                           for e in retried)


@pytest.mark.slow
def test_too_few_successful_clients_stop_the_run_with_a_checkpoint(tmp_path):
    config = in_one_process(small_config(**{  # the stop on Ray: test_engine
        "rounds": 6, "algorithm.name": "test_algorithms:FailsOnClientZero",
        "fault_tolerance.min_clients_fraction": 1.0, "fault_tolerance.max_client_retries": 2}))
    summary = execute(prepare(config, tmp_path), [RunDirectory(tmp_path)])
    first_bad = min(r for r in range(1, 7) if 0 in _sampled(config, r))
    assert summary.status == "failed"
    assert summary.rounds_completed == first_bad - 1
    assert f"round {first_bad}: only 3 of 4 sampled clients succeeded" in summary.stop_reason
    assert "client 0 is broken" in summary.stop_reason
    failures = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    assert first_bad > 1  # so the rounds before it have a checkpoint to check
    assert newest_complete(tmp_path).round == first_bad - 1
    assert [f["kind"] for f in failures] == []  # the failed round was never logged


def _sampled(config, r):
    from raysim.seeding import sample_clients

    return sample_clients(config.seed, r, config.data.partition.num_clients,
                          config.clients_per_round)


@pytest.mark.slow
def test_dropped_clients_and_retries_are_records_in_failures_parquet(ray_session, tmp_path):
    config = small_config(**{"rounds": 6, "algorithm.name": "test_algorithms:FailsOnClientZero",
                             "resources.num_workers": 1})
    summary = execute(prepare(config, tmp_path), [RunDirectory(tmp_path)])
    rows = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    bad_rounds = [r for r in range(1, 7) if 0 in _sampled(config, r)]
    assert [(f["round"], f["kind"]) for f in rows] == [
        (r, kind) for r in bad_rounds for kind in ("client_retried", "client_dropped")]
    assert all(f["client"] == 0 and "client 0 is broken" in f["reason"] for f in rows)
    assert summary.failures == {"client_dropped": len(bad_rounds),
                                   "client_retried": len(bad_rounds)}
    assert summary.status == "completed"


# ------------------------------------------------------------------ client-state stores


@pytest.mark.slow
def test_disk_store_gives_the_memory_store_run_and_keeps_files_for_checkpoints(ray_session,
                                                                              tmp_path,
                                                                              references):
    in_memory, expected = references("moon")
    raw = tiny_raw("moon")
    raw["client_state"] = {"store": "disk"}
    on_ray = config_from_dict(raw)
    execute(prepare(on_ray, tmp_path / "disk"), [RunDirectory(tmp_path / "disk")])
    assert metrics_of(tmp_path / "disk") == expected
    assert_same_state(final_state(tmp_path / "disk")[1], final_state(in_memory)[1])
    # the final checkpoint names one file per stateful client, holding the memory run's state
    memory = unpack(newest_complete(in_memory).read("client_states.safetensors"))
    store = DiskStore(tmp_path / "disk" / "client_states")
    store.restore({INDEX_FILE: newest_complete(tmp_path / "disk").read(INDEX_FILE)})
    assert len(store) == len(memory) > 0
    assert pack(store.get(sorted(memory))) == pack([memory[c] for c in sorted(memory)])


def test_disk_store_keeps_what_a_kept_checkpoint_names(tmp_path):
    store = DiskStore(tmp_path)
    store.put(1, {3: {"w": torch.ones(2)}, 4: {"w": torch.zeros(2)}})
    pinned = store.snapshot(2)  # the round-2 checkpoint
    store.put(3, {3: {"w": torch.full((2,), 3.0)}, 4: None})
    assert store.path(3, 1).is_file() and store.path(4, 1).is_file()  # round 2 needs them
    assert torch.equal(store.get([3])[0]["w"], torch.full((2,), 3.0))
    assert store.get([4]) == [None] and len(store) == 1
    # resuming from the round-2 checkpoint: its states, and what was written after it is gone
    resumed = DiskStore(tmp_path)
    resumed.restore(pinned)
    assert torch.equal(resumed.get([3])[0]["w"], torch.ones(2))
    assert torch.equal(resumed.get([4])[0]["w"], torch.zeros(2))
    assert not store.path(3, 3).exists()
    # once the checkpoint is pruned, files only it named go
    resumed.snapshot(2)
    resumed.put(5, {3: {"w": torch.full((2,), 5.0)}})
    resumed.release(2)
    assert not store.path(3, 1).exists() and store.path(3, 5).is_file()
    assert store.path(4, 1).is_file()  # still the live state of client 4
    store.path(4, 1).unlink()
    with pytest.raises(StateFormatError, match="r000001.safetensors is missing"):
        DiskStore(tmp_path).restore(pinned)


def test_memory_store_snapshot_round_trips_exactly():
    store = MemoryStore()
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(3), "step": torch.tensor(2.0)}},
                           "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]}}
    store.put(1, {5: state, 6: None})
    copy = MemoryStore()
    copy.restore(store.snapshot(1))
    assert pack(copy.get([5])[0]) == pack(state) and copy.get([6]) == [None]


# ------------------------------------------------------------------ interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_either_signal_lets_the_round_in_flight_finish(tmp_path, signum, capsys):
    """Ctrl-C and a scheduler's (or `ray job stop`'s) SIGTERM take the same path: the run is
    asked to stop after the round in flight, and the handlers before the run come back."""
    from raysim.run.interrupts import Interrupts

    class Stoppable:
        stop_requested = False

        def request_stop(self) -> None:
            self.stop_requested = True

    simulation, before = Stoppable(), signal.getsignal(signum)
    with Interrupts(simulation, tmp_path) as interrupts:
        assert signal.getsignal(signum) is not before  # else the signal would end the tests
        signal.raise_signal(signum)
        assert simulation.stop_requested and interrupts.count == 1
    assert signal.getsignal(signum) is before
    name = signal.Signals(signum).name
    assert f"raysim: {name}: finishing the round in flight" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupt_checkpoints_exits_130_and_resumes_identically(ray_session, tmp_path,
                                                                 references):
    signum = signal.SIGINT  # SIGTERM takes the same path (the test above)
    raw = tiny_raw("fedavg", rounds=6)
    raw["checkpoint"]["every"] = 0  # only the interrupt and the end write one
    raw["logging"]["progress"] = True
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    driver = cli("launch", str(config_file), "--run-dir", str(run_dir))
    for line in driver.stdout:
        if line.startswith("round 2/6"):
            driver.send_signal(signum)
            break
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    assert "Traceback" not in err
    assert f"continue with: raysim resume {run_dir}" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = summary["rounds_completed"]
    assert 2 <= done < 6 and newest_complete(run_dir).round == done
    _, expected = references("fedavg")  # its checkpoints and progress bar change no metric
    # resumed in this process (`raysim resume` on Ray after kill -9: the test above)
    execute(prepare_resume(run_dir, ["resources.backend=local", "logging.progress=false"]),
            [RunDirectory(run_dir)])
    assert metrics_of(run_dir) == expected
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ bad input


def finished_run(tmp_path: Path) -> Path:
    """A run directory with checkpoints after rounds 2 and 4 (written without Ray)."""
    config = small_config(rounds=6)
    run = prepare(config, tmp_path / "run")
    from raysim.results.records import failures_table, metrics_table, to_parquet_bytes
    from raysim.run.checkpoints import META, meta_for

    for r in (2, 4):
        files = {SERVER_FILE: pack({"not": "used"}), META: json.dumps(meta_for(config, r)).encode(),
                 "metrics.parquet": to_parquet_bytes(metrics_table([])),
                 "failures.parquet": to_parquet_bytes(failures_table([]))}
        write_checkpoint(run.run_dir, r, files, keep=2)
    return run.run_dir


@pytest.fixture
def resume_error(monkeypatch, capsys):
    """`raysim resume RUN_DIR -o ...` that must stop before Ray with exit status 2: its stderr
    lines. RAY_ADDRESS names a cluster nobody runs, so a resume that got as far as joining one
    would fail otherwise."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")

    def run(run_dir: Path, *overrides: str) -> list[str]:
        from raysim.cli.main import main

        capsys.readouterr()
        code = main(["resume", str(run_dir), *[f"-o{o}" for o in overrides]])
        err = capsys.readouterr().err
        assert code == 2, err
        return [line for line in err.splitlines() if line.strip()]

    return run


def test_resume_refuses_a_directory_without_a_run_or_a_checkpoint(tmp_path, resume_error):
    lines = resume_error(tmp_path)
    assert lines == [f"raysim: error: {tmp_path}: not a raysim run directory (no config.yaml); "
                     "pass the directory `raysim launch` printed"]
    prepare(small_config(), tmp_path / "fresh")
    lines = resume_error(tmp_path / "fresh")
    assert len(lines) == 1 and "nothing to resume: it has no checkpoint" in lines[0]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, resume_error):
    run_dir = finished_run(tmp_path)
    newest = run_dir / "checkpoints" / "round-000004" / SERVER_FILE
    newest.write_bytes(newest.read_bytes()[:10])
    warnings: list[str] = []
    found = newest_complete(run_dir, warnings)
    assert found.round == 2
    assert warnings == [f"checkpoint {newest.parent} is unusable: {SERVER_FILE} is truncated "
                        "or corrupted (size or SHA-256 differs from the manifest); trying the "
                        "one before"]
    (run_dir / "checkpoints" / "round-000002" / MANIFEST).unlink()  # as if killed mid-write
    lines = resume_error(run_dir)
    assert lines[-1] == (f"raysim: error: {run_dir}: nothing to resume: every checkpoint in it "
                         "is damaged")
    assert len([line for line in lines if "warning" in line]) == 2


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, resume_error):
    run_dir = finished_run(tmp_path)
    lines = resume_error(run_dir, "train.lr=0.1", "rounds=9", "resources.num_workers=1")
    assert lines == [f"raysim: error: {run_dir / 'checkpoints' / 'round-000004'}: written by a "
                     "different config: train.lr differs from the checkpoint's; a resume may "
                     "change only name, rounds, resources, logging, checkpoint, "
                     "fault_tolerance, client_state"]
    with pytest.raises(ConfigError, match="rounds: the run is complete up to round 4"):
        prepare_resume(run_dir, ["rounds=4"])


def test_a_checkpoint_carrying_a_pickle_payload_never_runs_it(tmp_path, resume_error):
    run_dir = finished_run(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Payload())
    for r in (2, 4):  # forged checkpoints: the payload, and manifests that match it
        checkpoint = run_dir / "checkpoints" / f"round-{r:06d}"
        (checkpoint / SERVER_FILE).write_bytes(data)
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        manifest["files"][SERVER_FILE] = {"bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}
        (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    assert newest_complete(run_dir).round == 4  # it passes its manifest ...
    lines = resume_error(run_dir)  # ... and is refused as data
    for line, r in zip(lines[:2], (4, 2)):  # the safetensors reason follows in brackets
        assert line.startswith(f"raysim: warning: checkpoint {run_dir / 'checkpoints'}/"
                               f"round-{r:06d} is unusable: {SERVER_FILE}: not a safetensors "
                               "file (")
        assert line.endswith("); trying the one before")
    assert lines[2] == (f"raysim: error: {run_dir}: nothing to resume: every checkpoint in it "
                        "is damaged")
    with pytest.raises(StateFormatError):
        unpack(data)
    assert not marker.exists()


def test_state_trees_round_trip_bit_exactly_and_refuse_modules():
    from algorithms.fedtgp import TrainablePrototypeState

    state = TrainablePrototypeState(
        weights={"w": torch.randn(2, 3), "n": torch.tensor(5)}, metrics={"x": float("nan")},
        prototypes=torch.randn(2, 3), present=torch.tensor([True, False]),
        generator={"fc.weight": torch.randn(3, 3)},
        generator_optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]})
    back = unpack(pack(state))
    assert type(back) is TrainablePrototypeState and pack(back) == pack(state)
    assert back.generator_optimizer["param_groups"][0]["params"] == [0, 1]
    with pytest.raises(TypeError, match="keep a module's state_dict"):
        pack({"module": torch.nn.Linear(2, 2)})


def test_config_keys_of_durable_runs_are_validated():
    with pytest.raises(ConfigError, match="checkpoint.keep: must be >= 1"):
        load_config(None, ["checkpoint.keep=0"])
    with pytest.raises(ConfigError, match="min_clients_fraction: must be in"):
        load_config(None, ["fault_tolerance.min_clients_fraction=1.5"])
    with pytest.raises(ConfigError, match="client_state.store: choose one of memory, disk"):
        load_config(None, ["client_state.store=cloud"])
