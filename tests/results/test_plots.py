"""`raysim plot` and the curves.png of every launch: real run directories, real PNG files."""

from __future__ import annotations

import struct

import pyarrow.parquet as pq
import pytest

from raysim.cli.main import main
from raysim.results.records import metrics_table
from raysim.types import RoundResult

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "run"
    code = main(["launch", "yaml/quickstart.yaml", "--local", "--quiet", "--run-dir", str(out),
                 "-o", "rounds=2", "-o", "train.local_epochs=1"])
    assert code == 0
    return out


def test_every_launch_leaves_its_curves(run_dir, capsys) -> None:
    assert png_size(run_dir / "curves.png") == (640, 380)


def test_plot_one_or_several_runs(run_dir, tmp_path, capsys) -> None:
    assert main(["plot", str(run_dir)]) == 0
    assert png_size(run_dir / "test_accuracy.png") == (640, 380)
    assert f"wrote {run_dir / 'test_accuracy.png'}" in capsys.readouterr().out
    out = tmp_path / "loss.png"
    assert main(["plot", str(run_dir), str(run_dir), "--metric", "train_loss",
                 "--out", str(out)]) == 0
    assert png_size(out) == (640, 380)


def test_per_domain_series_are_drawn_beside_the_metric(tmp_path) -> None:
    from raysim.results.plots import plot_runs, read_metrics

    results = [RoundResult(r, {"test_accuracy": 0.1 * r, "test_accuracy/svhn": 0.05 * r,
                               "test_accuracy/usps": 0.15 * r}) for r in (1, 2, 3)]
    pq.write_table(metrics_table(results), tmp_path / "metrics.parquet")
    metrics = read_metrics(tmp_path)
    assert metrics["test_accuracy/usps"] == [(1, 0.15), (2, 0.3), (3, 0.15 * 3)]
    path = plot_runs([tmp_path], "test_accuracy", tmp_path / "p.png")
    assert png_size(path) == (640, 380)


def test_bad_plot_requests_get_one_line(run_dir, tmp_path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raysim: error: {tmp_path}: not a raysim run directory (no metrics.parquet); "
                   "pass a directory `raysim launch` printed"]
    assert main(["plot", str(run_dir), "--metric", "test_dice"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"raysim: error: {run_dir}: has no metric 'test_dice'; it has: ")
    assert "test_accuracy" in line and "train_loss" in line


def test_curves_can_be_switched_off(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["launch", "yaml/quickstart.yaml", "--local", "--quiet", "--run-dir", str(out),
                 "-o", "rounds=1", "-o", "train.local_epochs=1",
                 "-o", "logging.curves=false"]) == 0
    assert (out / "summary.json").is_file() and not (out / "curves.png").exists()
