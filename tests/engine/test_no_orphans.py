"""Nothing of an embedded Ray outlives its driver: killed with `kill -9`, interrupted twice
(the immediate exit) or completed, the driver's Ray processes are gone soon after it. The
watch that does it ends only the processes of its own session (real processes, real files)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import small_config

from raysim.config import config_to_dict
from raysim.engine import watchdog
from raysim.run.checkpoints import MANIFEST

GONE_SECONDS = 20.0  # how long the processes of a dead driver may take to go
SLEEPER = "import signal, sys, time\nif 'ignore-term' in sys.argv: " \
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n" \
          "time.sleep(600)"


# ------------------------------------------------------------------ processes


def start_time(pid: int) -> int | None:
    """The start time of a live process (None: gone, or a zombie): with the pid, its identity."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else int(fields[19])


def descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            started = start_time(pid)
            if started is not None:
                found.add((pid, started))
                todo.append(pid)
    return found


def args_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def session_dir_of(processes: set[tuple[int, int]]) -> str:
    for pid, _ in processes:
        for arg in args_of(pid):
            match = re.match(r"--session[-_]dir=(.+)", arg)
            if match:
                return match.group(1)
    raise AssertionError("no process of the driver names a Ray session directory")


def alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(pid, started) for pid, started in processes if start_time(pid) == started}


def left_after(processes: set[tuple[int, int]], session_dir: str,
               timeout: float = GONE_SECONDS) -> tuple[set, list[int]]:
    """What is still alive of `processes`, and of the session, once they have had `timeout`
    seconds to go (returns as soon as all are gone)."""
    deadline = time.monotonic() + timeout
    while (alive(processes) or watchdog.session_processes(session_dir)) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(processes), watchdog.session_processes(session_dir)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the driver ended (code {process.returncode}) " \
                                        f"before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


# ------------------------------------------------------------------ the watch, without Ray


def test_ending_a_session_ends_its_processes_and_nothing_else(tmp_path):
    """Named by an option, or writing a log there (Ray's renamed processes), or deaf to
    SIGTERM: ended. Reading its log, or in a session directory with the same prefix: kept."""
    session, sibling = tmp_path / "session_1", tmp_path / "session_10"
    for folder in (session, sibling):
        (folder / "logs").mkdir(parents=True)
    (session / "logs" / "agent.out").write_text("")
    started: list[subprocess.Popen] = []

    def sleeper(*args: str, stdout=None) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", SLEEPER, *args], stdout=stdout)
        started.append(process)
        return process

    try:
        with open(session / "logs" / "worker.out", "w") as log, \
                open(sibling / "logs" / "worker.out", "w") as other_log:
            named = sleeper(f"--session-dir={session}")
            writer = sleeper(stdout=log)
            deaf = sleeper(f"--log-dir={session}/logs", "ignore-term", stdout=subprocess.PIPE)
            reader = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                                       "f = open(sys.argv[1])\ntime.sleep(600)",
                                       str(session / "logs" / "agent.out")])
            started.append(reader)
            other = sleeper(f"--session-dir={sibling}", stdout=other_log)
        mine = {named.pid, writer.pid, deaf.pid}
        assert deaf.stdout.readline() == b"ready\n"  # SIGTERM is ignored from now on
        wait_for(lambda: set(watchdog.session_processes(str(session))) == mine, named,
                 "the session's processes", timeout=30)
        assert set(watchdog.end_session(str(session), grace=0.5)) == mine
        for process in (named, writer, deaf):
            process.wait(timeout=10)
        assert deaf.returncode == -signal.SIGKILL and named.returncode == -signal.SIGTERM
        assert reader.poll() is None and other.poll() is None
    finally:
        for process in started:
            process.kill()
            process.wait()


