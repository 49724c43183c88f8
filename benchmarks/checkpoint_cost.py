"""What checkpoints cost: the round loop with `checkpoint.every: 10` against the loop with
checkpoints only after the last round, and the seconds and megabytes of each checkpoint.

Two cases: the quickstart (small CNN on digits) and FedHPro's backbone, resnet10, on
digits-domains (3×32×32; one local epoch so it fits a 2-core machine). The settings are
interleaved in each repeat, so drift on a shared machine hits both; compare the ratio.

    .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 3] [--rounds 20]

Writes benchmarks/results/checkpoint_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare
from raysim.run.validate import load_config

RESULTS = Path(__file__).parent / "results"
CASES = {
    "quickstart (cnn)": ["name=ckpt_cnn"],
    "resnet10": ["name=ckpt_resnet10", "data.dataset=digits_domains", "model.name=resnet10",
                 "data.partition.kind=domains", "train.local_epochs=1"],
}
SETTINGS = {"end only": 0, "every 10": 10}


def one_run(overrides: list[str], every: int, rounds: int) -> dict:
    config = load_config("yaml/quickstart.yaml", [*overrides, f"rounds={rounds}",
                                                  f"checkpoint.every={every}",
                                                  "logging.progress=false"])
    run_dir = RESULTS / "scratch" / f"{config.name}-{every}"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = execute(prepare(config, run_dir), [RunDirectory(run_dir)]).to_dict()
    written = summary["checkpoints_written"]
    return {"loop_seconds": sum(summary["round_seconds"]),
            "checkpoints": len(written),
            "write_seconds": [w["seconds"] for w in written],
            "megabytes": [w["bytes"] / 2**20 for w in written],
            "final_test_accuracy": summary["final"]["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    runs = {case: {name: [] for name in SETTINGS} for case in CASES}
    for _ in range(args.repeats):
        for case, overrides in CASES.items():
            for name, every in SETTINGS.items():
                runs[case][name].append(one_run(overrides, every, args.rounds))

    report = {"rounds": args.rounds, "repeats": args.repeats, "runs": runs, "cases": {}}
    print(f"\n{args.rounds} rounds, median of {args.repeats} (loop = sum of round times)")
    print(f"{'case':<18}{'loop, end only':>16}{'loop, every 10':>16}{'ratio':>8}"
          f"{'s/checkpoint':>14}{'MB/checkpoint':>15}")
    for case, by_setting in runs.items():
        loops = {name: statistics.median(r["loop_seconds"] for r in rs)
                 for name, rs in by_setting.items()}
        writes = [s for r in by_setting["every 10"] for s in r["write_seconds"]]
        sizes = [m for r in by_setting["every 10"] for m in r["megabytes"]]
        ratio = loops["every 10"] / loops["end only"]
        report["cases"][case] = {"loop_seconds": loops, "ratio": ratio,
                                 "write_seconds_median": statistics.median(writes),
                                 "megabytes_median": statistics.median(sizes)}
        print(f"{case:<18}{loops['end only']:>16.2f}{loops['every 10']:>16.2f}{ratio:>8.3f}"
              f"{statistics.median(writes):>14.3f}{statistics.median(sizes):>15.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_cost.json").write_text(json.dumps(report, indent=2))
    print(f"\nresults in {RESULTS / 'checkpoint_cost.json'}")


if __name__ == "__main__":
    main()
