"""Client groups: local training of a round's clients one by one against groups of K.

A microbenchmark of the worker's training step (no Ray, no actors, one process, one torch
thread, as a worker of one CPU): the clients of each round are sampled as a run samples them,
their data built as a worker builds it, and trained by the method's own client step (K = 1)
or by `raysim.engine.grouped.train_clients` on groups of K in client-id order. Timed: the
training only (the synthetic clients' data are generated before the clock starts, for both).

Workloads (FedAvg):
- synthetic_fedprox + logreg and + mlp, 10^6 registered clients, 100 and 1,000 per round,
  104 samples each, one epoch of batch 10 at lr 0.01 (benchmarks/scale.py's setting);
- the quickstart (digits, small CNN, 10 clients per round, 5 epochs of batch 16, momentum).
K ∈ {1, 8, 32, 128, 512}; a K above the clients per round is the whole round in one group.
Each round every K trains in turn (so a change of the machine's load slows them alike); the
table shows the median over the timed rounds. Memory: the estimate `check_group_memory` uses
for one group of K (stacked weights, gradients, moments, activations), and the process's peak
RSS over the whole workload.

With --runs, the same K on whole runs: fresh `raysim launch`es per K (--repeats of them, the
K taking turns) on the embedded local Ray (2 workers of one CPU, as benchmarks/scale.py runs),
synthetic_fedprox + logreg, 10^6 registered clients, 1,000 per round; per-round seconds from
the runs' summaries (each launch's first round, which also warms up, left out), the workers'
peak RSS. With --flower too, the same work on Flower's simulation engine (benchmarks/scale.py's
run, its own venv; 10^4 registered), and each K's ratio.

Then the agreement: per method (FedAvg, FedProx, SCAFFOLD, MOON, FedProto), one round one by
one to get every method's state (prototypes, control variates, previous models), and the next
round both ways: the largest |Δw| over every client's weights, grouped (all clients in one
group) against one by one.

    .venv/bin/python benchmarks/client_groups.py [--rounds 2] [--quick] [--runs]
        [--only-runs] [--run-rounds R] [--repeats 1] [--flower]

Writes benchmarks/results/client_groups.json, benchmarks/figures/client_groups.png and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from launching import launch_quickstart

from raysim.algorithm import ClientContext, ServerContext
from raysim.config import read_yaml
from raysim.engine.grouped import client_groups, train_clients
from raysim.nn.client_groups import group_bytes
from raysim.nn.training import ClientData, Preprocess
from raysim.run.validate import config_from_dict
from raysim.seeding import client_generator, sample_clients, server_generator
from raysim.task import build_task, initial_model, make_algorithm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "benchmarks" / "figures"
GROUP_SIZES = (1, 8, 32, 128, 512)
CPU = torch.device("cpu")
SYNTHETIC = {"data": {"dataset": "synthetic_fedprox", "size_sigma": 0.0,
                      "partition": {"kind": "natural", "num_clients": 1_000_000}},
             "train": {"local_epochs": 1, "batch_size": 10, "lr": 0.01, "momentum": 0.0}}
WORKLOADS = [  # (label, config overrides on yaml/quickstart.yaml, clients per round)
    ("synthetic logreg", {**SYNTHETIC, "model": {"name": "logreg"}}, 100),
    ("synthetic logreg", {**SYNTHETIC, "model": {"name": "logreg"}}, 1000),
    ("synthetic mlp", {**SYNTHETIC, "model": {"name": "mlp"}}, 100),
    ("synthetic mlp", {**SYNTHETIC, "model": {"name": "mlp"}}, 1000),
    ("quickstart cnn", {}, 10),
]
AGREEMENT = [  # (workload label, overrides, clients per round)
    ("quickstart cnn", {}, 10),
    ("synthetic mlp", {**SYNTHETIC, "model": {"name": "mlp"}}, 100),
]
METHODS = ("fedavg", "fedprox", "scaffold", "moon", "fedproto")


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


class Worker:
    """What a client worker holds, built the way it builds it, without the actor."""

    def __init__(self, overrides: dict, per_round: int, method: str = "fedavg") -> None:
        raw = merged(_quickstart_raw(), {
            **overrides, "clients_per_round": per_round, "algorithm": {"name": method}})
        self.config = config_from_dict(raw)
        self.task = build_task(self.config)
        self.algorithm = make_algorithm(self.config, self.task.info, CPU)
        self.model = initial_model(self.config, self.task.info, self.algorithm).to(CPU)
        dataset = self.task.dataset
        self.preprocess = Preprocess(dataset.spec, CPU)
        self.generated = dataset.clients
        if dataset.train is not None:
            self.x, self.y = torch.from_numpy(dataset.train.x), torch.from_numpy(dataset.train.y)
        self.partition = self.task.partition

    def client_data(self, client_id: int) -> ClientData:
        if self.generated is not None:
            x, y = self.generated.client(client_id)
            return ClientData(torch.from_numpy(x), torch.from_numpy(y),
                              torch.arange(len(y)), self.preprocess)
        lo, hi = self.partition.offsets[client_id], self.partition.offsets[client_id + 1]
        return ClientData(self.x, self.y, torch.from_numpy(self.partition.indices[lo:hi]),
                          self.preprocess)

    def sampled(self, round_index: int) -> list[int]:
        return sample_clients(self.config.seed, round_index, self.task.info.num_clients,
                              self.config.clients_per_round)

    def contexts(self, round_index: int, ids: list[int]) -> list[ClientContext]:
        return [ClientContext(cid, round_index, client_generator(self.config.seed, round_index,
                                                                 cid), CPU, self.config.train)
                for cid in ids]

    def train(self, broadcast, round_index: int, ids: list[int], datas, states, size: int):
        """The round's updates by client id, trained one by one (size 1) or in groups."""
        contexts = self.contexts(round_index, ids)
        if size == 1:
            return [self.algorithm.client_update(ctx, self.model, broadcast, data, state)
                    for ctx, data, state in zip(contexts, datas, states)]
        at = {cid: i for i, cid in enumerate(ids)}
        updates = []
        for group in client_groups(ids, size):
            members = [at[cid] for cid in group]
            updates += train_clients(self.algorithm, [self.model] * len(group),
                                     [datas[i] for i in members], [contexts[i] for i in members],
                                     broadcast, [states[i] for i in members])
        return updates


