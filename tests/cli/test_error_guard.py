"""One error line, exit code 2, whatever goes wrong before a run's rounds start: a plug-in whose
import calls sys.exit(0) or whose code raises (a real package installed with pip), with the
traceback only under --debug; and a run that fails or stops without a checkpoint never points
at `raysim resume`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import raysim_at_once, small_config, without_ray_settings

from raysim.cli.main import main
from raysim.config import dump_config
from raysim.run.checkpoints import write_checkpoint
from raysim.run.interrupts import resume_hint

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "guard-plugin"
version = "1.0"

[tool.setuptools]
py-modules = ["guard_exits", "guard_explodes"]

[project.entry-points."raysim.algorithms"]
exits = "guard_exits:Method"

[project.entry-points."raysim.datasets"]
explodes = "guard_explodes:dataset"
"""

EXPLODES = '''
class Explodes:
    task = "classification"

    def check(self, request):
        raise RuntimeError("the dataset server is down\\n(second line)")

    def load(self, request): ...


dataset = Explodes()
'''

CONFIG = """\
name: guard
rounds: 2
clients_per_round: 4
data: {dataset: digits, partition: {num_clients: 8}}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A plug-in package, built and installed with pip into a folder the raysim processes of
    these tests import from: one method whose module exits at import, one dataset that raises."""
    source, site = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "guard_exits.py").write_text("import sys\n\nsys.exit(0)\n\n\nclass Method: ...\n")
    (source / "guard_explodes.py").write_text(EXPLODES)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True,
                   capture_output=True)
    return site


# `raysim launch` of CONFIG on the local backend with each plug-in of the package
PLUGGED = {"exits": "algorithm.name=exits", "explodes": "data.dataset=explodes"}


@pytest.fixture(scope="module")
def launched(site, tmp_path_factory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Each PLUGGED launch in a process of its own, both at once (most of each one's time is
    importing, which the cores share): its config file, its run directory, its result."""
    paths = {}
    for name in PLUGGED:
        folder = tmp_path_factory.mktemp(name)
        (folder / "guard.yaml").write_text(CONFIG)
        paths[name] = folder / "guard.yaml", folder / "run"
    results = raysim_at_once(*[["launch", str(config), "-o", PLUGGED[name], "--local",
                                "--run-dir", str(run_dir)]
                               for name, (config, run_dir) in paths.items()],
                             env=without_ray_settings(site))
    return {name: (*paths[name], result) for name, result in zip(paths, results)}


def test_a_plugin_that_exits_at_import_fails_the_launch_with_one_line(launched):
    _, run_dir, done = launched["exits"]
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "raysim: error: algorithm.name: the algorithm plug-in 'exits' (guard_exits:Method, "
        "from guard-plugin) exited while being imported (SystemExit(0))"]
    assert done.stdout == "" and not run_dir.exists()


def test_a_plugin_that_raises_during_preparation_is_one_line_naming_it(launched):
    config, run_dir, done = launched["explodes"]
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"raysim: error: {config}, in the plug-in package guard-plugin (")
    assert "guard_explodes.py:" in line
    assert line.endswith("): RuntimeError: the dataset server is down "
                         "(raysim --debug launch ... for the traceback)")
    assert not run_dir.exists()


class Unreachable:
    """A dataset by import path whose check fails in a way no check of raysim's foresees."""

    task = "classification"

    def check(self, request):
        raise ConnectionError("the data server does not answer")

    def load(self, request): ...


unreachable = Unreachable()


def test_an_unexpected_error_is_one_line_and_the_traceback_only_under_debug(tmp_path, capsys):
    config = tmp_path / "guard.yaml"
    config.write_text(CONFIG)
    args = ["launch", str(config), "-o", "data.dataset=test_error_guard:unreachable", "--local",
            "--run-dir", str(tmp_path / "run")]
    line = (f"raysim: error: {config}: ConnectionError: the data server does not answer "
            "(raysim --debug launch ... for the traceback)")
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "run").exists()

    assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "in check" in err and err.splitlines()[-1] == line


def test_a_run_that_fails_before_any_checkpoint_does_not_suggest_resume(tmp_path, capsys):
    # client 0 fails every time and every client is sampled: round 1 cannot complete
    config = small_config(**{
        "rounds": 2, "clients_per_round": 4, "data.partition.num_clients": 4,
        "algorithm.name": "test_algorithms:FailsOnClientZero",
        "fault_tolerance.min_clients_fraction": 1.0, "fault_tolerance.max_client_retries": 0})
    path = tmp_path / "failing.yaml"
    path.write_text(dump_config(config))
    run_dir = tmp_path / "run"
    assert main(["launch", str(path), "--local", "--quiet", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "failed after round 0 (no checkpoint)" in err
    assert "raysim resume" not in err and "nothing to resume: launch it again" in err
    assert '"status": "failed"' in (run_dir / "summary.json").read_text()


def test_the_resume_hint_names_resume_only_with_a_complete_checkpoint(tmp_path):
    assert "raysim resume" not in resume_hint(tmp_path)
    (tmp_path / "checkpoints" / ".round-000001.tmp").mkdir(parents=True)  # a crash mid-write
    assert "raysim resume" not in resume_hint(tmp_path)
    write_checkpoint(tmp_path, 1, {"meta.json": b"{}"}, keep=2)
    assert resume_hint(tmp_path).endswith(f"raysim resume {tmp_path}")

