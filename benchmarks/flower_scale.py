"""The synthetic work of benchmarks/scale.py on Flower's simulation engine (run by scale.py in
its own venv): the same Synthetic(1, 1) clients (raysim's generator, which needs only numpy),
the same logistic regression, one epoch of SGD (batch 10, lr 0.01) in PyTorch, FedAvg over
`per_round` clients a round, two clients at a time (one CPU each).

    python benchmarks/flower_scale.py NUM_CLIENTS PER_ROUND ROUNDS

Prints one JSON line: the median seconds per round (after the first) and the time from the
start of this process to the end of the first round.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # raysim's generator

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from raysim.data.synthetic_fedprox import CLASSES, FEATURES, FedProxClients  # noqa: E402

NUM_CLIENTS, PER_ROUND, ROUNDS = (int(a) for a in sys.argv[1:4])
CLIENTS = FedProxClients.build(NUM_CLIENTS, 1.0, 1.0, size_sigma=0.0)
ROUND_ENDS: list[float] = []


class SyntheticClient(NumPyClient):
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        x, y = CLIENTS.client(self.client_id)
        x, y = torch.from_numpy(x).flatten(1), torch.from_numpy(y)
        model = torch.nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            for p, value in zip(model.parameters(), parameters):
                p.copy_(torch.from_numpy(value))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.client_id))
        for start in range(0, len(y), 10):
            batch = order[start:start + 10]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.detach().numpy() for p in model.parameters()], len(y), {}


def client_fn(context: Context):
    return SyntheticClient(int(context.node_config["partition-id"])).to_client()


class TimedFedAvg(FedAvg):
    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        ROUND_ENDS.append(time.perf_counter())
        return out


def server_fn(context: Context) -> ServerAppComponents:
    init = torch.nn.Linear(FEATURES, CLASSES)
    strategy = TimedFedAvg(
        fraction_fit=PER_ROUND / NUM_CLIENTS, fraction_evaluate=0.0, min_fit_clients=PER_ROUND,
        min_available_clients=NUM_CLIENTS,
        initial_parameters=ndarrays_to_parameters([p.detach().numpy()
                                                   for p in init.parameters()]))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


def main() -> None:
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn), num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rounds = np.diff(ROUND_ENDS).tolist()
    print(json.dumps({"clients": NUM_CLIENTS, "per_round": PER_ROUND, "rounds": ROUNDS,
                      "round_seconds_median": statistics.median(rounds),
                      "first_round_seconds": ROUND_ENDS[0] - STARTED,
                      "process_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()
