"""Weights & Biases logging, for real, in offline mode (no network)."""

from __future__ import annotations

import pytest

from raysim.cli.main import main
from raysim.results.sinks import wandb_mode


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    mode, note = wandb_mode("online")
    assert mode == "offline" and "no W&B API key" in note
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("online") == ("online", None)
    assert wandb_mode("disabled") == ("disabled", None)


@pytest.mark.slow
def test_offline_run_records_the_round_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    code = main(["launch", "yaml/quickstart.yaml", "--run-dir", str(run_dir), "--quiet",
                 "-o", "rounds=2", "-o", "train.local_epochs=1", "-o", "resources.backend=local",
                 "-o", "logging.wandb.mode=offline", "-o", "logging.wandb.tags=[ci]"])
    assert code == 0
    (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    content = record.read_bytes()  # W&B's record log: protobuf strings are stored as-is
    for text in (b"test_accuracy", b"train_loss", b"label_histograms", b"quickstart", b"ci"):
        assert text in content, text


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    assert main(["launch", "yaml/quickstart.yaml", "--run-dir", str(run_dir), "--quiet",
                 "-o", "rounds=2", "-o", "train.local_epochs=1", "-o", "resources.backend=local",
                 "-o", "logging.wandb.mode=offline"]) == 0
    assert main(["resume", str(run_dir), "--quiet", "-o", "rounds=3"]) == 0
    run_id = (run_dir / "wandb_run_id").read_text()
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    # W&B names a run's folder by the second it started and appends "-1" when two start in
    # the same second, so the run id is read from the record file inside each folder.
    assert len(runs) == 2 and all((path / f"run-{run_id}.wandb").is_file() for path in runs)
    resumed = runs[1] / f"run-{run_id}.wandb"
    assert b"test_accuracy" in resumed.read_bytes()
