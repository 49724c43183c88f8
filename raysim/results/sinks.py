"""Where per-round results go: the console, the run directory, (optionally) W&B.

A sink has three calls: `start(run)`, `log_round(result)`, `finish(summary)`. Sinks never raise
into the simulation loop for their own problems: logging must not stop a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import secrets
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq

from raysim.config import config_to_dict
from raysim.registry import SINKS
from raysim.results.records import client_metrics_table, failures_table, metrics_table
from raysim.types import HEADLINE_METRIC, RoundResult, RunSummary, headline_metric


def extra_sinks(config: Any, run_dir: Path) -> list[Sink]:
    """The run's sinks besides the run directory and the progress line: W&B (unless disabled)
    and those of `logging.sinks`, from the `raysim.sinks` registry; a sink that declares a
    `Config` is made as cls(run_dir, its keys), the others as cls(run_dir)."""
    chosen = [(sink.name, sink.params) for sink in config.logging.sinks]
    if config.logging.wandb.mode != "disabled" and "wandb" not in [n for n, _ in chosen]:
        chosen.insert(0, ("wandb", None))
    return [SINKS[name](run_dir, params) if hasattr(SINKS[name], "Config")
            else SINKS[name](run_dir) for name, params in chosen]


class Sink:
    """The interface of every sink (a plug-in registers a class taking the run directory)."""

    def start(self, run: Any) -> None:
        """`run` is the `raysim.run.Run` being executed (config, task, run_dir)."""

    def log_round(self, result: RoundResult) -> None: ...

    def finish(self, summary: RunSummary) -> None: ...


class CollectRounds(Sink):
    """Keeps every round's metrics in memory, for scripts that run experiments in-process."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []

    def log_round(self, result: RoundResult) -> None:
        self.rounds.append(result.metrics)


