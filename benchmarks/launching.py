"""One `raysim launch` of the quickstart (with overrides) in a fresh process, as the benchmarks
run it: its summary.json, or RuntimeError with the end of its stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch_quickstart(overrides: Sequence[str], run_dir: Path) -> dict:
    """`raysim launch yaml/quickstart.yaml --quiet --run-dir run_dir -o ...` from the
    repository root; the run's summary."""
    command = [sys.executable, "-m", "raysim.cli", "launch", "yaml/quickstart.yaml", "--quiet",
               "--run-dir", str(run_dir), *[arg for o in overrides for arg in ("-o", o)]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads((Path(run_dir) / "summary.json").read_text())
