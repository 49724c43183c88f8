"""Start in seconds: an embedded Ray without the dashboard unless asked, sized to the run, its
workers preloaded, started early by the `raysim` command; and the command's quick ending (the
results line once the results are on disk, the figures drawn by a child, the process gone at
once). Real Ray and real processes; nothing timed but the loose end of a process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import metrics_of, small_config
from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

from raysim.cli.main import _overrides, _start_ray_early, build_parser, in_child_process, main
from raysim.config import ActorResources, ResourcesConfig, config_to_dict
from raysim.engine import cluster
from raysim.engine.cluster import embedded_options, fit_resources
from raysim.run.validate import load_config

ROOT = Path(__file__).resolve().parents[2]

# Starts an embedded Ray as a launch does, twice: without, then with the dashboard.
EMBEDDED = """
import json, os, sys
import ray
from raysim.config import ResourcesConfig
from raysim.engine import cluster

@ray.remote(num_cpus=1)
class Probe:
    def preloaded(self):
        return [m for m in cluster.PRELOAD if m in sys.modules]

seen = {}
for dashboard in (False,):  # on: embedded_options' include_dashboard (a test below), one start less
    url = cluster.connect(resources=ResourcesConfig(dashboard=dashboard))
    node = ray._private.worker.global_worker.node
    seen[str(dashboard)] = {
        "url": url, "processes": sorted(node.all_processes),
        "ray_url": ray._private.worker.get_dashboard_url(),
        "cpus": ray.cluster_resources()["CPU"],
        "usage_stats": os.environ.get("RAY_USAGE_STATS_ENABLED"),
        "preloaded": [] if dashboard else ray.get(Probe.remote().preloaded.remote()),
        "agent_port": node.dashboard_agent_listen_port,
    }
    ray.shutdown()
