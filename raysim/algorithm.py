"""The contract between an FL method and the engine. Nothing here knows about Ray.

A method is a subclass of `Algorithm` with a frozen `Config` dataclass of its hyperparameters
(the defaults live there and nowhere else). It is constructed as `Method(config, task, device)`
in every process that hosts it (the server actor and each client worker), and it overrides
hooks; the engine only calls `client_update`, `server_round` and `evaluate_batch`, which are
fixed here:

    client_update:  load the broadcast weights
                    prepared  = before_training(step)      e.g. FedHPro's real-sample gradients
                    objective = local_objective(step)      the per-batch loss
                    optimizer = client_optimizer(step)
                    metrics   = train_locally(step)        the batch loop
                    trained   = after_training(step)       e.g. local prototypes
                    return upload(step)                    weights, counts, extras, next state
    server_round:   weights = aggregate(ctx, state, updates)          (sample-weighted mean)
                    return server_update(ctx, state, weights, updates) (server-side learning)

A method whose `aggregate` is the sample-weighted mean (`weighted_mean = True`, the default)
lets the workers sum their own clients' weights: the server then receives one exact sum per
worker (`raysim.methods.aggregation.WeightSum`), the mean is the same bits as summing every
client on the server, and `updates[k].weights` is empty in `server_update`.

`step` (a `LocalRound`) carries the context, model, broadcast, data and client state, and what
each earlier hook produced. Messages and states are frozen dataclasses of data (tensors,
numbers, lists, dicts), so the engine can move them and checkpoint them without pickle. The
supervised loss and the evaluation metrics belong to the task (`raysim.nn.objectives`), not to a
method; a method declares what it supports and reports in class attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from raysim.config import TrainConfig

Weights = dict[str, Tensor]
BatchLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TaskInfo:
    """What an algorithm may know about the task it runs on."""

    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    feature_dim: int | None  # None: the model has no feature head
    train: TrainConfig  # the clients' local training settings (some servers reuse them)
    seed: int = 0  # the run seed: derive generators from it (raysim.seeding.derive_seed)
    kind: str = "classification"  # or "segmentation": labels are (H, W) masks
    num_clients: int = 0  # registered clients (SCAFFOLD scales its control update by it)
    protocol: str = "default"  # the evaluation protocol (evaluation.protocol): its metrics


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


@dataclass
class LocalRound:
    """One client's round as the client hooks see it: what came in, and what each earlier hook
    produced (filled in as the round goes)."""

    ctx: ClientContext
    model: nn.Module
    broadcast: Broadcast
    data: Any  # raysim.nn.training.ClientData
    state: Any  # this client's state from its last round (None: its first round)
    prepared: Any = None  # what before_training returned
    objective: BatchLoss | None = None
    optimizer: torch.optim.Optimizer | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trained: Any = None  # what after_training returned


def extend(message: Any, cls: type, **fields: Any) -> Any:
    """`message` as an instance of its subclass `cls`, with `fields` filled in or replaced
    (e.g. FedAvg's `ClientUpdate` → FedProto's `PrototypeUpdate` with prototypes)."""
    base = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return cls(**{**base, **fields})


def copy_tensors(tree: Any) -> Any:
    """`tree` (a state dict, an optimiser's state) with every tensor a detached CPU copy, safe
    to send and to keep."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: copy_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(copy_tensors(v) for v in tree)
    return tree


def copy_weights(model: nn.Module) -> Weights:
    """A detached CPU copy of the model's state dict."""
    return copy_tensors(model.state_dict())


class Algorithm:
    """The base every method extends. On its own it trains with the task's loss and averages
    weights by sample count: FedAvg (`algorithms/fedavg.py`) adds nothing to it."""

    @dataclass(frozen=True)
    class Config:
        """No hyperparameters beyond the shared `train` section."""

    # ---------------------------------------------------------------- declarations
    stateful: ClassVar[bool] = False  # True: the engine keeps `ClientUpdate.state` per client
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation")  # task kinds it runs
    needs_features: ClassVar[bool] = False  # works on the model's features (not `logreg`)
    # metrics it adds: client metrics as logged, server metrics with their `server_` prefix
    reported_metrics: ClassVar[tuple[str, ...]] = ()
    has_anchors: ClassVar[bool] = False  # `anchors` returns global class anchors
    # `aggregate` is the sample-weighted mean of the clients' weights: the workers sum their
    # clients' weights before sending (a method that overrides `aggregate` sets it False)
    weighted_mean: ClassVar[bool] = True
    # what a client's upload carries besides its weights, for the leakage probe
    # (`raysim.methods.leakage`): weights | prototypes | class_gradients | another name
    uploads: ClassVar[str] = "weights"
    # What `raysim compare` tunes for this method: dotted config keys with a domain in the
    # sweep syntax ({loguniform: [low, high]}, {choice: [...]}, ...). Every method tunes the
    # shared client learning rate; a method adds its own keys (`algorithm.<field>`) with
    # `search_space = {**Parent.search_space, ...}`. The range suits SGD; a comparison may
    # replace any range (e.g. for Adam) in its `search_overrides`.
    search_space: ClassVar[dict[str, dict[str, list]]] = {
        "train.lr": {"loguniform": [0.003, 0.3]}}

    def __init__(
        self, config: Any = None, task: TaskInfo | None = None,
        device: torch.device | None = None,
    ) -> None:
        from raysim.nn.objectives import objective_of

        self.config = config if config is not None else self.Config()
        self.task = task
        self.device = device or torch.device("cpu")
        self.objectives = objective_of(task.kind, task.protocol) if task is not None \
            else objective_of("classification")

    @classmethod
    def check_task(cls, config: Any, kind: str) -> None:
        """Raise `ConfigError` where this method's settings `config` cannot run a task of this
        `kind` (checked while the experiment's config is validated, before Ray)."""

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
        self, ctx: ServerContext, state: ServerState, updates: list[ClientUpdate],
        summed: Any = None,
    ) -> ServerState:
        """The engine's server step (not a hook): `aggregate`, then `server_update`. `updates`
        come in client-id order; `summed` (a `WeightSum`) is their weights already summed on
        the workers, for `weighted_mean` methods."""
        weights = summed.mean() if summed is not None else self.aggregate(ctx, state, updates)
        return self.server_update(ctx, state, weights, updates)

    def aggregate(self, ctx: ServerContext, state: ServerState,
                  updates: list[ClientUpdate]) -> Weights:
        """w_{t+1} = Σ_k n_k w_k / Σ_k n_k, summed exactly (the same bits in any order)."""
        from raysim.methods.aggregation import weighted_average

        return weighted_average([u.weights for u in updates], [u.num_samples for u in updates])

    def server_update(self, ctx: ServerContext, state: ServerState, weights: Weights,
                      updates: list[ClientUpdate]) -> ServerState:
        """Server-side learning after aggregation (prototypes, generators, hyper-prototypes)."""
        return ServerState(weights=weights)

    # ---------------------------------------------------------------- client side
    def client_update(
        self, ctx: ClientContext, model: nn.Module, broadcast: Broadcast, data: Any,
        state: Any,
    ) -> ClientUpdate:
        """The engine's client step (not a hook): the hooks in order, see the module doc."""
        model.load_state_dict(broadcast.weights)
        step = LocalRound(ctx, model, broadcast, data, state)
        step.prepared = self.before_training(step)
        step.objective = self.local_objective(step)
        step.optimizer = self.client_optimizer(step)
        step.metrics = self.train_locally(step)
        step.trained = self.after_training(step)
        return self.upload(step)

    def before_training(self, step: LocalRound) -> Any:
        """Computed on the received model before any local step (None: nothing)."""
        return None

    def local_objective(self, step: LocalRound) -> BatchLoss:
        """The loss of one batch: the task's supervised loss. An objective with a `metrics()`
        method adds what it returns to the client's metrics."""
        model, loss = step.model, self.objectives.loss

        def objective(x: Tensor, y: Tensor) -> Tensor:
            return loss(model(x).logits, y)

        return objective

    def client_optimizer(self, step: LocalRound) -> torch.optim.Optimizer:
        """A fresh optimiser, or with `train.keep_optimizer_state` the one this client left off
        with (its moments survive rounds; the weights are the global ones)."""
        from raysim.nn.training import make_optimizer

        optimizer = make_optimizer(step.model, step.ctx.train)
        state = step.state
        if step.ctx.train.keep_optimizer_state and state and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return optimizer

    def train_locally(self, step: LocalRound) -> dict[str, float]:
        """E epochs of the objective over shuffled batches."""
        ctx, model, optimizer, objective = step.ctx, step.model, step.optimizer, step.objective
        model.train()
        total, steps = torch.zeros((), device=ctx.device), 0
        for _ in range(ctx.train.local_epochs):
            for x, y in step.data.batches(ctx.train.batch_size, ctx.generator):
                loss = objective(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
        metrics = {"train_loss": total.item() / max(steps, 1), "train_steps": float(steps)}
        if hasattr(objective, "metrics"):
            metrics.update(objective.metrics())
        return metrics

    def after_training(self, step: LocalRound) -> Any:
        """Computed on the trained local model (None: nothing)."""
        return None

    def upload(self, step: LocalRound) -> ClientUpdate:
        """What the client sends: its weights, sample count, metrics and next state."""
        return ClientUpdate(weights=copy_weights(step.model), num_samples=len(step.data),
                            metrics=step.metrics, state=self.next_state(step))

    def next_state(self, step: LocalRound) -> Any:
        """What the engine keeps for this client until its next round (None: nothing)."""
        if not step.ctx.train.keep_optimizer_state:
            return None
        return {"optimizer": copy_tensors(step.optimizer.state_dict())}

    # ---------------------------------------------------------------- what it declares
    def anchors(self, broadcast: Broadcast) -> tuple[Tensor, Tensor] | None:
        """The global class anchors clients are pulled towards, (C, d), and the (C,) mask of
        classes that have one; None before there are any (`has_anchors` methods only)."""
        return None

    def classifier(self, weights: Weights) -> tuple[Tensor, Tensor] | None:
        """The global model's linear classifier (weight (C, d), bias (C,)) in `weights`, for
        the anchor diagnostics; the bundled models name it `classifier`."""
        if "classifier.weight" in weights and "classifier.bias" in weights:
            return weights["classifier.weight"], weights["classifier.bias"]
        return None

    def local_means(self, update: ClientUpdate) -> tuple[Tensor, Tensor] | None:
        """The client's local class means (C, d) and counts (C,) where its upload carries them
        (the anchor diagnostic reuses them; None: it computes them when asked to)."""
        return None

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_batch(
        self, model: nn.Module, broadcast: Broadcast, x: Tensor, y: Tensor
    ) -> dict[str, float]:
        """Metric sums over the batch (the task's); the engine adds them up and divides by
        `count`."""
        return self.objectives.evaluate(model(x).logits, y)
