"""Scale: per-round time and memory as the number of registered clients grows.

Each setting is one `raysim launch` in a fresh process on the embedded local Ray (2 workers of
one CPU), so its time to the first round and its peak memory are those a user sees:

- synthetic_fedprox + logreg (clients generated on the workers when sampled), registered
  clients 100, 10^4, 10^5, 10^6 at 100 per round, and 10^6 at 1,000 per round;
- digits + the small CNN at 100 and 600 clients, IID (digits has 1,347 training samples: no
  more clients fit).

Client sizes are fixed (size_sigma 0: 104 samples each), so every round does the same work
and the per-round time shows the engine, not which clients were drawn. Engine overhead per
client = (round seconds × workers − seconds inside the method's client step) / clients per
round. With --flower, Flower's simulation runs the same synthetic work (the same clients,
the same logistic regression and SGD in PyTorch) at 100, 1,000 and 10,000 registered clients,
in its own venv (benchmarks/.flower-venv, created on first use; never a raysim dependency).

    .venv/bin/python benchmarks/scale.py [--rounds 12] [--repeats 3] [--flower]

Writes benchmarks/results/scale.json, benchmarks/figures/scale.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launching import launch_quickstart

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "benchmarks" / "figures"
SYNTHETIC = ["data.dataset=synthetic_fedprox", "data.partition.kind=natural", "model.name=logreg",
             "data.size_sigma=0", "train.local_epochs=1",
             "train.batch_size=10", "train.lr=0.01", "train.momentum=0"]
SETTINGS = [  # (label, registered clients, per round, overrides)
    ("synthetic", 100, 100, SYNTHETIC),
    ("synthetic", 1_000, 100, SYNTHETIC),
    ("synthetic", 10_000, 100, SYNTHETIC),
    ("synthetic", 100_000, 100, SYNTHETIC),
    ("synthetic", 1_000_000, 100, SYNTHETIC),
    ("synthetic", 1_000_000, 1_000, SYNTHETIC),
    ("digits cnn", 100, 100, ["train.local_epochs=1", "data.partition.kind=iid"]),
    ("digits cnn", 600, 100, ["train.local_epochs=1", "data.partition.kind=iid"]),
]


def launch(clients: int, per_round: int, overrides: list[str], rounds: int, out: Path) -> dict:
    """One fresh `raysim launch`: its per-round seconds (after the first round, which also
    pays for warm-up), engine overhead per client, time to the first round and peak memory."""
    run_dir = out / f"run-{clients}-{per_round}-{len(overrides)}"
    start = time.perf_counter()
    summary = launch_quickstart([f"rounds={rounds}", "eval_every=1000",
                                 f"data.partition.num_clients={clients}",
                                 f"clients_per_round={per_round}", "checkpoint.every=0",
                                 *overrides], run_dir)
    wall = time.perf_counter() - start
    seconds = summary["round_seconds"][1:]  # the first round also pays for warm-up
    train = summary["client_train_seconds"][1:]
    workers = summary["num_workers"]
    overhead = [(s * workers - t) / per_round for s, t in zip(seconds, train)]
    memory = summary["peak_rss_mb"]
    return {"round_seconds": seconds, "overhead_ms": [1000 * o for o in overhead],
            "first_round_seconds": summary["launch_to_first_round_seconds"],
            "process_seconds": wall, "driver_mb": memory["driver"],
            "server_mb": memory["server"], "worker_mb": max(memory["workers"])}


def combine(setting: str, clients: int, per_round: int, repeats: list[dict]) -> dict:
    """Repeats of one setting: medians over repeats of each repeat's median (the machine's
    drift between launches is larger than the differences measured), spread over all rounds,
    the largest peak memory."""
    pooled = [s for r in repeats for s in r["round_seconds"]]
    return {
        "setting": setting, "clients": clients, "per_round": per_round,
        "repeats": len(repeats),
        "round_seconds_median": statistics.median(statistics.median(r["round_seconds"])
                                                  for r in repeats),
        "round_seconds_p10": _quantile(pooled, 0.1), "round_seconds_p90": _quantile(pooled, 0.9),
        "overhead_ms_per_client": statistics.median(statistics.median(r["overhead_ms"])
                                                    for r in repeats),
        "first_round_seconds": statistics.median(r["first_round_seconds"] for r in repeats),
        "process_seconds": statistics.median(r["process_seconds"] for r in repeats),
        **{key: max(r[key] for r in repeats) for key in ("driver_mb", "server_mb", "worker_mb")},
        "runs": repeats,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flower(clients: list[int], rounds: int, per_round: int) -> list[dict]:
    """The same synthetic work on Flower's simulation engine, in its own venv."""
    venv = ROOT / "benchmarks" / ".flower-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "flwr[simulation]",
                        "torch==2.13.0", "numpy", "pyyaml"], check=True)
    rows = []
    for n in clients:
        done = subprocess.run([str(python), str(ROOT / "benchmarks" / "flower_scale.py"),
                               str(n), str(per_round), str(rounds)], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"Flower at {n} clients failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def plot(rows: list[dict], flower_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    synthetic = [r for r in rows if r["setting"] == "synthetic" and r["per_round"] == 100]
    xs = [r["clients"] for r in synthetic]
    left.errorbar(xs, [r["round_seconds_median"] for r in synthetic],
                  yerr=[[r["round_seconds_median"] - r["round_seconds_p10"] for r in synthetic],
                        [r["round_seconds_p90"] - r["round_seconds_median"] for r in synthetic]],
                  marker="o", capsize=3, label="raysim")
    if flower_rows:
        left.plot([r["clients"] for r in flower_rows],
                  [r["round_seconds_median"] for r in flower_rows], marker="s", label="Flower")
    left.set(xscale="log", xlabel="registered clients", ylabel="seconds per round",
             title="100 clients per round, logreg", ylim=(0, None))
    left.legend()
    for key, label in (("driver_mb", "driver"), ("server_mb", "server"),
                       ("worker_mb", "worker (max)")):
        right.plot(xs, [r[key] for r in synthetic], marker="o", label=label)
    right.set(xscale="log", xlabel="registered clients", ylabel="peak RSS (MiB)",
              title="memory", ylim=(0, None))
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3,
                        help="launches per setting, interleaved across settings")
    parser.add_argument("--flower", action="store_true",
                        help="also time Flower's simulation (installs it in its own venv)")
    args = parser.parse_args()
    scratch = RESULTS / "scale-runs"
    measured: list[list[dict]] = [[] for _ in SETTINGS]
    for repeat in range(args.repeats):  # interleaved: drift hits every setting alike
        for i, (setting, clients, per_round, overrides) in enumerate(SETTINGS):
            rounds = max(4, args.rounds // 4) if per_round >= 1000 else args.rounds
            run = launch(clients, per_round, overrides, rounds, scratch)
            measured[i].append(run)
            print(f"[{repeat + 1}/{args.repeats}] {setting:<11} {clients:>9,} clients "
                  f"{per_round:>5}/round: {statistics.median(run['round_seconds']):.3f} s/round",
                  flush=True)
    rows = [combine(setting, clients, per_round, runs)
            for (setting, clients, per_round, _), runs in zip(SETTINGS, measured)]
    flower_rows = flower([100, 1_000, 10_000], args.rounds, 100) if args.flower else []

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"rounds": args.rounds, "repeats": args.repeats, "workers": 2, "raysim": rows,
              "flower": flower_rows}
    base = next(r for r in rows if r["setting"] == "synthetic" and r["clients"] == 100)
    top = next(r for r in rows if r["setting"] == "synthetic" and r["clients"] == 1_000_000
               and r["per_round"] == 100)
    report["flatness"] = top["round_seconds_median"] / base["round_seconds_median"]
    report["driver_server_growth_mb"] = (top["driver_mb"] + top["server_mb"]
                                         - base["driver_mb"] - base["server_mb"])
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2))
    plot(rows, flower_rows, FIGURES / "scale.png")

    print(f"\n{'setting':<11}{'clients':>10}{'/round':>7}{'s/round':>9}{'p10-p90':>13}"
          f"{'ms/client':>10}{'1st round':>10}{'driver':>8}{'server':>8}{'worker':>8}")
    for r in rows:
        print(f"{r['setting']:<11}{r['clients']:>10,}{r['per_round']:>7}"
              f"{r['round_seconds_median']:>9.3f}"
              f"{r['round_seconds_p10']:>6.3f}-{r['round_seconds_p90']:<6.3f}"
              f"{r['overhead_ms_per_client']:>10.2f}{r['first_round_seconds']:>9.1f}s"
              f"{r['driver_mb']:>8.0f}{r['server_mb']:>8.0f}{r['worker_mb']:>8.0f}")
    print(f"\n10^6 vs 100 registered clients (100/round): {report['flatness']:.3f}× per-round "
          f"time; driver + server RSS growth {report['driver_server_growth_mb']:.0f} MiB")
    for f in flower_rows:
        ours = next((r for r in rows if r["setting"] == "synthetic" and r["clients"] ==
                     f["clients"] and r["per_round"] == 100), None)
        ratio = ""
        if ours:
            times = f["round_seconds_median"] / ours["round_seconds_median"]
            ratio = f"; Flower / raysim {times:.1f}×"
        print(f"Flower {f['clients']:>7,} clients: {f['round_seconds_median']:.3f} s/round, "
              f"first round {f['first_round_seconds']:.1f} s{ratio}")
    print(f"\nresults in {RESULTS / 'scale.json'}, figure {FIGURES / 'scale.png'}")


if __name__ == "__main__":
    main()