class ConsoleProgress(Sink):
    """A live progress line on a terminal (one line per round when output is not a TTY): the
    run's headline as of its last evaluated round (`acc`, `dice`; with personalised evaluation
    the mean over clients of their own models, `pacc`, `pdice`), and with `privacy` the ε
    spent so far."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.total = 0
        self.headline = headline_metric("classification")
        self.label = "acc"
        self.value: float | None = None  # the headline of the last evaluated round
        self.restarts = 0

    def start(self, run: Any) -> None:
        self.total = run.config.rounds
        kind, personal = run.task.info.kind, run.config.evaluation.personal is not None
        self.headline = headline_metric(kind, personal)
        metric = HEADLINE_METRIC[kind]
        self.label = ("p" if personal else "") + ("acc" if metric == "accuracy" else metric)
        self.restarts = sum(e["kind"].endswith("_restarted") for r in run.history
                            for e in r.events)

    def log_round(self, result: RoundResult) -> None:
        m = result.metrics
        self.value = m.get(self.headline, self.value)
        width = 20
        filled = round(width * result.round / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        value_text = f"{self.value:.4f}" if self.value is not None else "  n/a "
        text = (
            f"round {result.round:>{len(str(self.total))}}/{self.total} [{bar}] "
            f"{self.label} {value_text} "
            f"loss {m.get('train_loss', float('nan')):.4f} | "
            f"{result.seconds:.2f} s/round, {m.get('samples_per_second', 0):,.0f} samples/s"
        )
        for event in result.events:
            if event["kind"].endswith("_restarted"):
                self.restarts += 1
                self._print(f"\nwarning: round {result.round}: {event['actor']} died and was "
                            f"replaced ({event['reason']})\n")
        if "privacy_epsilon" in m:  # the privacy spent so far (differential privacy)
            text += f" | ε {m['privacy_epsilon']:.2f}"
        if self.restarts:
            text += f" | {self.restarts} actor restart{'s' if self.restarts > 1 else ''}"
        for cid, reason in result.failures.items():
            first = reason.strip().splitlines()[-1] if reason.strip() else "unknown error"
            self._print(f"\nwarning: round {result.round}: client {cid} dropped: {first}\n")
        if self.live:
            end = "\n" if result.round == self.total else ""
            self._print("\r" + text + " " * 4 + end)
        else:
            self._print(text + "\n")

    def _print(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


CLIENT_METRICS = "client_metrics.parquet"  # a folder of one part file per evaluated round


class RunDirectory(Sink):
    """`metrics.parquet` (one row per round and metric), `failures.parquet` (one row per
    retry, dropped client, actor restart and replay) and `summary.json` in the run dir. A
    resumed run starts from the rows its checkpoint recorded.

    With personalised evaluation, `client_metrics.parquet/` holds every evaluated client's
    values (`round`, `client`, `metric`, `value`, e.g. 12, 7, personal_test_accuracy, 0.93):
    one file per evaluated round, `round-000012.parquet`, written once when the round ends
    (a long run never rewrites its history), which `pyarrow.parquet.read_table` and
    `pandas.read_parquet` read as one table. A resumed run drops the files of rounds after its
    checkpoint and writes that checkpoint's own round again from its records."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.results: list[RoundResult] = []
        self.records: list[dict[str, Any]] = []

    def start(self, run: Any) -> None:
        self.restart(run.history)

    def restart(self, history: Sequence[RoundResult]) -> None:
        """The records of `history` (a checkpoint's) and nothing after them: rows a run logged
        after its checkpoint's round are dropped."""
        self.results = [dataclasses.replace(r, client_metrics=()) for r in history]
        self.records = [e for r in history for e in r.events]
        self.write_metrics()
        self.write_failures()
        self.drop_client_metrics(after=history[-1].round if history else 0)
        for result in history:
            self.write_client_metrics(result)

    def log_round(self, result: RoundResult) -> None:
        # records, not files; the per-client rows go to their own file, not into memory
        self.results.append(dataclasses.replace(result, checkpoint=None, client_metrics=()))
        self.write_client_metrics(result)
        self.write_metrics()  # small; rewritten each round so an interrupted run keeps its data
        if result.events:
            self.records.extend(result.events)
            self.write_failures()

    def write_metrics(self) -> None:
        table = metrics_table(self.results)
        atomic_write(self.run_dir / "metrics.parquet", lambda path: pq.write_table(table, path))

    def write_failures(self) -> None:
        table = failures_table(self.records)
        atomic_write(self.run_dir / "failures.parquet", lambda path: pq.write_table(table, path))

    def write_client_metrics(self, result: RoundResult) -> None:
        """The round's per-client rows as its own part file (none for a round without)."""
        if not result.client_metrics:
            return
        table = client_metrics_table([result])
        folder = self.run_dir / CLIENT_METRICS
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(client_metrics_part(self.run_dir, result.round),
                     lambda path: pq.write_table(table, path))

    def drop_client_metrics(self, after: int) -> None:
        """Remove the part files of rounds after `after` (and a folder left empty)."""
        folder = self.run_dir / CLIENT_METRICS
        if not folder.is_dir() or folder.is_symlink():
            return
        for path in folder.iterdir():
            found = PART_NAME.fullmatch(path.name)
            cut_short = path.name.startswith(".round-") and path.name.endswith(".tmp")
            if cut_short or (found is not None and int(found.group(1)) > after):
                path.unlink()  # a write cut short, or a round the run goes back before
        if not any(folder.iterdir()):
            folder.rmdir()

    def finish(self, summary: RunSummary) -> None:
        text = json.dumps(summary.to_dict(), indent=2)
        atomic_write(self.run_dir / "summary.json", lambda path: Path(path).write_text(text))


PART_NAME = re.compile(r"round-(\d{6,})\.parquet")


def client_metrics_part(run_dir: Path, round_index: int) -> Path:
    """The file of one round's per-client rows in a run directory."""
    return Path(run_dir) / CLIENT_METRICS / f"round-{round_index:06d}.parquet"


def atomic_write(target: Path, write) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)  # a link left there is removed, not written through
    write(tmp)
    os.replace(tmp, target)


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """`online` without credentials (WANDB_API_KEY or a netrc entry) becomes `offline`, with
    the reason, so a run never waits on a login prompt."""
    if requested != "online" or os.environ.get("WANDB_API_KEY"):
        return requested, None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return requested, None
    return "offline", "no W&B API key found: logging offline (sync later with `wandb sync`)"