print(json.dumps(seen))
"""


def test_the_embedded_ray_has_no_dashboard_and_preloads_its_workers():
    """...and its dashboard agent listens on a free port (`raysim.engine.head.free_port`)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")}
    done = subprocess.run([sys.executable, "-c", EMBEDDED], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    lean = seen["False"]
    assert lean["url"] is None and not lean["ray_url"]
    assert "dashboard" not in lean["processes"] and "raylet" in lean["processes"]
    # two one-CPU workers and a CPU-less server: three CPUs, or what the machine has
    assert lean["cpus"] == min(os.cpu_count(), 3)
    assert lean["preloaded"] == list(cluster.PRELOAD)
    assert lean["usage_stats"] == "0"
    # not the one fixed port another Ray here (this session's) may hold
    assert lean["agent_port"] > 0 and lean["agent_port"] != DEFAULT_DASHBOARD_AGENT_LISTEN_PORT


@pytest.mark.parametrize(("workers", "cpus", "server"),
                         [(2, 1.0, 0.0), (3, 0.3, 0.1), (7, 0.25, 0.5), (1, 0.0, 0.0)])
def test_a_cluster_sized_to_the_run_fits_its_whole_pool(workers, cpus, server):
    resources = ResourcesConfig(num_workers=workers, worker=ActorResources(num_cpus=cpus),
                                server=ActorResources(num_cpus=server))
    options = embedded_options(resources)
    assert options["include_dashboard"] is False
    assert options["_system_config"] == {"preload_python_modules": list(cluster.PRELOAD)}
    assert options["num_cpus"] <= (os.cpu_count() or 1)
    # as sized on a machine with CPUs to spare, fit_resources keeps every worker
    sized = math.ceil(workers * cpus + server) + 1
    config = dataclasses.replace(small_config(), resources=resources)
    fitted, notes = fit_resources(config, {"CPU": float(sized)})
    assert fitted.resources.num_workers == workers and notes == []


def test_a_cluster_for_many_runs_is_the_whole_machine_without_preloading():
    options = embedded_options(None)
    assert "num_cpus" not in options and "_system_config" not in options
    assert embedded_options(ResourcesConfig(dashboard=True))["include_dashboard"] is True


def test_the_dashboard_flag_and_key_turn_the_dashboard_on():
    parse = build_parser().parse_args
    assert not load_config("yaml/quickstart.yaml").resources.dashboard
    flagged = parse(["launch", "yaml/quickstart.yaml", "--dashboard"])
    assert load_config(flagged.config, _overrides(flagged)).resources.dashboard
    keyed = parse(["launch", "yaml/quickstart.yaml", "-o", "resources.dashboard=true"])
    assert load_config(keyed.config, _overrides(keyed)).resources.dashboard


@pytest.mark.parametrize("case", ["local flag", "local backend", "address", "RAY_ADDRESS",
                                  "unreadable config", "not a launch"])
def test_ray_starts_early_only_for_an_embedded_ray_run(case, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    words = ["launch", "yaml/quickstart.yaml"]
    if case == "local flag":
        words.append("--local")
    elif case == "local backend":
        words += ["-o", "resources.backend=local"]
    elif case == "address":
        words += ["--address", "127.0.0.1:9"]
    elif case == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    elif case == "unreadable config":
        (tmp_path / "bad.yaml").write_text("resources: [unclosed\n")
        words[1] = str(tmp_path / "bad.yaml")
    else:
        words = ["config", "yaml/quickstart.yaml"]
    _start_ray_early(build_parser().parse_args(words))
    assert cluster._early.thread is None


def test_rays_start_up_messages_wait_until_the_run_goes_on():
    import logging

    import ray  # noqa: F401  (it sets up Ray's logger)

    shown: list[str] = []

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    ray_logger, handler = logging.getLogger("ray"), Shown()
    ray_logger.addHandler(handler)
    # an earlier ray.init in this process may have raised Ray's log level
    names = ("ray", "ray._private.worker")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        held = cluster._HeldLogs()
        logging.getLogger("ray._private.worker").warning("a start-up warning")
        assert shown == []
        held.release()
        assert shown == ["a start-up warning"]
    finally:
        ray_logger.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_a_child_process_finishes_the_work_after_the_call_returns(tmp_path, capfd):
    done = tmp_path / "done"

    def work() -> None:
        print("from the child")
        time.sleep(0.5)
        done.write_text(str(os.getsid(0)))

    assert in_child_process(work) is True
    assert not done.exists()  # the call returned before the work ended
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(done.read_text()) != os.getsid(0)  # a session of its own
    assert "from the child" not in capfd.readouterr().out


def test_the_command_prints_its_results_once_durable_and_ends_at_once(tmp_path):
    """`raysim launch` on an embedded Ray started early: the same metrics as the run in one
    process; summary.json is in place when the results line comes, the process ends soon
    after it, the figures follow."""
    raw = config_to_dict(small_config(rounds=2))
    raw["resources"]["num_workers"] = 1
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "raysim.cli", "launch", str(config_file), "--run-dir",
         str(run_dir), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT)
    lines, durable, last_line_at = [], None, None
    for line in driver.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("raysim: results in"):
            durable = (run_dir / "summary.json").is_file()
            last_line_at = time.monotonic()
    code = driver.wait(timeout=120)
    assert code == 0 and last_line_at is not None, driver.stderr.read()
    ended = time.monotonic() - last_line_at
    assert lines[-1].startswith(f"raysim: results in {run_dir}/")
    assert "curves.png, partition.png in a moment" in lines[-1]
    assert durable
    assert ended < 5, f"ended {ended:.1f} s after its last line"
    deadline = time.monotonic() + 60
    while not (run_dir / "partition.png").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (run_dir / "curves.png").is_file() and (run_dir / "partition.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["startup_phases"]) >= {"prepared", "ray_ready", "actors_ready"}

    here = tmp_path / "in_one_process"
    assert main(["launch", str(config_file), "--local", "--quiet", "--run-dir", str(here)]) == 0
    assert metrics_of(run_dir) == metrics_of(here)
