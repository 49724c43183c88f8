"""Personalised evaluation downstream of the engine: client_metrics.parquet (one part file per
evaluated round, dropped past a resume's checkpoint, restored from it), the personalised
headline in the summary, the progress line, selection and the sweep's metric checks. Round
results are built here, as the engine reports them."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, small_config

from algorithms.fedavg import FedAvg
from raysim.algorithm import PersonalModel
from raysim.config import ConfigError
from raysim.results.metric_names import check_metric, default_mode
from raysim.results.sinks import CLIENT_METRICS, ConsoleProgress, RunDirectory
from raysim.run.checkpoints import (
    CheckpointWriter,
    checkpoint_history,
    newest_complete,
    records_agree,
)
from raysim.run.summary import select_best, summarize
from raysim.tune.compare import parse_comparison
from raysim.types import RoundResult, headline_metric

PERSONAL = {"evaluation.personal.finetune_epochs": 1}  # fedavg, deployed after fine-tuning


class KeepsHead(PersonalModel, FedAvg):
    """Shares the body only: no global model, so no global test metrics."""

    shares = "head"


def evaluated(round_index: int, accuracies: dict[int, float], val: bool = False) -> RoundResult:
    """A round whose personalised evaluation scored `accuracies` (client → accuracy)."""
    rows = [(c, "personal_test_accuracy", a) for c, a in accuracies.items()]
    rows += [(c, "personal_test_loss", 1 - a) for c, a in accuracies.items()]
    mean = sum(accuracies.values()) / len(accuracies)
    metrics = {"train_loss": 0.5, "personal_test_accuracy": mean,
               "personal_test_accuracy_weighted": mean + 0.01,
               "personal_test_accuracy_std": 0.1, "personal_test_accuracy_p10": mean - 0.2,
               "personal_clients": float(len(accuracies))}
    if val:
        metrics["personal_val_accuracy"] = 1 - mean  # so val and test disagree on the best
    return RoundResult(round=round_index, metrics=metrics, client_metrics=tuple(rows))


def plain(round_index: int) -> RoundResult:
    return RoundResult(round=round_index, metrics={"train_loss": 0.4})


def rows_of(results) -> list[tuple]:
    return sorted((r.round, c, m, v) for r in results for c, m, v in r.client_metrics)


def read_rows(run_dir) -> list[tuple]:
    table = pq.read_table(run_dir / CLIENT_METRICS)
    return sorted(zip(*(table.column(c).to_pylist()
                        for c in ("round", "client", "metric", "value"))))


def parts(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / CLIENT_METRICS).iterdir())


def test_each_evaluated_round_is_one_part_file_read_as_one_table(tmp_path) -> None:
    sink = RunDirectory(tmp_path)
    sink.restart([])
    results = [evaluated(1, {0: 0.5, 3: 0.75}), plain(2), evaluated(3, {1: 0.25, 7: 1.0})]
    first = None
    for result in results:
        sink.log_round(result)
        if result.round == 1:
            first = (tmp_path / CLIENT_METRICS / "round-000001.parquet").stat().st_mtime_ns
    assert parts(tmp_path) == ["round-000001.parquet", "round-000003.parquet"]
    # written once: a later round does not rewrite an earlier part
    assert (tmp_path / CLIENT_METRICS / "round-000001.parquet").stat().st_mtime_ns == first
    assert read_rows(tmp_path) == rows_of(results)
    frame = pd.read_parquet(tmp_path / CLIENT_METRICS)
    assert list(frame.columns) == ["round", "client", "metric", "value"] and len(frame) == 8
    # the per-round summaries stay in metrics.parquet, the per-client rows do not
    metrics = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert {"round": 3, "metric": "personal_test_accuracy", "value": 0.625} in metrics
    assert all(r["metric"] != "personal_test_loss" for r in metrics)
    assert sink.results[0].client_metrics == ()  # not kept in the driver's memory


def test_a_resume_drops_the_parts_after_its_checkpoint(tmp_path) -> None:
    sink = RunDirectory(tmp_path)
    sink.restart([])
    results = [evaluated(r, {0: r / 10, 1: r / 20}) for r in (1, 2, 3, 4)]
    for result in results:
        sink.log_round(result)
    (tmp_path / CLIENT_METRICS / ".round-000005.parquet.tmp").write_bytes(b"cut short")
    (tmp_path / CLIENT_METRICS / "notes.txt").write_text("mine")  # not ours: left alone
    # a checkpoint's history carries its own round's rows only
    history = [plain_of(r) for r in results[:1]] + [results[1]]
    RunDirectory(tmp_path).restart(history)
    assert parts(tmp_path) == ["notes.txt", "round-000001.parquet", "round-000002.parquet"]
    (tmp_path / CLIENT_METRICS / "notes.txt").unlink()
    assert read_rows(tmp_path) == rows_of(results[:2])
    RunDirectory(tmp_path).restart([])  # a run started over keeps nothing
    assert not (tmp_path / CLIENT_METRICS).exists()


def plain_of(result: RoundResult) -> RoundResult:
    return RoundResult(round=result.round, metrics=result.metrics)


def test_a_checkpoint_restores_the_part_of_its_own_round(tmp_path) -> None:
    """The driver writes a round's part after its checkpoint: one that died between the two
    gets the part back from the checkpoint on resume."""
    config = small_config(**PERSONAL)
    run = SimpleNamespace(run_dir=tmp_path, config=config, restore=None)
    writer = CheckpointWriter(run, SimpleNamespace(release_checkpoint=lambda r: None))
    results = [evaluated(1, {0: 0.5}), evaluated(2, {0: 0.6, 5: 0.8})]
    sink = RunDirectory(tmp_path)
    sink.restart([])
    sink.log_round(results[0])
    writer.write(2, {}, results)  # ... and the driver dies before logging round 2
    found = newest_complete(tmp_path)
    history = checkpoint_history(found)
    assert [r.client_metrics for r in history] == [(), results[1].client_metrics]
    assert not records_agree(found, tmp_path)
    RunDirectory(tmp_path).restart(history)
    assert read_rows(tmp_path) == rows_of(results)
    assert records_agree(found, tmp_path)
    writer.write(3, {}, [*results, plain(3)])  # a round without personalised evaluation
    assert "client_metrics.parquet" not in newest_complete(tmp_path).names()


def test_selection_on_personal_validation_parts_or_else_test() -> None:
    with_val = [evaluated(r, {0: a, 1: a}, val=True) for r, a in [(1, 0.6), (2, 0.9), (3, 0.7)]]
    best = select_best(with_val, "accuracy", prefix="personal_")
    assert best == {"selected_by": "personal_val_accuracy", "round": 1,
                    "personal_val_accuracy": pytest.approx(0.4),
                    "personal_test_accuracy": 0.6,
                    "personal_test_accuracy_weighted": 0.61,
                    "personal_test_accuracy_std": 0.1,
                    "personal_test_accuracy_p10": pytest.approx(0.4)}
    without = [evaluated(r, {0: a}) for r, a in [(1, 0.6), (2, 0.9), (3, 0.7)]]
    best = select_best(without, "accuracy", prefix="personal_")
    assert (best["selected_by"], best["round"]) == ("personal_test_accuracy", 2)
    # the global selection ignores the personal metrics
    assert select_best(with_val, "accuracy") == {"selected_by": "test_accuracy", "round": None,
                                                 "test_accuracy": None}


def test_the_summary_is_judged_by_the_personal_headline(tmp_path) -> None:
    results = [evaluated(r, {0: a, 1: a}, val=True) for r, a in [(1, 0.6), (2, 0.9)]]
    for personal, headline in [(PERSONAL, "personal_test_accuracy"), ({}, "test_accuracy")]:
        run = SimpleNamespace(config=small_config(**personal), run_dir=tmp_path,
                              task=SimpleNamespace(info=SimpleNamespace(kind="classification")))
        summary = summarize(run, results, 1.0, 2.0, status="completed")
        assert summary.headline == headline
    assert summary.best["round"] is None  # the global run has no global test metric here
    run.config = small_config(**PERSONAL)
    best = summarize(run, results, 1.0, 2.0, status="completed").best
    assert best["selected_by"] == "personal_val_accuracy" and best["round"] == 1
    assert headline_metric("segmentation", True, "val") == "personal_val_dice"


def progress_of(results, personal: bool, kind: str = "classification") -> list[str]:
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    config = small_config(**(PERSONAL if personal else {}))
    progress.start(SimpleNamespace(config=config, history=(),
                                   task=SimpleNamespace(info=SimpleNamespace(kind=kind))))
    for result in results:
        progress.log_round(result)
    return stream.getvalue().splitlines()


def test_the_progress_line_shows_the_personal_headline() -> None:
    results = [plain(1), evaluated(2, {0: 0.9312, 1: 0.9312}), plain(3)]
    lines = progress_of(results, personal=True)
    assert "pacc   n/a " in lines[0]
    assert "pacc 0.9312" in lines[1] and "pacc 0.9312" in lines[2]  # carried forward
    global_run = [RoundResult(round=1, metrics={"test_accuracy": 0.5, "train_loss": 1.0})]
    assert " acc 0.5000" in progress_of(global_run, personal=False)[0]
    dice = [RoundResult(round=1, metrics={"personal_test_dice": 0.75})]
    assert "pdice 0.7500" in progress_of(dice, personal=True, kind="segmentation")[0]


@pytest.mark.parametrize("metric", [
    "personal_test_accuracy", "personal_test_accuracy_weighted", "personal_test_accuracy_std",
    "personal_test_accuracy_p10", "personal_test_loss", "personal_clients"])
def test_personal_metrics_are_reportable_with_personal_evaluation(metric) -> None:
    check_metric(metric, [small_config(**PERSONAL)])
    with pytest.raises(ConfigError, match=(
            f"^metric: '{metric}' is reported only with personalised evaluation; set "
            r"evaluation.personal \(e.g.")):
        check_metric(metric, [small_config()])


def test_personal_metric_errors_and_modes() -> None:
    with_val = small_config(**PERSONAL, **{"evaluation.personal.val_fraction": 0.15})
    check_metric("personal_val_accuracy_weighted", [with_val])
    with pytest.raises(ConfigError, match="^metric: 'personal_val_accuracy' needs validation "
                                          "parts: set evaluation.personal.val_fraction"):
        check_metric("personal_val_accuracy", [small_config(**PERSONAL)])
    with pytest.raises(ConfigError, match="did you mean 'personal_test_accuracy'"):
        check_metric("personal_test_acuracy", [small_config(**PERSONAL)])
    head = small_config(**PERSONAL, **{"algorithm.name": "test_personal_results:KeepsHead"})
    check_metric("personal_test_accuracy", [head])
    with pytest.raises(ConfigError, match="not reported by test_personal_results:KeepsHead .*"
                                          "no whole model.*use personal_test_accuracy"):
        check_metric("test_accuracy", [head])
    assert default_mode("personal_test_accuracy_p10") == "max"
    assert default_mode("personal_test_loss_weighted") == "min"
    assert default_mode("personal_test_accuracy_std") == "min"


def test_a_comparison_selects_on_personal_validation_or_says_it_used_test(tmp_path) -> None:
    from raysim.results.compare_report import markdown_table

    (tmp_path / "setting.yaml").write_text(
        "base: {}\nevaluation: {{personal: {{finetune_epochs: 1}}}}\n".format(
            (ROOT / "yaml" / "quickstart.yaml").as_posix()))
    raw = {"setting": "setting.yaml", "methods": ["fedavg"], "budget": {"trials": 1},
           "seeds": [0]}
    comparison = parse_comparison(raw, tmp_path)  # no data.val_fraction needed
    assert (comparison.selection_metric, comparison.test_metric) == (
        "personal_test_accuracy", "personal_test_accuracy")
    comparison.validate()
    raw["overrides"] = {"evaluation.personal.val_fraction": 0.15}
    comparison = parse_comparison(raw, tmp_path)
    assert comparison.selection_metric == "personal_val_accuracy"
    summary = {"reported": "personal_test_accuracy", "selected_on_test": True, "methods": {}}
    assert "selected on the test split (personal_test_accuracy)" in markdown_table(summary)
    assert "test split" not in markdown_table({**summary, "selected_on_test": False})
