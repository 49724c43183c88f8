"""What privacy costs and what it stops: accuracy and every leakage figure as ε shrinks.

- local DP (each client privatises its upload) on digits α = 0.5: FedAvg, FedProto, FPL,
  FedTGP and FedHPro (official) at ε ∈ {∞, 32, 8, 2, 0.5} (δ = 10^-5 per sample of a client;
  σ calibrated before each run to reach ε after the most rounds any client takes part in), with
  the honest-but-curious server probe on (`diagnostics.leakage`: 2 clients every round,
  reading the privatised uploads);
- central DP (DP-FedAvg) where it is meant to work: FedAvg on `synthetic_fedprox` (IID: one
  labelling model, so one global model can learn it) with 10^5 registered clients, 1,000 per
  round by Poisson sampling, adaptive clipping, PLD accounting, at ε ∈ {∞, 8, 2, 0.5}
  (δ = 1/N^1.1).

    .venv/bin/python benchmarks/privacy.py               # both parts, seed 0 (~20 min, 2 cores)
    .venv/bin/python benchmarks/privacy.py --table       # re-print the saved results
    .venv/bin/python benchmarks/privacy.py --parts central    # one part, kept beside the other

Few rounds keep the whole under ~20 minutes on a loaded 2-core machine (the settings are in the
JSON); every run uses the local backend (the Ray backend's bits, without its start-up). Writes
benchmarks/results/privacy.json, benchmarks/figures/privacy.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from accuracy import RESULTS, config_path

from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.validate import load_config

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "benchmarks" / "figures"
EPSILONS = [None, 8.0, 2.0, 0.5]  # None: no privacy (ε = ∞)
LOCAL_EPSILONS = [None, 32.0, 8.0, 2.0, 0.5]  # and 32, to see where the uploads stop leaking
LOCAL_METHODS = ["fedavg", "fedproto", "fpl", "fedtgp", "fedhpro-official"]
LOCAL = {"setting": "digits_a0.5", "rounds": 5, "clip": 1.0, "feature_clip": 1.0,
         "counts": "noised", "delta": 1e-5}
LOCAL_OVERRIDES = ["diagnostics.leakage.clients_per_round=2", "diagnostics.leakage.every=1",
                   "diagnostics.leakage.dlg_max_samples=16", "checkpoint.every=0",
                   "logging.progress=false", "resources.backend=local"]
CENTRAL = {"setting": "synthetic_fedprox (IID)", "clients": 100_000, "per_round": 1_000,
           "rounds": 20, "clip": 0.5, "sampling": "poisson", "accountant": "pld",
           "adaptive": "target_quantile 0.5"}
CENTRAL_OVERRIDES = ["data.iid=true", "data.size_sigma=0", "train.local_epochs=1",
                     "train.batch_size=10", "train.lr=0.3", "train.momentum=0", "eval_every=5",
                     "checkpoint.every=0", "logging.progress=false", "resources.backend=local",
                     "resources.num_workers=1"]
KEYS = ["leak_presence_exact", "leak_counts_exact", "leak_counts_mae", "leak_mean_cosine",
        "leak_image_psnr", "leak_image_ssim"]


def privacy_overrides(epsilon: float | None, mechanism: str, extra: list[str]) -> list[str]:
    if epsilon is None:
        return []
    return [f"privacy.mechanism={mechanism}", f"privacy.target_epsilon={epsilon}", *extra]


def run(config, name: str) -> dict:
    """One run: its final metrics, the probe's averaged over every probed upload, status."""
    prepared = prepare(config, RESULTS / "scratch" / f"privacy-{name}")
    collect = CollectRounds()
    started = time.perf_counter()
    summary = execute(prepared, [collect]).to_dict()
    evaluated = [r for r in collect.rounds if "test_accuracy" in r]
    probed = [r for r in collect.rounds if "leak_presence_exact" in r]
    plan = prepared.task.info.privacy
    row = {"status": summary["status"], "rounds": len(collect.rounds),
           "test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else math.nan,
           "epsilon": collect.rounds[-1].get("privacy_epsilon") if collect.rounds else None,
           "sigma": plan.noise_multiplier if plan else 0.0,
           "delta": plan.delta if plan else None,
           "probed_uploads": len(probed) * 2, "wall_seconds": time.perf_counter() - started}
    for key in KEYS:
        values = [r[key] for r in probed if key in r]
        row[key] = float(np.mean(values)) if values else math.nan
    if "server_privacy_clip" in (collect.rounds[-1] if collect.rounds else {}):
        row["final_clip"] = collect.rounds[-1]["server_privacy_clip"]
    return row


