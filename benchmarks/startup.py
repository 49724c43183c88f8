"""Start-up: where a launch's seconds go before its first round and after its last, and the
whole quickstart process beside pfl-research and Flower doing the same work.

Each measurement is a fresh process, the settings interleaved (A B C A B C ...) so drift of a
shared machine hits them alike:

- raysim, cold (a new embedded Ray each launch): `raysim launch yaml/quickstart.yaml`, without
  the dashboard (the default) and with it (`--dashboard`). The phases come from the run's
  `summary.json` (`startup_phases`, seconds from `main()`), the interpreter's own start from
  when the first line appears, and the end from when the results line appears and when the
  process is gone;
- with `--baseline DIR`: the same launch of another raysim checkout (e.g. `git archive` of an
  older commit unpacked in DIR), run by this venv with DIR first on PYTHONPATH;
- with `--warm`: in every repeat `raysim up` (its own RAYSIM_HOME), one launch that fills its
  warm pool ("raysim on raysim up, first"), a launch that finds the pool warm ("raysim
  warm"), then `raysim down`. The cold launches and the peers never run beside that cluster;
- with `--compare`: a 2-method × 4-trial `raysim compare` (digits α = 0.5, FedAvg and FedProx,
  3 rounds, one seed), cold (`--cold`: every trial starts its actors) against warm (the
  default: a trial's process and actors go on to the next trial), interleaved; the wall time
  and each trial's start (from the trial's run starting to its actors being ready);
- with `--peers`: the quickstart's work (benchmarks/quickstart_work.py) on pfl-research
  (`pip install pfl`, a venv of its own in ~/.cache/raysim/benchmarks/pfl-venv) and on
  Flower's simulation (benchmarks/.flower-venv, as benchmarks/scale.py makes it); each venv is
  made on first use, with the CPU build of torch.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--warm] [--compare] [--peers]
        [--baseline DIR] [--note "what else ran on the machine"]

Writes benchmarks/results/startup.json, benchmarks/figures/startup.png (the phases as
stacked bars, medians) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "benchmarks" / "figures"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raysim" / "benchmarks"
SCRATCH = RESULTS / "startup-runs"
SETTLE_SECONDS = 5.0  # after each measurement, before the next
# the stacked segments, in order: (key, label)
PHASES = [("interpreter", "Python, CLI imports"), ("prepared", "config and data"),
          ("ray", "Ray ready (after the data)"), ("actors", "actors ready"),
          ("first_round", "first round"), ("rounds", "the other rounds"),
          ("results_line", "to the results line"), ("ending", "to the process end")]


COLD_HOME = SCRATCH / "home-cold"  # RAYSIM_HOME of the cold launches: no `raysim up` there
WARM_HOME = SCRATCH / "home-warm"  # that of `raysim up` and the warm launches


def launch(label: str, extra: list[str], python_path: str | None = None,
           home: Path = COLD_HOME) -> dict:
    """One `raysim launch` of the quickstart in a fresh process: its phases (seconds)."""
    run_dir = SCRATCH / label.replace(" ", "_").replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    env = cli_env(home)
    cwd = ROOT
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([python_path, env.get("PYTHONPATH", "")])
        cwd = Path(python_path)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "raysim.cli", "launch", str(ROOT / "yaml" / "quickstart.yaml"),
         "--run-dir", str(run_dir), "--quiet", *extra], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    first_line = results_line = None
    for line in process.stdout:
        now = time.perf_counter() - started
        first_line = now if first_line is None else first_line
        if line.startswith("raysim: results in"):
            results_line = now
    code = process.wait()
    ended = time.perf_counter() - started
    if code != 0 or results_line is None:
        raise RuntimeError(f"{label}: exit {code}\n{process.stderr.read()[-2000:]}")
    settle(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = summary["startup_phases"]
    # main() starts after the interpreter and the CLI's imports: the first line comes when
    # the data is prepared
    interpreter = max(first_line - phases["prepared"], 0.0)
    loop_end = interpreter + summary["wall_seconds"]
    return {
        "interpreter": interpreter,
        "prepared": phases["prepared"],
        "ray": phases["ray_ready"] - phases["prepared"],
        "actors": phases["actors_ready"] - phases["ray_ready"],
        "first_round": phases["first_round"] - phases["actors_ready"],
        "rounds": summary["wall_seconds"] - phases["first_round"],
        "results_line": max(results_line - loop_end, 0.0),
        "ending": ended - results_line,
        "launch_to_first_round": interpreter + phases["first_round"],
        "whole_process": ended,
        "final_accuracy": summary["final"].get("test_accuracy"),
        "warm_workers": float(summary.get("warm_workers", False)),
    }


def cli_env(home: Path) -> dict[str, str]:
    """A `raysim` process's environment: no RAY_ADDRESS, `home` as its RAYSIM_HOME."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYSIM_HOME"] = str(home)
    return env


