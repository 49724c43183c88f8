"""The README's tuned accuracy tables: the ready comparisons of yaml/compare/ run one after the
other (`raysim compare`), then one table with a column per setting.

    .venv/bin/python benchmarks/comparisons.py                       # the digits comparisons
    .venv/bin/python benchmarks/comparisons.py --settings synthetic_organ synthetic_nuclei
    .venv/bin/python benchmarks/comparisons.py --trials 4            # a smaller budget
    .venv/bin/python benchmarks/comparisons.py --draws tune          # Tune's draws, as the
                                                                     # README's tables were run
    .venv/bin/python benchmarks/comparisons.py --table DIR [DIR ...] # re-read finished ones

Each comparison's directory goes under benchmarks/results/compare/<setting>/.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "compare"
SETTINGS = ["digits_a0.5", "digits_a0.1", "digits_domains", "digits_fedhpro_clients"]


def run(setting: str, trials: int | None, draws: str | None) -> Path:
    out = RESULTS / setting
    command = [sys.executable, "-m", "raysim.cli", "compare",
               str(ROOT / "yaml" / "compare" / f"{setting}.yaml"), "--out", str(out)]
    if trials is not None:
        command += ["-o", f"budget.trials={trials}"]
    if draws is not None:
        command += ["-o", f"budget.draws={draws}"]
    subprocess.run(command, check=True)
    return out


def combined_table(dirs: list[Path]) -> str:
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    metric = summaries[0]["reported"]
    head = ["method", *(f"{s['name']} ({s['trials_per_method']} trials)" for s in summaries)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    for method in methods:
        cells = []
        for s in summaries:
            m = s["methods"].get(method)
            mean = math.nan if m is None else m[f"{metric}_mean"]
            cells.append("–" if math.isnan(mean) else
                         f"{100 * mean:.1f} ± {100 * m[f'{metric}_std']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    minutes = ", ".join(f"{s['name']} {s['wall_seconds'] / 60:.0f} min" for s in summaries)
    return "\n".join(lines) + f"\n\nWall time on this machine: {minutes}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--trials", type=int, help="trials per method instead of the file's")
    parser.add_argument("--draws", choices=["per_key", "tune"],
                        help="how trials draw their values instead of the file's")
    parser.add_argument("--table", nargs="+", type=Path, metavar="DIR",
                        help="print the table of finished comparison directories")
    args = parser.parse_args()
    dirs = args.table or [run(setting, args.trials, args.draws) for setting in args.settings]
    print(combined_table(dirs))


if __name__ == "__main__":
    main()