# An unreachable W&B gives up this fast (W&B's defaults: 90 s, unbounded), so the end of a run
# never waits long on it; what was not uploaded stays in the run's local W&B files.
WANDB_INIT_SECONDS = 20.0
WANDB_FINISH_SECONDS = 45.0
WANDB_TABLE_ROWS = 100_000  # label counts beyond this stay in label_histograms.parquet


class WandbSink(Sink):
    """Weights & Biases logging on a background thread: a slow, unreachable or misconfigured
    W&B never stalls the rounds. Its first error is printed once and W&B logging stops there;
    the simulation goes on."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def start(self, run: Any) -> None:
        mode, note = wandb_mode(run.config.logging.wandb.mode)
        if note:
            print(f"raysim: warning: {note}", file=sys.stderr)
        self.thread = threading.Thread(target=self._work, args=(run, mode), daemon=True)
        self.thread.start()

    def log_round(self, result: RoundResult) -> None:
        self.queue.put(("log", dict(result.metrics), result.round))

    def finish(self, summary: RunSummary) -> None:
        self.queue.put(("finish", summary.to_dict(), None))
        if self.thread is not None:
            self.thread.join(timeout=60)

    def _work(self, run: Any, mode: str) -> None:

        settings = run.config.logging.wandb
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            # one W&B run per run directory: a resumed run continues it (same id)
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            wb = wandb.init(
                id=run_id, resume="allow",
                project=settings.project, entity=settings.entity, group=settings.group,
                tags=settings.tags or None, name=run.config.name, mode=mode,
                config=config_to_dict(run.config), dir=str(self.run_dir),
                settings=wandb.Settings(init_timeout=WANDB_INIT_SECONDS,
                                        finish_timeout=WANDB_FINISH_SECONDS),
            )
            counts = run.task.partition.label_counts
            if not run.history and counts is not None and len(counts.count) <= WANDB_TABLE_ROWS:
                rows = [[int(c), int(k), int(n)]
                        for c, k, n in zip(counts.client, counts.label, counts.count)]
                wb.log({"label_histograms": wandb.Table(columns=["client", "label", "count"],
                                                        data=rows)}, step=0)
            anchors: dict[int, dict[str, float]] = {}  # round → anchor diagnostics
            while True:
                kind, payload, step = self.queue.get()
                if kind == "log":
                    wb.log(payload, step=step)
                    found = {k: v for k, v in payload.items() if k.startswith("anchor_")}
                    if found:
                        anchors[step] = found
                    continue
                wb.summary.update({k: v for k, v in payload.items() if k != "final"})
                wb.summary.update({f"final/{k}": v for k, v in payload["final"].items()})
                figures = self._diagnostic_figures(wandb, anchors)
                if figures:
                    wb.log(figures, step=max(anchors, default=0))
                wb.finish()
                wandb.teardown()  # flush to disk now: exit hooks may not run in a Ray actor
                return
        except Exception as error:  # W&B must never take the simulation down
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(f"raysim: warning: W&B logging stopped: {first}", file=sys.stderr)

    def _diagnostic_figures(self, wandb: Any, anchors: dict[int, dict[str, float]]) -> dict:
        """One line chart of the anchor diagnostics over the rounds, and the run directory's
        figures (*.png), if any."""
        figures = {f"figures/{path.stem}": wandb.Image(str(path))
                   for path in sorted(self.run_dir.glob("*.png"))}
        keys = sorted({k for row in anchors.values() for k in row})
        rounds = [r for r in sorted(anchors) if all(k in anchors[r] for k in keys)]
        if keys and rounds:
            figures["anchor_diagnostics"] = wandb.plot.line_series(
                xs=rounds, ys=[[anchors[r][k] for r in rounds] for k in keys], keys=keys,
                title="anchor diagnostics", xname="round")
        return figures