def raysim_command(*args: str, home: Path = WARM_HOME) -> str:
    done = subprocess.run([sys.executable, "-m", "raysim.cli", *args], capture_output=True,
                          text=True, env=cli_env(home), cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"raysim {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


COMPARE = ["yaml/compare/digits_a0.5.yaml", "-o", "methods=[fedavg,fedprox]",
           "-o", "budget.trials=4", "-o", "seeds=[0]", "-o", "overrides.rounds=3",
           "-o", "budget.scheduler.name=none",
           "-o", "max_concurrent_trials=1"]


def compare(cold: bool) -> dict:
    """The 2-method × 4-trial comparison in a fresh process: wall time and the starts of its
    runs, the 8 tuning trials and the 2 seed runs (`trials` counts both)."""
    out = SCRATCH / ("compare-cold" if cold else "compare-warm")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    raysim_command("compare", *COMPARE, "--out", str(out), *(["--cold"] if cold else []),
                   home=COLD_HOME)
    wall = time.perf_counter() - started
    settle()
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("methods/*/*/trials/*/"
                                                                     "summary.json"))]
    starts = [s["startup_phases"]["actors_ready"] for s in summaries]
    return {"whole_process": wall, "trials": float(len(summaries)),
            "warm_trials": float(sum(s.get("warm_workers", False) for s in summaries)),
            "trial_start_median": statistics.median(starts), "trial_start_max": max(starts),
            "trial_start_total": sum(starts)}


def settle(run_dir: Path | None = None) -> None:
    """Before the next measurement: what a launch leaves to finish after its process ended
    (its figures, drawn by a child; its Ray's processes, ended by the watchdog within
    seconds) must not land in the next one's time."""
    deadline = time.monotonic() + 120
    while run_dir is not None and not (run_dir / "partition.png").is_file() \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(SETTLE_SECONDS)


def peer_venv(name: str) -> Path:
    """The venv of pfl-research or Flower, made on first use; its python."""
    venv = CACHE / "pfl-venv" if name == "pfl" else ROOT / "benchmarks" / ".flower-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        packages = ["pfl"] if name == "pfl" else ["flwr[simulation]", "pyyaml"]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages,
                        "torch==2.13.0", "numpy", "scikit-learn"], check=True)
    return python


def peer(name: str) -> dict:
    """The quickstart's work on pfl-research or Flower in a fresh process of its venv."""
    python = peer_venv(name)
    script = ROOT / "benchmarks" / f"{'pfl' if name == 'pfl' else 'flower'}_quickstart.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = time.perf_counter()
    command = [str(python), str(script)]
    if name == "pfl":  # two processes, as raysim's two workers
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          check=False)
    ended = time.perf_counter() - started
    settle()
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"launch_to_first_round": report["first_round_seconds"],
            "rounds": report["loop_seconds"], "whole_process": ended,
            "ending": ended - report["last_round_seconds"],
            "final_accuracy": report["final_accuracy"]}


