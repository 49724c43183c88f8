"""Round-loop throughput: raysim against a plain single-process PyTorch FedAvg loop.

Both run the same workload (default: yaml/quickstart.yaml): the same partition, the same
sampled clients each round, the same local SGD steps and an evaluation every round. The plain
loop runs with 1 and with 2 torch threads; "ideal 2-way" is half the 1-thread time: perfect
parallelism over 2 cores of the same per-client work, no overhead. It bounds a loop that trains
its clients one by one, as the plain loop does; it is not a bound for client groups
(`train.client_group` = K, measured too with `--group K`), which change the work itself (one
vmapped step for K clients instead of K steps). All timings come from this one run, with the
loops interleaved in each repeat, so compare ratios.

    .venv/bin/python benchmarks/throughput.py [--config yaml/quickstart.yaml] [--repeats 1]
        [--group K]

Writes benchmarks/results/throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raysim.nn.training import ClientData, Preprocess
from raysim.run import prepare
from raysim.run.validate import load_config
from raysim.seeding import sample_clients
from raysim.task import initial_model

RESULTS = Path(__file__).parent / "results"


def plain_pytorch(config, task, threads: int) -> dict:
    """FedAvg in one process: no Ray, no actors, no serialisation."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    data, spec = task.dataset, task.dataset.spec
    preprocess = Preprocess(spec, device)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    test_x, test_y = preprocess(torch.from_numpy(data.test.x)), torch.from_numpy(data.test.y)
    model = initial_model(config, task.info)
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    train = config.train
    start = time.perf_counter()
    for r in range(1, config.rounds + 1):
        sums, total = None, 0
        for cid in sample_clients(config.seed, r, task.partition.num_clients,
                                  config.clients_per_round):
            model.load_state_dict(global_weights)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                  weight_decay=train.weight_decay)
            indices = torch.from_numpy(task.partition.client_indices[cid])
            client = ClientData(x, y, indices, preprocess)
            generator = torch.Generator().manual_seed(cid * 1000 + r)
            for _ in range(train.local_epochs):
                for bx, by in client.batches(train.batch_size, generator):
                    loss = F.cross_entropy(model(bx).logits, by)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            n = len(indices)
            total += n
            state = model.state_dict()
            if sums is None:
                sums = {k: v.double() * n for k, v in state.items()}
            else:
                for k, v in state.items():
                    sums[k] += v.double() * n
        global_weights = {k: (v / total).to(global_weights[k].dtype) for k, v in sums.items()}
        model.load_state_dict(global_weights)
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x).logits.argmax(1) == test_y).float().mean().item()
    return {"seconds": time.perf_counter() - start, "final_accuracy": accuracy}


def raysim_rounds(config, run) -> dict:
    from raysim.engine.cluster import connect as init_ray
    from raysim.engine.cluster import fit_resources
    from raysim.engine.simulation import Simulation

    init_ray()
    import ray

    config, _ = fit_resources(config, ray.cluster_resources())
    simulation = Simulation(config, run.task)
    t0 = time.perf_counter()
    simulation.start()
    ready = time.perf_counter() - t0
    start = time.perf_counter()
    results = list(simulation.rounds())
    seconds = time.perf_counter() - start
    simulation.shutdown()
    return {
        "seconds": seconds,
        "pool_start_seconds": ready,
        "final_accuracy": results[-1].metrics["test_accuracy"],
        "num_workers": config.resources.num_workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="yaml/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many runs")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--group", type=int, default=0,
                        help="also raysim with train.client_group=K (0: not measured)")
    args = parser.parse_args()

    config = load_config(args.config, args.override)
    run = prepare(config, RESULTS / "scratch")
    measured: dict[str, list[dict]] = {"plain_1_thread": [], "plain_2_threads": [], "raysim": []}
    if args.group:
        grouped = load_config(args.config, [*args.override, f"train.client_group={args.group}"])
        measured["raysim_grouped"] = []  # the same task: K changes no data
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits them alike
        measured["plain_1_thread"].append(plain_pytorch(config, run.task, threads=1))
        measured["plain_2_threads"].append(plain_pytorch(config, run.task, threads=2))
        measured["raysim"].append(raysim_rounds(config, run))
        if args.group:
            measured["raysim_grouped"].append(raysim_rounds(grouped, run))

    seconds = {k: statistics.median(m["seconds"] for m in v) for k, v in measured.items()}
    ideal = seconds["plain_1_thread"] / 2
    report = {
        "config": args.config,
        "overrides": args.override,
        "rounds": config.rounds,
        "clients_per_round": config.clients_per_round,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "seconds": seconds,
        "ideal_2way_seconds": ideal,
        "ideal_2way_means": "half the 1-thread one-by-one loop: a bound for one-by-one "
                            "training only, not for client groups",
        "client_group": args.group,
        "ratios": {
            "raysim_vs_ideal_2way": seconds["raysim"] / ideal,
            "raysim_vs_plain_1_thread": seconds["raysim"] / seconds["plain_1_thread"],
            "raysim_vs_plain_2_threads": seconds["raysim"] / seconds["plain_2_threads"],
        },
        "runs": measured,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(report, indent=2))

    print(f"\n{config.rounds} rounds × {config.clients_per_round} clients "
          f"({args.config}), median of {args.repeats}:")
    print(f"{'loop':<28}{'seconds':>9}{'s/round':>9}{'× ideal':>9}{'final acc':>11}")
    rows = [("plain PyTorch, 1 thread", "plain_1_thread"),
            ("plain PyTorch, 2 threads", "plain_2_threads"),
            (f"raysim, {measured['raysim'][0]['num_workers']} workers", "raysim")]
    if args.group:
        rows.append((f"raysim, groups of {args.group}", "raysim_grouped"))
    print(f"{'ideal 2-way (1 thread / 2)':<28}{ideal:>9.2f}{ideal / config.rounds:>9.3f}"
          f"{1.0:>9.2f}{'':>11}")
    for label, key in rows:
        acc = statistics.median(m["final_accuracy"] for m in measured[key])
        print(f"{label:<28}{seconds[key]:>9.2f}{seconds[key] / config.rounds:>9.3f}"
              f"{seconds[key] / ideal:>9.2f}{acc:>11.4f}")
    pool = measured["raysim"][0]["pool_start_seconds"]
    print(f"\nraysim pool start (workers ready): {pool:.1f} s; "
          f"results in {RESULTS / 'throughput.json'}")


if __name__ == "__main__":
    main()
