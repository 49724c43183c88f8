"""Accuracy of the FL methods on the offline settings, over several seeds.

For every setting and method (yaml/<setting>/<method>.yaml; FedHPro: yaml/fedhpro/
<setting>_<variant>.yaml), runs each seed on one local Ray and reports the final test accuracy
and the mean over the last 5 rounds (mean ± std over seeds). Domain settings also report each
domain's final accuracy. `--ablation` runs FedHPro's ablations on the given settings instead.

    .venv/bin/python benchmarks/accuracy.py                       # everything, seeds 0 1 2
    .venv/bin/python benchmarks/accuracy.py --settings digits_a0.5 --methods fedavg fpl
    .venv/bin/python benchmarks/accuracy.py --ablation --settings digits_a0.5 digits_lt100
    .venv/bin/python benchmarks/accuracy.py --table results/a.json results/b.json  # re-print

Writes benchmarks/results/accuracy.json (updated after every run) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.validate import load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SETTINGS = ["digits_a0.5", "digits_a0.1", "digits_domains"]
BASELINES = ["fedavg", "fedprox", "scaffold", "moon", "fedproto", "fpl", "fedtgp"]
METHODS = [*BASELINES, "fedhpro-official", "fedhpro-paper"]
# FedHPro ablations: label → overrides on top of the official code's reading (fedhpro)
ABLATIONS = {
    "fedhpro-official": [],
    "no CReFF branch": ["algorithm.creff=false"],
    "no HPCL, no HPAL (= CReFF)": ["algorithm.hpcl=false", "algorithm.hpal=false"],
    "HP distance cos": ["algorithm.distance=cos"],
    "HP distance mse": ["algorithm.distance=mse"],
    "fedhpro-paper": ["algorithm.name=fedhpro_paper"],
}


def config_path(setting: str, method: str) -> Path:
    if method.startswith("fedhpro"):
        variant = "paper" if method.endswith("paper") else "official"
        return ROOT / "yaml" / "fedhpro" / f"{setting}_{variant}.yaml"
    return ROOT / "yaml" / setting / f"{method}.yaml"


def run_one(setting: str, method: str, seed: int, overrides: list[str]) -> dict:
    path = config_path(setting, "fedhpro-official" if method in ABLATIONS else method)
    extra = ABLATIONS.get(method, [])
    config = load_config(path, [f"seed={seed}", *extra, *overrides])
    run = prepare(config, RESULTS / "scratch" / f"{setting}-{method}-{seed}")
    collect = CollectRounds()
    summary = execute(run, [collect]).to_dict()
    accuracy = [m["test_accuracy"] for m in collect.rounds if "test_accuracy" in m]
    final = collect.rounds[-1]
    return {
        "setting": setting, "method": method, "seed": seed,
        "final": final["test_accuracy"],
        "last5": float(np.mean(accuracy[-5:])),
        "curve": accuracy,
        "per_domain": {k.split("/", 1)[1]: v for k, v in final.items()
                       if k.startswith("test_accuracy/")},
        "wall_seconds": summary["wall_seconds"],
    }


def table(results: list[dict], settings: list[str], methods: list[str]) -> str:
    def cell(rows: list[dict]) -> str:
        if not rows:
            return "—"
        final = np.array([r["final"] for r in rows]) * 100
        last5 = np.array([r["last5"] for r in rows]) * 100
        return f"{final.mean():.1f} ± {final.std():.1f} ({last5.mean():.1f})"

    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method in methods:
        cells = [cell([r for r in results if r["method"] == method and r["setting"] == s])
                 for s in settings]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    domain_rows = [r for r in results if r["per_domain"]]
    if domain_rows:
        domains = list(domain_rows[0]["per_domain"])
        lines += ["", "| method (" + domain_rows[0]["setting"] + ") | " + " | ".join(domains)
                  + " |", "|---" * (len(domains) + 1) + "|"]
        for method in methods:
            rows = [r for r in domain_rows if r["method"] == method]
            if rows:
                values = [np.mean([r["per_domain"][d] for r in rows]) * 100 for d in domains]
                lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--ablation", action="store_true", help="FedHPro ablations instead")
    parser.add_argument("--table", nargs="+", help="only print the table of these JSON files")
    parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    args = parser.parse_args()
    if args.table:
        results = [r for f in args.table for r in json.loads(Path(f).read_text())["results"]]
        settings = list(dict.fromkeys(r["setting"] for r in results))
        print(table(results, settings, list(dict.fromkeys(r["method"] for r in results))))
        return
    if args.ablation and args.methods == METHODS:
        args.methods = list(ABLATIONS)

    results, started = [], time.perf_counter()
    for setting in args.settings:
        for method in args.methods:
            for seed in args.seeds:
                result = run_one(setting, method, seed, args.override)
                results.append(result)
                print(f"{setting:>15} {method:>9} seed {seed}: final {result['final']:.4f} "
                      f"last-5 {result['last5']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(
                    {"seeds": args.seeds, "overrides": args.override, "results": results},
                    indent=2))
    print(f"\nTest accuracy (%), final mean ± std over seeds {args.seeds} "
          f"(mean of the last 5 rounds); {time.perf_counter() - started:.0f} s in all\n")
    print(table(results, args.settings, args.methods))


if __name__ == "__main__":
    main()