def _quickstart_raw() -> dict:
    return read_yaml(ROOT / "yaml" / "quickstart.yaml")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_workload(label: str, overrides: dict, per_round: int, rounds: int) -> list[dict]:
    """Per K: the median over `rounds` rounds of the training seconds. Every K trains each
    round in turn (after one warm-up round for all), so a machine whose load changes slows
    them alike."""
    worker = Worker(overrides, per_round)
    broadcast = worker.algorithm.broadcast(worker.algorithm.init_server(worker.model))
    epochs = worker.config.train.local_epochs
    sizes = sorted({min(k, per_round) for k in GROUP_SIZES})  # K ≥ clients: one group
    seconds: dict[int, list[float]] = {k: [] for k in sizes}
    gaps: dict[int, float] = {k: 0.0 for k in sizes}
    samples = []
    for r in range(rounds + 1):  # round 0 warms up
        ids = worker.sampled(r + 1)
        datas = [worker.client_data(cid) for cid in ids]
        samples.append(epochs * sum(len(d) for d in datas))
        reference = None
        for size in sizes:
            start = time.perf_counter()
            updates = worker.train(broadcast, r + 1, ids, datas, [None] * len(ids), size)
            if r:
                seconds[size].append(time.perf_counter() - start)
            reference = reference or updates
            gaps[size] = max(gaps[size], max_gap(reference, updates))
    rows = []
    per_round_samples = statistics.mean(samples[1:])
    sample = torch.zeros(worker.config.train.batch_size, *worker.task.info.input_shape)
    for size in sizes:
        median = statistics.median(seconds[size])
        rows.append({"workload": label, "clients_per_round": per_round, "K": size,
                     "round_seconds": median, "round_seconds_all": seconds[size],
                     "samples_per_second": per_round_samples / median,
                     "speedup": statistics.median(seconds[1]) / median,
                     "max_weight_gap": gaps[size], "peak_rss_mb": peak_rss_mb(),
                     "group_mb_estimate": group_bytes(worker.model, sample, size,
                                                      worker.config.train.optimizer) / 2**20})
        print(f"  {label:16s} {per_round:5d}/round  K={size:4d}  {median:8.3f} s/round  "
              f"x{rows[-1]['speedup']:.1f}  |Δw|≤{gaps[size]:.1e}", flush=True)
    return rows


