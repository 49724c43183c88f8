"""A Ray system process of the embedded Ray killed mid-run (raylet, GCS server): the driver
says what died in one line, writes summary.json with status failed, names the resume command
of its last checkpoint, exits 1, and leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_no_orphans import (
    after_round,
    args_of,
    kill_leftovers,
    launch,
    left_after,
    session_dir_of,
)

from raysim.run.checkpoints import newest_complete


@pytest.mark.slow
# The raylet only: a dead GCS server takes the same path (raysim.engine.cluster's
# embedded_failure) but holds the driver 7-12 s longer in Ray's own shutdown.
@pytest.mark.parametrize("victim, named", [("raylet", "the raylet")])
def test_a_dead_ray_system_process_fails_the_run_with_a_summary(tmp_path, victim, named):
    driver, run_dir = launch(tmp_path, rounds=40)
    processes: set[tuple[int, int]] = set()
    try:
        processes = after_round(run_dir, driver)
        session_dir = session_dir_of(processes)
        pid = next(p for p, _ in processes if Path(args_of(p)[0]).name == victim)
        os.kill(pid, signal.SIGKILL)
        driver.wait(timeout=240)
        err = (tmp_path / "err.txt").read_text()
        assert driver.returncode == 1, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("raysim: error:")]
        assert len(errors) == 1
        assert errors[0].startswith(f"raysim: error: the Ray cluster failed: {named} (pid {pid})"
                                    " was killed by SIGKILL"), err
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed"
        assert "the Ray cluster failed" in summary["stop_reason"]
        done = summary["rounds_completed"]
        assert 1 <= done < 40
        # the newest checkpoint is the last complete round's, and the run resumes from it
        assert newest_complete(run_dir).round == done
        assert summary["checkpoint"].endswith(f"round-{done:06d}")
        assert f"raysim resume {run_dir}" in err
        assert left_after(processes, session_dir) == (set(), [])
    finally:
        kill_leftovers(driver, processes)
