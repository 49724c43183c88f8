"""Client groups and fractional workers on one GPU: samples/s and GPU memory per worker.

One fresh `raysim launch` per setting, on the embedded local Ray of a machine with one GPU:
FedAvg on digits (100 clients, Dirichlet(0.5) label skew, 40 a round, 2 local epochs of batch
16, 4 rounds; the first, which also warms up, left out of the medians), for the quickstart's
small CNN and for ResNet10:

- one by one on 1 worker of a whole GPU, 4 workers of 0.25 and 8 of 0.125 (a fractional GPU
  per worker: processes share the card);
- grouped (`train.client_group`) on 1 worker of a whole GPU and on 4 of 0.25: one vectorised
  step for a group's clients, one kernel launch instead of K. ResNet10 has BatchNorm, so its
  clients train one by one whatever K is (the run says so); it is not run grouped.

Per setting: median seconds per round, samples/s (the engine's: a round's samples × local
epochs ÷ its seconds; median), each worker's peak allocated GPU
memory and what its caching allocator still holds after the last round (`summary.json`
`peak_rss_mb.workers_gpu`): whether an idle worker keeps memory between rounds.

    .venv/bin/python benchmarks/gpu_groups.py [--rounds 4] [--cpu]

`--cpu` runs the same launches with no GPU (num_gpus 0; 1 and 2 workers), to check the
script where there is none. Writes benchmarks/results/gpu_groups.json (gpu_groups_cpu.json
with --cpu) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from launching import launch_quickstart

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

WORKLOAD = ["data.partition.num_clients=100", "clients_per_round=40", "train.local_epochs=2",
            "eval_every=1000", "checkpoint.every=0"]
# (model, workers, GPU per worker, K)
SETTINGS = [(model, workers, gpu, k) for model in ("cnn", "resnet10")
            for workers, gpu, k in ((1, 1.0, 1), (4, 0.25, 1), (8, 0.125, 1), (1, 1.0, 8),
                                    (4, 0.25, 8))
            if not (model == "resnet10" and k > 1)]
CPU_SETTINGS = [("cnn", 1, 0.0, 1), ("cnn", 2, 0.0, 1), ("cnn", 1, 0.0, 8)]


def launch(model: str, workers: int, gpu: float, size: int, rounds: int) -> dict:
    """One setting in a fresh process; its round times, samples/s and workers' memory."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        summary = launch_quickstart([*WORKLOAD, f"model.name={model}", f"rounds={rounds}",
                                     f"resources.num_workers={workers}",
                                     f"resources.worker.num_gpus={gpu}",
                                     f"train.client_group={size}"], run_dir)
        # the engine's own per round: the round's samples × local epochs ÷ its seconds
        rates = [r["value"] for r in pq.read_table(run_dir / "metrics.parquet").to_pylist()
                 if r["metric"] == "samples_per_second" and r["round"] > 1]
    seconds = summary["round_seconds"][1:]
    gpus = summary["peak_rss_mb"].get("workers_gpu") or []
    return {
        "model": model, "workers": summary["num_workers"], "gpu_per_worker": gpu, "K": size,
        "round_seconds": statistics.median(seconds), "round_seconds_all": seconds,
        "samples_per_second": statistics.median(rates),
        "final_accuracy": summary["final"].get("test_accuracy"),
        "worker_peak_gpu_mb": max((g["peak_allocated"] for g in gpus if g), default=None),
        "worker_reserved_gpu_mb_after": max((g["reserved"] for g in gpus if g), default=None),
        "worker_peak_rss_mb": max(summary["peak_rss_mb"]["workers"]),
        "devices": sorted({w["device"] for w in summary["workers"]}),
    }


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | workers × GPU | K | s/round | samples/s | worker peak GPU MiB | "
             "held after its rounds MiB | accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['workers']} × {r['gpu_per_worker']} | {r['K']} | "
                     f"{r['round_seconds']:.3f} | {r['samples_per_second']:,.0f} | "
                     f"{mib(r['worker_peak_gpu_mb'])} | "
                     f"{mib(r['worker_reserved_gpu_mb_after'])} | {r['final_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="no GPU: check the script only")
    args = parser.parse_args()
    rows = []
    for model, workers, gpu, size in CPU_SETTINGS if args.cpu else SETTINGS:
        rows.append(launch(model, workers, gpu, size, args.rounds))
        print(f"  {model:9s} {workers} × {gpu:<5} K={size:<3} "
              f"{rows[-1]['round_seconds']:.3f} s/round", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("gpu_groups_cpu.json" if args.cpu else "gpu_groups.json")
    path.write_text(json.dumps({"benchmark": "gpu_groups", "rows": rows,
                                "cpus": os.cpu_count()}, indent=2) + "\n")
    print(table(rows))
    print(f"\nresults in {path}")


if __name__ == "__main__":
    main()
