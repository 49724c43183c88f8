"""A fingerprint of what runs compute, to hold a refactoring to "the same bits as before".

Records, as SHA-256 hashes, every non-timing metric of the quickstart (20 rounds, on the local
backend unless `--ray`) and, for the seven durable-run configurations of the tests (FedAvg, MOON,
FedProto, FedTGP, FedHPro official and paper, FedBCS), their metrics and the tensors of their
final checkpointed server state. Run it on two versions of the code on one machine and compare:

    .venv/bin/python benchmarks/fingerprint.py --out before.json    # on the old checkout
    .venv/bin/python benchmarks/fingerprint.py --out after.json --compare before.json

Digits depend on the CPU's kernels: compare fingerprints made on the same machine only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "run")]

import test_durable  # noqa: E402  (the durable-run configurations are the tests')

from raysim.results.sinks import RunDirectory  # noqa: E402
from raysim.run import execute, prepare  # noqa: E402
from raysim.run.checkpoints import newest_complete  # noqa: E402
from raysim.run.validate import load_config  # noqa: E402
from raysim.state_io import to_tree, unpack  # noqa: E402

TIMING = {"round_seconds", "samples_per_second"}
SERVER_FILE = "server_state.safetensors"


def metrics_hash(run_dir: Path) -> list:
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    rows = sorted((r["round"], r["metric"], r["value"]) for r in rows
                  if r["metric"] not in TIMING)
    return [hashlib.sha256(json.dumps(rows).encode()).hexdigest(), len(rows)]


def state_hash(run_dir: Path) -> list:
    """The final server state's tensors, in the order the state tree holds them."""
    _, tensors = to_tree(unpack(newest_complete(run_dir).read(SERVER_FILE)))
    digest = hashlib.sha256()
    for key in sorted(tensors, key=lambda k: int(k[1:])):
        tensor = tensors[key].contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return [digest.hexdigest(), len(tensors)]


def fingerprint(backend: str) -> dict:
    out: dict = {}
    work = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    config = load_config(ROOT / "yaml" / "quickstart.yaml", [f"resources.backend={backend}",
                                                             "logging.progress=false"])
    execute(prepare(config, work / "quickstart"), [RunDirectory(work / "quickstart")])
    out["quickstart"] = {"metrics": metrics_hash(work / "quickstart")}
    print("quickstart", out["quickstart"], flush=True)
    for method in test_durable.METHODS:
        test_durable.reference_run(test_durable.tiny_raw(method), work / method)
        out[method] = {"metrics": metrics_hash(work / method),
                       "state": state_hash(work / method)}
        print(method, out[method], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="a fingerprint to compare with")
    parser.add_argument("--ray", action="store_true", help="the quickstart on Ray")
    args = parser.parse_args()
    found = fingerprint("ray" if args.ray else "local")
    args.out.write_text(json.dumps(found, indent=1))
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    differ = [name for name in found if found[name] != before.get(name)]
    print(f"{len(found) - len(differ)} of {len(found)} identical"
          + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