def max_gap(reference, updates) -> float:
    return max(float((u.weights[n] - r.weights[n]).abs().max())
               for r, u in zip(reference, updates, strict=True) for n in r.weights)


def agreement(label: str, overrides: dict, per_round: int) -> list[dict]:
    """Per method: round 1 one by one (for its state), round 2 one by one and in one group."""
    rows = []
    for method in METHODS:
        worker = Worker(overrides, per_round, method)
        algorithm = worker.algorithm
        state = algorithm.init_server(worker.model)
        ids = worker.sampled(1)
        datas = [worker.client_data(cid) for cid in ids]
        first = worker.train(algorithm.broadcast(state), 1, ids, datas, [None] * len(ids), 1)
        state = algorithm.server_round(ServerContext(1, server_generator(0, 1), CPU), state,
                                       first)
        states = {cid: u.state for cid, u in zip(ids, first)}
        ids = worker.sampled(2)
        datas = [worker.client_data(cid) for cid in ids]
        kept = [states.get(cid) for cid in ids]
        broadcast = algorithm.broadcast(state)
        alone = worker.train(broadcast, 2, ids, datas, kept, 1)
        grouped = worker.train(broadcast, 2, ids, datas, kept, len(ids))
        gap = max_gap(alone, grouped)
        rows.append({"workload": label, "clients_per_round": per_round, "method": method,
                     "max_weight_gap": gap,
                     "max_loss_gap": max(abs(a.metrics["train_loss"] - g.metrics["train_loss"])
                                         for a, g in zip(alone, grouped))})
        print(f"  {label:16s} {method:9s} max |Δw| {gap:.1e}", flush=True)
    return rows


RUN_OVERRIDES = ["data.dataset=synthetic_fedprox", "data.partition.kind=natural",
                 "data.partition.num_clients=1000000", "data.size_sigma=0", "model.name=logreg",
                 "train.local_epochs=1", "train.batch_size=10", "train.lr=0.01",
                 "train.momentum=0", "clients_per_round=1000", "eval_every=1000",
                 "checkpoint.every=0"]


# samples a whole-run round trains: 1,000 clients of 104 samples, one epoch
RUN_ROUND_SAMPLES = 1000 * 104


