"""The quickstart's work (benchmarks/quickstart_work.py) on pfl-research, run by
benchmarks/startup.py in pfl's own venv as two processes (`torchrun --nproc_per_node 2`: pfl
shards each cohort's users over them): FedAverage with a central SGD step of 1 (pfl averages
the users' model differences), the local SGD of the quickstart, the test accuracy after every
round.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/pfl_quickstart.py

The first process prints one JSON line: seconds from its start to the first round's end and
to the last round's end, and the final test accuracy.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import quickstart_work as work  # noqa: E402
import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402


class Net(torch.nn.Module):
    """The quickstart's CNN with the loss and metrics pfl asks of a model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = work.model()

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):
        self.eval() if eval else self.train()
        # pfl hands the labels over as floats
        return torch.nn.functional.cross_entropy(self(torch.as_tensor(x)),
                                                 torch.as_tensor(y).long())

    def metrics(self, x, y):
        x, y = torch.as_tensor(x), torch.as_tensor(y).long()
        with torch.no_grad():
            correct = (self(x).argmax(1) == y).float().sum()
        return {"accuracy": Weighted(correct, len(y))}


class RoundTimes(TrainingProcessCallback):
    """The end of every round, after the test accuracy of the new global model."""

    def __init__(self, x_test: np.ndarray, y_test: np.ndarray) -> None:
        self.x_test, self.y_test = x_test, y_test
        self.ends: list[float] = []
        self.accuracy: list[float] = []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.accuracy.append(work.accuracy(model._model.net, self.x_test, self.y_test))
        self.ends.append(time.perf_counter())
        return False, Metrics()


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # every process samples the same cohorts
    x, y, x_test, y_test = work.digits()
    clients = work.dirichlet_clients(y)
    users = list(range(work.NUM_CLIENTS))
    data = FederatedDataset(lambda u: Dataset(raw_data=[x[clients[u]], y[clients[u]]]),
                            get_user_sampler("random", users))
    net = Net()
    model = PyTorchModel(model=net, local_optimizer_create=functools.partial(
        torch.optim.SGD, momentum=work.MOMENTUM),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    times = RoundTimes(x_test, y_test)
    FederatedAveraging().run(
        backend=SimulatedBackend(training_data=data, val_data=data),
        model=model,
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=work.ROUNDS, evaluation_frequency=work.ROUNDS + 1,
            train_cohort_size=work.PER_ROUND, val_cohort_size=0),
        model_train_params=NNTrainHyperParams(
            local_num_epochs=work.EPOCHS, local_learning_rate=work.LR,
            local_batch_size=work.BATCH),
        model_eval_params=NNEvalHyperParams(local_batch_size=512),
        callbacks=[times])
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"first_round_seconds": times.ends[0] - STARTED,
                          "loop_seconds": times.ends[-1] - times.ends[0],
                          "last_round_seconds": times.ends[-1] - STARTED,
                          "rounds": len(times.ends), "final_accuracy": times.accuracy[-1]}),
              flush=True)


if __name__ == "__main__":
    main()
