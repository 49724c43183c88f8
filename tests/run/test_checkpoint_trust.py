"""Checkpoints are trusted only after verification: a damaged one (truncated, a link, a manifest
naming files outside its folder, a meta.json of the wrong shape) is never the newest, never
counts towards `keep`, and is set aside rather than deleted; the run directory's records agree
with the checkpoint after any stop. Real runs in this process (the local backend), real files,
real links, real truncation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import in_one_process, metrics_of, small_config

from raysim.config import ConfigError, dump_config
from raysim.engine.server import SERVER_FILE
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare, prepare_resume
from raysim.run.checkpoints import (
    MANIFEST,
    META,
    checkpoint_rounds,
    meta_for,
    newest_complete,
    verify,
    write_checkpoint,
)
from raysim.state_io import pack

LOCAL = "resources.backend=local"


def finished(run_dir: Path, rounds: int = 4) -> dict:
    """A real run of `rounds` rounds, checkpoints every 2 (the newest 2 kept); its metrics."""
    config = in_one_process(small_config(**{"rounds": rounds, "checkpoint.every": 2,
                                            "checkpoint.keep": 2}))
    summary = execute(prepare(config, run_dir), [RunDirectory(run_dir)])
    assert summary.status == "completed"
    return metrics_of(run_dir)


def checkpoint(run_dir: Path, r: int) -> Path:
    return run_dir / "checkpoints" / f"round-{r:06d}"


def forge(folder: Path, name: str, data: bytes | None = None, entry: dict | None = None) -> None:
    """Rewrite one manifest entry (and the file) so that the manifest's own check passes."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if data is not None:
        (folder / name).write_bytes(data)
        entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"][name] = entry
    (folder / MANIFEST).write_text(json.dumps(manifest))


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------ the data-loss cases


def test_a_damaged_newest_checkpoint_never_makes_pruning_delete_the_good_ones(tmp_path, capsys):
    """Resuming past a truncated newest checkpoint with keep=1 keeps the fresh checkpoint, and
    the damaged one is set aside, not counted by its name as the newest."""
    run_dir = tmp_path / "run"
    finished(run_dir)
    expected = finished(tmp_path / "short", rounds=3)
    damaged = checkpoint(run_dir, 4) / SERVER_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])
    summary = execute(prepare_resume(run_dir, [LOCAL, "rounds=3", "checkpoint.keep=1"]),
                      [RunDirectory(run_dir)])
    assert summary.status == "completed" and summary.rounds_completed == 3
    assert Path(summary.checkpoint) == checkpoint(run_dir, 3)
    assert verify(checkpoint(run_dir, 3)) is None  # the fresh one is there, whole
    assert summary_of(run_dir)["checkpoint"] == str(checkpoint(run_dir, 3))
    assert [r for r, _ in checkpoint_rounds(run_dir)] == [3]  # keep=1: round 2 pruned
    aside = run_dir / "checkpoints" / "round-000004.damaged-1"
    assert (aside / SERVER_FILE).stat().st_size == 100  # kept as it was, for inspection
    assert "round-000004 is damaged" in capsys.readouterr().err
    assert metrics_of(run_dir) == expected


def test_a_checkpoint_folder_that_is_a_link_is_set_aside_and_the_run_completes(tmp_path):
    """A link named like the newest checkpoint (to a damaged copy elsewhere) neither ends the
    resume with an error nor loses the round's metric rows; the link's target is untouched."""
    run_dir = tmp_path / "run"
    expected = finished(run_dir)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint(run_dir, 4), elsewhere)
    state = elsewhere / SERVER_FILE
    state.write_bytes(state.read_bytes()[:-1])
    shutil.rmtree(checkpoint(run_dir, 4))
    checkpoint(run_dir, 4).symlink_to(elsewhere, target_is_directory=True)
    (run_dir / "summary.json").unlink()
    run = prepare_resume(run_dir, [LOCAL])
    assert run.restore.round == 2
    summary = execute(run, [RunDirectory(run_dir)])
    assert summary.status == "completed" and summary.rounds_completed == 4
    assert metrics_of(run_dir) == expected  # round 4's rows included
    assert newest_complete(run_dir).round == 4 and not checkpoint(run_dir, 4).is_symlink()
    aside = run_dir / "checkpoints" / "round-000004.damaged-1"
    assert aside.is_symlink() and aside.readlink() == elsewhere
    assert {p.name for p in elsewhere.iterdir()} == {
        MANIFEST, *json.loads((elsewhere / MANIFEST).read_text())["files"]}
    assert state.stat().st_size == (checkpoint(run_dir, 4) / SERVER_FILE).stat().st_size - 1
    with pytest.raises(ConfigError, match="rounds: the run is complete up to round 4"):
        prepare_resume(run_dir, [LOCAL])


