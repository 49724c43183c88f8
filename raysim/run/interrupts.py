"""SIGINT / SIGTERM during a run."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from raysim.run.checkpoints import MANIFEST, checkpoint_rounds


class Interrupts:
    """SIGINT / SIGTERM during a run: the first lets the round in flight finish, then the run
    checkpoints and ends (`count` > 0); a second exits at once with 130 (the last complete
    checkpoint still resumes). Only the main thread can take signals (not a Tune trial)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, simulation: Any, run_dir: Path) -> None:
        self.simulation, self.run_dir = simulation, run_dir
        self.count = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.simulation.request_stop()
            print(f"\nraysim: {name}: finishing the round in flight, then writing a checkpoint "
                  "(again to stop at once)", file=sys.stderr, flush=True)
            return
        print(f"\nraysim: {name} again: stopped at once; {resume_hint(self.run_dir)}",
              file=sys.stderr, flush=True)
        os._exit(130)


def resume_hint(run_dir: Path) -> str:
    """How to go on with a run that stopped: `raysim resume` only if it has a complete checkpoint
    (one is renamed into place once written; its manifest is not hashed here: this runs in a
    signal handler)."""
    if any((path / MANIFEST).is_file() for _, path in checkpoint_rounds(run_dir)):
        return f"continue with: raysim resume {run_dir}"
    return "it has no checkpoint yet, so there is nothing to resume: launch it again"
