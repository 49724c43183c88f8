"""A run's state on disk, and the only module that knows its layout: checkpoint directories
written atomically, verified on load, pruned to the newest `keep`; resuming from them.

`<run dir>/checkpoints/round-000040/` holds the server state and the client-state store (as the
server actor packed them: safetensors), the metric rows and failure records so far (Parquet),
`meta.json` (round, the resolved config, a hash of the keys that change results, the raysim
version) and, written last, `MANIFEST.json` with the size and SHA-256 of every file. A
checkpoint is written under a temporary name, flushed and renamed, so a crash mid-write never
leaves one that looks complete; a damaged one fails its manifest and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import raysim
from raysim.config import Config, ConfigError, config_to_dict
from raysim.engine.client_store import INDEX_FILE
from raysim.engine.server import Restore
from raysim.results.records import (
    failures_table,
    from_parquet_bytes,
    metrics_table,
    results_from_tables,
    to_parquet_bytes,
)
from raysim.run.prepare import Run, prepare
from raysim.run.validate import load_config
from raysim.state_io import StateFormatError, unpack

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
META = "meta.json"
FORMAT = 1
# Keys a resume may change: they do not change what a round computes.
RESULT_NEUTRAL = ("name", "rounds", "resources", "logging", "checkpoint", "fault_tolerance",
                  "client_state")


class CheckpointError(Exception):
    """No usable checkpoint (the message says why, in one line)."""


def results_config(config: Config | dict) -> dict:
    raw = config if isinstance(config, dict) else config_to_dict(config)
    return {k: v for k, v in raw.items() if k not in RESULT_NEUTRAL}


def results_hash(config: Config | dict) -> str:
    text = json.dumps(results_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, result keys only."""
    if not prefix:
        old, new = results_config(old), results_config(new)
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, f"{dotted}."))
        elif a != b:
            out.append(dotted)
    return out


