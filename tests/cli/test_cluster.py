"""Real Ray clusters on this machine: a two-node cluster (`ray start --head` plus a second
`ray start --address`, each its own raylet) with token authentication, one logical GPU on the
head and the job server; raysim driven from subprocesses, as on a real cluster. Every process
the cluster starts is stopped by pid at the end (never `ray stop`, which would stop every Ray
on the machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import raysim_at_once, without_ray_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["-o", "rounds=2", "-o", "train.local_epochs=1", "-o", "clients_per_round=4",
        "-o", "data.partition.num_clients=12", "--quiet"]


@dataclass(frozen=True)
class Cluster:
    address: str  # GCS, for `raysim launch --address`
    jobs: str  # job server, for `raysim submit/logs/status --address`
    env: dict  # the environment that holds the cluster's token


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports(ports: list[int]) -> list[str]:
    """Explicit agent ports, so two nodes (and any other Ray here) never collide."""
    names = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port"]
    return [f"{name}={port}" for name, port in zip(names, ports)]


def processes_matching(marks: list[str]) -> list[int]:
    """Pids whose command line holds one of `marks`, and all their descendants."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(pid)] = (parent, cmdline)
    chosen = {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in marks)}
    chosen.discard(os.getpid())
    while True:
        children = {pid for pid, (parent, _) in table.items() if parent in chosen} - chosen
        if not children:
            return sorted(chosen)
        chosen |= children


def stop_processes(pids: list[int]) -> None:
    # a second to end on SIGTERM (the cluster is thrown away), then SIGKILL
    for sig, grace in ((signal.SIGTERM, 1), (signal.SIGKILL, 10)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    gcs, dashboard, client, *agents = free_ports(11)
    env = without_ray_settings(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--temp-dir={temp}",
            "--num-gpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            *node_ports(agents[:4]), *common]
    second = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
              '--resources={"second_node": 1}', *node_ports(agents[4:]), *common]
    try:
        for command in (head, second):
            started = subprocess.run(command, env=env, capture_output=True, text=True,
                                     timeout=120, cwd=temp)
            assert started.returncode == 0, started.stderr[-3000:]
        yield Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        stop_processes(processes_matching([str(temp), f":{gcs} "]))
        shutil.rmtree(temp, ignore_errors=True)


def raysim(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysim.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


FORWARDED = re.compile(r"^\(\S[^)]*\) ")  # "(raylet) ...", "(ClientWorker pid=7) ...": from Ray


def driver_lines(logs: str) -> list[str]:
    """A job's log lines less those Ray forwards from its own processes (a raylet's warning
    that the disk is nearly full can come after the driver's last line)."""
    plain = (re.sub(r"\x1b\[[0-9;]*m", "", line) for line in logs.strip().splitlines())
    return [line for line in plain if not FORWARDED.match(line)]


UNREACHABLE = {
    "launch": ["launch", "yaml/quickstart.yaml", "--address", "127.0.0.1:9"],
    "launch ray://": ["launch", "yaml/quickstart.yaml", "--address", "ray://127.0.0.1:9"],
    "tune": ["tune", "yaml/sweeps/digits_alpha_algorithm.yaml", "--address", "127.0.0.1:9"],
    "submit": ["submit", "yaml/quickstart.yaml", "--address", "http://127.0.0.1:9"],
}


@pytest.fixture(scope="module")
def unreachable_answers() -> dict[str, subprocess.CompletedProcess]:
    # the check answers before Ray's own connection retries (minutes) would: within 60 s
    return dict(zip(UNREACHABLE, raysim_at_once(*UNREACHABLE.values(),
                                                env=without_ray_settings(), timeout=60)))


@pytest.mark.parametrize("name", UNREACHABLE)
def test_unreachable_cluster_is_one_error_line(unreachable_answers, name):
    result = unreachable_answers[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raysim: error: "), lines
    assert "127.0.0.1:9" in lines[0]


@pytest.mark.slow
def test_a_submitted_job_packs_quarter_gpus_and_its_logs_hold_the_final_line(cluster, tmp_path):
    run_dir = tmp_path / "job-run"
    quarter_gpus = ["-o", "resources.num_workers=4", "-o", "resources.worker.num_cpus=0",
                    "-o", "resources.worker.num_gpus=0.25"]
    submitted = raysim("submit", "yaml/quickstart.yaml", *TINY[:-1], *quarter_gpus,
                       "--run-dir", str(run_dir), "--address", cluster.jobs, env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"submitted job (\S+)", submitted.stdout).group(1)

    followed = raysim("logs", job, "--address", cluster.jobs, "--follow", env=cluster.env)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    status, logs = raysim_at_once(["status", job, "--address", cluster.jobs],
                                  ["logs", job, "--address", cluster.jobs], env=cluster.env)
    assert status.returncode == 0 and f"job {job}: SUCCEEDED" in status.stdout
    logs = logs.stdout
    assert "round 2/2" in logs
    assert driver_lines(logs)[-1].startswith(f"raysim: results in {run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    workers = summary["workers"]
    assert len(workers) == 4 and len({w["pid"] for w in workers}) == 4  # all alive at once
    assert all(w["gpu_ids"] == ["0"] for w in workers)  # each holds a quarter of GPU 0
    assert all(w["device"] == "cpu" for w in workers)  # no CUDA here: torch falls back
    warnings = [line for line in logs.splitlines() if "raysim: warning" in line]
    assert len(warnings) == 1 and "sees no CUDA device" in warnings[0], warnings  # not shrunk


@pytest.mark.slow
def test_missing_token_is_explained(cluster):
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    for result in raysim_at_once(["launch", "yaml/quickstart.yaml", "--address", cluster.address],
                                 ["status", "raysim_x", "--address", cluster.jobs], env=env):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raysim: error: "), lines
        assert "token authentication" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]


@pytest.mark.slow
def test_a_plugin_installed_only_on_the_driver_reaches_workers_on_both_nodes(cluster, tmp_path):
    """The example package is importable by the driver alone (PYTHONPATH), not by the nodes
    started before it: `raysim launch --address` ships it through Ray's runtime_env, and the
    run places one worker on each node (one CPU per node), so both nodes import it."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site),
                    str(ROOT / "examples" / "plugin")], check=True, capture_output=True)
    env = {**cluster.env, "PYTHONPATH": str(site)}
    result = raysim("launch", "examples/plugin/example.yaml", "--address", cluster.address,
                    "--run-dir", str(tmp_path / "run"), "-o", "rounds=2", "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "fedavgm" and summary["rounds_completed"] == 2
    nodes = [worker["node_id"] for worker in summary["workers"]]
    assert len(nodes) == 2 and len(set(nodes)) == 2
