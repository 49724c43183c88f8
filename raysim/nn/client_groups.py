"""Client groups: the local training of K clients at once. Their weights are stacked along a
leading client dimension and every step is one vectorised forward/backward for the whole group
(`torch.func.vmap` of `grad_and_value` of a functional loss), instead of K small ones.

Each client gets what training it alone gives, to float tolerance:
- its batches come from its own generator, drawn as `ClientData.batches` draws them (one
  permutation per epoch, a trailing batch of one sample skipped, augmentation in the same
  order), so the same samples reach the same step;
- clients whose batches differ in size at a step (a trailing batch, a smaller client) run as
  sub-groups of one batch size, so each client's loss is the mean over its own batch;
- the optimisers are elementwise on the stacked weights and follow `torch.optim.SGD`
  (momentum, weight decay) and `torch.optim.Adam` (per-client step counts) update for update;
  a client out of batches takes no step: its weights, moments and step count stay put.
Batched kernels sum in another order than one client's, so the results agree with one-by-one
training to float tolerance, not bit for bit; a group of the same clients gives the same bits
every time.

Nothing here knows about methods: `raysim.engine.grouped` builds the loss from a method's
`functional_loss` and its per-client `loss_extras`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from raysim.nn.training import ClientData

# loss(params, constants, x, y, own, shared) → one client's scalar loss of one batch: `params`
# the trained weights by name, `constants` the rest of the model's state (buffers, frozen
# parameters), `own` this client's extras, `shared` the extras every client of the group shares
GroupLoss = Callable[[dict, dict, Tensor, Tensor, Any, Any], Tensor]


# ------------------------------------------------------------------------------- stacking


def stack_trees(trees: Sequence[Any]) -> Any:
    """Nested dicts/lists/tuples of tensors (one per client, same structure) → one tree of
    tensors stacked along a new leading client dimension."""
    first = trees[0]
    if torch.is_tensor(first):
        return torch.stack(list(trees))
    if isinstance(first, dict):
        return {k: stack_trees([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_trees(parts) for parts in zip(*trees, strict=True))
    raise TypeError(f"a client's loss extras must be tensors (or dicts, lists of them) to be "
                    f"stacked; got {type(first).__name__}")


def split_extras(trees: Sequence[Any], device: torch.device) -> tuple[list, list, Callable]:
    """The clients' loss extras (one tree each, same structure) as (own, shared, rebuild):
    `own` the leaves that differ between clients, each stacked along the client dimension;
    `shared` the leaves every client holds as the same object, passed once; `rebuild(own,
    shared)` one client's tree again (inside the vmapped loss). Tensors go to `device`."""
    flat = [tree_flatten(tree) for tree in trees]
    spec = flat[0][1]
    if any(other != spec for _, other in flat):
        raise ValueError("the clients' loss extras differ in structure; a group stacks them")
    own, shared, is_own = [], [], []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        first = column[0]
        if all(leaf is first for leaf in column):
            shared.append(first.to(device) if torch.is_tensor(first) else first)
            is_own.append(False)
        elif all(torch.is_tensor(leaf) for leaf in column):
            own.append(torch.stack(list(column)).to(device))
            is_own.append(True)
        else:
            raise TypeError("a loss extra that differs between clients must be a tensor")

    def rebuild(own_leaves: Sequence[Any], shared_leaves: Sequence[Any]) -> Any:
        mine, theirs = iter(own_leaves), iter(shared_leaves)
        return tree_unflatten([next(mine) if o else next(theirs) for o in is_own], spec)

    return own, shared, rebuild