def meta_for(config: Config, round_index: int) -> dict[str, Any]:
    return {"format": FORMAT, "round": round_index, "raysim_version": raysim.__version__,
            "results_hash": results_hash(config), "config": config_to_dict(config),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: Path, round_index: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round-{round_index:06d}"


def write_checkpoint(run_dir: Path, round_index: int, files: dict[str, bytes],
                     keep: int) -> tuple[Path, list[int]]:
    """Write one checkpoint atomically; return it and the rounds of the checkpoints pruned."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, round_index)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {}
    for name, data in files.items():
        _write_synced(tmp / name, data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_synced(tmp / MANIFEST, json.dumps({"round": round_index, "files": manifest},
                                             indent=1).encode())
    _sync_dir(tmp)
    if final.exists():  # the same round again (an interrupt right after a periodic one)
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _sync_dir(root)
    pruned = [r for r, _ in checkpoint_rounds(run_dir)[keep:]]
    for r in pruned:
        shutil.rmtree(checkpoint_dir(run_dir, r), ignore_errors=True)
    return final, pruned


def checkpoint_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, directory) of every checkpoint by name, newest first (not yet verified)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for path in root.glob("round-*") if root.is_dir() else []:
        suffix = path.name.removeprefix("round-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def verify(path: Path, read: dict[str, bytes] | None = None) -> str | None:
    """None when every file the manifest names is there with its size and hash; else why not.
    `read` (if given) receives the files' bytes, so they are read once."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "incomplete (no MANIFEST.json)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"damaged MANIFEST.json ({error})"
    for name, entry in files.items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            return f"{name} is missing"
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{name} is truncated or corrupted (size or SHA-256 differs from the manifest)"
        if read is not None:
            read[name] = data
    if META not in files:
        return "no meta.json"
    return None


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    round: int
    meta: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # verified contents

    def read(self, name: str) -> bytes:
        return self.files[name] if name in self.files else (self.path / name).read_bytes()

    def names(self) -> list[str]:
        return sorted(self.files) or sorted(
            json.loads((self.path / MANIFEST).read_text())["files"])


def newest_complete(run_dir: Path, warnings: list[str] | None = None,
                    check: Callable[[LoadedCheckpoint], None] | None = None,
                    ) -> LoadedCheckpoint | None:
    """The newest checkpoint that passes its manifest (and `check`, which raises ValueError
    for contents it refuses); each one skipped adds a warning."""
    for round_index, path in checkpoint_rounds(run_dir):
        files: dict[str, bytes] = {}
        problem = verify(path, files)
        if problem is None:
            try:
                found = LoadedCheckpoint(path, round_index, json.loads(files[META]), files)
                if check is not None:
                    check(found)
                return found
            except (OSError, ValueError) as error:
                problem = str(error)
        if warnings is not None:
            warnings.append(f"checkpoint {path} is unusable: {problem}; trying the one before")
    return None


def clean_partial(run_dir: Path) -> None:
    """Remove what a crash mid-write left (temporary directories are never complete)."""
    root = Path(run_dir) / CHECKPOINTS
    for path in root.glob(".round-*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- a run's state


class CheckpointWriter:
    """Writes the run's checkpoints: the server actor's files plus the driver's records."""

    def __init__(self, run: Run, simulation: Any) -> None:
        self.run, self.simulation = run, simulation
        self.last: Path | None = None
        self.written: list[dict[str, float]] = []  # round, seconds, bytes of each one
        self.last_round = run.restore.round if run.restore is not None else None

    def write(self, round_index: int, files: dict[str, bytes], results: list) -> None:

        done = [r for r in results if r.round <= round_index]
        files = {**files,
                 "metrics.parquet": to_parquet_bytes(metrics_table(done)),
                 "failures.parquet": to_parquet_bytes(failures_table(
                     [e for r in done for e in r.events])),
                 META: json.dumps(meta_for(self.run.config, round_index), indent=1).encode()}
        start = time.perf_counter()
        self.last, pruned = write_checkpoint(self.run.run_dir, round_index, files,
                                             self.run.config.checkpoint.keep)
        self.written.append({"round": round_index, "seconds": time.perf_counter() - start,
                             "bytes": sum(len(data) for data in files.values())})
        self.last_round = round_index
        for r in pruned:
            self.simulation.release_checkpoint(r)

    def write_now(self, round_index: int, results: list) -> None:
        """A checkpoint after `round_index`, unless that round has one already."""
        if round_index < 1 or round_index == self.last_round:
            return
        self.write(round_index, self.simulation.snapshot(round_index), results)


def check_state_files(found: Any) -> None:
    """Decode every state file of a checkpoint (before any Ray work): anything but raysim's
    safetensors state, a pickle payload included, raises StateFormatError naming the file."""

    for name in found.names():
        if name.endswith(".safetensors"):
            try:
                unpack(found.read(name))
            except StateFormatError as error:
                raise StateFormatError(f"{name}: {error}") from None


def restore_from(found: Any, run_dir: Path) -> Restore:
    """A verified checkpoint as the server's `Restore`: its state files, and for a disk store
    the index of every other kept checkpoint (whose files the store must keep)."""
    state_files = [n for n in found.names() if n.endswith(".safetensors")]
    files = {name: found.read(name) for name in state_files}
    others = {}
    if INDEX_FILE in files:
        for r, path in checkpoint_rounds(run_dir):
            if r != found.round and (path / INDEX_FILE).is_file() and verify(path) is None:
                others[r] = {INDEX_FILE: (path / INDEX_FILE).read_bytes()}
        others[found.round] = {INDEX_FILE: files[INDEX_FILE]}
    return Restore(found.round, files, others)


def load_restore(run_dir: Path, config: Config) -> Any:
    """The newest complete checkpoint of `run_dir` as a `Restore` (None: there is none)."""

    warnings: list[str] = []
    found = newest_complete(run_dir, warnings)
    for warning in warnings:
        print(f"raysim: warning: {warning}", file=sys.stderr)
    return None if found is None else restore_from(found, run_dir)


def checkpoint_history(found: Any) -> list:
    """The round results a checkpoint recorded (its metrics and failures tables)."""

    return results_from_tables(from_parquet_bytes(found.read("metrics.parquet")),
                               from_parquet_bytes(found.read("failures.parquet")))


def prepare_resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> Run:
    """A run directory's newest complete checkpoint as a `Run` that continues from it, or a
    ConfigError saying why it cannot: no run there, no usable checkpoint, or a config whose
    result keys differ from the checkpoint's."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a raysim run directory (no config.yaml); pass the "
                          "directory `raysim launch` printed")
    return resume_run(load_config(run_dir / "config.yaml", overrides), run_dir)


def resume_run(config: Config, run_dir: Path) -> Run:
    """`config` continued from the newest complete checkpoint in `run_dir` (see
    `prepare_resume`)."""
    warnings: list[str] = []
    found = newest_complete(run_dir, warnings, check=check_state_files)
    for warning in warnings:
        print(f"raysim: warning: {warning}", file=sys.stderr)
    if found is None:
        what = "every checkpoint in it is damaged" if checkpoint_rounds(run_dir) else \
            "it has no checkpoint (runs write one every checkpoint.every rounds, after the " \
            "last round and on an interrupt)"
        raise ConfigError(f"{run_dir}: nothing to resume: {what}")
    saved = found.meta.get("config", {})
    if found.meta.get("results_hash") != results_hash(config):
        keys = changed_keys(saved, config_to_dict(config)) or ["(unknown)"]
        raise ConfigError(
            f"{found.path}: written by a different config: {', '.join(keys)} differ"
            f"{'s' if len(keys) == 1 else ''} from the checkpoint's; a resume may change only "
            f"{', '.join(RESULT_NEUTRAL)}")
    if saved.get("client_state", {}).get("store", "memory") != config.client_state.store:
        raise ConfigError(f"client_state.store: the checkpoint keeps client state in the "
                          f"{saved['client_state']['store']} store; resume with that store")
    if config.rounds <= found.round:
        raise ConfigError(f"rounds: the run is complete up to round {found.round} "
                          f"(rounds={config.rounds}); extend it with -o rounds=N")
    clean_partial(run_dir)
    run = prepare(config, run_dir)
    return dataclasses.replace(run, history=tuple(checkpoint_history(found)),
                               restore=restore_from(found, run_dir))
