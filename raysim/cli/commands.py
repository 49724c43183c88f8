"""The `raysim tune`, `compare`, `submit`, `logs`, `status`, `up` and `down` commands
(arguments and handlers).

Each command imports what it runs inside its own function (see `raysim.cli.main`)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from datetime import datetime
from pathlib import Path

from raysim.config import ConfigError

ADDRESS_HELP = "existing Ray cluster (auto, HOST:PORT, ray://HOST:PORT); default: RAY_ADDRESS " \
    "if set, else an embedded local Ray"
COLD_HELP = "fresh worker and server actors for every run, none kept warm for the next " \
    "(the results are the same)"
JOB_ADDRESS_HELP = "the cluster's job server, e.g. http://HEAD:8265 (default: " \
    "RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"


def add_commands(commands) -> None:
    tune = commands.add_parser("tune", help="run a sweep (Ray Tune) from a sweep YAML file")
    tune.add_argument("sweep", nargs="?",
                      help="sweep YAML file, e.g. yaml/sweeps/digits_alpha_algorithm.yaml")
    tune.add_argument("--resume", metavar="SWEEP_DIR",
                      help="continue an interrupted sweep: finished trials stay, the others go "
                      "on from their last checkpoint")
    tune.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>-<time>)")
    tune.add_argument("--address", help=ADDRESS_HELP)
    tune.add_argument("--cold", action="store_true", help=COLD_HELP)
    tune.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2),
                      help="Ray Tune's own console output: 0 none, one line per trial start and "
                      "end instead (default), 1 status tables, 2 every report")

    compare = commands.add_parser(
        "compare", help="tune every method of a comparison with one budget, rerun the best on "
        "every seed, and write the table and curves")
    compare.add_argument("comparison", help="comparison YAML file, e.g. "
                         "yaml/compare/digits_a0.5.yaml")
    compare.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                         help="set a key of the comparison file, e.g. budget.trials=2, "
                         "seeds=[0], overrides.rounds=3, methods=[fedavg,fedprox] (repeatable)")
    compare.add_argument("--out", help="comparison directory (default: "
                         "runs/compare/<name>-<time>)")
    compare.add_argument("--address", help=ADDRESS_HELP)
    compare.add_argument("--cold", action="store_true", help=COLD_HELP)
    compare.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2),
                         help="Ray Tune's own console output (as for `raysim tune`)")
    compare.add_argument("--report", action="store_true",
                         help="write the report of what --out DIR already holds (a comparison "
                         "cut short: its finished methods and seed runs), without running")
    compare.add_argument("--resume", action="store_true",
                         help="finish the comparison in --out DIR: methods that finished are "
                         "kept, the rest run (give the file and overrides it was started with)")

    submit = commands.add_parser("submit", help="run one experiment as a Ray job on a cluster")
    submit.add_argument("config", help="experiment YAML file inside this project")
    submit.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set a dotted config key (repeatable)")
    submit.add_argument("--address", help=JOB_ADDRESS_HELP)
    submit.add_argument("--run-dir", help="run directory on the cluster (default: runs/... "
                        "inside the job's working directory on the head node)")
    submit.add_argument("--python", default="python",
                        help="the cluster's Python with raysim's dependencies (default: python)")
    submit.add_argument("--follow", action="store_true", help="print the job's logs until it ends")

    logs = commands.add_parser("logs", help="print a Ray job's logs")
    logs.add_argument("job", help="job id printed by `raysim submit`")
    logs.add_argument("--address", help=JOB_ADDRESS_HELP)
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing until the job ends; exit 0 only if it succeeded")

    status = commands.add_parser("status", help="print a Ray job's status")
    status.add_argument("job", help="job id printed by `raysim submit`")
    status.add_argument("--address", help=JOB_ADDRESS_HELP)

    up = commands.add_parser(
        "up", help="start a Ray cluster on this machine that later launches join by themselves "
        "and whose workers stay warm between them (stop it with `raysim down`)")
    up.add_argument("--num-cpus", type=int, help="CPUs it offers (default: the machine's)")
    up.add_argument("--num-gpus", type=int, help="GPUs it offers (default: those Ray finds)")
    up.add_argument("--dashboard", action="store_true", help="with Ray's dashboard")
    commands.add_parser("down", help="stop the cluster `raysim up` started, warm workers "
                        "included")


def run_command(args: argparse.Namespace) -> int:
    return {"tune": tune_command, "compare": compare_command, "submit": submit_command,
            "logs": logs_command, "status": status_command, "up": up_command,
            "down": down_command}[args.command](args)


def tune_command(args: argparse.Namespace) -> int:
    from raysim.tune.sweep import load_sweep
    from raysim.tune.trials import source_of

    if (args.sweep is None) == (args.resume is None):
        raise ConfigError("tune: give a sweep file, or --resume SWEEP_DIR (not both)")
    source = source_of(Path(args.resume)) if args.resume else Path(args.sweep)
    sweep = load_sweep(source)  # validates every trial config before Ray starts
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.resume:
        sweep_dir = Path(args.resume)
    elif args.out:
        sweep_dir = Path(args.out)
    else:
        sweep_dir = Path("runs") / "sweeps" / f"{sweep.name}-{stamp}"
    grid = math.prod(len(d.values) for d in sweep.search if d.kind == "grid")
    print(f"raysim: sweep {sweep.name}: {grid * sweep.num_samples} trials "
          f"({', '.join(sweep.keys)}), {sweep.mode} {sweep.metric}, "
          f"scheduler {sweep.scheduler.name} -> {sweep_dir}")
    from raysim.tune.trials import run_sweep

    outcome = run_sweep(sweep, sweep_dir, address=args.address, verbose=args.verbose,
                        resume=bool(args.resume), source=source, warm=not args.cold)
    table = outcome.table
    done = int((table["status"] != "ERROR").sum()) if len(table) else 0
    if outcome.best_config_path is not None:
        best = table.iloc[0]
        print(f"raysim: best trial {best['trial']}: {sweep.rank_by} {sweep.metric} "
              f"{best[f'{sweep.rank_by}_{sweep.metric}']:.4f}; its config: "
              f"{outcome.best_config_path} (raysim launch accepts it)")
    files = ["trials.csv", "trials.parquet"] + (["best_config.yaml"] if outcome.best_config_path
                                                else [])
    if outcome.plot_path is not None:
        files.append(outcome.plot_path.name)
    print(f"raysim: sweep results in {outcome.sweep_dir}/ ({', '.join(files)}; one run "
          "directory per trial under trials/)")
    return 0 if done else 1


def compare_command(args: argparse.Namespace) -> int:
    from raysim.tune.compare import load_comparison

    comparison = load_comparison(args.comparison, args.override)  # all checked before Ray
    if args.report or args.resume:

        flag = "--report" if args.report else "--resume"
        if args.report and args.resume:
            raise ConfigError("compare: --report writes the report of a directory, --resume "
                              "finishes it; give one")
        if not args.out or not (Path(args.out) / "methods").is_dir():
            raise ConfigError(f"compare {flag}: give the comparison directory with --out DIR")
    if args.report:
        from raysim.results.compare_report import write_compare_report
        from raysim.tune.compare_run import COMPARISON_RECORD, check_directory, outcomes_in

        out = Path(args.out).resolve()
        if (out / COMPARISON_RECORD).is_file():
            check_directory(comparison, out, resume=True)
        write_compare_report(comparison, outcomes_in(comparison, out), out)
        return 0
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / "compare" / f"{comparison.name}-{stamp}"
    labels = ", ".join(m.label for m in comparison.methods)
    print(f"raysim: comparison {comparison.name}: {len(comparison.methods)} methods ({labels}), "
          f"{comparison.trials} trials each (scheduler {comparison.scheduler.name}), seeds "
          f"{', '.join(map(str, comparison.seeds))} -> {out}")
    from raysim.tune.compare_run import run_comparison

    report = run_comparison(comparison, out, address=args.address, verbose=args.verbose,
                            resume=args.resume, warm=not args.cold)
    failed = [label for label, m in report.summary["methods"].items() if m["error"]]
    print(f"raysim: comparison results in {report.out_dir}/ (table.md, results.csv, "
          "compare.parquet, curves.png, best/<method>.yaml, summary.json)")
    if failed:
        print(f"raysim: warning: no result for {', '.join(failed)}", file=sys.stderr)
    return 1 if len(failed) == len(comparison.methods) else 0


def submit_command(args: argparse.Namespace) -> int:
    from raysim.cli import jobs

    job_id = jobs.submit(args.config, args.override, args.address, args.run_dir, args.python)
    where = f" --address {args.address}" if args.address else ""
    print(f"raysim: submitted job {job_id}")
    print(f"raysim: follow it with `raysim logs {job_id}{where} --follow`, "
          f"status: `raysim status {job_id}{where}`")
    if args.follow:
        return 0 if jobs.follow_logs(job_id, args.address) == "SUCCEEDED" else 1
    return 0


def logs_command(args: argparse.Namespace) -> int:
    from raysim.cli import jobs

    if args.follow:
        state = jobs.follow_logs(args.job, args.address)
        print(f"raysim: job {args.job} {state}")
        return 0 if state == "SUCCEEDED" else 1
    print(jobs.logs(args.job, args.address), end="")
    return 0


def status_command(args: argparse.Namespace) -> int:
    from raysim.cli import jobs

    info = jobs.status(args.job, args.address)
    message = re.sub(r"\s+", " ", info["message"]).strip()
    print(f"raysim: job {args.job}: {info['status']}" + (f" ({message})" if message else ""))
    return 0


def up_command(args: argparse.Namespace) -> int:
    from raysim.engine import head

    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"up --num-cpus {args.num_cpus}: give at least 1")
    if args.num_gpus is not None and args.num_gpus < 0:
        raise ConfigError(f"up --num-gpus {args.num_gpus}: give 0 or more")
    started = head.up(args.num_cpus, args.num_gpus, args.dashboard)
    print(f"raysim: Ray cluster up at {started.address} ({started.num_cpus} CPUs, log "
          f"{started.log}); `raysim launch`, `tune` and `compare` join it by themselves, and "
          "a launch keeps its workers warm for the next one; stop it with `raysim down`")
    return 0


def down_command(args: argparse.Namespace) -> int:
    from raysim.engine import head

    stopped = head.down()
    print(f"raysim: stopped the Ray cluster at {stopped.address} and its warm workers")
    return 0