def local_rows(methods: list[str], epsilons: list[float], seed: int) -> list[dict]:
    rows = []
    for method in methods:
        for epsilon in epsilons:
            extra = [f"privacy.clip={LOCAL['clip']}", f"privacy.delta={LOCAL['delta']}",
                     f"privacy.local.feature_clip={LOCAL['feature_clip']}",
                     f"privacy.local.counts={LOCAL['counts']}"]
            config = load_config(config_path(LOCAL["setting"], method), [
                f"seed={seed}", f"rounds={LOCAL['rounds']}", *LOCAL_OVERRIDES,
                *privacy_overrides(epsilon, "local", extra)])
            row = {"part": "local", "method": method, "target_epsilon": epsilon, "seed": seed,
                   **run(config, f"local-{method}-{epsilon}")}
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def central_rows(epsilons: list[float], seed: int) -> list[dict]:
    rows = []
    for epsilon in epsilons:
        extra = [f"privacy.clip={CENTRAL['clip']}", f"privacy.sampling={CENTRAL['sampling']}",
                 f"privacy.accountant={CENTRAL['accountant']}", "privacy.adaptive={}"]
        config = load_config(ROOT / "yaml" / "synthetic_fedprox" / "fedavg.yaml", [
            f"seed={seed}", f"rounds={CENTRAL['rounds']}",
            f"data.partition.num_clients={CENTRAL['clients']}",
            f"clients_per_round={CENTRAL['per_round']}", *CENTRAL_OVERRIDES,
            *privacy_overrides(epsilon, "central", extra)])
        row = {"part": "central", "method": "fedavg", "target_epsilon": epsilon, "seed": seed,
               **run(config, f"central-{epsilon}")}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['part']} {row['method']} ε={row['target_epsilon']}: acc "
            f"{row['test_accuracy']:.3f}, σ {row['sigma']:.3g}, " +
            ", ".join(f"{k} {row[k]:.3f}" for k in KEYS if not math.isnan(row[k])) +
            f" ({row['status']}, {row['wall_seconds']:.0f} s)")


# ---------------------------------------------------------------------------- reporting


def _epsilon(value: float | None) -> str:
    return "∞" if value is None else f"{value:.3g}"


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    value = row.get(key, math.nan)
    return "–" if value is None or math.isnan(value) else fmt.format(value)


