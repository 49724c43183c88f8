"""A raysim plug-in in one file: a method, a dataset, a partitioner and a sink."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from algorithms.fedavg import FedAvg
from raysim.algorithm import ServerContext, ServerState, Weights, extend
from raysim.config import require
from raysim.data import ArraySplit, Dataset, DatasetSpec
from raysim.results.sinks import Sink

# ---------------------------------------------------------------- a method


@dataclass(frozen=True)
class MomentumState(ServerState):
    velocity: Weights = field(default_factory=dict)


class FedAvgM(FedAvg):
    """FedAvgM — Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019: momentum on the server's averaged update,
        v ← β v + (w_t − w̄),    w_{t+1} = w_t − v."""

    @dataclass(frozen=True)
    class Config:
        beta: float = 0.9  # server momentum β

        def __post_init__(self) -> None:
            require(0 <= self.beta < 1, "beta", f"must be in [0, 1) (got {self.beta})")

    def init_server(self, model: torch.nn.Module) -> MomentumState:
        return extend(super().init_server(model), MomentumState)

    def server_update(self, ctx: ServerContext, state: MomentumState, weights: Weights,
                      updates: list) -> MomentumState:
        velocity, moved = {}, {}
        for name, mean in weights.items():
            if not mean.is_floating_point():  # counters (BatchNorm) are taken as averaged
                moved[name] = mean
                continue
            velocity[name] = self.config.beta * state.velocity.get(name, 0) \
                + (state.weights[name] - mean)
            moved[name] = state.weights[name] - velocity[name]
        return MomentumState(weights=moved, velocity=velocity)


# ---------------------------------------------------------------- a dataset


@dataclass(frozen=True)
class BlobsConfig:
    """The dataset's own keys, written beside its name: data: {dataset: blobs, train: 600}."""

    train: int = 600  # training samples
    test: int = 200  # test samples
    spread: float = 1.0  # std of each blob around its centre

    def __post_init__(self) -> None:
        require(self.train >= 1 and self.test >= 1, "train", "train and test must be >= 1")
        require(self.spread > 0, "spread", f"must be > 0 (got {self.spread})")


class Blobs:
    """Ten Gaussian blobs in 64 dimensions, shown as 1×8×8 images; generated, so no root."""

    task = "classification"
    Config = BlobsConfig

    def check(self, request) -> None:  # nothing on disk to look for
        pass

    def load(self, request) -> Dataset:
        own = request.params  # a BlobsConfig
        rng = np.random.default_rng(0)
        centers = rng.normal(0, 1, (10, 64))

        def split(n: int) -> ArraySplit:
            y = rng.integers(0, 10, n)
            x = centers[y] + rng.normal(0, own.spread, (n, 64))
            return ArraySplit(x.reshape(n, 1, 8, 8).astype(np.float32), y.astype(np.int64))

        spec = DatasetSpec("blobs", 10, (1, 8, 8), (0.0,), (1.5,), 1.0, None)
        return Dataset(spec=spec, train=split(own.train), test=split(own.test))


blobs = Blobs()

# ---------------------------------------------------------------- a partitioner


def label_sorted(request) -> list[np.ndarray]:
    """Samples sorted by label and cut into equal consecutive pieces: each client sees one or
    two classes (a deterministic label skew)."""
    order = np.argsort(request.labels, kind="stable")
    return [np.sort(part) for part in np.array_split(order, request.num_clients)]


# ---------------------------------------------------------------- a sink


class JsonLines(Sink):
    """Every round's metrics as one JSON line in `<run dir>/rounds.jsonl`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "rounds.jsonl"

    def start(self, run) -> None:
        self.path.write_text("")

    def log_round(self, result) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"round": result.round, **result.metrics}) + "\n")

    def finish(self, summary) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"summary": summary.final}) + "\n")
