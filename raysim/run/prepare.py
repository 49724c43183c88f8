"""Everything that can fail on user input, before Ray starts: the task (dataset files,
partition feasibility), client groups (the method, the model, a worker's memory) and the run
directory."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.config import Config, ConfigError, dump_config
from raysim.data import DatasetFormatError, DatasetNotFoundError
from raysim.data.domain_split import DomainSelectionError
from raysim.engine.grouped import check_grouping
from raysim.registry import DATASETS
from raysim.results.sinks import atomic_write
from raysim.task import Task, _available_memory, build_task, dataset_request


@dataclass(frozen=True)
class Run:
    config: Config
    task: Task
    run_dir: Path
    history: tuple = ()  # RoundResults of the rounds a resumed run has done already
    restore: Any = None  # raysim.engine.simulation.Restore: where a resumed run starts


def build_checked_task(config: Config) -> Task:
    """The config's task, or a ConfigError for what the user must fix: missing or unusable
    dataset files, an infeasible partition or partition file."""
    try:
        DATASETS[config.data.dataset].check(dataset_request(config))
    except DatasetNotFoundError as error:
        raise ConfigError(str(error)) from None
    except DatasetFormatError as error:  # a layout other than the one named
        raise ConfigError(f"data: {error}") from None
    try:
        return build_task(config)
    except DomainSelectionError as error:
        raise ConfigError(f"data.{error}") from None
    except DatasetFormatError as error:  # unusable file contents, named in the message
        raise ConfigError(f"data: {error}") from None
    except ConfigError:  # already names its key (personal parts, model groups)
        raise
    except ValueError as error:  # an infeasible partition, e.g. too many clients for alpha
        raise ConfigError(f"data.partition: {error}") from None


def prepare(config: Config, run_dir: str | Path | None = None, *, new: bool = False,
            overwrite: bool = False) -> Run:
    """The run of `config` in `run_dir` (default: a new `runs/<name>-<time>/`), its task built
    and its directory made. `new` (a launch): a directory that holds anything is refused
    unless `overwrite`, which moves its contents aside (`<dir>.old-<time>/`, nothing deleted),
    so a new run never mixes with an old one; without `new` the directory is used as it is
    (a resume's, a trial's)."""
    run_dir = Path(run_dir) if run_dir else default_run_dir(config.name)
    if new:
        check_new_run_dir(run_dir, overwrite)
    task = build_checked_task(config)
    note = check_grouping(config, task.info, worker_memory(config))
    if note is not None:  # K > 1 where the method or model trains one client at a time
        print(f"raysim: {note}", file=sys.stderr)
    privacy = task.info.privacy
    if privacy is not None:  # σ as calibrated before the run, and what δ implies
        print(f"raysim: privacy: {privacy.describe()}", file=sys.stderr)
        for warning in privacy.warnings:
            print(f"raysim: warning: {warning}", file=sys.stderr)
    if new and overwrite:
        moved = move_aside(run_dir)
        if moved is not None:
            print(f"raysim: warning: {run_dir} held files: moved to {moved}", file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{run_dir}: cannot create the run directory "
                          f"({error.strerror or error}); choose another --run-dir") from None
    # written to a temporary file and renamed (both files): a link left in the run directory
    # is replaced, never written through (its target may be another run's file)
    text = dump_config(config)
    atomic_write(run_dir / "config.yaml", lambda path: Path(path).write_text(text))
    write_label_histograms(task, run_dir / "label_histograms.parquet")
    return Run(config=config, task=task, run_dir=run_dir)


def worker_memory(config: Config) -> int | None:
    """One worker's share of this machine's available memory, which a client group must fit
    in (None: unknown). An estimate: on a cluster the workers may run elsewhere."""
    if config.train.client_group <= 1:
        return None
    available = _available_memory()
    return None if available is None else available // config.resources.num_workers


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A ConfigError unless a new run may start in `run_dir`: it is missing or an empty
    directory, or it holds files and `overwrite` moves them aside."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: a file, not a directory; choose another --run-dir")
        if not run_dir.is_dir() or overwrite or next(run_dir.iterdir(), None) is None:
            return
    except OSError as error:  # e.g. a directory this user may not read
        raise ConfigError(f"{run_dir}: cannot use it as the run directory "
                          f"({error.strerror or error}); choose another --run-dir") from None
    if (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: holds a run already; continue it with `raysim resume "
                          f"{run_dir}`, choose a new --run-dir, or pass --overwrite to move "
                          "its contents aside")
    raise ConfigError(f"{run_dir}: not empty; choose a new --run-dir, or pass --overwrite to "
                      "move its contents aside")


def move_aside(run_dir: Path) -> Path | None:
    """Move the contents of `run_dir` into a new sibling `<name>.old-<time>/` (one rename per
    entry, so the directory itself, perhaps a mount point or a link, stays); None when it held
    nothing."""
    if not run_dir.is_dir():
        return None
    entries = sorted(run_dir.iterdir())
    if not entries:
        return None
    real = run_dir.resolve()  # the sibling on the same file system as the entries
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    old, n = real.with_name(f"{real.name}.old-{stamp}"), 1
    while os.path.lexists(old):
        old, n = real.with_name(f"{real.name}.old-{stamp}-{n}"), n + 1
    try:
        old.mkdir()
        for entry in entries:
            os.rename(entry, old / entry.name)
    except OSError as error:
        raise ConfigError(f"{run_dir}: cannot move its contents aside to {old} "
                          f"({error.strerror or error}); choose a new --run-dir") from None
    return old


def default_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{name}-{stamp}", 1
    while path.exists():
        path, n = Path("runs") / f"{name}-{stamp}-{n}", n + 1
    return path


def write_label_histograms(task: Task, path: Path) -> None:
    """Per-client label counts, long format: client, label, count (the nonzero ones). A
    dataset that generates its clients has none until they train: no file."""
    counts = task.partition.label_counts
    if counts is None:
        return
    table = pa.table({
        "client": pa.array(counts.client, pa.int32()),
        "label": pa.array(counts.label, pa.int32()),
        "count": pa.array(counts.count, pa.int64()),
    })
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def describe_partition(task: Task) -> str:
    partition, dataset = task.partition, task.dataset
    sizes = partition.sizes
    val = f"{len(dataset.val.y)} val / " if dataset.val is not None else ""
    text = (
        f"{len(sizes)} clients, {int(sizes.sum())} train / {val}"
        f"{len(dataset.test.y)} test samples; "
        f"client size min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"
    )
    if partition.generated:
        return f"{text}; each client's samples generated when it trains"
    if task.info.kind == "segmentation":  # the histogram counts images without/with foreground
        return f"{text}; sites {', '.join(dataset.spec.domains)}"
    classes = len(partition.label_counts.count) / partition.num_clients
    return f"{text}; classes per client mean {classes:.1f}"