def median_of(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["whole_process_range"] = [min(r["whole_process"] for r in runs),
                                  max(r["whole_process"] for r in runs)]
    return row


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(labels) + 1.6))
    for i, label in enumerate(labels):
        row, left = rows[label], 0.0
        if "prepared" not in row:  # another simulator: start-up, loop, ending
            start = row["whole_process"] - row["rounds"] - row["ending"]
            parts = [("start to the first round's end", start),
                     ("the other rounds", row["rounds"]), ("to the process end", row["ending"])]
            colours = ["0.75", "C5", "C7"]
        else:
            parts = [(name, row[key]) for key, name in PHASES]
            colours = [f"C{j}" for j in range(len(parts))]
        for (name, width), colour in zip(parts, colours):
            ax.barh(i, width, left=left, color=colour, edgecolor="white", label=name)
            left += width
        ax.text(left + 0.3, i, f"{left:.1f} s", va="center", fontsize="small")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))  # one entry per segment name
    ax.legend(unique.values(), unique.keys(), fontsize="small", loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    ax.set(yticks=range(len(labels)), yticklabels=labels, xlabel="seconds from process start",
           title="the quickstart as a whole process (medians)")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", action="store_true",
                        help="also time pfl-research and Flower (venvs of their own)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="another raysim checkout to launch the same way")
    parser.add_argument("--warm", action="store_true",
                        help="also launch on a `raysim up` cluster, warm")
    parser.add_argument("--compare", action="store_true",
                        help="also a 2-method × 4-trial raysim compare, cold against warm")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    settings: dict[str, object] = {
        "raysim": lambda: launch("raysim", []),
        "raysim --dashboard": lambda: launch("raysim dashboard", ["--dashboard"]),
    }
    first = "raysim on raysim up, first"
    first_runs: list[dict] = []
    if args.warm:

        def warm() -> dict:
            # the cluster is up only for these two launches: the cold launches and the peers
            # run with no other Ray on the machine
            raysim_command("up")
            try:
                first_runs.append(launch(first, [], home=WARM_HOME))
                return launch("raysim warm", [], home=WARM_HOME)
            finally:
                raysim_command("down")

        settings["raysim warm"] = warm
    if args.compare:
        settings["compare, cold"] = lambda: compare(cold=True)
        settings["compare, warm"] = lambda: compare(cold=False)
    if args.baseline:
        base = str(Path(args.baseline).resolve())
        settings["raysim before"] = lambda: launch("raysim before", [], base)
    if args.peers:
        for name in ("pfl", "flower"):
            peer_venv(name)  # made before the timing starts
        settings["pfl-research"] = lambda: peer("pfl")
        settings["Flower"] = lambda: peer("flower")
    measured: dict[str, list[dict]] = {label: [] for label in settings}
    loads, failures = [], []
    for repeat in range(args.repeats):
        for label, run in settings.items():
            loads.append(os.getloadavg()[0])
            try:
                measured[label].append(run())
            except RuntimeError as error:  # kept in the report, left out of the medians
                failures.append({"setting": label, "repeat": repeat, "error": str(error)})
                print(f"[{repeat + 1}/{args.repeats}] {label:<20} failed", flush=True)
                continue
            print(f"[{repeat + 1}/{args.repeats}] {label:<20} whole process "
                  f"{measured[label][-1]['whole_process']:.1f} s", flush=True)
    shown: dict[str, list[dict]] = {}
    for label, runs in measured.items():
        if label == "raysim warm":  # after the launches that filled the pool for it
            shown[first] = first_runs
        shown[label] = runs
    rows = {label: median_of(runs) for label, runs in shown.items() if runs}
    comparisons = {label: rows.pop(label) for label in list(rows) if label.startswith("compare")}
    report = {
        "workload": "yaml/quickstart.yaml: 20 rounds × 10 of 50 clients, 5 local epochs",
        "repeats": args.repeats, "machine": {"cpus": os.cpu_count(),
                                             "python": platform.python_version()},
        "load_average_at_starts": [round(x, 2) for x in loads],
        "note": args.note, "medians": rows, "compare_medians": comparisons,
        "compare_command": "raysim compare " + " ".join(COMPARE),
        "runs": shown, "failures": failures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(report, indent=2))
    plot(rows, FIGURES / "startup.png")
    shutil.rmtree(SCRATCH, ignore_errors=True)

    print(f"\n{'':<20}{'whole process':>15}{'range':>14}{'first round':>13}{'loop':>7}"
          f"{'ending':>8}{'accuracy':>10}")
    for label, row in rows.items():
        low, high = row["whole_process_range"]
        print(f"{label:<20}{row['whole_process']:>14.1f}s{low:>7.1f}-{high:<6.1f}"
              f"{row['launch_to_first_round']:>12.1f}s{row['rounds']:>6.1f}s"
              f"{row['ending']:>7.1f}s{row['final_accuracy']:>10.4f}")
    if comparisons:
        print(f"\n{'':<20}{'whole process':>15}{'trials':>8}{'warm':>6}{'trial start':>13}"
              f"{'max':>7}{'all starts':>12}")
    for label, row in comparisons.items():
        print(f"{label:<20}{row['whole_process']:>14.1f}s{row['trials']:>8.0f}"
              f"{row['warm_trials']:>6.0f}{row['trial_start_median']:>12.2f}s"
              f"{row['trial_start_max']:>6.1f}s{row['trial_start_total']:>11.1f}s")
    print(f"\nresults in {RESULTS / 'startup.json'}, figure {FIGURES / 'startup.png'}")


if __name__ == "__main__":
    main()
