"""The quickstart's work (benchmarks/quickstart_work.py) on Flower's simulation engine, run by
benchmarks/startup.py in Flower's own venv: two clients at a time (one CPU each), FedAvg
weighted by samples, the test accuracy on the server after every round.

    python benchmarks/flower_quickstart.py

Prints one JSON line: seconds from this process's start to the first round's end and to the
last round's end, and the final test accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quickstart_work as work  # noqa: E402
import torch  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

X, Y, X_TEST, Y_TEST = work.digits()
CLIENTS = work.dirichlet_clients(Y)
ROUND_ENDS: list[float] = []
ACCURACY: list[float] = []


def load(net: torch.nn.Module, parameters) -> torch.nn.Module:
    with torch.no_grad():
        for p, value in zip(net.parameters(), parameters):
            p.copy_(torch.from_numpy(value))
    return net


class DigitsClient(NumPyClient):
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def fit(self, parameters, config):
        net = load(work.model(), parameters)
        part = CLIENTS[self.client_id]
        work.train(net, X[part], Y[part], seed=self.client_id)
        return [p.detach().numpy() for p in net.parameters()], len(part), {}


def client_fn(context: Context):
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


def evaluate(server_round, parameters, config):
    if server_round > 0:
        ACCURACY.append(work.accuracy(load(work.model(), parameters), X_TEST, Y_TEST))
        ROUND_ENDS.append(time.perf_counter())
    return None


def server_fn(context: Context) -> ServerAppComponents:
    torch.manual_seed(0)
    initial = [p.detach().numpy() for p in work.model().parameters()]
    strategy = FedAvg(
        fraction_fit=work.PER_ROUND / work.NUM_CLIENTS, fraction_evaluate=0.0,
        min_fit_clients=work.PER_ROUND, min_available_clients=work.NUM_CLIENTS,
        evaluate_fn=evaluate, initial_parameters=ndarrays_to_parameters(initial))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=work.ROUNDS))


def main() -> None:
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=work.NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print(json.dumps({"first_round_seconds": ROUND_ENDS[0] - STARTED,
                      "loop_seconds": ROUND_ENDS[-1] - ROUND_ENDS[0],
                      "last_round_seconds": ROUND_ENDS[-1] - STARTED,
                      "rounds": len(ROUND_ENDS), "final_accuracy": ACCURACY[-1]}), flush=True)


if __name__ == "__main__":
    main()