def test_rows_lost_after_the_final_checkpoint_come_back_from_it(tmp_path, capsys,
                                                                monkeypatch):
    """A driver that died after its last checkpoint and before that round's rows: the next
    `raysim resume` says the run is complete and makes metrics.parquet the checkpoint's."""
    from raysim.cli.main import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # a resume that got to Ray would fail
    run_dir = tmp_path / "run"
    expected = finished(run_dir)
    table = pq.read_table(run_dir / "metrics.parquet")
    pq.write_table(table.filter(pc.less(table["round"], 4)), run_dir / "metrics.parquet")
    assert max(r for r, _ in metrics_of(run_dir)) == 3
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("raysim: error: rounds: the run is complete up to "
                                           "round 4")
    assert metrics_of(run_dir) == expected


# ------------------------------------------------------------------ what a checkpoint may name


def written(tmp_path: Path, rounds=(2, 4)) -> Path:
    """A run directory with checkpoints of `rounds` (written without running anything)."""
    config = small_config(rounds=6)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(config))
    from raysim.results.records import failures_table, metrics_table, to_parquet_bytes

    for r in rounds:
        files = {SERVER_FILE: pack({"round": r}), META: json.dumps(meta_for(config, r)).encode(),
                 "metrics.parquet": to_parquet_bytes(metrics_table([])),
                 "failures.parquet": to_parquet_bytes(failures_table([]))}
        write_checkpoint(run_dir, r, files, keep=len(rounds))
    return run_dir


@pytest.mark.parametrize("name", ["ABSOLUTE", "../../config.yaml", "sub/file", "..", "a\nb"])
def test_a_manifest_names_files_of_its_own_folder_only(tmp_path, name):
    run_dir = written(tmp_path)
    if name == "ABSOLUTE":  # a file, not a device: code that followed it must not hang the tests
        name = str(tmp_path / "outside")
        Path(name).write_bytes(b"x")
    forge(checkpoint(run_dir, 4), name, entry={"bytes": 10**12, "sha256": "0" * 64})
    assert verify(checkpoint(run_dir, 4)) == (
        f"MANIFEST.json names {name!r}, which is not a file of the checkpoint's own folder")
    assert newest_complete(run_dir).round == 2


def test_a_state_file_that_is_a_link_is_damaged_and_never_read(tmp_path):
    run_dir = written(tmp_path)
    folder = checkpoint(run_dir, 4)
    big = tmp_path / "big"  # sparse: a stand-in for /dev/zero that cannot exhaust memory
    with open(big, "wb") as f:
        f.truncate(1 << 26)
    (folder / SERVER_FILE).unlink()
    (folder / SERVER_FILE).symlink_to(big)
    forge(folder, SERVER_FILE, entry={"bytes": 1 << 26, "sha256": "0" * 64})
    assert verify(folder) == f"{SERVER_FILE} is a symbolic link"
    # a link to a file that matches the manifest is refused the same way
    good = tmp_path / "good.safetensors"
    shutil.copy(checkpoint(run_dir, 2) / SERVER_FILE, good)
    (folder / SERVER_FILE).unlink()
    (folder / SERVER_FILE).symlink_to(good)
    forge(folder, SERVER_FILE, entry={"bytes": good.stat().st_size,
                                      "sha256": hashlib.sha256(good.read_bytes()).hexdigest()})
    assert verify(folder) == f"{SERVER_FILE} is a symbolic link"
    assert newest_complete(run_dir).round == 2