def index_tree(tree: Any, index: Tensor | int) -> Any:
    """The clients `index` of a stacked tree (an int: one client, its dimension dropped)."""
    if torch.is_tensor(tree):
        return tree[index]
    if isinstance(tree, dict):
        return {k: index_tree(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(index_tree(v, index) for v in tree)
    return tree


# ------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Bucket:
    """Clients of the group that take a step with batches of one size: their positions in the
    group (ascending) and their batches stacked, x (k, b, ...) and y (k, b, ...)."""

    positions: list[int]
    x: Tensor
    y: Tensor


def epoch_steps(size: int, batch_size: int) -> int:
    """How many batches `ClientData.batches` yields for a client of `size` samples: a trailing
    batch of one sample is skipped, unless it is the client's only sample."""
    if size == 1:
        return 1
    return size // batch_size + (size % batch_size >= 2)


def group_batches(
    datas: Sequence[ClientData], generators: Sequence[torch.Generator], batch_size: int,
    epochs: int,
) -> Iterator[list[Bucket]]:
    """Per step, the group's batches in buckets of one batch size, each client's drawn from its
    own generator as `ClientData.batches` would draw them over `epochs` epochs; ends when every
    client has run out. Index-gathered for plain `ClientData` without random augmentation,
    else from each client's own `batches` iterator."""
    if all(type(d) is ClientData for d in datas) and not _augments(datas):
        return _gathered_batches(datas, generators, batch_size, epochs)
    return _iterated_batches(datas, generators, batch_size, epochs)


def _augments(datas: Sequence[ClientData]) -> bool:
    """Whether a client's batches draw from its generator beyond the epoch's permutation."""
    return any(getattr(d.preprocess, "augment", None) for d in datas)


def _gathered_batches(
    datas: Sequence[ClientData], generators: Sequence[torch.Generator], batch_size: int,
    epochs: int,
) -> Iterator[list[Bucket]]:
    """Every client's samples of every step as one index table, each epoch's permutation drawn
    up front (nothing else draws from the generator during training); per step one gather
    and one preprocessing for the whole bucket."""
    device = datas[0].indices.device
    shared = all(d.x is datas[0].x and d.y is datas[0].y for d in datas)
    xs = datas[0].x if shared else torch.cat([d.x for d in datas])
    ys = datas[0].y if shared else torch.cat([d.y for d in datas])
    sizes = np.array([len(d) for d in datas])
    per_epoch = np.array([epoch_steps(int(n), batch_size) for n in sizes])
    width = per_epoch * batch_size  # an epoch's rows in the table, its trailing batch padded
    # all clients' samples as positions in one index list (and, generated, in one x)
    index_base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x_base = 0 if shared else np.concatenate([[0], np.cumsum([len(d.x) for d in datas])[:-1]])
    indices = torch.cat([d.indices for d in datas]) + torch.as_tensor(
        np.repeat(x_base, sizes) if not shared else 0, device=device)
    orders, used = [], []
    for data, generator, rows in zip(datas, generators, width, strict=True):
        for _ in range(epochs):  # the draws `ClientData.batches` makes, in its order
            order = torch.randperm(len(data.indices), generator=generator)[:rows]
            orders.append(order)
            used.append(len(order))
    starts = np.concatenate([[0], np.cumsum(width * epochs)[:-1]])  # each client's first row
    # row of (client k, epoch e, j-th sample) = starts[k] + e·width[k] + j
    slot_start = (starts[:, None] + np.arange(epochs)[None, :] * width[:, None]).ravel()
    used = np.array(used, dtype=np.int64)
    within = np.arange(used.sum()) - np.repeat(np.cumsum(used) - used, used)
    table = torch.zeros(int((width * epochs).sum()), dtype=torch.long, device=device)
    if used.sum():
        sample = torch.cat(orders).to(device) + torch.as_tensor(
            np.repeat(np.repeat(index_base, epochs), used), device=device)
        table[torch.as_tensor(np.repeat(slot_start, used) + within, device=device)] = \
            indices[sample]
    starts = torch.as_tensor(starts, device=device)
    preprocess = datas[0].preprocess
    for t in itertools.count():
        taking = _step_sizes(sizes, per_epoch, epochs, batch_size, t)
        if not taking.any():
            return
        buckets = []
        for size in sorted(set(taking[taking > 0].tolist()), reverse=True):
            positions = np.flatnonzero(taking == size)
            where = torch.as_tensor(positions, device=table.device)
            index = table[starts[where, None] + t * batch_size
                          + torch.arange(size, device=table.device)]
            flat = index.reshape(-1)  # index_select gathers rows faster than xs[index]
            x, y = preprocess.batch(xs.index_select(0, flat).view(*index.shape, *xs.shape[1:]),
                                    ys.index_select(0, flat).view(*index.shape, *ys.shape[1:]))
            buckets.append(Bucket(positions.tolist(), x, y))
        yield buckets


def _step_sizes(sizes: np.ndarray, per_epoch: np.ndarray, epochs: int, batch_size: int,
                t: int) -> np.ndarray:
    """Each client's batch size at its step t (0: it has finished)."""
    active = t < per_epoch * epochs
    slot = t % np.maximum(per_epoch, 1)
    return np.where(active, np.minimum(batch_size, sizes - slot * batch_size), 0)


def _iterated_batches(
    datas: Sequence[ClientData], generators: Sequence[torch.Generator], batch_size: int,
    epochs: int,
) -> Iterator[list[Bucket]]:
    """Each client's own `batches` iterator, one batch per step: exact for any `ClientData`
    (augmentation draws from the generator between batches, as it does one by one)."""
    def epochs_of(data: ClientData, generator: torch.Generator) -> Iterator:
        return itertools.chain.from_iterable(data.batches(batch_size, generator)
                                             for _ in range(epochs))

    streams: list[Iterator | None] = [epochs_of(d, g) for d, g in zip(datas, generators)]
    while True:
        taken: dict[int, list[tuple[int, Tensor, Tensor]]] = {}
        for position, stream in enumerate(streams):
            if stream is None:
                continue
            batch = next(stream, None)
            if batch is None:
                streams[position] = None
                continue
            taken.setdefault(len(batch[0]), []).append((position, *batch))
        if not taken:
            return
        yield [Bucket([p for p, _, _ in items], torch.stack([x for _, x, _ in items]),
                      torch.stack([y for _, _, y in items]))
               for _, items in sorted(taken.items(), reverse=True)]


# ------------------------------------------------------------------------------- optimisers


class UnsupportedOptimizer(ValueError):
    """The client optimiser has no elementwise stacked form here (the message says why)."""


@dataclass(frozen=True)
class StackedSettings:
    """The settings of a client's `torch.optim.SGD` or `torch.optim.Adam`, which the stacked
    optimiser applies to every client of the group."""

    kind: str  # sgd | adam
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    eps: float = 1e-8  # adam

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> StackedSettings:
        """The settings of `optimizer`, which must train exactly `params` in one group, with
        the options implemented here (plain or heavy-ball SGD, Adam with L2 weight decay)."""
        if len(optimizer.param_groups) != 1:
            raise UnsupportedOptimizer("the optimiser has several parameter groups")
        group = optimizer.param_groups[0]
        if [id(p) for p in group["params"]] != [id(p) for p in params]:
            raise UnsupportedOptimizer("the optimiser does not train every parameter that "
                                       "requires a gradient")
        if group.get("maximize") or group.get("differentiable") or torch.is_tensor(group["lr"]):
            raise UnsupportedOptimizer("maximize, differentiable or a tensor learning rate")
        if type(optimizer) is torch.optim.SGD:
            if group["nesterov"] or group["dampening"]:
                raise UnsupportedOptimizer("SGD with nesterov or dampening")
            return cls("sgd", group["lr"], group["weight_decay"], group["momentum"])
        if type(optimizer) is torch.optim.Adam:
            if group["amsgrad"] or group.get("decoupled_weight_decay"):
                raise UnsupportedOptimizer("Adam with amsgrad or decoupled weight decay")
            return cls("adam", group["lr"], group["weight_decay"],
                       betas=tuple(group["betas"]), eps=group["eps"])
        raise UnsupportedOptimizer(f"{type(optimizer).__name__} (grouped: SGD and Adam)")


class StackedOptimizer:
    """SGD or Adam on stacked weights (K, ...), each client's update the one its own torch
    optimiser would make. `step(params, grads, clients)` updates the clients `clients` names
    (their positions, in the order of `grads`' rows; None: all of them, in order) and leaves
    the others exactly as they are: weights, moments and step counts."""

    def __init__(self, settings: StackedSettings, params: dict[str, Tensor],
                 num_clients: int) -> None:
        self.settings = settings
        self.state: dict[str, dict[str, Tensor]] = {name: {} for name in params}
        for name, param in params.items():
            if settings.kind == "sgd" and settings.momentum:
                self.state[name]["momentum"] = torch.zeros_like(param)
            elif settings.kind == "adam":
                self.state[name]["exp_avg"] = torch.zeros_like(param)
                self.state[name]["exp_avg_sq"] = torch.zeros_like(param)
        device = next(iter(params.values())).device if params else None
        self.steps = torch.zeros(num_clients, dtype=torch.float64, device=device)
        self.started = [False] * num_clients  # whether a client's torch optimiser has state

    # torch's names of the per-parameter state, and ours
    TORCH_KEYS = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

    @torch.no_grad()
    def load(self, saved: Sequence[dict | None], names: Sequence[str]) -> None:
        """Each client's torch optimiser state (`state_dict()` of an optimiser over the
        parameters `names`, in order; None: a fresh optimiser) into its rows, as
        `load_state_dict` gives the client's own optimiser (`train.keep_optimizer_state`)."""
        for k, state_dict in enumerate(saved):
            for index, entry in (state_dict or {}).get("state", {}).items():
                name = names[int(index)]
                for key, value in entry.items():
                    if key == "step":
                        self.steps[k] = float(value)
                    elif self.TORCH_KEYS.get(key) in self.state[name] and value is not None:
                        mine = self.state[name][self.TORCH_KEYS[key]]
                        mine[k] = value.to(device=mine.device, dtype=mine.dtype)
                self.started[k] = True

    def torch_state(self, k: int, params: dict[str, Tensor]) -> dict[Tensor, dict[str, Any]]:
        """Client k's state in torch's form, keyed by the model's parameters (`params`: by
        name): what its own optimiser would hold after the same steps."""
        if not (self.started[k] or self.steps[k] > 0):
            return {}
        torch_key = {mine: theirs for theirs, mine in self.TORCH_KEYS.items()}
        out = {}
        for name, param in params.items():
            entry = {torch_key[key]: rows[k].clone() for key, rows in self.state[name].items()}
            if self.settings.kind == "adam":
                entry = {"step": torch.tensor(float(self.steps[k]),
                                              dtype=torch.get_default_dtype()), **entry}
            if entry:
                out[param] = entry
        return out

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor],
             clients: Tensor | None = None) -> None:
        if clients is None:
            self.steps += 1
        else:
            self.steps.index_add_(0, clients, torch.ones_like(clients, dtype=self.steps.dtype))
        update = self._sgd if self.settings.kind == "sgd" else self._adam
        for name, param in params.items():
            state = self.state[name]
            if clients is None:  # in place, as torch does
                update(param, grads[name], state, self.steps)
                continue
            # the stepping clients' rows, updated as copies and written back
            mine = param.index_select(0, clients)
            their_state = {key: value.index_select(0, clients) for key, value in state.items()}
            update(mine, grads[name], their_state, self.steps.index_select(0, clients))
            param.index_copy_(0, clients, mine)
            for key, value in their_state.items():
                state[key].index_copy_(0, clients, value)

    def _sgd(self, param: Tensor, grad: Tensor, state: dict[str, Tensor],
             steps: Tensor) -> None:
        """torch.optim.SGD's update (no dampening, no Nesterov), in place."""
        s = self.settings
        if s.weight_decay != 0:
            grad = grad.add(param, alpha=s.weight_decay)
        if "momentum" in state:
            # torch starts the buffer as a copy of the first gradient: 0·β + g is that
            grad = state["momentum"].mul_(s.momentum).add_(grad)
        param.add_(grad, alpha=-s.lr)

    def _adam(self, param: Tensor, grad: Tensor, state: dict[str, Tensor],
              steps: Tensor) -> None:
        """torch.optim.Adam's update (L2 weight decay, no AMSGrad), in place, with each
        client's own step count in the bias corrections (in double, as torch computes them
        from Python floats)."""
        s = self.settings
        beta1, beta2 = s.betas
        if s.weight_decay != 0:
            grad = grad.add(param, alpha=s.weight_decay)
        exp_avg = state["exp_avg"].lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = (-1,) + (1,) * (param.dim() - 1)
        step_size = (s.lr / (1 - beta1 ** steps)).to(param.dtype).view(shape)
        correction2_sqrt = (1 - beta2 ** steps).sqrt().to(param.dtype).view(shape)
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(s.eps)
        param.sub_(step_size * exp_avg / denom)


