"""`raysim` command line. User mistakes exit with code 2 and one `raysim: error:` line, before
any round runs.

Each command imports what it runs inside its own function: the run (torch), Tune and Ray load
only for the commands that use them, so `raysim --help` or a config mistake answers at once.

The `raysim` command itself (`main()` without arguments) is quick at both ends
(docs/guide/startup.md): a launch or resume on an embedded Ray starts it on a thread at once,
while the config is validated and the data prepared (a mistake still ends the command with its
one line, and Ray with the process); once the results are on disk the last line is printed,
the figures are drawn by a child process of their own, and the process ends without waiting
on Ray's or Python's teardown.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from raysim.cli.commands import ADDRESS_HELP, COLD_HELP, add_commands, run_command
from raysim.config import (
    ConfigError,
    ResourcesConfig,
    apply_override,
    dump_config,
    parse_dataclass,
    read_yaml,
)
from raysim.engine import cluster
from raysim.engine.cluster import check_cluster


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file, e.g. yaml/quickstart.yaml")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="set a dotted config key, e.g. -o data.partition.alpha=0.1 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysim", description="Federated-learning simulation on Ray."
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error before the rounds "
                        "start (still one `raysim: error:` line and exit code 2)")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run one experiment")
    _add_config_args(launch)
    launch.add_argument("--run-dir", help="where results go (default: runs/<name>-<time>); "
                        "a directory that holds anything is refused unless --overwrite")
    launch.add_argument("--overwrite", action="store_true",
                        help="launch into a --run-dir that holds files: they are moved to "
                        "<dir>.old-<time>/ first (nothing is deleted)")
    launch.add_argument("--address", help=ADDRESS_HELP)
    launch.add_argument("--cold", action="store_true", help=COLD_HELP)
    launch.add_argument("--quiet", action="store_true", help="no per-round progress output")
    launch.add_argument("--local", action="store_true",
                        help="run in this process without Ray, one client after another "
                        "(for pdb; same results): resources.backend=local")
    launch.add_argument("--dashboard", action="store_true",
                        help="start the embedded Ray with its dashboard (about 1-2 s more): "
                        "resources.dashboard=true")

    resume = commands.add_parser(
        "resume", help="continue a run from its newest complete checkpoint, into the same "
        "run directory")
    resume.add_argument("run_dir", help="the run directory `raysim launch` printed")
    resume.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="change a key that does not change results, e.g. -o rounds=40 to extend the run "
        "(also resources.*, logging.*, checkpoint.*, fault_tolerance.*)",
    )
    resume.add_argument("--address", help=ADDRESS_HELP)
    resume.add_argument("--quiet", action="store_true", help="no per-round progress output")

    show = commands.add_parser("config", help="print the resolved config (defaults included)")
    _add_config_args(show)

    plot = commands.add_parser(
        "plot", help="draw a metric per round of one or several runs as a PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--metric", help="the metric to draw (default: the first run's headline "
                      "test metric); per-domain series are drawn beside it for one run")
    plot.add_argument("--out", help="the PNG to write (default: RUN_DIR/<metric>.png for one "
                      "run, ./<metric>.png for several)")

    split = commands.add_parser(
        "partition", help="write the client split a config produces as a partition file "
        "(Parquet: client, index), for data.partition.kind: file or another tool")
    _add_config_args(split)
    split.add_argument("--out", required=True, help="the Parquet file to write")
    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit code. Without `argv` (the `raysim` command itself) the
    process ends here, as soon as the command is done (`_end_process`)."""
    launched_at = time.perf_counter()
    args = build_parser().parse_args(argv)
    if argv is None:
        args.ends_process = True
        _start_ray_early(args)
    code = _guarded(args, launched_at)
    if argv is None:
        _end_process(code)
    return code


