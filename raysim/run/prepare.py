"""Everything that can fail on user input, before Ray starts: the task (dataset files,
partition feasibility) and the run directory."""

from __future__ import annotations

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
from raysim.registry import DATASETS
from raysim.task import Task, build_task, dataset_request


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
    except ValueError as error:  # an infeasible partition, e.g. too many clients for alpha
        raise ConfigError(f"data.partition: {error}") from None


def prepare(config: Config, run_dir: str | Path | None = None) -> Run:
    task = build_checked_task(config)
    run_dir = Path(run_dir) if run_dir else default_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    write_label_histograms(task, run_dir / "label_histograms.parquet")
    return Run(config=config, task=task, run_dir=run_dir)


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
    pq.write_table(table, path)


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
