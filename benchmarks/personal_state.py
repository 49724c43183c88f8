"""Memory of personal models: 10,000 clients, each keeping its own small CNN (`cnn` on 8×8
digits, 151,306 parameters, 0.6 MB) as FedProto-style client state `{"personal": weights}`,
in the memory store against the disk store (raysim.engine.client_store).

Each store runs in a fresh process (the server actor's role) and gets every client's state
once, 1,000 clients per put as rounds of a run would; then the same 1,000-client chunks are
read back (and checked). Reported: RSS growth of the process (MiB), peak RSS, bytes on disk
(the disk store's safetensors files, packed by raysim.state_io), and the median seconds to put
and to get 1,000 clients' states. The disk store's RSS growth is one chunk of states, the
benchmark's own (built before each put; the allocator keeps the freed pages), so it follows the
chunk, not the number of clients (100-client chunks: a tenth of it). A memory store's
checkpoint packs every state into one file as well: its seconds and bytes for 1,000 clients are
measured too (a checkpoint of all 10,000 costs ten times that, in memory while it is written).

    .venv/bin/python benchmarks/personal_state.py [--clients 10000] [--chunk 1000]

Writes benchmarks/results/personal_state.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rss_mib() -> dict[str, float]:
    """Current and peak resident memory of this process, MiB (from /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def personal_states(weights: dict, ids: range) -> dict[int, dict]:
    """FedProto-style states: each client its own copy of the whole model, made distinct."""
    return {cid: {"personal": {k: v + cid for k, v in weights.items()}} for cid in ids}


def store_child(kind: str, clients: int, chunk: int, folder: str) -> None:
    """Runs in its own process: fill one store with `clients` personal models."""
    import torch

    from raysim.engine.client_store import make_store
    from raysim.nn.models import build_model
    from raysim.state_io import pack

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = build_model("cnn", (1, 8, 8), 10).state_dict()
    store = make_store(kind, folder)
    before = rss_mib()["rss"]
    put_seconds, get_seconds = [], []
    chunks = [range(start, min(start + chunk, clients)) for start in range(0, clients, chunk)]
    for round_index, ids in enumerate(chunks, start=1):
        states = personal_states(weights, ids)
        t = time.perf_counter()
        store.put(round_index, states)
        put_seconds.append(time.perf_counter() - t)
        del states
    after_put = rss_mib()["rss"]
    last = chunks[-1][-1]
    for ids in chunks:
        t = time.perf_counter()
        got = store.get(list(ids))
        get_seconds.append(time.perf_counter() - t)
        assert torch.equal(got[-1]["personal"]["classifier.bias"],
                           weights["classifier.bias"] + ids[-1])
        del got
    state_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    out = {
        "store": kind, "clients": len(store), "chunk": chunk,
        "state_mib_per_client": state_bytes / 2**20,
        "rss_before_mib": before, "rss_after_put_mib": after_put,
        "rss_growth_mib": after_put - before, "peak_mib": rss_mib()["peak"],
        "put_seconds_per_chunk": statistics.median(put_seconds),
        "get_seconds_per_chunk": statistics.median(get_seconds),
        "disk_bytes": sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors")),
        "last_client_checked": last,
    }
    if kind == "memory":  # what a checkpoint of the store costs per chunk of clients
        sample = {cid: state for cid, state in zip(chunks[0], store.get(list(chunks[0])))}
        t = time.perf_counter()
        blob = pack(dict(sorted(sample.items())))
        out["checkpoint_seconds_per_chunk"] = time.perf_counter() - t
        out["checkpoint_bytes_per_chunk"] = len(blob)
    print(json.dumps(out))


def run_store(kind: str, clients: int, chunk: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"personal-state-{kind}-"))
    try:
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--clients",
                               str(clients), "--chunk", str(chunk), "--folder", str(folder)],
                              capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=1_000)
    parser.add_argument("--child")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        store_child(args.child, args.clients, args.chunk, args.folder)
        return
    stores = [run_store(kind, args.clients, args.chunk) for kind in ("memory", "disk")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "personal_state.json").write_text(json.dumps({
        "model": "cnn", "input_shape": [1, 8, 8], "clients": args.clients,
        "chunk": args.chunk, "stores": stores}, indent=2))

    print(f"\n{args.clients:,} clients, each keeping a personal small CNN "
          f"({stores[0]['state_mib_per_client']:.2f} MiB), in its own process; "
          f"seconds per {args.chunk:,} clients")
    print(f"{'store':<8}{'RSS growth MiB':>16}{'peak MiB':>10}{'disk MiB':>10}"
          f"{'put s':>8}{'get s':>8}")
    for s in stores:
        print(f"{s['store']:<8}{s['rss_growth_mib']:>16.0f}{s['peak_mib']:>10.0f}"
              f"{s['disk_bytes'] / 2**20:>10.0f}{s['put_seconds_per_chunk']:>8.2f}"
              f"{s['get_seconds_per_chunk']:>8.2f}")
    memory = stores[0]
    print(f"a memory-store checkpoint packs {memory['checkpoint_bytes_per_chunk'] / 2**20:.0f} "
          f"MiB per {args.chunk:,} clients in {memory['checkpoint_seconds_per_chunk']:.2f} s")
    print(f"\nresults in {RESULTS / 'personal_state.json'}")


if __name__ == "__main__":
    main()