def _guarded(args: argparse.Namespace, launched_at: float) -> int:
    try:
        return _command(args, launched_at)
    except ConfigError as error:
        print(f"raysim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a run's own handler is in place (start-up)
        print("\nraysim: interrupted during start-up, before any new round",
              file=sys.stderr)
        return 130
    # Anything else before the rounds start (validation, preparation, a plug-in's code, a
    # plug-in calling sys.exit) is one error line naming the input, exit 2: never a traceback,
    # never exit 0 having run nothing. Once the rounds run, the run's own failure path stands.
    except (Exception, SystemExit) as error:
        if _rounds_started(args):
            raise
        if args.debug:
            traceback.print_exc()
        first = str(error).strip().splitlines()
        print(f"raysim: error: {_input_of(args)}{_plugin_of(error)}: {type(error).__name__}: "
              f"{first[0] if first else ''} "
              f"(raysim --debug {args.command} ... for the traceback)", file=sys.stderr)
        return 2


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command's `-o` overrides with those its flags stand for."""
    flags = {"local": "resources.backend=local", "dashboard": "resources.dashboard=true"}
    return [*args.override, *(o for flag, o in flags.items() if getattr(args, flag, False))]


def _start_ray_early(args: argparse.Namespace) -> None:
    """Start the embedded Ray of a launch or resume now, on a thread, while the driver
    validates the config and prepares the data (`cluster.start_early`). Only the resources
    section is read here (no torch): what the run will ask of Ray. Anything unclear (a run on
    another backend or cluster, a config that does not parse) starts nothing: the command
    goes on as usual and reports what is wrong."""
    if args.command not in ("launch", "resume") or cluster.cluster_address(args.address):
        return
    try:
        if args.command == "launch":
            raw = read_yaml(Path(args.config))
        else:
            raw = read_yaml(Path(args.run_dir) / "config.yaml")
        for override in _overrides(args):
            apply_override(raw, override)
        resources = parse_dataclass(ResourcesConfig, raw.get("resources", {}), "resources")
    except Exception:  # reported by the validation proper, with its one line
        return
    if resources.backend == "ray":
        cluster.start_early(resources)


def _end_process(code: int) -> None:
    """End the `raysim` process now: what it printed is flushed and its files are written
    (each by a rename), so only teardown is left, which takes seconds and saves nothing: an
    embedded Ray's processes end with this one (`raysim.engine.watchdog`), a joined cluster is
    left properly, the exit handlers of everything else run, Python's own teardown is skipped."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        cluster.leave()
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


def _command(args: argparse.Namespace, launched_at: float) -> int:
    if args.command == "resume":
        from raysim.run import prepare_resume

        run = prepare_resume(args.run_dir, args.override)
        check_cluster(args.address)
        return _launch(run, args, launched_at)
    if args.command == "plot":
        return _plot(args)
    if args.command not in ("launch", "config", "partition"):
        return run_command(args)
    from raysim.run.validate import load_config

    config = load_config(args.config, _overrides(args))
    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    if args.command == "partition":
        return _write_partition(config, args.out)
    check_cluster(args.address)
    from raysim.run import prepare

    run = prepare(config, args.run_dir, new=True, overwrite=args.overwrite)
    return _launch(run, args, launched_at)


def _rounds_started(args: argparse.Namespace) -> bool:
    """Whether the command got past preparation: a run's rounds started (`_launch` says so),
    or a sweep's or comparison's trials did (they start Ray)."""
    if getattr(args, "rounds_started", False):
        return True
    ray = sys.modules.get("ray") if args.command in ("tune", "compare") else None
    return ray is not None and ray.is_initialized()


def _input_of(args: argparse.Namespace) -> str:
    """The input a command was given, for its error line."""
    if args.command == "resume":
        return f"run directory {args.run_dir}"
    if args.command == "plot":
        return f"run director{'ies' if len(args.run_dirs) > 1 else 'y'} " \
            f"{', '.join(args.run_dirs)}"
    if args.command == "tune":
        return f"sweep directory {args.resume}" if args.resume else str(args.sweep)
    if args.command == "compare":
        return str(args.comparison)
    if args.command in ("logs", "status"):
        return f"job {args.job}"
    return str(args.config)


def _plugin_of(error: BaseException) -> str:
    """`, in the plug-in package P (file:line)` when the innermost frame of the error that is
    installed plug-in code (another distribution registering raysim entry points) is known."""
    from importlib.metadata import distribution, packages_distributions

    try:
        owners = packages_distributions()
    except Exception:  # unreadable metadata of some installed package: no name, still a line
        return ""
    found = ""
    for frame, line in traceback.walk_tb(error.__traceback__):
        module = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        for name in owners.get(module, ()):
            try:
                groups = {point.group for point in distribution(name).entry_points}
            except Exception:
                continue
            if name != "raysim" and any(g.startswith("raysim.") for g in groups):
                found = f", in the plug-in package {name} ({frame.f_code.co_filename}:{line})"
    return found


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysim.results.plots import headline, plot_runs, read_metrics

    runs = [Path(d) for d in args.run_dirs]
    metric = args.metric or headline(runs[0], read_metrics(runs[0]))
    default = (runs[0] if len(runs) == 1 else Path(".")) / f"{metric.replace('/', '_')}.png"
    path = plot_runs(runs, metric, Path(args.out) if args.out else default)
    print(f"raysim: wrote {path} ({metric} per round, {len(runs)} run{'s' * (len(runs) > 1)})")
    return 0


def _write_partition(config, out: str) -> int:
    from raysim.data.partition_file import write_partition
    from raysim.run import build_checked_task, describe_partition

    task = build_checked_task(config)
    if task.partition.generated:
        raise ConfigError(f"data.dataset: {config.data.dataset} generates each client's "
                          "samples: there is no sample index to write")
    dataset, parts = task.dataset, task.partition.personal
    path = write_partition(task.partition, out, len(dataset.train.y), config.data.dataset,
                           test_samples=len(dataset.test.y),
                           val_samples=None if dataset.val is None else len(dataset.val.y))
    rows = len(task.partition.indices)
    columns = "client, index"
    if parts is not None:  # evaluation.personal: each client's test/validation parts too
        rows += len(parts.test_indices) + (0 if parts.val_indices is None else
                                           len(parts.val_indices))
        columns += ", part"
    print(f"raysim: {describe_partition(task)}")
    print(f"raysim: wrote {path} ({rows} rows: {columns}); use it "
          f"with data.partition: {{kind: file, path: {path}, "
          f"num_clients: {task.partition.num_clients}}}")
    return 0


def _launch(run, args: argparse.Namespace, launched_at: float) -> int:
    """Run a prepared (new or resumed) run; print its outcome. Exit 0 when it completed, 130
    when interrupted (after its checkpoint), 1 when fault tolerance stopped it."""
    # before Ray: a job's code may go from disk
    from raysim.results.plots import write_curves, write_partition_figure
    from raysim.results.sinks import ConsoleProgress, RunDirectory, extra_sinks
    from raysim.run import describe_partition, execute
    from raysim.run.interrupts import resume_hint

    config = run.config
    start = f"resuming after round {run.restore.round}, " if run.restore is not None else ""
    print(f"raysim: {config.name}: {config.algorithm.name} on {config.data.dataset}, {start}"
          f"{config.rounds} rounds × {config.clients_per_round} clients -> {run.run_dir}")
    print(f"raysim: {describe_partition(run.task)}")
    sinks = [RunDirectory(run.run_dir), *extra_sinks(config, run.run_dir)]
    if config.logging.progress and not args.quiet:
        sinks.append(ConsoleProgress())
    args.rounds_started = True  # from here on a failure is the run's own (summary.json)
    summary = execute(run, sinks, address=args.address, launched_at=launched_at,
                      warm=not getattr(args, "cold", False))
    figures, pending = [], False
    if config.logging.curves:
        new_run = run.restore is None and run.task.partition.label_counts is not None
        figures = ["curves.png", *(["partition.png"] if new_run else [])]

        def draw() -> None:
            write_curves(run.run_dir)
            if new_run:
                write_partition_figure(run.task, run.run_dir / "partition.png")

        # the `raysim` process does not wait for matplotlib (seconds): a child draws them
        pending = getattr(args, "ends_process", False) and in_child_process(draw)
        if not pending:
            draw()
    if summary.status != "completed":
        where = f"checkpoint {summary.checkpoint}" if summary.checkpoint else "no checkpoint"
        print(f"raysim: {summary.status} after round {summary.rounds_completed} ({where}); "
              f"{resume_hint(run.run_dir)}", file=sys.stderr)
        return 130 if summary.status == "interrupted" else 1
    final, best, headline = summary.final, summary.best, summary.headline
    name = headline.removeprefix("test_")
    if best["selected_by"] == headline:
        selection = f"best {best[headline]:.4f}"
    else:  # selected on the validation split
        selection = f"{best[headline]:.4f} at the best {best['selected_by']}"
    print(
        f"raysim: final test {name} {final.get(headline, float('nan')):.4f} "
        f"({selection} at round {best['round']}); "
        f"{summary.rounds_completed} rounds in {summary.wall_seconds:.1f} s, "
        f"first round done {summary.launch_to_first_round_seconds:.1f} s after launch"
    )
    if summary.actor_restarts or summary.clients_dropped:
        print(f"raysim: survived {summary.actor_restarts} actor restart(s); "
              f"{summary.clients_dropped} client result(s) dropped (failures.parquet)")
    if pending:
        curves = f"; {', '.join(figures)} in a moment"
    else:
        curves = "".join(f", {name}" for name in figures if (run.run_dir / name).is_file())
    print(f"raysim: results in {run.run_dir}/ (summary.json, metrics.parquet, config.yaml"
          f"{curves})")
    return 0


def in_child_process(work) -> bool:
    """Run `work` in a forked child process that finishes it even after this process has
    ended; False (nothing run) where processes cannot fork. The child holds none of this
    process's files (its output goes nowhere; nothing of a Ray session's stays open, so that
    session's watchdog leaves it alone) and ends without any exit handler of this process."""
    try:
        if os.fork():
            return True
    except (AttributeError, OSError):  # no fork here, or no memory for one: draw in place
        return False
    code = 1
    try:
        os.setsid()  # a Ctrl-C at the terminal after the command is not for it
        quiet = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(quiet, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        # what sys.stdout and sys.stderr wrapped may be closed now
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        work()
        code = 0
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