def time_runs(rounds: int, repeats: int = 1) -> list[dict]:
    """Per K, `repeats` fresh `raysim launch`es of the 10^6-client logreg workload at 1,000
    clients per round, the K taking turns (so a change of the machine's load moves them alike):
    the median per-round seconds over every launch's rounds after its first, samples/s, the
    workers' peak RSS."""
    seconds: dict[int, list[float]] = {size: [] for size in GROUP_SIZES}
    rss: dict[int, float] = {size: 0.0 for size in GROUP_SIZES}
    workers = 0
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for size in GROUP_SIZES:
                summary = launch_quickstart(
                    [f"rounds={rounds + 1}", *RUN_OVERRIDES, f"train.client_group={size}"],
                    Path(scratch) / f"K{size}-{repeat}")
                seconds[size] += summary["round_seconds"][1:]
                rss[size] = max(rss[size], *summary["peak_rss_mb"]["workers"])
                workers = summary["num_workers"]
                print(f"  run {repeat + 1}/{repeats}: logreg 1,000/round K={size:4d}  "
                      f"{statistics.median(summary['round_seconds'][1:]):7.3f} s/round",
                      flush=True)
    one_by_one = statistics.median(seconds[GROUP_SIZES[0]])
    rows = []
    for size in GROUP_SIZES:
        median = statistics.median(seconds[size])
        rows.append({"K": size, "clients_per_round": 1000, "registered": 1_000_000,
                     "workers": workers, "launches": repeats, "round_seconds": median,
                     "round_seconds_mean": statistics.mean(seconds[size]),
                     "round_seconds_all": seconds[size],
                     "samples_per_second": RUN_ROUND_SAMPLES / median,
                     "worker_peak_rss_mb": rss[size], "speedup": one_by_one / median})
        print(f"  run: logreg 1,000/round K={size:4d}  {median:7.3f} s/round  "
              f"x{rows[-1]['speedup']:.1f}", flush=True)
    return rows


def time_flower(rounds: int) -> dict:
    """The same work (1,000 clients per round, logreg, one epoch of batch 10) on Flower's
    simulation engine, two clients at a time, in its own venv (benchmarks/scale.py's `flower`),
    of 10^4 registered clients (Flower makes a node for every registered client: 10^6 does
    not start); its median seconds per round after the first."""
    from scale import flower  # a sibling script, as `launching`

    row = flower([10_000], rounds + 1, 1000)[0]
    print(f"  run: Flower 1,000/round      {row['round_seconds_median']:7.3f} s/round",
          flush=True)
    return row


def run_table(rows: list[dict], flower_row: dict | None = None) -> str:
    lines = ["| K | s/round (median) | s/round (mean) | samples/s | speed-up | "
             "worker peak RSS MB | Flower s ÷ raysim s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = f"{flower_row['round_seconds_median'] / r['round_seconds']:.1f}" \
            if flower_row else "–"
        mean = r.get("round_seconds_mean")
        lines.append(f"| {r['K']} | {r['round_seconds']:.3f} | "
                     f"{'–' if mean is None else f'{mean:.3f}'} | "
                     f"{r['samples_per_second']:,.0f} | {r['speedup']:.1f}× | "
                     f"{r['worker_peak_rss_mb']:.0f} | {versus} |")
    if flower_row:
        seconds = flower_row["round_seconds_median"]
        lines.append(f"| Flower | {seconds:.3f} | – | {RUN_ROUND_SAMPLES / seconds:,.0f} | – | "
                     "– | 1.0 |")
    return "\n".join(lines)


def cnn_ceiling(group: int = 10, repeats: int = 40, trials: int = 5) -> dict:
    """How far grouping can speed up the quickstart CNN's step on this CPU (one thread): the
    FLOP rate of one client's step (forward, backward, SGD with momentum, batch 16), of a
    vmapped step of `group` clients on equal batches, and of a large single-precision matrix
    product, the most this core does; a step's FLOPs counted by torch's FlopCounterMode. Each
    rate is the best of `trials` timings of `repeats` calls (the machine's best, not its load)."""
    from torch.utils.flop_counter import FlopCounterMode

    from raysim.nn.models import SmallCNN

    def rate(step, flops: float) -> float:
        step()
        best = math.inf
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            best = min(best, (time.perf_counter() - start) / repeats)
        return flops / best / 1e9

    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10)
    x, y = torch.randn(group, 16, 1, 8, 8), torch.randint(0, 10, (group, 16))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x[0]).logits, y[0]).backward()
    flops = counter.get_total_flops()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def one_step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[0]).logits, y[0]).backward()
        optimizer.step()

    stacked = {n: p.detach().expand(group, *p.shape).clone() for n, p in
               model.named_parameters()}

    def loss(params, xs, ys):
        logits = torch.func.functional_call(model, params, (xs,)).logits
        return torch.nn.functional.cross_entropy(logits, ys)

    vmapped = torch.func.vmap(torch.func.grad(loss))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = rate(lambda: a @ b, 2 * 1024**3)
    one = rate(one_step, flops)
    grouped = rate(lambda: vmapped(stacked, x, y), flops * group)
    return {"step_mflop": flops / 1e6, "one_by_one_gflops": one, "grouped_gflops": grouped,
            "matmul_gflops": matmul, "group": group,
            "ceiling": matmul / one}  # no grouping beats one by one by more than this


