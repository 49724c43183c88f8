"""One run's lifecycle, from a validated config to its summary: `prepare` (everything that can
fail on user input, before Ray), `execute` (connect, run the rounds, checkpoint, interrupts,
summary), `prepare_resume` (continue a run directory from its newest complete checkpoint).

    prepare.py      the task and the run directory
    execute.py      the round loop's driver side: sinks, checkpoints, the summary
    checkpoints.py  the run's state on disk (the only module that knows the layout), resuming
    interrupts.py   SIGINT / SIGTERM
    summary.py      the reported round and the `RunSummary`
"""

from raysim.run.checkpoints import prepare_resume, resume_run
from raysim.run.execute import execute
from raysim.run.prepare import Run, build_checked_task, describe_partition, prepare
from raysim.run.summary import select_best, summarize

__all__ = ["Run", "build_checked_task", "describe_partition", "execute", "prepare",
           "prepare_resume", "resume_run", "select_best", "summarize"]
