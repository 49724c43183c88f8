"""Memory of stateful clients: MOON's previous model kept per client (the small CNN, 0.6 MB
each), in the memory store against the disk store.

1. The store at 10,000 registered clients, in a fresh process per store (the server actor's
   role): every client's state put once, 100 per round as a run would; peak RSS, seconds to
   put and to get a round's 100 states, and the checkpoint snapshot's size and seconds.
2. A real MOON run on digits (600 clients, 100 per round, 1 local epoch, 12 rounds, so most
   clients come back with state): peak RSS of the driver, the server actor and each worker.
   (The bundled data cannot be split among 10,000 clients; part 1 is the store at that size.)

    .venv/bin/python benchmarks/client_state_memory.py [--clients 10000]

Writes benchmarks/results/client_state_memory.json and prints two tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rss_mib(pid: int | str = "self") -> dict[str, float]:
    """Current and peak resident memory of a process, MiB (from /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def store_child(kind: str, clients: int, folder: str) -> None:
    """Runs in its own process: fill one store with `clients` MOON states."""
    import torch

    from raysim.engine.client_store import make_store
    from raysim.nn.models import build_model

    weights = build_model("cnn", (1, 8, 8), 10).state_dict()
    store = make_store(kind, folder)
    before = rss_mib()["rss"]
    put_seconds, get_seconds = [], []
    for start in range(0, clients, 100):
        ids = list(range(start, min(start + 100, clients)))
        states = {cid: {"previous": {k: v + cid for k, v in weights.items()}} for cid in ids}
        t = time.perf_counter()
        store.put(start // 100 + 1, states)
        put_seconds.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = store.get(ids)
        get_seconds.append(time.perf_counter() - t)
        assert torch.equal(got[-1]["previous"]["classifier.bias"],
                           states[ids[-1]]["previous"]["classifier.bias"])
        del states, got
    after = rss_mib()
    t = time.perf_counter()
    files = store.snapshot(clients // 100)
    snapshot_seconds = time.perf_counter() - t
    print(json.dumps({
        "store": kind, "clients": len(store), "rss_before_mib": before,
        "rss_after_mib": after["rss"], "peak_mib": rss_mib()["peak"],
        "put_100_seconds": sorted(put_seconds)[len(put_seconds) // 2],
        "get_100_seconds": sorted(get_seconds)[len(get_seconds) // 2],
        "snapshot_seconds": snapshot_seconds,
        "snapshot_mib": sum(len(b) for b in files.values()) / 2**20,
        "disk_mib": sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors")) / 2**20,
    }))


def store_at_scale(clients: int) -> list[dict]:
    out = []
    for kind in ("memory", "disk"):
        folder = RESULTS / "scratch" / f"store-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--clients",
                               str(clients), "--folder", str(folder)],
                              capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(folder, ignore_errors=True)
    return out


def real_run(kind: str) -> dict:
    import ray

    from raysim.engine.cluster import connect as init_ray
    from raysim.engine.cluster import fit_resources
    from raysim.engine.simulation import Simulation
    from raysim.run import prepare
    from raysim.run.validate import load_config

    config = load_config("yaml/quickstart.yaml", [
        "name=moon_memory", "algorithm.name=moon", "data.partition.kind=iid",
        "data.partition.num_clients=600", "clients_per_round=100", "train.local_epochs=1",
        "rounds=12", f"client_state.store={kind}", "logging.progress=false"])
    run_dir = RESULTS / "scratch" / f"moon-{kind}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = prepare(config, run_dir)
    init_ray()
    config, _ = fit_resources(config, ray.cluster_resources())
    simulation = Simulation(config, run.task, run_dir=str(run_dir))
    simulation.start()
    start = time.perf_counter()
    results = list(simulation.rounds())
    seconds = time.perf_counter() - start
    described = simulation.describe()
    server = described[-1]
    peaks = {"driver": rss_mib()["peak"], "server": rss_mib(server["pid"])["peak"],
             "workers": [rss_mib(w["pid"])["peak"] for w in described[:-1]]}
    simulation.shutdown()
    return {"store": kind, "clients_with_state": server["clients_with_state"],
            "loop_seconds": seconds, "peak_mib": peaks,
            "final_test_accuracy": results[-1].metrics["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--child")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        store_child(args.child, args.clients, args.folder)
        return
    scale = store_at_scale(args.clients)
    runs = [real_run(kind) for kind in ("memory", "disk")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "client_state_memory.json").write_text(
        json.dumps({"store_at_scale": scale, "runs": runs}, indent=2))

    print(f"\n1. the store with {args.clients:,} MOON clients (small CNN), in its own process")
    print(f"{'store':<8}{'RSS MiB':>10}{'peak MiB':>10}{'put 100 s':>11}{'get 100 s':>11}"
          f"{'snapshot s':>12}{'snapshot MiB':>14}{'disk MiB':>10}")
    for s in scale:
        print(f"{s['store']:<8}{s['rss_after_mib']:>10.0f}{s['peak_mib']:>10.0f}"
              f"{s['put_100_seconds']:>11.3f}{s['get_100_seconds']:>11.3f}"
              f"{s['snapshot_seconds']:>12.3f}{s['snapshot_mib']:>14.1f}{s['disk_mib']:>10.0f}")
    print("\n2. MOON on digits, 600 clients, 100 per round, 12 rounds: peak RSS (MiB)")
    print(f"{'store':<8}{'with state':>11}{'driver':>9}{'server':>9}{'workers':>16}"
          f"{'loop s':>9}{'acc':>8}")
    for r in runs:
        workers = "/".join(f"{w:.0f}" for w in r["peak_mib"]["workers"])
        print(f"{r['store']:<8}{r['clients_with_state']:>11}{r['peak_mib']['driver']:>9.0f}"
              f"{r['peak_mib']['server']:>9.0f}{workers:>16}{r['loop_seconds']:>9.1f}"
              f"{r['final_test_accuracy']:>8.4f}")
    print(f"\nresults in {RESULTS / 'client_state_memory.json'}")


if __name__ == "__main__":
    main()