# ------------------------------------------------------------------------------- training


@dataclass
class GroupOutcome:
    """What the group's training leaves: trained weights (K, ...) by name, each client's summed
    batch losses (K,) and its optimiser steps (K,)."""

    params: dict[str, Tensor]
    loss_sums: Tensor
    steps: list[int]


def train_group(
    loss: GroupLoss, params: dict[str, Tensor], constants: dict[str, Tensor], own: Any,
    shared: Any, batches: Iterator[list[Bucket]], optimizer: StackedOptimizer,
) -> GroupOutcome:
    """Train the group: per step one vectorised gradient of `loss` per bucket, then one
    stacked optimiser step for the clients that took a batch. `params`, `constants` and `own`
    are stacked along the client dimension (K, ...), `shared` is passed to every client as it
    is (`split_extras`); `params` are updated in place."""
    num_clients = len(next(iter(params.values()))) if params else 0
    gradient = torch.func.vmap(torch.func.grad_and_value(loss),
                               in_dims=(0, 0, 0, 0, 0, None), randomness="error")
    device = next(iter(params.values())).device if params else torch.device("cpu")
    loss_sums = torch.zeros(num_clients, device=device)
    steps = [0] * num_clients
    everyone = list(range(num_clients))
    for buckets in batches:
        if len(buckets) == 1 and buckets[0].positions == everyone:  # the common step
            bucket = buckets[0]
            grads, values = gradient(params, constants, bucket.x, bucket.y, own, shared)
            loss_sums += values.detach()
            clients = None
        else:  # sub-groups of one batch size; their gradients in the order of `clients`
            parts, wheres = [], []
            for bucket in buckets:
                where = torch.as_tensor(bucket.positions, device=device)
                part, values = gradient(index_tree(params, where), index_tree(constants, where),
                                        bucket.x, bucket.y, index_tree(own, where), shared)
                loss_sums.index_add_(0, where, values.detach())
                parts.append(part)
                wheres.append(where)
            clients = torch.cat(wheres)
            grads = {n: torch.cat([part[n] for part in parts]) for n in params}
        for bucket in buckets:
            for position in bucket.positions:
                steps[position] += 1
        optimizer.step(params, grads, clients)
    return GroupOutcome(params, loss_sums, steps)


