"""The quickstart's work (yaml/quickstart.yaml) in plain numpy and PyTorch, for other simulators
timed beside raysim by benchmarks/startup.py (their own venvs import this file, never raysim):
scikit-learn's bundled digits (1,797 8×8 images; a stratified 25 % test split), 50 clients
with Dirichlet(α = 0.5) label skew, 10 per round, 20 rounds of 5 local epochs (batch 16, SGD
lr 0.05, momentum 0.9) on raysim's small CNN, FedAvg weighted by samples, test accuracy
after every round. The split and the draws are seeded but not raysim's: the work is the same,
the digits of the accuracy are not.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

NUM_CLIENTS, PER_ROUND, ROUNDS = 50, 10, 20
EPOCHS, BATCH, LR, MOMENTUM, ALPHA = 5, 16, 0.05, 0.9, 0.5


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (N, 1, 8, 8) standardised by the train split's statistics."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0, table[:, -1].astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[
        : round(np.sum(y == c) * 0.25)] for c in range(10)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def dirichlet_clients(labels: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Each class's samples spread over the clients by Dirichlet(α) shares; every client
    gets at least one sample."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(NUM_CLIENTS)]
        for c in range(10):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([ALPHA] * NUM_CLIENTS))[:-1]
                    * len(members)).astype(int)
            for client, share in enumerate(np.split(members, cuts)):
                parts[client].extend(share.tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.array(p)) for p in parts]


def model() -> nn.Module:
    """raysim's SmallCNN on 8×8 inputs (no pooling before the second convolution)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10))


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """The local epochs of one client, in place."""
    torch.set_num_threads(1)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(ys), generator=generator)
        for start in range(0, len(ys), BATCH):
            batch = order[start:start + BATCH]
            loss = nn.functional.cross_entropy(net(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        predicted = net(torch.from_numpy(x)).argmax(1).numpy()
    return float((predicted == y).mean())
