"""A private run survives kill -9 of its driver: the resumed run is the undisturbed one bit for
bit, its Poisson draws, adaptive clip, server noise and ε included (the noise streams are
seeded by round, the clip is server state in the checkpoint, ε is recomputed from the round
cursor)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import metrics_of, small_config
from test_durable import assert_same_state, final_state, kill_9_after_round_2, reference_run

from raysim.config import config_to_dict


@pytest.mark.slow
def test_a_private_run_killed_by_sigkill_resumes_to_the_undisturbed_run(ray_session, tmp_path,
                                                                        capsys):
    from raysim.cli.main import main

    raw = config_to_dict(small_config(rounds=4, clients_per_round=3))
    raw["checkpoint"] = {"every": 2, "keep": 2}
    raw["resources"]["num_workers"] = 1
    raw["privacy"] = {"mechanism": "central", "noise_multiplier": 0.05, "clip": 0.5,
                      "sampling": "poisson", "adaptive": {"count_noise": 1.0}}
    expected = reference_run(raw, tmp_path / "reference")
    epsilons = [value for (_, metric), value in sorted(expected.items())
                if metric == "privacy_epsilon"]
    assert len(epsilons) == 4 and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert any(metric == "server_privacy_clip" for _, metric in expected)

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed"
    kill_9_after_round_2(config_file, run_dir)
    # `raysim resume` in this process, on the tests' Ray (the killed driver was a process)
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert "resuming after round 2" in capsys.readouterr().out
    assert metrics_of(run_dir) == expected
    (r1, state), (r2, reference) = final_state(run_dir), final_state(tmp_path / "reference")
    assert r1 == r2 == 4
    assert_same_state(state, reference)  # adaptive clip and all, bit for bit
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
