"""Does a method's global class anchor carry a consistent semantic signal? Runs the anchor
methods on one setting and plots, per round, the diagnostics every such method logs:

- anchor_cosine: cosine between clients' trained local class means and the global anchors;
- anchor_self_accuracy: how often the global classifier puts anchor c in class c;
- anchor_interclass_cosine: cosine between anchors of different classes;
- (FedHPro) server_hp_init_cosine: cosine of the hyper-prototypes to their random initialisation.

    .venv/bin/python benchmarks/diagnostics.py [--setting digits_a0.5] [--seeds 0 1 2]

Writes benchmarks/results/diagnostics.json, benchmarks/figures/diagnostics_<setting>.png and
prints a table of the last-round values (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from accuracy import RESULTS, config_path

from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.validate import load_config

FIGURES = Path(__file__).parent / "figures"
METHODS = ["fedproto", "fpl", "fedtgp", "fedhpro-official", "fedhpro-paper"]
KEYS = ["anchor_cosine", "anchor_self_accuracy", "anchor_interclass_cosine",
        "server_hp_init_cosine", "test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="digits_a0.5")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--plot-only", action="store_true", help="redraw from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / f"diagnostics_{args.setting}.json").read_text()), args.setting)
        return

    curves: dict[str, dict[str, list[list[float]]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            config = load_config(config_path(args.setting, method),
                                 [f"seed={seed}", "diagnostics.anchors=true"])
            collect = CollectRounds()
            execute(prepare(config, RESULTS / "scratch" / f"diag-{method}-{seed}"), [collect])
            for key in KEYS:
                values = [m.get(key, np.nan) for m in collect.rounds]
                curves.setdefault(method, {}).setdefault(key, []).append(values)
            print(f"{method} seed {seed}: " + ", ".join(
                f"{k} {collect.rounds[-1][k]:.3f}" for k in KEYS if k in collect.rounds[-1]),
                flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"diagnostics_{args.setting}.json").write_text(json.dumps(curves))

    print(f"\n| method ({args.setting}, last round, mean of {len(args.seeds)} seed(s)) | "
          + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for method, by_key in curves.items():
        cells = [np.mean([c[-1] for c in by_key[k]]) for k in KEYS]
        print(f"| {method} | " + " | ".join("—" if np.isnan(v) else f"{v:.3f}" for v in cells)
              + " |")
    plot(curves, args.setting)


def plot(curves: dict, setting: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.2))
    for ax, key in zip(axes, KEYS):
        for index, (method, by_key) in enumerate(curves.items()):
            values = np.array(by_key[key], dtype=float).mean(axis=0)  # over seeds
            if not np.all(np.isnan(values)):  # one colour per method across the panels
                ax.plot(np.arange(1, len(values) + 1), values, label=method, color=f"C{index}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / f"diagnostics_{setting}.png", dpi=90)


if __name__ == "__main__":
    main()