def test_a_fifo_or_a_grown_file_is_refused_without_reading_past_its_size(tmp_path):
    run_dir = written(tmp_path)
    folder = checkpoint(run_dir, 4)
    fifo = folder / SERVER_FILE
    fifo.unlink()
    os.mkfifo(fifo)
    # code that opened it for reading would wait for a writer: one comes, and writes nothing
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    assert verify(folder) == f"{SERVER_FILE} is not a regular file"
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
    writer.join(timeout=30)
    (folder / SERVER_FILE).unlink()
    (folder / SERVER_FILE).write_bytes(b"x" * 10)
    forge(folder, SERVER_FILE, entry={"bytes": 5, "sha256": hashlib.sha256(b"x" * 5).hexdigest()})
    assert "is truncated or corrupted" in verify(folder)


def test_a_checkpoint_folder_that_is_a_link_is_damaged(tmp_path):
    run_dir = written(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint(run_dir, 4), copy)
    shutil.rmtree(checkpoint(run_dir, 4))
    checkpoint(run_dir, 4).symlink_to(copy, target_is_directory=True)
    assert verify(copy) is None  # a whole checkpoint ...
    assert verify(checkpoint(run_dir, 4)) == "the checkpoint folder is a symbolic link"
    assert newest_complete(run_dir).round == 2  # ... not trusted through a link


@pytest.mark.parametrize("meta", [[1, 2], "round", {"round": "4", "config": {},
                                                     "results_hash": "x"}, {"round": 4}])
def test_a_meta_json_of_the_wrong_shape_makes_the_checkpoint_damaged(tmp_path, meta, capsys,
                                                                       monkeypatch):
    from raysim.cli.main import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # a resume that got to Ray would fail
    run_dir = written(tmp_path)
    for r in (2, 4):
        forge(checkpoint(run_dir, r), META, json.dumps(meta).encode())
    assert verify(checkpoint(run_dir, 4)).startswith("meta.json is not a checkpoint's")
    assert main(["resume", str(run_dir)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == f"raysim: error: {run_dir}: nothing to resume: every checkpoint in it " \
        "is damaged"
    assert not any("Traceback" in line for line in lines)
    assert [r for r, _ in checkpoint_rounds(run_dir)] == [4, 2]  # a refused resume renames nothing


def test_pruning_counts_verified_checkpoints_and_keeps_the_fresh_one(tmp_path, capsys):
    run_dir = written(tmp_path, rounds=(2, 4, 8))
    late = checkpoint(run_dir, 8) / SERVER_FILE
    late.write_bytes(late.read_bytes()[:-3])
    files = {name: (checkpoint(run_dir, 4) / name).read_bytes()
             for name in json.loads((checkpoint(run_dir, 4) / MANIFEST).read_text())["files"]}
    files[META] = json.dumps(meta_for(small_config(rounds=6), 6)).encode()
    final, pruned = write_checkpoint(run_dir, 6, files, keep=2)
    assert final == checkpoint(run_dir, 6) and pruned == [2]
    assert [r for r, _ in checkpoint_rounds(run_dir)] == [6, 4]
    assert (run_dir / "checkpoints" / "round-000008.damaged-1" / SERVER_FILE).is_file()
    assert "round-000008 is damaged" in capsys.readouterr().err
    # a link where an old checkpoint was is set aside, never deleted through
    target = tmp_path / "kept"
    target.mkdir()
    (target / "data").write_text("mine")
    shutil.rmtree(checkpoint(run_dir, 4))
    checkpoint(run_dir, 4).symlink_to(target, target_is_directory=True)
    files[META] = json.dumps(meta_for(small_config(rounds=9), 7)).encode()
    write_checkpoint(run_dir, 7, files, keep=1)
    assert [r for r, _ in checkpoint_rounds(run_dir)] == [7]
    assert (run_dir / "checkpoints" / "round-000004.damaged-1").is_symlink()
    assert (target / "data").read_text() == "mine"
