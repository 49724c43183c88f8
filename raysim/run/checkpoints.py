"""A run's state on disk, and the only module that knows its layout: checkpoint directories
written atomically, verified on load, pruned to the newest `keep`; resuming from them.

`<run dir>/checkpoints/round-000040/` holds the server state and the client-state store (as the
server actor packed them: safetensors), the metric rows and failure records so far and the
per-client rows of its own round where personalised evaluation scored it (Parquet),
`meta.json` (round, the resolved config, a hash of the keys that change results, the raysim
version) and, written last, `MANIFEST.json` with the size and SHA-256 of every file. A
checkpoint is written under a temporary name, flushed and renamed, so a crash mid-write never
leaves one that looks complete; a damaged one fails its manifest and the previous one is used.

Only verified checkpoints count: "newest" and pruning consider checkpoints whose manifest names
plain files inside their own folder (no links followed, sizes checked before reading, reading
bounded by them) that match it. A damaged one is set aside (`round-000006.damaged-1`), never
deleted. The run directory's `metrics.parquet` may lag its newest checkpoint by the round whose
checkpoint was in place when the driver died; a resume rewrites the records from the
checkpoint's own, which are the truth (rows after its round dropped, missing ones restored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
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
    client_metrics_table,
    failures_table,
    from_parquet_bytes,
    metrics_table,
    results_from_tables,
    to_parquet_bytes,
)
from raysim.results.sinks import CLIENT_METRICS, RunDirectory, client_metrics_part
from raysim.run.prepare import Run, prepare
from raysim.run.validate import load_config
from raysim.state_io import StateFormatError, unpack

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
META = "meta.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a handful of files
CHUNK = 1 << 24
ROUND_NAME = re.compile(r"round-([0-9]+)")
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


def write_checkpoint(run_dir: Path, round_index: int, files: dict[str, bytes], keep: int,
                     trusted: set[int] | None = None) -> tuple[Path, list[int]]:
    """Write one checkpoint atomically; return it and the rounds of the checkpoints pruned.

    Once the checkpoint is in place nothing here raises (the round's metric rows are written
    after it): a failure to prune or to set a damaged one aside is a warning. `trusted`: rounds
    verified already (this writer wrote them, or they were verified on loading), so pruning
    reads each other checkpoint at most once; it is updated."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, round_index)
    tmp = root / f".{final.name}.tmp"
    _remove(tmp)
    tmp.mkdir()
    manifest = {}
    for name, data in files.items():
        _write_synced(tmp / name, data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_synced(tmp / MANIFEST, json.dumps({"round": round_index, "files": manifest},
                                             indent=1).encode())
    _sync_dir(tmp)
    if os.path.lexists(final):  # the same round again (an interrupt right after a periodic one)
        problem = verify(final)
        if problem is None:
            old = root / f".{final.name}.old"
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:  # a damaged folder (or link) of this round is kept, renamed, as every damaged one
            if set_aside(final, problem) is None:
                raise OSError(f"{final}: a damaged checkpoint is in the way")
            os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    try:
        _sync_dir(root)
    except OSError as error:  # the rename is done; durability of the directory entry is best-effort
        _warn(f"could not sync {root}: {error}")
    if trusted is not None:
        trusted.add(round_index)
    return final, prune(run_dir, round_index, keep, trusted)


def prune(run_dir: Path, newest: int, keep: int, trusted: set[int] | None = None) -> list[int]:
    """Delete verified checkpoints beyond the `keep` newest, the one of round `newest` (just
    written) always kept; set damaged ones aside. The rounds deleted; never raises."""
    root = Path(run_dir) / CHECKPOINTS
    kept, pruned = 1, []
    for r, path in checkpoint_rounds(run_dir):
        if r == newest:
            continue
        if trusted is None or r not in trusted:
            problem = verify(path)
            if problem is not None:
                set_aside(path, problem)
                continue
            if trusted is not None:
                trusted.add(r)
        if kept < keep:
            kept += 1
            continue
        # hidden by one rename first: a folder half deleted is never taken for a checkpoint
        hidden = root / f".{path.name}.pruned"
        try:
            _remove(hidden)
            os.rename(path, hidden)
        except OSError as error:
            _warn(f"could not remove the old checkpoint {path}: {error}")
            continue
        _remove(hidden)  # what a failure leaves is hidden; a resume removes it
        pruned.append(r)
        if trusted is not None:
            trusted.discard(r)
    return pruned


def set_aside(path: Path, problem: str) -> Path | None:
    """Rename a damaged checkpoint (a link: the link itself) to `<name>.damaged-<n>`, out of
    every listing, with a warning; None when the rename failed (also a warning)."""
    n = 1
    while os.path.lexists(path.with_name(f"{path.name}.damaged-{n}")):
        n += 1
    target = path.with_name(f"{path.name}.damaged-{n}")
    try:
        os.rename(path, target)
    except OSError as error:
        _warn(f"checkpoint {path} is damaged ({problem}) and could not be set aside: {error}")
        return None
    _warn(f"checkpoint {path} is damaged ({problem}): set aside as {target.name}")
    return target


def _warn(text: str) -> None:
    print(f"raysim: warning: {text}", file=sys.stderr)


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points at) or a folder; errors are ignored."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def checkpoint_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint by name, newest first (not yet verified): folders
    named round-NNNNNN, and links so named (which verify as damaged)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = ROUND_NAME.fullmatch(path.name)
        if match and (path.is_symlink() or path.is_dir()):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