def table(report: dict) -> str:
    rows = report["rows"]
    local = [r for r in rows if r["part"] == "local"]
    central = [r for r in rows if r["part"] == "central"]
    out = []
    if local:
        out += [f"Local DP, {LOCAL['setting']} ({report['local']['rounds']} rounds; probe on 2 "
                "clients every round, reading the privatised uploads)", "",
                "| method | target ε | σ | ε spent | test acc. (%) | presence exact | counts "
                "exact | counts MAE | class-mean cosine | image PSNR (dB) | image SSIM |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in local:
            out.append(f"| {r['method']}{_stopped(r)} | {_epsilon(r['target_epsilon'])} | "
                       f"{r['sigma']:.3g} | {_epsilon(r['epsilon'])} | "
                       f"{_cell(r, 'test_accuracy', '{:.1%}').rstrip('%')} | "
                       f"{_cell(r, 'leak_presence_exact')} | {_cell(r, 'leak_counts_exact')} | "
                       f"{_cell(r, 'leak_counts_mae')} | "
                       f"{_cell(r, 'leak_mean_cosine', '{:.3f}')} | "
                       f"{_cell(r, 'leak_image_psnr', '{:.1f}')} | "
                       f"{_cell(r, 'leak_image_ssim', '{:.3f}')} |")
    if central:
        c = report["central"]
        out += ["", f"Central DP (DP-FedAvg), {c['setting']}: {c['clients']:,} clients, "
                f"{c['per_round']:,} per round ({c['sampling']}), {c['rounds']} rounds, adaptive "
                f"clipping from C = {c['clip']}, {c['accountant'].upper()} accountant", "",
                "| target ε | σ | ε spent | test acc. (%) | final C |", "|---|---|---|---|---|"]
        for r in central:
            out.append(f"| {_epsilon(r['target_epsilon'])}{_stopped(r)} | {r['sigma']:.3g} | "
                       f"{_epsilon(r['epsilon'])} | "
                       f"{_cell(r, 'test_accuracy', '{:.1%}').rstrip('%')} | "
                       f"{_cell(r, 'final_clip', '{:.3g}')} |")
    minutes = {part: sum(r["wall_seconds"] for r in rows if r["part"] == part) / 60
               for part in ("local", "central")}
    out += ["", f"Seed {report['seed']}; the runs took {minutes['local']:.0f} min (local DP) "
            f"and {minutes['central']:.0f} min (central DP) on {report['machine']}."]
    return "\n".join(out)


def _stopped(row: dict) -> str:
    if row["status"] == "completed":
        return ""
    return f" (stopped after round {row['rounds']}: diverged)"


def figure(report: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = [("test_accuracy", "test accuracy"), ("leak_counts_exact", "counts exact"),
              ("leak_presence_exact", "label set exact"),
              ("leak_mean_cosine", "class-mean cosine")]
    order = [e for e in LOCAL_EPSILONS if any(r["target_epsilon"] == e for r in rows)]
    x = {e: i for i, e in enumerate(order)}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4))
    series = [(m, "local", m) for m in dict.fromkeys(r["method"] for r in rows
                                                      if r["part"] == "local")]
    if any(r["part"] == "central" for r in rows):
        series.append(("fedavg", "central", "DP-FedAvg (synthetic, central)"))
    colors = {(method, part): f"C{i}" for i, (method, part, _) in enumerate(series)}
    for ax, (key, label) in zip(axes, panels):
        for method, part, name in series:
            points = [(x[r["target_epsilon"]], r.get(key, math.nan)) for r in rows
                      if r["method"] == method and r["part"] == part]
            points = [(i, v) for i, v in points if v is not None and not math.isnan(v)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=colors[(method, part)],
                        linestyle="--" if part == "central" else "-")
        ax.set_xticks(range(len(order)), [_epsilon(e) for e in order])
        ax.set_xlabel("ε (target)")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("accuracy and what the server recovers, as ε shrinks", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / "privacy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["local", "central"])
    parser.add_argument("--methods", nargs="+", default=LOCAL_METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true",
                        help="re-print the saved results and redraw the figure")
    args = parser.parse_args()
    path = RESULTS / "privacy.json"
    if args.table:
        report = json.loads(path.read_text())
        print(f"figure: {figure(report)}")
        print(table(report))
        return
    started = time.perf_counter()
    kept = json.loads(path.read_text()) if path.is_file() else {}
    rows = [r for r in kept.get("rows", []) if r["part"] not in args.parts]
    if "local" in args.parts:
        rows += local_rows(args.methods, LOCAL_EPSILONS, args.seed)
    if "central" in args.parts:
        rows += central_rows(EPSILONS, args.seed)
    import os

    report = {"seed": args.seed, "local": LOCAL, "central": CENTRAL,
              "local_overrides": LOCAL_OVERRIDES, "central_overrides": CENTRAL_OVERRIDES,
              "machine": f"{os.cpu_count()} CPUs, shared with other work (timings are loose)",
              "wall_minutes": (time.perf_counter() - started) / 60, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"figure: {figure(report)}")
    print(table(report))


if __name__ == "__main__":
    main()
