"""The documentation: the README stays a front page whose method runs, the MkDocs site builds
with `--strict` (a broken link fails it), and its generated pages cover the code: every config
key, every registered method, results tables rendered from the benchmarks' JSON."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def page_text(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build_site(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_readme_is_a_front_page_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    commands = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "make run" in commands and "make test" in commands


def test_the_site_builds_strict_with_the_generated_pages(site):
    assert (site / "reference" / "configuration" / "index.html").is_file()
    assert (site / "guide" / "methods" / "index.html").is_file()
    for figure in (ROOT / "benchmarks" / "figures").glob("*.png"):
        assert (site / "figures" / figure.name).read_bytes() == figure.read_bytes()


def test_a_broken_link_fails_the_build(tmp_path):
    """The site's own settings (strict, link validation) on a page with a dead link."""
    settings = {key: value for key, value in
                yaml.safe_load((ROOT / "mkdocs.yml").read_text()).items()
                if key not in ("hooks", "nav", "exclude_docs")}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(yaml.safe_dump({**settings, "docs_dir": str(docs)}))
    done = build_site(config, tmp_path / "site")
    assert done.returncode != 0
    assert "missing.md" in done.stdout + done.stderr


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a user can write in the dataclass `cls`, dotted; a list of mappings as `[]`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if hint is Any:  # a plug-in's own Config held as a value
            continue
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, key)
            continue
        keys.append(key)
        (item,) = typing.get_args(hint)[:1] or (None,)
        if typing.get_origin(hint) in (list, tuple) and dataclasses.is_dataclass(item):
            keys += dotted_keys(item, f"{key}[]")
    return keys


def test_the_configuration_reference_names_every_key(site):
    from raysim.config import Config
    from raysim.registry import algorithm_class, algorithm_names

    text = page_text(site, "reference/configuration")
    core = dotted_keys(Config)
    assert {"seed", "data.partition.kind", "resources.worker.num_cpus"} <= set(core)
    missing = [key for key in core if f"<code>{key}</code>" not in text]
    assert not missing, f"keys not in the generated reference: {missing}"
    for name in algorithm_names():
        for key in dotted_keys(algorithm_class(name).Config, "algorithm"):
            assert f"<code>{key}</code>" in text, f"{name}: {key}"


def test_every_plugins_own_keys_are_in_the_reference(site):
    from raysim.registry import REGISTRIES

    text = page_text(site, "reference/configuration")
    for kind, plugins in REGISTRIES.items():
        for name in plugins.names():
            config = getattr(plugins[name], "Config", None)
            if not dataclasses.is_dataclass(config) or not dataclasses.fields(config):
                continue
            heading = f"<code>{name}</code>"
            assert heading in text, f"{kind} {name} has keys but no section"
            for key in dotted_keys(config):  # under the section that names the plug-in
                assert re.search(rf"<code>[\w.\[\]]*\.{re.escape(key)}</code>", text), \
                    f"{kind} {name}: {key}"


def test_every_registered_method_is_on_the_methods_page(site):
    from raysim.registry import algorithm_names

    text = page_text(site, "methods")
    assert [n for n in algorithm_names() if f"<code>{n}</code>" not in text] == []


def test_the_readmes_error_example_is_what_raysim_prints():
    cli_errors = load_hook("cli_errors")
    lines = README.read_text(encoding="utf-8").splitlines()
    shown = [(line[2:], lines[i + 1]) for i, line in enumerate(lines)
             if line.startswith("$ raysim ")]
    assert shown
    for command, printed in shown:
        assert cli_errors.error_line(command) == printed


# --------------------------------------------------------------------------- results tables


