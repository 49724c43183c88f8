"""Plug-ins for every extension point, installed for real: the example package (one method,
one dataset, one partitioner, one sink) runs under a 2-trial `raysim tune`; broken, incomplete
and clashing plug-ins each give one error line before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import raysim_at_once, without_ray_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin"


def raysim(*args: str, site: Path, timeout: float = 600, **env: str):
    return subprocess.run([sys.executable, "-m", "raysim.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=without_ray_settings(site, **env),
                          cwd=ROOT)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package installed (built, with its entry points) into a folder that the
    test's raysim processes import from."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(EXAMPLE)], check=True,
                   capture_output=True)
    return site


@pytest.mark.slow
def test_the_example_plugin_runs_under_tune(installed, tmp_path):
    """A 2-trial `raysim tune` of the example, its runs on Ray workers that import the plug-in
    (`raysim launch` of it, there on a two-node cluster: tests/cli/test_cluster.py)."""
    out = tmp_path / "sweep"
    swept = raysim("tune", str(EXAMPLE / "sweep.yaml"), "--out", str(out), site=installed)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    table = pd.read_parquet(out / "trials.parquet")
    assert sorted(table["algorithm.beta"]) == [0.0, 0.5]
    assert (table["status"] == "TERMINATED").all() and (table["rounds"] == 5).all()
    run_dirs = sorted(out.glob("trials/*"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [line["round"] for line in lines[:-1]] == [1, 2, 3, 4, 5]  # the plug-in sink
        assert "test_accuracy" in lines[-1]["summary"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["algorithm"] == "fedavgm" and summary["status"] == "completed"
        histograms = pd.read_parquet(run_dir / "label_histograms.parquet")
        assert histograms["count"].sum() == 600  # the plug-in dataset's training split
        per_client = histograms[histograms["count"] > 0].groupby("client")["label"].nunique()
        assert per_client.max() <= 2  # the plug-in partitioner: one or two classes per client


def write_distribution(site: Path, name: str, group: str, entry: str, module: str = "") -> None:
    """A real installed distribution (dist-info metadata with entry points) in `site`."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    if module:
        module_name = entry.split("=")[1].strip().split(":")[0]
        (site / f"{module_name}.py").write_text(module)


def broken_plugin(site: Path) -> None:
    write_distribution(site, "broken_plugin", "raysim.algorithms",
                       "broken = broken_module:Method", "import not_installed_anywhere\n")


def thin_plugin(site: Path) -> None:
    write_distribution(site, "thin_plugin", "raysim.sinks", "thin = thin_module:Thin",
                       "class Thin:\n    def start(self, run): ...\n")


def clashing_plugins(site: Path) -> None:
    for package in ("first_blobs", "second_blobs"):
        write_distribution(site, package, "raysim.datasets",
                           f"blobs = {package}_module:blobs", "blobs = None\n")


SIZED_DATASET = '''
from dataclasses import dataclass


@dataclass(frozen=True)
class SizedConfig:
    samples: int = 100


class Sized:
    task = "classification"
    Config = SizedConfig

    def check(self, request): ...

    def load(self, request): ...


class Untyped:
    task = "classification"
    Config = dict

    def check(self, request): ...

    def load(self, request): ...


sized, untyped = Sized(), Untyped()
'''


def sized_plugin(site: Path) -> None:
    write_distribution(site, "sized_plugin", "raysim.datasets",
                       "sized = sized_module:sized\nuntyped = sized_module:untyped",
                       SIZED_DATASET)


# `raysim config` with these overrides, and only the plug-ins the function installs
MISTAKES = {
    "fails to import": (broken_plugin, ["algorithm.name=broken"]),
    "lacks the contract": (thin_plugin, ["logging.sinks=[thin]"]),
    "two of one name": (clashing_plugins, ["data.dataset=blobs"]),
    "rejects a key": (sized_plugin, ["data.dataset=sized", "data.sample=5"]),
    "untyped config": (sized_plugin, ["data.dataset=untyped"]),
}


@pytest.fixture(scope="module")
def config_errors(tmp_path_factory) -> dict[str, list[str]]:
    """Each MISTAKES case's stderr lines (exit status 2): its plug-ins installed in a folder of
    its own, its `raysim config` in a process of its own, all at once (most of each one's time
    is importing, which the cores share)."""
    envs = []
    for install, _ in MISTAKES.values():
        site = tmp_path_factory.mktemp("site")
        install(site)
        envs.append(without_ray_settings(site, RAY_ADDRESS="127.0.0.1:9"))
    results = raysim_at_once(*[["config", "yaml/quickstart.yaml", *[f"-o{o}" for o in overrides]]
                               for _, overrides in MISTAKES.values()], env=envs)
    errors = {}
    for name, result in zip(MISTAKES, results):
        assert result.returncode == 2, f"{name}: {result.stdout}{result.stderr}"
        errors[name] = result.stderr.strip().splitlines()
    return errors


def test_a_plugin_that_fails_to_import_is_named(config_errors):
    assert config_errors["fails to import"] == [
        "raysim: error: algorithm.name: the algorithm plug-in 'broken' "
        "(broken_module:Method, from broken_plugin) failed to import: "
        "ModuleNotFoundError: No module named 'not_installed_anywhere'"]


def test_a_plugin_without_the_contract_names_what_is_missing(config_errors):
    assert config_errors["lacks the contract"] == [
        "raysim: error: logging.sinks[0]: the sink plug-in 'thin' "
        "(thin_module:Thin, from thin_plugin) lacks log_round, finish, which every "
        "sink must have"]


def test_two_plugins_with_one_name_name_both_packages(config_errors):
    lines = config_errors["two of one name"]
    assert len(lines) == 1 and lines[0].startswith(
        "raysim: error: data.dataset: two packages register the dataset 'blobs'")
    assert "first_blobs" in lines[0] and "second_blobs" in lines[0]


def test_a_plugin_config_that_rejects_a_key_names_the_plugin_and_the_key(config_errors):
    assert config_errors["rejects a key"] == [
        "raysim: error: unknown key 'data.sample' for dataset 'sized'; did you "
        "mean 'data.samples'?"]


def test_a_plugin_config_that_is_not_a_dataclass_is_named(config_errors):
    assert config_errors["untyped config"] == [
        "raysim: error: data.dataset: the dataset plug-in 'untyped' "
        "(sized_module:untyped, from sized_plugin) has a Config that is not a "
        "dataclass (its keys must be dataclass fields)"]
