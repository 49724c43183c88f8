"""Federated segmentation on the synthetic multi-site sets: Dice of FedAvg, FedProx, MOON,
FedProto, FPL (pixel prototypes of the decoder's last stage), FedBCS and FedBCS's ablations
over several seeds, and the cost of FSR's FFT form against its closed form.

Configs: yaml/<flavour>/{fedavg,fedprox,moon,fedproto,fpl}.yaml and yaml/fedbcs/<flavour>.yaml
(ablations are overrides of the latter). Every run reports the test Dice of the round with the
best validation Dice (never selected on test), per site and averaged over sites, plus HD95 and
ASD.

    .venv/bin/python benchmarks/segmentation.py                     # both flavours, seeds 0 1 2
    .venv/bin/python benchmarks/segmentation.py --flavours synthetic_nuclei --methods fedbcs
    .venv/bin/python benchmarks/segmentation.py --timing --rounds 6 # fft vs closed_form s/round
    .venv/bin/python benchmarks/segmentation.py --table             # re-print saved results

Writes benchmarks/results/segmentation.json (updated after every run) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.validate import load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
FLAVOURS = ["synthetic_organ", "synthetic_nuclei"]
# label → (config stem, overrides)
METHODS = {
    "fedavg": ("fedavg", []),
    "fedprox": ("fedprox", []),
    "moon": ("moon", []),
    "fedproto": ("fedproto", []),
    "fpl": ("fpl", []),
    "fedbcs": ("fedbcs", []),
    "fedbcs, FSR off": ("fedbcs", ["algorithm.fsr=none"]),
    "fedbcs, encoder level only": ("fedbcs", ["algorithm.levels=[encoder]"]),
    "fedbcs, decoder level only": ("fedbcs", ["algorithm.levels=[decoder]"]),
    "fedbcs, contrastive only": ("fedbcs", ["algorithm.consistency=false"]),
    "fedbcs, MSE only": ("fedbcs", ["algorithm.contrastive=false"]),
}


def config_path(flavour: str, stem: str) -> Path:
    if stem == "fedbcs":
        return ROOT / "yaml" / "fedbcs" / f"{flavour}.yaml"
    return ROOT / "yaml" / flavour / f"{stem}.yaml"


def run_one(flavour: str, method: str, seed: int, overrides: list[str]) -> dict:
    stem, extra = METHODS[method]
    config = load_config(config_path(flavour, stem), [f"seed={seed}", "logging.progress=false",
                                                     *extra, *overrides])
    run = prepare(config, RESULTS / "scratch" / f"{flavour}-{method}-{seed}".replace(" ", ""))
    collect = CollectRounds()
    summary = execute(run, [collect]).to_dict()
    best = summary["best"]
    chosen = collect.rounds[best["round"] - 1]
    return {
        "flavour": flavour, "method": method, "seed": seed,
        "selected_round": best["round"],
        "dice": chosen["test_dice"], "hd95": chosen["test_hd95"], "asd": chosen["test_asd"],
        "final_dice": collect.rounds[-1]["test_dice"],
        "per_site": {k.split("/", 1)[1]: v for k, v in chosen.items()
                     if k.startswith("test_dice/")},
        "curve": [m.get("test_dice") for m in collect.rounds],
        "round_seconds": [m["round_seconds"] for m in collect.rounds],
        "wall_seconds": summary["wall_seconds"],
    }


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    return f"{np.mean(values) * scale:.{digits}f} ± {np.std(values) * scale:.{digits}f}"


def tables(results: list[dict]) -> str:
    out = []
    for flavour in dict.fromkeys(r["flavour"] for r in results if "dice" in r):
        rows = [r for r in results if r["flavour"] == flavour and "dice" in r]
        sites = sorted({s for r in rows for s in r["per_site"]})
        seeds = sorted({r["seed"] for r in rows})
        out.append(f"\n{flavour}: test Dice (%) at the best-validation round, mean ± std over "
                   f"seeds {seeds}; HD95 and ASD in pixels\n")
        out.append("| method | Dice | " + " | ".join(sites) + " | HD95 | ASD |")
        out.append("|---|---|" + "---|" * len(sites) + "---|---|")
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            cells = [mean_std([r["dice"] for r in runs])]
            cells += [mean_std([r["per_site"][s] for r in runs]) for s in sites]
            cells += [mean_std([r["hd95"] for r in runs], 1.0),
                      mean_std([r["asd"] for r in runs], 1.0)]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
    timing = [r for r in results if r.get("kind") == "timing"]
    if timing:
        out.append("\nFedBCS seconds per round (median over rounds 2.., all clients training "
                   "and evaluation; runs interleaved)\n")
        out.append("| flavour | fsr | s/round | vs closed_form |")
        out.append("|---|---|---|---|")
        for r in timing:
            out.append(f"| {r['flavour']} | {r['fsr']} | {r['seconds']:.2f} | "
                       f"{r['ratio']:.2f}× |")
    return "\n".join(out)


def timing(flavours: list[str], rounds: int, repeats: int) -> list[dict]:
    """Interleaved FedBCS runs with fsr=fft and fsr=closed_form; median round time."""
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for flavour in flavours:
            for fsr in ("closed_form", "fft"):
                r = run_one(flavour, "fedbcs", 0, [f"rounds={rounds}", f"algorithm.fsr={fsr}"])
                seconds.setdefault((flavour, fsr), []).extend(r["round_seconds"][1:])
    out = []
    for (flavour, fsr), values in seconds.items():
        base = statistics.median(seconds[(flavour, "closed_form")])
        median = statistics.median(values)
        out.append({"kind": "timing", "flavour": flavour, "fsr": fsr, "seconds": median,
                    "ratio": median / base})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", nargs="+", default=FLAVOURS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--timing", action="store_true", help="fft vs closed_form only")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per timing run")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats")
    parser.add_argument("--table", action="store_true", help="re-print the saved results")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "segmentation.json"
    results = json.loads(path.read_text()) if path.exists() else []
    if args.table:
        print(tables(results))
        return
    if args.timing:
        results = [r for r in results if r.get("kind") != "timing"]
        results += timing(args.flavours, args.rounds, args.repeats)
        path.write_text(json.dumps(results, indent=1))
    else:
        for flavour in args.flavours:
            for method in args.methods:
                for seed in args.seeds:
                    results = [r for r in results if (r.get("flavour"), r.get("method"),
                                                      r.get("seed")) != (flavour, method, seed)]
                    results.append(run_one(flavour, method, seed, args.override))
                    path.write_text(json.dumps(results, indent=1))
                    print(f"{flavour} {method} seed {seed}: dice {results[-1]['dice']:.4f} "
                          f"({results[-1]['wall_seconds']:.0f} s)", flush=True)
    print(tables(results))


if __name__ == "__main__":
    main()
