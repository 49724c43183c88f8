"""Client groups on a worker (`train.client_group` = K): the sampled clients of a round are
cut into groups of K in client-id order (`client_groups`), and a worker trains each group it
receives at once (`train_clients`), with `raysim.nn.client_groups`' vectorised trainer.

Group composition depends only on the sampled clients and K, never on the worker count or on
scheduling, so a config gives the same bits with any number of workers, after a resume and
after a dead worker's group is replayed. Grouped and one-by-one training agree to float
tolerance (docs/client_groups.md states the measured figures).

For one client the method's hooks run as they do one by one (`load_weights`,
`before_training`, then `loss_extras` on the loaded model), the batch loop is replaced by the
group's (the method's `functional_loss`, vmapped; the optimiser `client_optimizer` builds,
stacked), and `after_training` and `upload` run per client on its trained weights. A method
or model that cannot be grouped (`why_one_by_one`) trains one client at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raysim.algorithm import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientUpdate,
    LocalRound,
    TaskInfo,
    ungroupable_reason,
)
from raysim.config import Config, ConfigError, TrainConfig
from raysim.nn.client_groups import (
    StackedOptimizer,
    StackedSettings,
    UnsupportedOptimizer,
    group_batches,
    group_bytes,
    largest_group,
    model_blocker,
    split_extras,
    stack_trees,
    train_group,
)
from raysim.nn.training import ClientData
from raysim.task import make_algorithm, model_members, new_model


def client_groups(client_ids: Sequence[int], size: int) -> list[list[int]]:
    """The round's sampled clients in client-id order, cut into groups of `size` (the last
    may be smaller): the units the driver hands to workers."""
    ordered = sorted(client_ids)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def assign_groups(client_ids: Sequence[int], costs: Sequence[int], size: int,
                  num_workers: int) -> list[list[int]]:
    """Each worker's clients (sorted), as whole groups of `client_groups`: the costliest
    group first, each to the least loaded worker. A worker's own `client_groups(ids, size)`
    gives back exactly the groups it was handed (they are runs of consecutive sampled ids, only
    the last one short), so what a group holds never depends on the worker count."""
    loads, assigned = [0] * num_workers, [[] for _ in range(num_workers)]
    groups = client_groups(client_ids, size)
    for group in sorted(groups, key=lambda g: (-sum(int(costs[c]) for c in g), g[0])):
        worker = min(range(num_workers), key=lambda i: (loads[i], i))
        assigned[worker] += group
        loads[worker] += sum(int(costs[c]) for c in group)
    return [sorted(ids) for ids in assigned]


def why_one_by_one(algorithm: Algorithm, model: nn.Module) -> str | None:
    """Why clients of `algorithm` on `model` train one at a time even with K > 1 (None: they
    are grouped); one line naming the method or the model."""
    name = type(algorithm).__name__
    reason = ungroupable_reason(algorithm)
    if reason is not None:
        return f"{name} is not groupable: {reason}"
    blocker = model_blocker(model)
    if blocker is not None:
        return f"{blocker}, so {name}'s clients cannot share one vectorised step"
    return None


def check_client_group(algorithm: Algorithm, model: nn.Module, train: TrainConfig) -> str | None:
    """Before Ray: a `ConfigError` where `train.client_group_strict` demands groups that this
    method or model cannot form; else the one-line note to print where K > 1 falls back to one
    by one (None: nothing to say)."""
    if train.client_group <= 1:
        return None
    reason = why_one_by_one(algorithm, model)
    if reason is None:
        return None
    if train.client_group_strict:
        raise ConfigError(f"train.client_group_strict: {reason}; set client_group: 1 or "
                          "client_group_strict: false to train one client at a time")
    return f"train.client_group = {train.client_group}: clients train one by one ({reason})"


def check_group_memory(model: nn.Module, input_shape: Sequence[int], train: TrainConfig,
                       available_bytes: int | None) -> None:
    """Before Ray: a `ConfigError` naming the K that fits where a group of
    `train.client_group` clients of `model` would need more than `available_bytes` (a
    worker's share of memory; None: unknown, no check)."""
    size = train.client_group
    if size <= 1 or available_bytes is None:
        return
    sample = torch.zeros(train.batch_size, *input_shape)
    need = group_bytes(model, sample, size, train.optimizer)
    if need > available_bytes:
        fits = largest_group(model, sample, available_bytes, train.optimizer)
        raise ConfigError(f"train.client_group: {size} clients of this model train in about "
                          f"{need / 2**20:,.0f} MiB, more than a worker's "
                          f"{available_bytes / 2**20:,.0f} MiB; client_group: {fits} fits")


def check_grouping(config: Config, info: TaskInfo,
                   available_bytes: int | None = None) -> str | None:
    """The checks of `train.client_group` before Ray, for a whole config: `check_client_group`
    and `check_group_memory` on every architecture the clients train (`available_bytes`: one
    worker's share of memory). Returns the one-line note to print where clients fall back to
    one by one (None: nothing to say); raises `ConfigError` for what cannot run."""
    if config.train.client_group <= 1:
        return None
    algorithm = make_algorithm(config, info, torch.device("cpu"))
    for member in range(len(model_members(config))):
        model = new_model(config, info, algorithm, member)
        note = check_client_group(algorithm, model, config.train)
        if note is not None:
            return note
        check_group_memory(model, info.input_shape, config.train, available_bytes)
    return None


# what the caller does with each client's update while the model still holds that client's
# trained weights (privacy, diagnostics): (its position in the lists given, update) → result
Finish = Callable[[int, ClientUpdate], Any]


def train_clients(
    algorithm: Algorithm, models: Sequence[nn.Module], datas: Sequence[ClientData],
    contexts: Sequence[ClientContext], broadcast: Broadcast, states: Sequence[Any],
    finish: Finish | None = None,
) -> list[Any]:
    """Each client's update (or what `finish` makes of it), in the order given. Clients that
    share a model (architecture) train as one group; where `why_one_by_one` says why not, one
    after another. `finish(position, update)` runs right after each client's `upload`, while
    `models[position]` holds that client's trained weights, as it does after `client_update`
    one by one."""
    finish = finish or (lambda position, update: update)
    results: list[Any] = [None] * len(contexts)
    by_model: dict[int, list[int]] = {}
    for position, model in enumerate(models):
        by_model.setdefault(id(model), []).append(position)
    for positions in by_model.values():
        model = models[positions[0]]
        if len(positions) > 1 and why_one_by_one(algorithm, model) is None:
            part = [(datas[i], contexts[i], states[i]) for i in positions]
            done = train_group_of(algorithm, model, part, broadcast,
                                  lambda k, update, at=positions: finish(at[k], update))
        else:
            done = [finish(i, algorithm.client_update(contexts[i], model, broadcast, datas[i],
                                                      states[i])) for i in positions]
        for position, result in zip(positions, done, strict=True):
            results[position] = result
    return results


def train_group_of(
    algorithm: Algorithm, model: nn.Module,
    clients: Sequence[tuple[ClientData, ClientContext, Any]], broadcast: Broadcast,
    finish: Finish | None = None,
) -> list[Any]:
    """The updates of clients that share `model`, trained as one group (each passed through
    `finish(k, update)` while the model holds client k's trained weights)."""
    steps = [LocalRound(ctx, model, broadcast, data, state) for data, ctx, state in clients]
    trained_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained_names = list(trained_params)
    # every client starts from the broadcast unless the method loads its own part
    same_start = type(algorithm).load_weights is Algorithm.load_weights
    if same_start:
        algorithm.load_weights(steps[0])
    starts, constants, extras = [], [], []
    for step in steps:  # each client's start, as one by one: its weights, then its hooks
        if not same_start:
            algorithm.load_weights(step)
        step.prepared = algorithm.before_training(step)
        extras.append(algorithm.loss_extras(step))
        if same_start and starts:
            starts.append(starts[0])
            constants.append(constants[0])
            continue
        weights = model.state_dict()
        starts.append({n: weights[n].clone() for n in trained_names})
        constants.append({n: t.clone() for n, t in weights.items() if n not in starts[-1]})
    optimizer = algorithm.client_optimizer(steps[0])
    try:
        settings = StackedSettings.of(optimizer, [p for p in model.parameters()
                                                  if p.requires_grad])
    except UnsupportedOptimizer as reason:
        raise RuntimeError(f"{type(algorithm).__name__}'s client optimiser cannot be "
                           f"grouped: {reason}") from None
    device, train = steps[0].ctx.device, steps[0].ctx.train
    params, fixed = stack_trees(starts), stack_trees(constants)
    own, shared, rebuild = split_extras(extras, device)

    def loss(p: dict, c: dict, x: Tensor, y: Tensor, mine: list, theirs: list) -> Tensor:
        return algorithm.functional_loss(model, {**p, **c}, x, y, rebuild(mine, theirs))

    model.train()
    batches = group_batches([step.data for step in steps], [step.ctx.generator for step in steps],
                            train.batch_size, train.local_epochs)
    group_optimizer = StackedOptimizer(settings, params, len(steps))
    keep = train.keep_optimizer_state  # each client's optimiser goes on from its last round
    if keep:
        group_optimizer.load([(step.state or {}).get("optimizer") for step in steps],
                             trained_names)
    outcome = train_group(loss, params, fixed, own, shared, batches, group_optimizer)
    losses = outcome.loss_sums.tolist()
    own_state = model.state_dict(keep_vars=True)
    targets = [(own_state[n], stacked) for n, stacked in {**outcome.params, **fixed}.items()]
    updates = []
    for k, step in enumerate(steps):
        with torch.no_grad():  # client k's trained weights into the model its hooks read
            for tensor, stacked in targets:
                tensor.copy_(stacked[k])
        taken = outcome.steps[k]
        if keep:  # what client k's own optimiser would hold, for its `next_state`
            optimizer.state = defaultdict(dict, group_optimizer.torch_state(k, trained_params))
        step.optimizer, step.num_steps = optimizer, taken
        step.metrics = {"train_loss": losses[k] / max(taken, 1), "train_steps": float(taken)}
        if not model.training:
            model.train()
        step.trained = algorithm.after_training(step)
        update = algorithm.upload(step)
        updates.append(finish(k, update) if finish is not None else update)
    return updates
