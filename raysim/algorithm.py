"""The contract between an FL method and the engine. Nothing here knows about Ray.

A method is a subclass of `Algorithm` with a frozen `Config` dataclass of its hyperparameters
(the defaults live there and nowhere else). It is constructed as `Method(config, task, device)`
in every process that hosts it (the server actor and each client worker), and it overrides
hooks; the engine only calls `client_update`, `server_round` and `evaluate_batch`, and the first
two are fixed here (a method that overrides them is refused when its class is created):

    client_update:  load_weights(step)                     the broadcast (and a personal part)
                    prepared  = before_training(step)      e.g. FedHPro's real-sample gradients
                    objective = local_objective(step)      the per-batch loss
                    optimizer = client_optimizer(step)
                    metrics   = train_locally(step)        the batch loop (sets step.num_steps)
                    trained   = after_training(step)       e.g. local prototypes
                    return upload(step)                    weights, counts, extras, next state
    server_round:   weights = aggregate(ctx, state, updates)          (sample-weighted mean)
                    return server_update(ctx, state, weights, updates) (server-side learning)

`weighted_mean` says whether the aggregate is the sample-weighted mean, which the workers can
pre-sum: it is derived when the class is created (False for a method that overrides
`aggregate`; a method may also set it False to receive every client's weights). For a
`weighted_mean` method the server receives one exact sum per worker
(`raysim.methods.aggregation.WeightSum`), the mean is the same bits as summing every client on
the server, and `updates[k].weights` in `server_update` is empty (`SummedWeights`).

With `train.client_group` > 1 the engine trains many clients of a `groupable` method at once
(`raysim.engine.grouped`): the per-client hooks run as above, but the batch loop is one
vectorised step for the group, from the method's `functional_loss` and `loss_extras` and the
optimiser `client_optimizer` builds, stacked (docs/client_groups.md).

`step` (a `LocalRound`) carries the context, model, broadcast, data and client state, and what
each earlier hook produced. Messages and states are frozen dataclasses of data (tensors,
numbers, lists, dicts), so the engine can move them and checkpoint them without pickle. The
supervised loss and the evaluation metrics belong to the task (`raysim.nn.objectives`), not to a
method. What only tools read (the anchor diagnostics, the leakage probe, `raysim compare`) is
optional and declared apart from `Algorithm`: see the end of this module. The method guide
(docs/guide/methods.md) walks through every hook with examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from raysim.config import Config as ExperimentConfig
from raysim.config import TrainConfig
from raysim.methods.aggregation import weighted_average
from raysim.nn.objectives import objective_of
from raysim.nn.training import make_optimizer
from raysim.registry import DATASETS
from raysim.state_io import register_state_types
from raysim.types import Weights

BatchLoss = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "Algorithm", "BatchLoss", "Broadcast", "ClassAnchors", "ClientContext", "ClientUpdate",
    "LEARNING_RATE_SPACE", "LocalRound", "PersonalModel", "SHARED_PARTS", "ServerContext",
    "ServerState", "SummedWeights", "TaskInfo", "Weights", "copy_tensors", "copy_weights",
    "call_model", "extend", "fine_tune", "search_space_of", "task_kind", "ungroupable_reason",
    "weights_part",
]


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
    finetune_epochs: int = 0  # evaluation.personal.finetune_epochs (personalised evaluation)
    # the run's differential privacy, resolved before Ray (a `raysim.methods.privacy.PrivacyPlan`;
    # None: off): the engine applies it around the hooks, a method need not read it
    privacy: Any = None


@dataclass(frozen=True)
class ClientContext:
    """Everything a client step needs besides the model, the data and the broadcast."""

    client_id: int
    round: int
    generator: torch.Generator  # seeded from (seed, round, client id): use it for every draw
    device: torch.device
    train: TrainConfig
    # the round-0 weights of this client's architecture: where a personal model starts
    initial_weights: Weights | None = field(default=None, repr=False, compare=False)


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
    """What a client sends back.

    `weights`: its trained weights; on the server of a `weighted_mean` method an empty
    `SummedWeights`, the workers having summed them. `num_samples`: n_k, its training samples
    (the weight of its weights in the mean). `state`: kept by the engine for this client's next
    round (None: nothing). `num_steps`: the local optimiser steps it took (τ_k, as FedNova
    normalises by), also logged as the metric `train_steps`."""

    weights: Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    state: Any = None
    num_steps: int = 0


@dataclass(frozen=True)
class ServerState:
    weights: Weights
    metrics: dict[str, float] = field(default_factory=dict)  # logged as server_<name>


# checkpoints rebuild these messages (and their subclasses in method files) by name
register_state_types(ServerState, Broadcast, ClientUpdate)


class SummedWeights(dict):
    """`ClientUpdate.weights` on the server of a `weighted_mean` method: empty, the workers
    having summed every client's weights. Reading a tensor from it says why it is not there."""

    def __missing__(self, name: str) -> Tensor:
        raise KeyError(f"{name!r}: the workers summed this method's client weights "
                       "(weighted_mean); a method that reads each client's weights on the "
                       "server declares weighted_mean = False")


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
    num_steps: int = 0  # the optimiser steps train_locally took
    trained: Any = None  # what after_training returned