def table(rows: list[dict]) -> str:
    lines = ["| workload | clients/round | K | s/round | samples/s | speed-up | max abs Δw | "
             "group MB (est.) | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['clients_per_round']} | {r['K']} | "
                     f"{r['round_seconds']:.3f} | {r['samples_per_second']:,.0f} | "
                     f"{r['speedup']:.1f}× | {r['max_weight_gap']:.1e} | "
                     f"{r['group_mb_estimate']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key in dict.fromkeys((r["workload"], r["clients_per_round"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["clients_per_round"]) == key]
        ax.plot([r["K"] for r in mine], [r["samples_per_second"] for r in mine], marker="o",
                label=f"{key[0]}, {key[1]}/round")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients per group K (1: one by one)")
    ax.set_ylabel("training samples / s (one thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per setting")
    parser.add_argument("--quick", action="store_true", help="100 clients per round at most")
    parser.add_argument("--runs", action="store_true",
                        help="also whole runs (raysim launch) of logreg at 1,000 per round")
    parser.add_argument("--only-runs", action="store_true",
                        help="only the whole runs; merged into the existing JSON")
    parser.add_argument("--run-rounds", type=int, default=None,
                        help="timed rounds per whole-run launch (default: --rounds)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="launches per K for the whole runs, the K taking turns")
    parser.add_argument("--flower", action="store_true",
                        help="with the runs, the same work on Flower (its own venv)")
    args = parser.parse_args()
    if args.flower and not (args.runs or args.only_runs):
        parser.error("--flower runs with the whole runs: add --runs or --only-runs")
    run_rounds = args.run_rounds or args.rounds
    if args.only_runs:
        path = RESULTS / "client_groups.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result["runs"] = time_runs(run_rounds, args.repeats)
        if args.flower:  # else a Flower row measured before stays
            result["runs_flower"] = time_flower(args.rounds)
        result["runs_load_average"] = os.getloadavg()
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(run_table(result["runs"], result.get("runs_flower")))
        return
    torch.set_num_threads(1)
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # imports torch._dynamo
    timing = []
    for label, overrides, per_round in WORKLOADS:
        if args.quick and per_round > 100:
            continue
        timing += time_workload(label, overrides, per_round, args.rounds)
    ceiling = cnn_ceiling()
    print(f"  quickstart cnn step: one by one {ceiling['one_by_one_gflops']:.1f} GFLOP/s, "
          f"vmapped K={ceiling['group']} {ceiling['grouped_gflops']:.1f}, a 1024² matmul "
          f"{ceiling['matmul_gflops']:.1f}: at most {ceiling['ceiling']:.2f}× from grouping",
          flush=True)
    agreed = [row for label, overrides, per_round in AGREEMENT
              for row in agreement(label, overrides, per_round)]
    load = os.getloadavg()
    result = {
        "benchmark": "client_groups", "timing": timing, "agreement": agreed,
        "cnn_ceiling": ceiling,
        "runs": time_runs(run_rounds, args.repeats) if args.runs else [],
        "runs_flower": time_flower(args.rounds) if args.runs and args.flower else None,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average": load},
        "notes": [
            "Worker-level microbenchmark of the training step, one torch thread, no Ray.",
            f"The machine was shared with other work while this ran (1-minute load average "
            f"{load[0]:.1f} on {os.cpu_count()} CPUs): timings are noisy; compare ratios "
            "within one run.",
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "client_groups.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(timing, FIGURES / "client_groups.png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(table(timing))


if __name__ == "__main__":
    main()
