"""`raysim` command line. User mistakes exit with code 2 and one `raysim: error:` line, before
Ray starts."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from raysim.cluster import check_cluster
from raysim.commands import add_commands, run_command
from raysim.config import ConfigError, dump_config, load_config


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
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run one experiment")
    _add_config_args(launch)
    launch.add_argument("--run-dir", help="where results go (default: runs/<name>-<time>)")
    launch.add_argument(
        "--address", help="existing Ray cluster (auto, HOST:PORT, ray://HOST:PORT); "
        "default: RAY_ADDRESS if set, else an embedded local Ray",
    )
    launch.add_argument("--quiet", action="store_true", help="no per-round progress output")

    show = commands.add_parser("config", help="print the resolved config (defaults included)")
    _add_config_args(show)
    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    launched_at = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        if args.command not in ("launch", "config"):
            return run_command(args)
        config = load_config(args.config, args.override)
        if args.command == "config":
            print(dump_config(config), end="")
            return 0
        check_cluster(args.address)
        return _launch(config, args, launched_at)
    except ConfigError as error:
        print(f"raysim: error: {error}", file=sys.stderr)
        return 2


def _launch(config, args: argparse.Namespace, launched_at: float) -> int:
    from raysim.run import describe_partition, execute, prepare
    from raysim.sinks import ConsoleProgress, RunDirectory, WandbSink

    run = prepare(config, args.run_dir)
    print(f"raysim: {config.name}: {config.algorithm.name} on {config.data.dataset}, "
          f"{config.rounds} rounds × {config.clients_per_round} clients -> {run.run_dir}")
    print(f"raysim: {describe_partition(run.task)}")
    sinks = [RunDirectory(run.run_dir)]
    if config.logging.wandb.mode != "disabled":
        sinks.append(WandbSink(run.run_dir))
    if config.logging.progress and not args.quiet:
        sinks.append(ConsoleProgress())
    summary = execute(run, sinks, address=args.address, launched_at=launched_at)
    final, best, headline = summary["final"], summary["best"], summary["headline"]
    name = headline.removeprefix("test_")
    if best["selected_by"] == headline:
        selection = f"best {best[headline]:.4f}"
    else:  # selected on the validation split
        selection = f"{best[headline]:.4f} at the best {best['selected_by']}"
    print(
        f"raysim: final test {name} {final.get(headline, float('nan')):.4f} "
        f"({selection} at round {best['round']}); "
        f"{summary['rounds_completed']} rounds in {summary['wall_seconds']:.1f} s, "
        f"first round done {summary['launch_to_first_round_seconds']:.1f} s after launch"
    )
    print(f"raysim: results in {run.run_dir}/ (summary.json, metrics.parquet, config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
