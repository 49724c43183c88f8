"""How long building the rendered four-domain digits takes (`digits_domains`: every bundled digit
drawn in the MNIST / USPS / SVHN / SYN styles), the cost every run on that dataset pays in the
driver before its first round. Budget: under 5 s per build on a 2-core machine.

    .venv/bin/python benchmarks/render_time.py [--repeats 5]

Writes benchmarks/results/render_time.json and prints the median and the slowest build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from raysim.data.digits_domains import load_digits_domains

RESULTS = Path(__file__).parent / "results"
BUDGET_SECONDS = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds = []
    for seed in range(args.repeats):  # another split seed each time: nothing is reused
        start = time.perf_counter()
        load_digits_domains(split_seed=seed)
        seconds.append(time.perf_counter() - start)
    report = {"repeats": args.repeats, "seconds": seconds,
              "median_seconds": statistics.median(seconds), "max_seconds": max(seconds),
              "budget_seconds": BUDGET_SECONDS, "within_budget": max(seconds) < BUDGET_SECONDS}
    print(f"digits_domains build: median {report['median_seconds']:.2f} s, slowest "
          f"{report['max_seconds']:.2f} s (budget {BUDGET_SECONDS:.0f} s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "render_time.json").write_text(json.dumps(report, indent=2))
    print(f"results in {RESULTS / 'render_time.json'}")


if __name__ == "__main__":
    main()
