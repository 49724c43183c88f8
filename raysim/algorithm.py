"""The contract between an FL method and the engine. Nothing here knows about Ray.

An algorithm (see `algorithms/fedavg.py`) is a class with a frozen `Config` dataclass of its
hyperparameters and four steps: `init_server`, `broadcast`, `client_update`, `server_round`, plus
`evaluate_batch` for the test metrics. It is constructed as `Algorithm(config, task, device)` in
every process that hosts it (the server actor and each client worker). The engine moves the
immutable messages below between them.
"""

from __future__ import annotations

import dataclasses
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
    input_shape: tuple[int, int, int]  # (C, H, W)
    feature_dim: int | None  # None: the model has no feature head
    train: TrainConfig  # the clients' local training settings (some servers reuse them)
    seed: int = 0  # the run seed: derive generators from it (raysim.seeding.derive_seed)
    kind: str = "classification"  # or "segmentation": labels are (H, W) masks


@dataclass(frozen=True)
class ClientContext:
    """Everything a client step needs besides the model, the data and the broadcast."""

    client_id: int
    round: int
    generator: torch.Generator  # seeded from (seed, round, client id): use it for every draw
    device: torch.device
    train: TrainConfig


@dataclass(frozen=True)
class ServerContext:
    """What a server step needs besides the state and the updates."""

    round: int
    generator: torch.Generator  # seeded from (seed, round): server-side shuffles, inits
    device: torch.device  # the server actor's device (it may hold a GPU fraction)


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
    metrics: dict[str, float] = field(default_factory=dict)  # logged as server_<name>


def extend(message: Any, cls: type, **fields: Any) -> Any:
    """`message` as an instance of its subclass `cls`, with `fields` filled in or replaced
    (e.g. FedAvg's `ClientUpdate` → FedProto's `PrototypeUpdate` with prototypes)."""
    base = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return cls(**{**base, **fields})