class Damaged(Exception):
    """Why a checkpoint cannot be trusted (one line)."""


def _plain_name(name: Any) -> bool:
    """A file name inside the checkpoint's own folder: no path, no `..`, no control
    characters, not the manifest."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST)
            and not any(c in name for c in "/\\") and name.isprintable())


def _read_file(path: Path, size: int | None, limit: int, sha256: str | None = None,
               keep: bool = True) -> bytes:
    """The bytes of `path`, a regular file that is no link, of `size` bytes (None: at most
    `limit`): checked with lstat before it is opened, and never read past that size."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise Damaged(f"{path.name} is missing") from None
    if stat.S_ISLNK(info.st_mode):
        raise Damaged(f"{path.name} is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise Damaged(f"{path.name} is not a regular file")
    expected = info.st_size if size is None else size
    if info.st_size != expected or expected > limit:
        raise Damaged(f"{path.name} is truncated or corrupted (size or SHA-256 differs from the "
                      "manifest)" if size is not None else f"{path.name} is too large")
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a FIFO since lstat is refused
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Damaged(f"{path.name} is not a regular file")
        digest, chunks, total = hashlib.sha256(), [], 0
        while total <= expected:  # one byte past the size tells a file that grew
            chunk = os.read(fd, min(CHUNK, expected + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    finally:
        os.close(fd)
    if total != expected or (sha256 is not None and digest.hexdigest() != sha256):
        raise Damaged(f"{path.name} is truncated or corrupted (size or SHA-256 differs from "
                      "the manifest)")
    return b"".join(chunks)


def _manifest_files(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files, each a plain name with a size and a hash, or Damaged."""
    try:
        manifest = json.loads(_read_file(path / MANIFEST, None, MAX_MANIFEST_BYTES))
    except Damaged as error:
        if str(error) == f"{MANIFEST} is missing":
            raise Damaged("incomplete (no MANIFEST.json)") from None
        raise
    except (OSError, ValueError) as error:
        raise Damaged(f"damaged MANIFEST.json ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise Damaged("damaged MANIFEST.json (no files)")
    for name, entry in files.items():
        if not _plain_name(name):
            raise Damaged(f"MANIFEST.json names {name!r}, which is not a file of the "
                          "checkpoint's own folder")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int
                and entry["bytes"] >= 0 and isinstance(entry.get("sha256"), str)):
            raise Damaged(f"damaged MANIFEST.json (the entry of {name})")
    if META not in files:
        raise Damaged("no meta.json")
    return files


def check_meta(data: bytes, path: Path) -> dict[str, Any]:
    """meta.json as the mapping a checkpoint writes, or Damaged."""
    try:
        meta = json.loads(data)
    except ValueError as error:
        raise Damaged(f"damaged meta.json ({error})") from None
    if not (isinstance(meta, dict) and type(meta.get("round")) is int
            and isinstance(meta.get("config"), dict)
            and isinstance(meta.get("results_hash"), str)):
        raise Damaged("meta.json is not a checkpoint's (an object with round, config and "
                      "results_hash)")
    match = ROUND_NAME.fullmatch(path.name)
    if match and int(match.group(1)) != meta["round"]:
        raise Damaged(f"meta.json is of round {meta['round']}, the folder of round "
                      f"{int(match.group(1))}")
    return meta


def verify(path: Path, read: dict[str, bytes] | None = None) -> str | None:
    """None when every file the manifest names is there with its size and hash, and meta.json
    is a checkpoint's; else why not. `read` (if given) receives the files' bytes, so they are
    read once."""
    try:
        if os.path.islink(path):
            raise Damaged("the checkpoint folder is a symbolic link")
        files = _manifest_files(path)
        for name, entry in files.items():
            data = _read_file(path / name, entry["bytes"], entry["bytes"], entry["sha256"],
                              keep=read is not None or name == META)
            if name == META:
                check_meta(data, path)
            if read is not None:
                read[name] = data
    except Damaged as error:
        return str(error)
    except OSError as error:
        return f"unreadable ({error})"
    return None


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    round: int
    meta: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # verified contents

    def read(self, name: str) -> bytes:
        return self.files[name]

    def names(self) -> list[str]:
        return sorted(self.files)


def newest_complete(run_dir: Path, warnings: list[str] | None = None,
                    check: Callable[[LoadedCheckpoint], None] | None = None,
                    damaged: list[tuple[Path, str]] | None = None,
                    ) -> LoadedCheckpoint | None:
    """The newest checkpoint that passes its manifest (and `check`, which raises ValueError
    for contents it refuses); each one skipped adds a warning, and (path, why) to `damaged`."""
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
        if damaged is not None:
            damaged.append((path, problem))
    return None


def clean_partial(run_dir: Path) -> None:
    """Remove what a crash mid-write or mid-prune left (hidden folders are never complete)."""
    root = Path(run_dir) / CHECKPOINTS
    for path in root.glob(".round-*") if root.is_dir() else []:
        _remove(path)


# --------------------------------------------------------------------------- a run's state


class CheckpointWriter:
    """Writes the run's checkpoints: the server actor's files plus the driver's records."""

    def __init__(self, run: Run, simulation: Any) -> None:
        self.run, self.simulation = run, simulation
        self.last: Path | None = None
        self.written: list[dict[str, float]] = []  # round, seconds, bytes of each one
        self.last_round = run.restore.round if run.restore is not None else None
        # verified on loading: pruning need not read them again
        self.trusted: set[int] = set() if run.restore is None else {
            run.restore.round, *run.restore.others}

    def write(self, round_index: int, files: dict[str, bytes], results: list) -> None:

        done = [r for r in results if r.round <= round_index]
        files = {**files,
                 "metrics.parquet": to_parquet_bytes(metrics_table(done)),
                 "failures.parquet": to_parquet_bytes(failures_table(
                     [e for r in done for e in r.events])),
                 META: json.dumps(meta_for(self.run.config, round_index), indent=1).encode()}
        # the rows of this round's client_metrics.parquet part, which the driver writes only
        # after the checkpoint is in place (earlier rounds' parts are written by then)
        own = [r for r in done if r.round == round_index and r.client_metrics]
        if own:
            files[CLIENT_METRICS] = to_parquet_bytes(client_metrics_table(own))
        start = time.perf_counter()
        self.last, pruned = write_checkpoint(self.run.run_dir, round_index, files,
                                             self.run.config.checkpoint.keep, self.trusted)
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
            read: dict[str, bytes] = {}
            if r != found.round and verify(path, read) is None and INDEX_FILE in read:
                others[r] = {INDEX_FILE: read[INDEX_FILE]}
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
    """The round results a checkpoint recorded (its metrics and failures tables, and its own
    round's per-client rows where it has them)."""

    clients = from_parquet_bytes(found.read(CLIENT_METRICS)) \
        if CLIENT_METRICS in found.names() else None
    return results_from_tables(from_parquet_bytes(found.read("metrics.parquet")),
                               from_parquet_bytes(found.read("failures.parquet")), clients)


def check_contents(found: Any) -> None:
    """Everything a resume reads from a checkpoint decodes: its state files and its records
    (a ValueError naming the file otherwise)."""
    check_state_files(found)
    try:
        checkpoint_history(found)
    except Exception as error:  # pyarrow's own error types on a damaged or foreign table
        raise ValueError(f"its records (metrics.parquet, failures.parquet"
                         f"{', ' + CLIENT_METRICS if CLIENT_METRICS in found.names() else ''})"
                         f" do not decode "
                         f"({type(error).__name__}: {error})") from None


def records_agree(found: Any, run_dir: Path) -> bool:
    """Whether the run directory's records are the checkpoint's (else a resume rewrites them:
    the driver may have died after the checkpoint and before the rows of its round), its
    round's client_metrics.parquet part included."""
    import pyarrow.parquet as pq

    history = checkpoint_history(found)
    expected = {"metrics.parquet": metrics_table(history),
                "failures.parquet": failures_table([e for r in history for e in r.events])}
    own = [r for r in history if r.client_metrics]  # the checkpoint's round, if evaluated
    if own:
        expected[str(client_metrics_part(Path(), own[-1].round))] = client_metrics_table(own)
    try:
        # compared as text: a NaN metric equals itself there
        return all(repr(pq.read_table(Path(run_dir) / name).to_pylist())
                   == repr(table.to_pylist()) for name, table in expected.items())
    except Exception:  # missing or unreadable: not the checkpoint's
        return False


def prepare_resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> Run:
    """A run directory's newest complete checkpoint as a `Run` that continues from it, or a
    ConfigError saying why it cannot: no run there, no usable checkpoint, or a config whose
    result keys differ from the checkpoint's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: a file, not a run directory; pass the directory "
                          "`raysim launch` printed")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a raysim run directory (no config.yaml); pass the "
                          "directory `raysim launch` printed")
    return resume_run(load_config(run_dir / "config.yaml", overrides), run_dir)


def resume_run(config: Config, run_dir: Path) -> Run:
    """`config` continued from the newest complete checkpoint in `run_dir` (see
    `prepare_resume`)."""
    warnings: list[str] = []
    damaged: list[tuple[Path, str]] = []
    found = newest_complete(run_dir, warnings, check=check_contents, damaged=damaged)
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
    kept = saved.get("client_state")
    store = kept.get("store", "memory") if isinstance(kept, dict) else "memory"
    if store != config.client_state.store:
        raise ConfigError(f"client_state.store: the checkpoint keeps client state in the "
                          f"{store} store; resume with that store")
    if config.rounds <= found.round:
        if not records_agree(found, run_dir):  # the checkpoint's records are the truth
            RunDirectory(run_dir).restart(checkpoint_history(found))
            print(f"raysim: warning: {run_dir}: metrics.parquet and failures.parquet rewritten "
                  f"from the records of {found.path} (the run stopped between the two)",
                  file=sys.stderr)
        raise ConfigError(f"rounds: the run is complete up to round {found.round} "
                          f"(rounds={config.rounds}); extend it with -o rounds=N")
    run = prepare(config, run_dir)
    # only now that the run goes on: newer checkpoints that could not be used are kept aside,
    # so neither "newest" nor pruning ever counts them
    for path, problem in damaged:
        set_aside(path, problem)
    clean_partial(run_dir)
    return dataclasses.replace(run, history=tuple(checkpoint_history(found)),
                               restore=restore_from(found, run_dir))
