"""The command line: user mistakes exit 2 with one error line before Ray starts; a launch
writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from raysim.cli.main import main

# An address nothing listens on: if the CLI touched Ray before validating, it would fail with
# a connection error, not the config error asserted below.
UNREACHABLE = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysim.cli", *args], capture_output=True, text=True,
        env=UNREACHABLE, timeout=120,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.partiton.alpha=0.1"],
         "unknown key 'data.partiton' for dataset 'digits'; did you mean 'data.partition'"),
        (["rounds=many"], "rounds: expected int, got str 'many'"),
        (["data.partition.alpha=0"], "data.partition.alpha: must be > 0"),
        (["clients_per_round=51"], "clients_per_round: 51 > data.partition.num_clients (50)"),
        (["data.dataset=imagenet"],
         "unknown dataset 'imagenet'; choose one of cifar10, cifar100, digits,"),
        (["model.name=vit"],
         "unknown model 'vit'; choose one of cnn, cnn_deep, cnn_wide, logreg, mlp, resnet10, unet"),
        (["algorithm.name=fedfoo"],
         "unknown algorithm 'fedfoo'; choose one of fedavg, fedavg_ft, fedbcs, fedgh, fedhpro, "
         "fedhpro_paper, fedper, fedproto, fedproto_personal, fedprox, fedrep, fedtgp, "
         "fedtgp_personal, fpl, lg_fedavg, local, moon, scaffold"),
        (["data.dataset=cifar10", "data.root=/nonexistent/data"],
         "/nonexistent/data/cifar-10-batches-py"),
        (["data.dataset=mnist"], "data.root"),
        (["data.partition.num_clients=1000", "clients_per_round=5", "data.partition.min_size=5"],
         "data.partition:"),
    ],
)
def test_user_mistakes_exit_2_with_one_error_line(overrides, message, capsys, tmp_path):
    args = ["launch", "yaml/quickstart.yaml", "--run-dir", str(tmp_path / "run")]
    for override in overrides:
        args += ["-o", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("raysim: error: ")
    assert message in err[0]


def test_errors_come_before_ray_in_a_real_process():
    result = run_cli("launch", "yaml/quickstart.yaml", "-o", "data.partition.alpha=-1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "raysim: error: data.partition.alpha: must be > 0 (got -1.0)"
    )
    assert "ray" not in result.stdout.lower()


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    for path, message in ((tmp_path / "none.yaml", "none.yaml"), (bad, "not valid YAML")):
        assert main(["launch", str(path)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("raysim: error: ") and message in line


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", "yaml/quickstart.yaml", "-o", "algorithm.name=fedprox"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["algorithm"] == {"name": "fedprox", "mu": 0.01}
    assert resolved["train"]["weight_decay"] == 0.0


@pytest.mark.slow
def test_launch_writes_config_metrics_and_summary(ray_session, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main([
        "launch", "yaml/quickstart.yaml", "--run-dir", str(run_dir),
        "-o", "rounds=3", "-o", "eval_every=2", "-o", "train.local_epochs=1",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "round 3/3" in out and "final test accuracy" in out

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["rounds"] == 3 and resolved["train"]["local_epochs"] == 1

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert len(summary["round_seconds"]) == 3
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert summary["wall_seconds"] > summary["launch_to_first_round_seconds"] > 0
    phases = summary["startup_phases"]  # in the order start-up goes through them
    assert 0 < phases["prepared"] < phases["ray_ready"] < phases["actors_ready"] \
        < phases["first_round"] == summary["launch_to_first_round_seconds"]
    memory = summary["peak_rss_mb"]
    assert memory["driver"] > 50 and memory["server"] > 50 and len(memory["workers"]) == 2
    assert "workers_gpu" not in memory  # workers on CPUs
    assert len(summary["client_train_seconds"]) == 3
    assert all(0 < t < s * 2 for t, s in zip(summary["client_train_seconds"],
                                              summary["round_seconds"]))

    table = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    rounds_with_accuracy = sorted(r["round"] for r in table if r["metric"] == "test_accuracy")
    assert rounds_with_accuracy == [2, 3]  # eval_every=2, plus the last round
    train_loss = [r for r in table if r["metric"] == "train_loss"]
    assert [r["round"] for r in train_loss] == [1, 2, 3]
    final_acc = [r["value"] for r in table if r["metric"] == "test_accuracy" and r["round"] == 3]
    assert final_acc == [summary["final"]["test_accuracy"]]

    histograms = pq.read_table(run_dir / "label_histograms.parquet").to_pydict()
    assert sum(histograms["count"]) == 1797 - 450  # digits: every train sample, once
    assert set(histograms["client"]) == set(range(50))
    assert min(histograms["count"]) > 0  # sparse: nonzero rows only
