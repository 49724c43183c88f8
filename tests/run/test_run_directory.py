"""A run directory is never overwritten or escaped: `raysim launch` refuses a directory that
holds anything unless `--overwrite`, which moves the old contents aside (nothing deleted); a
run's name is one safe directory name; a run directory that is a file is one error line. Real
`raysim` commands in this process (the local backend), real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_config

from raysim.config import ConfigError, config_to_dict, dump_config
from raysim.run import prepare
from raysim.run.checkpoints import checkpoint_rounds, newest_complete
from raysim.run.validate import config_from_dict


@pytest.fixture
def raysim(monkeypatch, capsys):
    """`raysim ARGS...` in this process: (exit code, stderr lines). No cluster to join."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(*args: str) -> tuple[int, list[str]]:
        from raysim.cli.main import main

        capsys.readouterr()
        code = main(list(args))
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    return run


def config_file(tmp_path: Path, **overrides) -> str:
    config = small_config(**{"rounds": 2, "checkpoint.every": 1, "logging.curves": False,
                             **overrides})
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(dump_config(config))
    return str(path)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_launch_never_overwrites_a_run_and_overwrite_moves_it_aside(tmp_path, raysim):
    run_dir = tmp_path / "run"
    first = config_file(tmp_path)
    assert raysim("launch", first, "--run-dir", str(run_dir), "--local", "--quiet")[0] == 0
    before = files_of(run_dir)
    assert "metrics.parquet" in before and [r for r, _ in checkpoint_rounds(run_dir)] == [2, 1]

    second = config_file(tmp_path, rounds=3, seed=4)
    code, lines = raysim("launch", second, "--run-dir", str(run_dir), "--local", "--quiet")
    assert code == 2
    assert lines == [f"raysim: error: {run_dir}: holds a run already; continue it with `raysim "
                     f"resume {run_dir}`, choose a new --run-dir, or pass --overwrite to move "
                     "its contents aside"]
    assert files_of(run_dir) == before  # untouched

    code, lines = raysim("launch", second, "--run-dir", str(run_dir), "--local", "--quiet",
                         "--overwrite")
    assert code == 0, lines
    [old] = tmp_path.glob("run.old-*")
    assert lines[0] == f"raysim: warning: {run_dir} held files: moved to {old}"
    assert files_of(old) == before  # the old run, every byte, elsewhere
    # the new run alone: its own checkpoints (none of the old run's counted), its own rows
    assert [r for r, _ in checkpoint_rounds(run_dir)] == [3, 2]
    assert newest_complete(run_dir).meta["config"]["seed"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and Path(summary["checkpoint"]).is_dir()
    code, lines = raysim("resume", str(run_dir))
    assert code == 2 and len(lines) == 1  # its records agree with its checkpoint: no warning
    assert lines[0].startswith("raysim: error: rounds: the run is complete up to round 3")


def test_launch_refuses_a_directory_with_other_files_and_takes_an_empty_one(tmp_path, raysim):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, lines = raysim("launch", config_file(tmp_path), "--run-dir", str(busy), "--local")
    assert code == 2 and lines == [f"raysim: error: {busy}: not empty; choose a new --run-dir, "
                                   "or pass --overwrite to move its contents aside"]
    assert files_of(busy) == {"notes.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    run = prepare(small_config(), empty, new=True)
    assert run.run_dir == empty and (empty / "config.yaml").is_file()


def test_a_run_directory_that_is_a_file_is_one_error_line(tmp_path, raysim):
    path = tmp_path / "a-file"
    path.write_text("keep me")
    for args in (("launch", config_file(tmp_path), "--run-dir", str(path), "--local"),
                 ("launch", config_file(tmp_path), "--run-dir", str(path), "--local",
                  "--overwrite"),
                 ("resume", str(path))):
        code, lines = raysim(*args)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"raysim: error: {path}: a file, not a")
    code, lines = raysim("launch", config_file(tmp_path), "--run-dir", str(path / "below"),
                         "--local")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"raysim: error: {path / 'below'}")
    assert path.read_text() == "keep me"


@pytest.mark.parametrize(("name", "character"), [
    ("../../../x", "/"), ("/tmp/x", "/"), ("a\nb", "\n"), ("a\x00b", "\x00"), ("a b", " "),
    ("run\\x", "\\"), ("..", None), (".hidden", None), ("", None)])
def test_a_run_name_is_one_safe_directory_name(name, character):
    raw = config_to_dict(small_config())
    raw["name"] = name
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    message = str(error.value)
    assert message.startswith("name: ") and "\n" not in message
    if character is not None:
        assert f"contains {character!r}" in message and "--run-dir" in message


@pytest.mark.parametrize("name", ["digits_a0.1_fedavg", "lr=0.1,mu=0.01", "run+1@node-2",
                                  "método"])
def test_ordinary_run_names_are_accepted(name):
    raw = config_to_dict(small_config())
    raw["name"] = name
    assert config_from_dict(raw).name == name


def test_a_name_cannot_place_a_run_outside_runs(tmp_path, raysim, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    config = Path(config_file(tmp_path))
    config.write_text(config.read_text().replace("name: test", "name: ../../../escaped"))
    code, lines = raysim("launch", str(config), "--local", "--quiet")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("raysim: error: name: '../../../escaped' contains '/'")
    assert not list(tmp_path.rglob("escaped*")) and not (work / "runs").exists()
