"""The contract between an FL method and the engine. Nothing here knows about Ray.

An algorithm (see `algorithms/fedavg.py`) is a class with a frozen `Config` dataclass of its
hyperparameters and four steps: `init_server`, `broadcast`, `client_update`, `server_round`, plus
`evaluate_batch` for the test metrics. The engine moves these immutable messages between the
server actor and the client workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from raysim.config import TrainConfig

Weights = dict[str, Tensor]


@dataclass(frozen=True)
class TaskInfo:
    """What an algorithm may know about the task it runs on."""

    num_classes: int
    in_channels: int
    feature_dim: int


@dataclass(frozen=True)
class ClientContext:
    """Everything a client step needs besides the model, the data and the broadcast."""

    client_id: int
    round: int
    generator: torch.Generator  # seeded from (seed, round, client id): use it for every draw
    device: torch.device
    train: TrainConfig


@dataclass(frozen=True)
class Broadcast:
    """What every sampled client receives in a round."""

    weights: Weights


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back. `state` is kept by the engine for this client's next round."""

    weights: Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    state: Any = None


@dataclass(frozen=True)
class ServerState:
    weights: Weights