# ------------------------------------------------------------------------------- what fits


# Modules whose training forward cannot be vmapped per client: BatchNorm updates running
# statistics in place (and normalises over the batch it sees), dropout draws from the global RNG.
_UNGROUPABLE = {
    nn.modules.batchnorm._BatchNorm: "BatchNorm layers (batch statistics, running buffers "
                                     "updated in place)",
    nn.modules.dropout._DropoutNd: "dropout (draws from the global RNG)",
}


def model_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot be trained in a group (None: it can)."""
    for module in model.modules():
        for kind, why in _UNGROUPABLE.items():
            if isinstance(module, kind):
                return f"the model has {why}"
    return None


def group_bytes(model: nn.Module, sample: Tensor, size: int, optimizer: str) -> int:
    """Estimated memory of training `size` clients at once on batches like `sample`
    (B, ...): per client its weights, gradients, optimiser moments and one stacked extras
    copy, plus the forward's activations kept for backward (measured on `sample`), twice."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 3 + (2 if optimizer == "adam" else 1)
    activations = [0]

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        tensors = output if isinstance(output, (tuple, list)) else [output]
        activations[0] += sum(t.numel() * t.element_size() for t in tensors
                              if torch.is_tensor(t))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return size * (copies * param_bytes + 2 * activations[0] + sample.numel()
                   * sample.element_size())


def largest_group(model: nn.Module, sample: Tensor, budget_bytes: int, optimizer: str) -> int:
    """The largest K whose `group_bytes` fits in `budget_bytes` (at least 1)."""
    one = group_bytes(model, sample, 1, optimizer)
    return max(1, math.floor(budget_bytes / max(one, 1)))
