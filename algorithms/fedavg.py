"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017.

Client k runs E epochs of SGD on its data from the global weights w_t; the server sets
w_{t+1} = Σ_k (n_k / n) w_k^{t+1} over the sampled clients (Algorithm 1).

Every other method inherits from this class and overrides only what differs:
`local_objective` (the per-batch loss), `client_update` (what is sent back), `server_round`
(what the server does with it), `broadcast` (what clients receive).

The same steps run segmentation tasks: the supervised loss is then the (CE + soft Dice)/2 of
the FedBCS code (spec fedbcs §4.2) and evaluation reports foreground Dice, HD95 and ASD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysim.aggregation import weighted_average
from raysim.algorithm import (
    Broadcast,
    ClientContext,
    ClientUpdate,
    ServerContext,
    ServerState,
    TaskInfo,
    Weights,
)
from raysim.segmentation import joint_loss, segmentation_sums
from raysim.training import ClientData, make_optimizer

BatchLoss = Callable[[Tensor, Tensor], Tensor]


def copy_weights(model: nn.Module) -> Weights:
    """A detached CPU copy of the model's state dict (safe to send and to keep)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def copy_tensors(tree: Any) -> Any:
    """`tree` (e.g. an optimiser's state_dict) with every tensor a detached CPU copy."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: copy_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(copy_tensors(v) for v in tree)
    return tree


class FedAvg:
    @dataclass(frozen=True)
    class Config:
        """FedAvg has no hyperparameters beyond the shared `train` section."""

    stateful: ClassVar[bool] = False  # True: the engine keeps `ClientUpdate.state` per client

    def __init__(
        self, config: Any = None, task: TaskInfo | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config if config is not None else self.Config()
        self.task = task
        self.device = device or torch.device("cpu")

    @property
    def segmentation(self) -> bool:
        return self.task is not None and self.task.kind == "segmentation"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model this method trains, built from the configured one (FedBCS adds style
        recalibration and fusion layers); every process builds it the same way."""
        return model

    # ---------------------------------------------------------------- server side
    def init_server(self, model: nn.Module) -> ServerState:
        return ServerState(weights=copy_weights(model))

    def broadcast(self, state: ServerState) -> Broadcast:
        return Broadcast(weights=state.weights)

    def server_round(
        self, ctx: ServerContext, state: ServerState, updates: list[ClientUpdate]
    ) -> ServerState:
        """w_{t+1} = Σ_k n_k w_k / Σ_k n_k, in client-id order (the engine sorts `updates`)."""
        averaged = weighted_average([u.weights for u in updates], [u.num_samples for u in updates])
        return ServerState(weights=averaged)

    # ---------------------------------------------------------------- client side
    def client_update(
        self, ctx: ClientContext, model: nn.Module, broadcast: Broadcast, data: ClientData,
        state: Any,
    ) -> ClientUpdate:
        model.load_state_dict(broadcast.weights)
        objective = self.local_objective(ctx, model, broadcast, state)
        optimizer = self.client_optimizer(ctx, model, state)
        metrics = self.train_locally(ctx, model, data, objective, optimizer)
        return ClientUpdate(weights=copy_weights(model), num_samples=len(data), metrics=metrics,
                            state=self.next_state(ctx, optimizer))

    def task_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The supervised loss: cross-entropy, or (CE + soft Dice)/2 for segmentation."""
        if self.segmentation:
            return joint_loss(logits, y)
        return F.cross_entropy(logits, y)

    def local_objective(
        self, ctx: ClientContext, model: nn.Module, broadcast: Broadcast, state: Any
    ) -> BatchLoss:
        """The loss of one batch; FedAvg: the supervised loss alone."""

        def loss(x: Tensor, y: Tensor) -> Tensor:
            return self.task_loss(model(x).logits, y)

        return loss

    def client_optimizer(
        self, ctx: ClientContext, model: nn.Module, state: Any
    ) -> torch.optim.Optimizer:
        """A fresh optimiser, or with `train.keep_optimizer_state` the one this client left off
        with (its moments survive rounds; the weights are the global ones)."""
        optimizer = make_optimizer(model, ctx.train)
        if ctx.train.keep_optimizer_state and state and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return optimizer

    def next_state(self, ctx: ClientContext, optimizer: torch.optim.Optimizer) -> Any:
        """What the engine keeps for this client until its next round (None: nothing)."""
        if not ctx.train.keep_optimizer_state:
            return None
        return {"optimizer": copy_tensors(optimizer.state_dict())}

    def train_locally(
        self, ctx: ClientContext, model: nn.Module, data: ClientData, objective: BatchLoss,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, float]:
        model.train()
        total, steps = torch.zeros((), device=ctx.device), 0
        for _ in range(ctx.train.local_epochs):
            for x, y in data.batches(ctx.train.batch_size, ctx.generator):
                loss = objective(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
        return {"train_loss": total.item() / max(steps, 1), "train_steps": float(steps)}

    def anchors(self, broadcast: Broadcast) -> tuple[Tensor, Tensor] | None:
        """The global class anchors clients are pulled towards, (C, d), and the (C,) mask of
        classes that have one; None for methods without anchors. Used for diagnostics only."""
        return None

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_batch(
        self, model: nn.Module, broadcast: Broadcast, x: Tensor, y: Tensor
    ) -> dict[str, float]:
        """Sums over the batch; the engine adds them up and divides by `count`."""
        logits = model(x).logits
        if self.segmentation:
            loss = joint_loss(logits, y).item() * len(y)
            return {**segmentation_sums(logits.argmax(1), y), "loss": loss}
        return {
            "accuracy": (logits.argmax(1) == y).sum().item(),
            "loss": F.cross_entropy(logits, y, reduction="sum").item(),
            "count": float(len(y)),
        }
