"""Memory and time of one FedBCS client step: the official materialized prototype features vs
the factored path, and FSR's FFT form vs its closed form.

Each configuration runs in its own process, so peak RSS is that configuration's alone. Reported
per configuration (median of `--repeats` forward+backward steps after one warm-up):
  * activations saved for backward (MiB): the bytes of every distinct storage autograd keeps,
    recorded with `torch.autograd.graph.saved_tensors_hooks` — what a GPU would have to hold;
  * peak RSS of the process (MiB), on CPU;
  * seconds per step.

    .venv/bin/python benchmarks/fedbcs_cost.py                      # 256², width 32, batch 6
    .venv/bin/python benchmarks/fedbcs_cost.py --size 128 --batch 2 --repeats 3

Writes benchmarks/results/fedbcs_cost.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = {  # label → (feature_path, fsr, prototype branch on)
    "U-Net + FSR, no prototype branch": ("per_branch", "closed_form", False),
    "materialized features, FSR fft (official)": ("materialized", "fft", True),
    "materialized features, FSR closed form": ("materialized", "closed_form", True),
    "factored features, FSR fft": ("per_branch", "fft", True),
    "factored features, FSR closed form (default)": ("per_branch", "closed_form", True),
}


def measure(label: str, size: int, batch: int, width: int, repeats: int, threads: int) -> dict:
    import torch

    from algorithms.fedbcs import AlignmentObjective, BCSBroadcast, FedBCS
    from raysim.nn.models import UNet

    torch.set_num_threads(threads)
    path, fsr, align = CASES[label]
    method = FedBCS(FedBCS.Config(feature_path=path, fsr=fsr))
    g = torch.Generator().manual_seed(0)
    model = method.prepare_model(UNet((3, size, size), 2, width))
    x = torch.randn(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, size, size, generator=g) > 0.7).long()
    anchors = {level: (torch.randn(3, model.fusion[level].dim, generator=g),
                       torch.tensor([0, 1, 1])) for level in ("encoder", "decoder")}
    # the client's own batch loss; no prototypes are collected (they are a no-grad side pass)
    broadcast = BCSBroadcast(weights={}, prototypes=anchors if align else {})

    def step() -> torch.Tensor:
        objective = AlignmentObjective(method, model, broadcast, torch.device("cpu"),
                                       collect_from=repeats + 1)
        return objective(x, y)

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step().backward()  # warm-up, and the saved-activation count
    model.zero_grad()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad()
    return {
        "case": label, "size": size, "batch": batch, "width": width,
        "saved_mib": sum(saved.values()) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args()
    shape = (args.size, args.batch, args.width, args.repeats, args.threads)
    if args.case:
        print(json.dumps(measure(args.case, *shape)))
        return
    rows = []
    for label in CASES:
        cmd = [sys.executable, __file__, "--case", label, "--size", str(args.size),
               "--batch", str(args.batch), "--width", str(args.width),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {label}: {rows[-1]['saved_mib']:.0f} MiB saved, "
              f"{rows[-1]['seconds']:.2f} s", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fedbcs_cost.json").write_text(json.dumps(rows, indent=2))
    base = rows[0]
    print(f"\nFedBCS client step, {args.batch}×3×{args.size}², U-Net width {args.width}, "
          f"{args.threads} threads (median of {args.repeats})\n")
    print("| case | saved activations (MiB) | over the backbone (MiB) | peak RSS (MiB) | s/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['saved_mib']:.0f} | {r['saved_mib'] - base['saved_mib']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