FAKE_DRIVER = """
import subprocess, sys
from raysim.engine import watchdog
log = open(sys.argv[1] + "/logs/raylet.out", "w")
# as the raylet's children do: not bound to this process, a log in the session directory
member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=log,
                          start_new_session=True)
watch = watchdog.start(sys.argv[1])
print(member.pid, watch.pid, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["kill -9", "exit"])
def test_the_watch_ends_the_session_when_its_driver_ends(tmp_path, ending):
    session = tmp_path / "session_1"
    (session / "logs").mkdir(parents=True)
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, str(session)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    member, watch = map(int, driver.stdout.readline().split())
    processes = {(pid, start_time(pid)) for pid in (member, watch)}
    try:
        assert len(alive(processes)) == 2
        if ending == "exit":
            driver.stdin.close()
        else:
            driver.kill()
        driver.wait(timeout=30)
        assert left_after(processes, str(session)) == (set(), [])
    finally:
        for pid, _ in alive(processes):
            os.kill(pid, signal.SIGKILL)


def test_a_joined_cluster_gets_no_watch(ray_session):
    """Joining leaves the cluster's processes alone, whatever happens to this driver."""
    code = ("from raysim.engine.cluster import connect\nfrom raysim.engine import watchdog\n"
            "connect()\nprint('watches', len(watchdog._running))")
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    joined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert joined.returncode == 0, joined.stderr
    assert "watches 0" in joined.stdout


# ------------------------------------------------------------------ a real driver


def launch(tmp_path: Path, rounds: int, local_epochs: int = 1) -> tuple[subprocess.Popen, Path]:
    """`raysim launch` of a small run on its own embedded Ray (RAY_ADDRESS unset), a
    checkpoint after every round, its output in files."""
    raw = config_to_dict(small_config(rounds=rounds))
    raw["resources"]["num_workers"] = 1
    raw["train"]["local_epochs"] = local_epochs
    raw["checkpoint"] = {"every": 1, "keep": 2}
    raw["logging"]["curves"] = False
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "raysim.cli", "launch", str(config_file), "--run-dir",
             str(run_dir), "--quiet"], stdout=out, stderr=err, env=env)
    return driver, run_dir


def after_round(run_dir: Path, driver: subprocess.Popen, r: int = 1) -> set[tuple[int, int]]:
    """Once round `r` is logged (its checkpoint is complete): the driver's processes, with
    its Ray's and the watch among them."""
    manifest = run_dir / "checkpoints" / f"round-{r:06d}" / MANIFEST
    wait_for(manifest.exists, driver, f"round {r}")
    processes = descendants(driver.pid)
    names = " ".join(" ".join(args_of(pid)) for pid, _ in processes)
    assert "raylet" in names and "watchdog.py" in names
    return processes


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["kill -9", "interrupted twice", "completed"])
def test_no_ray_process_outlives_the_driver(tmp_path, ending):
    driver, run_dir = launch(tmp_path, rounds=2 if ending == "completed" else 40,
                             local_epochs=8 if ending == "interrupted twice" else 1)
    processes: set[tuple[int, int]] = set()
    try:
        processes = after_round(run_dir, driver)
        session_dir = session_dir_of(processes)
        if ending == "kill -9":
            driver.kill()
        elif ending == "interrupted twice":
            driver.send_signal(signal.SIGINT)
            err = tmp_path / "err.txt"
            # the second signal only once the first is handled (two pending ones count once)
            wait_for(lambda: "finishing the round in flight" in err.read_text(), driver,
                     "the first interrupt's message")
            driver.send_signal(signal.SIGINT)
        driver.wait(timeout=240)
        expected = {"kill -9": -signal.SIGKILL, "interrupted twice": 130, "completed": 0}
        err = (tmp_path / "err.txt").read_text()
        assert driver.returncode == expected[ending], err
        if ending == "interrupted twice":
            assert "stopped at once" in err
        assert left_after(processes, session_dir) == (set(), [])
    finally:
        kill_leftovers(driver, processes)


def kill_leftovers(driver: subprocess.Popen, processes: Any) -> None:
    """Whatever a failed test left running: the driver and the processes it started."""
    if driver.poll() is None:
        driver.kill()
    for pid, _ in alive(processes):
        os.kill(pid, signal.SIGKILL)