def extend(message: Any, cls: type, **fields: Any) -> Any:
    """`message` as an instance of its subclass `cls`, with `fields` filled in or replaced
    (e.g. FedAvg's `ClientUpdate` → FedProto's `PrototypeUpdate` with prototypes)."""
    base = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return cls(**{**base, **fields})


def copy_tensors(tree: Any) -> Any:
    """`tree` (a state dict, an optimiser's state) with every tensor a detached CPU copy, safe
    to send and to keep."""
    if torch.is_tensor(tree):  # clone: the same copy as .to("cpu", copy=True), sooner on CPU
        return tree.detach().clone() if tree.device.type == "cpu" else tree.detach().to("cpu")
    if isinstance(tree, dict):
        return {k: copy_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(copy_tensors(v) for v in tree)
    return tree


def copy_weights(model: nn.Module) -> Weights:
    """A detached CPU copy of the model's state dict."""
    return copy_tensors(model.state_dict())


HEAD = "classifier."  # the bundled models' (and every group member's) last layer


def weights_part(weights: Weights, part: str) -> Weights:
    """The entries of `weights` that `part` names (an `Algorithm.shares` value): `model` all,
    `head` the classifier's, `body` all but the classifier's, `none` nothing."""
    if part == "model":
        return dict(weights)
    if part == "none":
        return {}
    head = part == "head"
    return {k: v for k, v in weights.items() if k.startswith(HEAD) == head}


SHARED_PARTS = ("model", "head", "body", "none")
_KEPT = {"model": "none", "head": "body", "body": "head", "none": "model"}


def task_kind(config: ExperimentConfig) -> str:
    """The task kind of an experiment config's dataset: classification | segmentation."""
    return DATASETS[config.data.dataset].task


# What a class may not define, and what it defines instead.
_ENGINE_STEPS = ("client_update", "server_round")
# The hooks that shape local training. Client groups replace them with `functional_loss`, so a
# class that overrides one of them is grouped only where it declares `groupable` itself.
_TRAINING_HOOKS = ("local_objective", "client_optimizer", "train_locally", "functional_loss",
                   "loss_extras")
_UNGROUPABLE: dict[type, str] = {}  # class → why it trains one client at a time
_RENAMED = {
    "check_task": "check_config(cls, config), which receives the whole validated config (its "
                  "own settings are config.algorithm.params); rename it",
    "has_anchors": "inherit raysim.algorithm.ClassAnchors instead, which switches the anchor "
                   "diagnostics on; delete the has_anchors line",
}


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
    # the aggregate is the sample-weighted mean, so the workers sum their clients' weights
    # before sending; derived (False where `aggregate` is overridden), see __init_subclass__
    weighted_mean: ClassVar[bool] = True
    # which of the model's weights clients send and the server averages: `model` (all of them,
    # so every client has one architecture), `head` or `body` (the rest stays personal, see
    # `PersonalModel`), or `none` (only what the method's messages add: prototypes, gradients)
    shares: ClassVar[str] = "model"
    # local training can run for many clients at once (`train.client_group`): its loss is
    # `functional_loss` with `loss_extras`, its optimiser plain SGD or Adam. Derived False for
    # a class that overrides a training hook (or one in `loss_hooks`) without declaring it.
    groupable: ClassVar[bool] = True
    loss_hooks: ClassVar[tuple[str, ...]] = ()  # methods its functional_loss calls

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuses a method whose declarations contradict its hooks, and derives
        `weighted_mean`: a method with its own `aggregate` gets every client's weights."""
        super().__init_subclass__(**kwargs)
        name = cls.__qualname__
        for step in _ENGINE_STEPS:
            if step in cls.__dict__:
                raise TypeError(f"{name} overrides {step}, the engine's own step; override "
                                "its hooks instead (docs/guide/methods.md lists them)")
        for old, instead in _RENAMED.items():
            if old in cls.__dict__:
                raise TypeError(f"{name}.{old} is no longer read: {instead}")
        if cls.aggregate is not Algorithm.aggregate:
            if cls.__dict__.get("weighted_mean") is True:
                raise TypeError(f"{name} overrides aggregate and declares weighted_mean = True, "
                                "so the workers would pre-sum the weights and its aggregate "
                                "would see none; delete the weighted_mean line")
            cls.weighted_mean = False
        if cls.shares not in SHARED_PARTS:
            raise TypeError(f"{name}.shares = {cls.shares!r}: choose one of "
                            f"{', '.join(SHARED_PARTS)}")
        if cls.shares != "model" and not issubclass(cls, PersonalModel):
            raise TypeError(f"{name} shares only {cls.shares!r} of the model, so its clients "
                            "must keep the rest: inherit raysim.algorithm.PersonalModel")
        _derive_groupable(cls)

    def __init__(
        self, config: Any = None, task: TaskInfo | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config if config is not None else self.Config()
        self.task = task
        self.device = device or torch.device("cpu")
        self.objectives = objective_of(task.kind, task.protocol) if task is not None \
            else objective_of("classification")

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        """Raise `ConfigError` (one line naming the key and the fix) where this method cannot
        run the experiment `config`: the whole validated config, its own settings in
        `config.algorithm.params`, the task kind in `task_kind(config)`, the clients' training
        in `config.train`. Runs while the config is validated, before Ray starts."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model this method trains, built from the configured one (FedBCS wraps the U-Net
        with its style recalibration and fusion); every process builds it the same way."""
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
        step = LocalRound(ctx, model, broadcast, data, state)
        self.load_weights(step)
        step.prepared = self.before_training(step)
        step.objective = self.local_objective(step)
        step.optimizer = self.client_optimizer(step)
        step.metrics = self.train_locally(step)
        step.trained = self.after_training(step)
        return self.upload(step)

    def load_weights(self, step: LocalRound) -> None:
        """Put the weights the client starts from into `step.model`: the broadcast's."""
        step.model.load_state_dict(step.broadcast.weights)

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

    def loss_extras(self, step: LocalRound) -> dict[str, Any]:
        """What `functional_loss` reads for this client besides its weights and batch (FedProx:
        the global weights; SCAFFOLD: its correction c − c_i): tensors, or dicts and lists of
        them, read after `load_weights` and `before_training`. A tensor every client of a group
        returns as the same object is passed once, the others are stacked per client."""
        return {}

    def functional_loss(self, model: nn.Module, weights: Weights, x: Tensor, y: Tensor,
                        extras: dict[str, Any]) -> Tensor:
        """`local_objective` as a pure function of the weights, for client groups: one
        client's batch loss with `weights` (parameters and buffers by name) in `model`'s place
        (`call_model`) and its `loss_extras`. The engine vmaps it over a group's clients, so
        it branches on no tensor's value and draws no random numbers."""
        return self.objectives.loss(call_model(model, weights, x).logits, y)

    def client_optimizer(self, step: LocalRound) -> torch.optim.Optimizer:
        """A fresh optimiser, or with `train.keep_optimizer_state` the one this client left off
        with (its moments survive rounds; the weights are the global ones)."""
        optimizer = make_optimizer(step.model, step.ctx.train)
        state = step.state
        if step.ctx.train.keep_optimizer_state and state and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return optimizer

    def train_locally(self, step: LocalRound) -> dict[str, float]:
        """E epochs of the objective over shuffled batches; sets `step.num_steps`."""
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
        step.num_steps = steps
        metrics = {"train_loss": total.item() / max(steps, 1), "train_steps": float(steps)}
        if hasattr(objective, "metrics"):
            metrics.update(objective.metrics())
        return metrics

    def after_training(self, step: LocalRound) -> Any:
        """Computed on the trained local model (None: nothing)."""
        return None

    def upload(self, step: LocalRound) -> ClientUpdate:
        """What the client sends: its weights, sample count, metrics, step count and next
        state."""
        return ClientUpdate(weights=copy_weights(step.model), num_samples=len(step.data),
                            metrics=step.metrics, state=self.next_state(step),
                            num_steps=step.num_steps)

    def next_state(self, step: LocalRound) -> Any:
        """What the engine keeps for this client until its next round (None: nothing)."""
        if not step.ctx.train.keep_optimizer_state:
            return None
        return {"optimizer": copy_tensors(step.optimizer.state_dict())}

    # ---------------------------------------------------------------- evaluation
    def deployed_model(self, step: LocalRound) -> nn.Module | None:
        """The model this client would deploy, which personalised evaluation scores on its
        own test part (`step.data` is its training part, `step.state` its stored state). A
        method with one global model has none (None), unless `evaluation.personal` asks for
        `finetune_epochs` of local fine-tuning of the global model (FL-bench's finetune)."""
        if not self.task or not self.task.finetune_epochs:
            return None
        self.load_weights(step)
        return fine_tune(self, step, self.task.finetune_epochs)

    @torch.no_grad()
    def evaluate_batch(
        self, model: nn.Module, broadcast: Broadcast, x: Tensor, y: Tensor
    ) -> dict[str, float]:
        """Metric sums over the batch (the task's); the engine adds them up and divides by
        `count`."""
        return self.objectives.evaluate(model(x).logits, y)


def call_model(model: nn.Module, weights: Weights, x: Tensor) -> Any:
    """`model(x)` with `weights` (parameters and buffers by name) in place of its own."""
    return functional_call(model, weights, (x,))


def _derive_groupable(cls: type[Algorithm]) -> None:
    """`groupable` holds for a class only where it is declared below every training hook it
    inherits: a class that overrides one without declaring `groupable` itself trains one client
    at a time. A declaration that contradicts its hooks is refused."""
    mro, name = cls.__mro__, cls.__qualname__

    def defined_at(attr: str) -> int:
        return next(i for i, c in enumerate(mro) if attr in c.__dict__)

    if cls.__dict__.get("groupable") is True:
        if defined_at("train_locally") != mro.index(Algorithm):
            raise TypeError(f"{name} declares groupable = True but has its own train_locally, "
                            "which client groups do not run; delete the groupable line")
        if defined_at("local_objective") < defined_at("functional_loss"):
            raise TypeError(f"{name} declares groupable = True but its functional_loss is "
                            "older than its local_objective; define functional_loss (and "
                            "loss_extras) to match it, or delete the groupable line")
        return
    if "groupable" in cls.__dict__:
        _UNGROUPABLE[cls] = "it declares groupable = False"
        return
    declared = defined_at("groupable")
    newer = [hook for hook in (*_TRAINING_HOOKS, *cls.loss_hooks) if defined_at(hook) < declared]
    if cls.groupable and newer:
        cls.groupable = False
        _UNGROUPABLE[cls] = (f"it overrides {', '.join(newer)} and does not declare "
                             "groupable (docs/client_groups.md)")


def ungroupable_reason(method: Algorithm | type[Algorithm]) -> str | None:
    """Why a method trains its clients one at a time even in client groups (None: it is
    groupable)."""
    cls = method if isinstance(method, type) else type(method)
    if cls.groupable:
        return None
    return next((_UNGROUPABLE[c] for c in cls.__mro__ if c in _UNGROUPABLE),
                "it declares groupable = False")


def fine_tune(method: Algorithm, step: LocalRound, epochs: int) -> nn.Module:
    """`epochs` of the task's loss (not the method's objective) with a fresh optimiser on the
    client's training part, from the weights in `step.model`; returns the model in eval mode."""
    train = dataclasses.replace(step.ctx.train, local_epochs=epochs)
    step.ctx = dataclasses.replace(step.ctx, train=train)
    step.objective = Algorithm.local_objective(method, step)
    step.optimizer = make_optimizer(step.model, train)
    Algorithm.train_locally(method, step)
    return step.model.eval()


class PersonalModel:
    """A mix-in (listed before the method's base) for methods whose clients keep the part of
    their model that `shares` does not name (FedProto and Local: all of it; FedPer and FedRep:
    the head; LG-FedAvg: the body) as client state, in the engine's client-state store. A
    client starts from the broadcast's shared part and its own kept part (its architecture's
    round-0 weights the first time), sends only the shared part, and deploys the model it
    trained (`deployed_model`)."""

    stateful: ClassVar[bool] = True
    shares: ClassVar[str] = "none"

    def kept_part(self, weights: Weights) -> Weights:
        return weights_part(weights, _KEPT[self.shares])

    def init_server(self, model: nn.Module) -> ServerState:
        state = super().init_server(model)
        return dataclasses.replace(state, weights=weights_part(state.weights, self.shares))

    def load_weights(self, step: LocalRound) -> None:
        kept = (step.state or {}).get("personal")
        if kept is None:
            kept = self.kept_part(step.ctx.initial_weights or step.model.state_dict())
        step.model.load_state_dict({**kept, **step.broadcast.weights})

    def upload(self, step: LocalRound) -> ClientUpdate:
        update = super().upload(step)
        return dataclasses.replace(update, weights=weights_part(update.weights, self.shares))

    def next_state(self, step: LocalRound) -> Any:
        return {**(super().next_state(step) or {}),
                "personal": self.kept_part(copy_weights(step.model))}

    def deployed_model(self, step: LocalRound) -> nn.Module | None:
        """The personal model as trained (`finetune_epochs` is for methods without one)."""
        self.load_weights(step)
        return step.model.eval()


# ------------------------------------------------------------------------------------------
# Optional declarations tools look for. None of them changes training.
#
# - `ClassAnchors` (a mix-in): the anchor diagnostics (`diagnostics.anchors`,
#   `raysim.methods.diagnostics`) run for methods that inherit it.
# - `uploads` (a class attribute, default "weights"): what a client's upload carries besides
#   its weights, for the leakage probe; read by `raysim.methods.leakage.upload_kind`.
# - `search_space` (a class attribute, default `LEARNING_RATE_SPACE`): what `raysim compare`
#   tunes; read by `search_space_of`.


class ClassAnchors:
    """A method whose clients are pulled towards global class anchors (prototypes, cluster
    means, hyper-prototypes). Inheriting this switches the anchor diagnostics on; the method
    defines `anchors` and may refine `classifier` and `local_means`."""

    def anchors(self, broadcast: Broadcast) -> tuple[Tensor, Tensor] | None:
        """The global class anchors clients are pulled towards, (C, d), and the (C,) mask of
        classes that have one; None before there are any."""
        raise NotImplementedError(f"{type(self).__qualname__} inherits ClassAnchors and must "
                                  "define anchors(broadcast)")

    def classifier(self, weights: Weights) -> tuple[Tensor, Tensor] | None:
        """The global model's linear classifier (weight (C, d), bias (C,)) in `weights`; the
        bundled models name it `classifier`."""
        if "classifier.weight" in weights and "classifier.bias" in weights:
            return weights["classifier.weight"], weights["classifier.bias"]
        return None

    def local_means(self, update: ClientUpdate) -> tuple[Tensor, Tensor] | None:
        """The client's local class means (C, d) and counts (C,) where its upload carries them
        (None: the diagnostic computes them with one pass over the client's data)."""
        return None


# What `raysim compare` tunes for a method that declares no `search_space`: the shared client
# learning rate, in the sweep syntax ({loguniform: [low, high]}, {choice: [...]}, ...). A method
# adds its own keys (`algorithm.<field>`) with `search_space = {**LEARNING_RATE_SPACE, ...}`.
# The range suits SGD; a comparison may replace any range (e.g. for Adam) in its
# `search_overrides`.
LEARNING_RATE_SPACE: dict[str, dict[str, list]] = {"train.lr": {"loguniform": [0.003, 0.3]}}


def search_space_of(method: type) -> dict[str, dict[str, list]]:
    """The search space a method class declares, or the learning rate alone."""
    return getattr(method, "search_space", LEARNING_RATE_SPACE)