def load_hook(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


THROUGHPUT = {  # the layout benchmarks/throughput.py writes
    "config": "yaml/quickstart.yaml", "overrides": [], "rounds": 20, "clients_per_round": 10,
    "repeats": 3, "torch": "2.14.1",
    "seconds": {"plain_1_thread": 10.0, "plain_2_threads": 7.0, "raysim": 6.0},
    "ideal_2way_seconds": 5.0,
    "ratios": {"raysim_vs_ideal_2way": 1.2},
    "runs": {"raysim": [{"seconds": 6.0, "num_workers": 2, "final_accuracy": 0.93}]},
}


def test_a_results_table_is_rendered_from_its_benchmark_json(tmp_path):
    tables = load_hook("results_tables")
    assert tables.generated("throughput", tmp_path) is None  # not run here: the text stays
    (tmp_path / "throughput.json").write_text(json.dumps(THROUGHPUT))
    table = tables.generated("throughput", tmp_path)
    assert "| **raysim, 2 workers** | 6.00 | 0.300 | 1.20 |" in table
    assert "| plain PyTorch, 1 thread | 10.00 | 0.500 | 2.00 |" in table

    page = "before\n<!-- results: throughput -->\n\n| old | table |\n\n<!-- /results -->\nafter"
    assert "| old | table |" not in tables.replace_blocks(page, tmp_path)
    assert "| old | table |" in tables.replace_blocks(page, tmp_path / "nothing-here")


def test_a_benchmark_json_of_another_layout_is_named(tmp_path):
    tables = load_hook("results_tables")
    (tmp_path / "scale.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="scale.json"):
        tables.generated("scale", tmp_path)


def test_the_other_results_tables_render_their_benchmarks_layouts(tmp_path):
    tables = load_hook("results_tables")
    samples = {
        "scale.json": {"rounds": 24, "repeats": 3, "workers": 2, "raysim": [
            {"setting": "synthetic", "clients": 100, "per_round": 100,
             "round_seconds_median": 0.16, "round_seconds_p10": 0.1, "round_seconds_p90": 0.25,
             "overhead_ms_per_client": 0.97, "first_round_seconds": 11.5, "driver_mb": 694,
             "server_mb": 614, "worker_mb": 770}],
            "flower": [{"clients": 100, "round_seconds_median": 2.88}]},
        "accuracy.json": {"seeds": [0, 1], "overrides": [], "results": [
            {"setting": "digits_a0.5", "method": "fedavg", "seed": s, "final": f, "last5": f,
             "per_domain": {}} for s, f in ((0, 0.9), (1, 0.8))]},
        "leakage.json": [{"setting": "digits_a0.5", "method": "fedavg", "test_accuracy": 0.93,
                          "leak_presence_exact": 0.14, "leak_counts_exact": 0.0,
                          "leak_counts_mae": 2.85, "leak_mean_cosine": math.nan,
                          "leak_image_psnr": math.nan, "leak_image_ssim": math.nan}],
    }
    for name, data in samples.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert "| synthetic | 100 | 100 | 0.160 | 0.100–0.250 | 0.97 |" in \
        tables.generated("scale", tmp_path)
    assert "| 100 | 2.88 | 0.160 | 18.0× |" in tables.generated("scale_flower", tmp_path)
    assert "| fedavg | 85.0 ± 5.0 (85.0) |" in tables.generated("accuracy", tmp_path)
    assert "| fedavg | 93.0 | 0.14 | 0.00 | 2.85 | – | – | – |" in \
        tables.generated("leakage", tmp_path)


# --------------------------------------------------------------------------- the README's method


def readme_method() -> tuple[str, list[str]]:
    """The README's method file and the `raysim launch` command shown after it."""
    text = README.read_text(encoding="utf-8")
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
                if block.startswith("# mymethods.py"))
    after = text[text.index(code) + len(code):]
    command = next(line for block in re.findall(r"```bash\n(.*?)```", after, re.DOTALL)
                   for line in block.splitlines() if "raysim launch" in line)
    return code, shlex.split(command)


def raysim_cli(*args: str, module_dir: Path) -> subprocess.CompletedProcess:
    """The `raysim` command, able to import modules from `module_dir` (as `PYTHONPATH=.`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(module_dir), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "raysim.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


QUICK = ["-o", "resources.backend=local", "-o", "rounds=2", "--quiet"]  # one process, 2 rounds


def launch(words: list[str], module_dir: Path, run_dir: Path) -> dict:
    """The README's `raysim launch …` as a command of its own, QUICK; the run's summary."""
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # env assignments
    assert words[:2] == ["raysim", "launch"]
    done = raysim_cli(*words[1:], *QUICK, "--run-dir", str(run_dir), module_dir=module_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_the_readme_method_runs_and_differs_from_fedavg(tmp_path, monkeypatch, capsys):
    from raysim.cli.main import main

    code, command = readme_method()
    assert len(code.splitlines()) <= 30
    (tmp_path / "mymethods.py").write_text(code)
    name = next(w.split("=", 1)[1] for w in command if w.startswith("algorithm.name="))

    ours = launch(command, tmp_path, tmp_path / "ours")
    # FedAvg's run in this process (the README's command is the one that needs its own)
    monkeypatch.chdir(ROOT)
    assert main(["launch", "yaml/quickstart.yaml", *QUICK, "--run-dir",
                 str(tmp_path / "fedavg")]) == 0
    fedavg = json.loads((tmp_path / "fedavg" / "summary.json").read_text())
    assert ours["algorithm"] == name and ours["status"] == "completed"
    assert ours["rounds_completed"] == 2
    accuracy, loss = ours["final"]["test_accuracy"], ours["final"]["train_loss"]
    assert 0 < accuracy <= 1 and math.isfinite(loss)
    # the same seed and clients: only the calibrated loss differs
    assert accuracy != fedavg["final"]["test_accuracy"]
    assert loss != fedavg["final"]["train_loss"]

    # every key the method declares for tuning is a valid config value at both bounds
    monkeypatch.syspath_prepend(str(tmp_path))
    module, _, cls = name.partition(":")
    space = getattr(importlib.import_module(module), cls).search_space
    assert "algorithm.tau" in space
    for bounds in zip(*(values for domain in space.values() for values in domain.values())):
        overrides = [f"-o{key}={value}" for key, value in zip(space, bounds)]
        capsys.readouterr()
        exit_code = main(["config", "yaml/quickstart.yaml", f"-oalgorithm.name={name}",
                          *overrides])
        assert exit_code == 0, capsys.readouterr().err
