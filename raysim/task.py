"""A Task is everything a run needs besides the engine: data, partition, model factory, and
the run's differential privacy resolved before Ray (`privacy_plan`, on `TaskInfo.privacy`).

With `evaluation.personal` the partition holds the clients' training parts (its
`personal` field their test and validation parts, `raysim.data.personal`). With
`model.heterogeneous` clients train different architectures, the members of a group: client k
trains member `member_index(config, k)`, built by `new_model(..., member=i)` and initialised
from its own seed (member 0 from the seed of every homogeneous run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raysim.algorithm import Algorithm, TaskInfo, task_kind
from raysim.config import Config
from raysim.data import Dataset, DatasetRequest, Partition, make_partition
from raysim.data.datasets import with_validation
from raysim.data.domain_split import hold_out_domains
from raysim.data.personal import split_personal
from raysim.methods.leakage import upload_kind
from raysim.nn.heterogeneous import build_member, common_feature_dim, group_members, member_of
from raysim.nn.models import build_model
from raysim.registry import DATASETS, MODELS, algorithm_class
from raysim.seeding import MODEL_INIT, derive_seed, round_clients


@dataclass(frozen=True)
class Task:
    dataset: Dataset
    partition: Partition
    info: TaskInfo
    members: tuple[str, ...] = ()  # the clients' architectures by member index (one: same model)
    assign: str = "by_client_id"  # model.heterogeneous.assign: which client trains which

    def member_of(self, client_id: int) -> int:
        """The member (index into `members`) client `client_id` trains."""
        if len(self.members) <= 1:
            return 0
        return member_of(client_id, self.info.num_clients, len(self.members), self.assign)


# What the driver holds per registered client of an in-memory dataset while partitioning (the
# partitioners' per-client arrays, the flat split, sizes and costs), for the memory check.
BYTES_PER_CLIENT = 400


def dataset_request(config: Config) -> DatasetRequest:
    """What the config's dataset plug-in is checked and loaded with."""
    data = config.data
    return DatasetRequest(
        dataset=data.dataset, params=data.params, root=data.root, download=data.download,
        test_fraction=data.test_fraction, val_fraction=data.val_fraction,
        num_clients=data.partition.num_clients, protocol=config.evaluation.protocol)


def build_task(config: Config) -> Task:
    data = config.data
    dataset = DATASETS[data.dataset].load(dataset_request(config))
    if data.val_fraction and dataset.val is None and dataset.train is not None:
        # every dataset without a validation split of its own, plug-ins included
        dataset = with_validation(dataset, data.val_fraction)
    dataset = hold_out_domains(dataset, data.test_domains, data.train_domains)
    part = data.partition
    if dataset.clients is not None:  # generated on the workers: only the sizes are known
        partition = Partition.of_sizes(dataset.clients.sizes, dataset.spec.num_classes)
    else:
        check_driver_memory(part.num_clients)
        partition = make_partition(
            partition_labels(dataset), dataset.spec.num_classes, kind=part.kind,
            num_clients=part.num_clients, seed=config.seed, params=part.params,
            long_tail_rho=data.long_tail.rho, domains=dataset.train.domain,
            clients=dataset.train.client,
        )
    personal = config.evaluation.personal
    if personal is not None:
        partition = personal_partition(config, dataset, partition)
    spec = dataset.spec
    info = TaskInfo(
        num_classes=spec.num_classes,
        input_shape=tuple(spec.input_shape),
        feature_dim=task_feature_dim(config, spec.input_shape, spec.num_classes),
        train=config.train,
        seed=config.seed,
        kind=spec.task,
        num_clients=part.num_clients,
        protocol=config.evaluation.protocol,
        finetune_epochs=personal.finetune_epochs if personal is not None else 0,
        privacy=privacy_plan(config, partition.sizes),
    )
    het = config.model.heterogeneous
    return Task(dataset=dataset, partition=partition, info=info, members=model_members(config),
                assign=het.assign if het is not None else "by_client_id")


def privacy_plan(config: Config, sizes: np.ndarray) -> Any:
    """The run's differential privacy (`raysim.methods.privacy.PrivacyPlan`: σ calibrated to
    `privacy.target_epsilon`, δ chosen), or None when off; a ConfigError where the method or
    the target cannot be met. `sizes`: each client's training samples (local DP's δ is per
    client dataset, and a client's ε composes over the rounds it takes part in)."""
    privacy = config.privacy
    if privacy.mechanism == "none":
        return None
    from raysim.methods.privacy import plan_privacy  # dp-accounting: only runs with privacy

    algorithm = algorithm_class(config.algorithm.name)
    num_clients, per_round = config.data.partition.num_clients, config.clients_per_round
    participations = None
    if privacy.mechanism == "local":
        counts = np.zeros(num_clients, dtype=np.int64)
        for r in range(1, config.rounds + 1):
            counts[round_clients(config.seed, r, num_clients, per_round,
                                 privacy.sampling == "poisson")] += 1
        participations = int(counts.max())
    return plan_privacy(
        privacy, method=config.algorithm.name, uploads=upload_kind(algorithm),
        weighted_mean=algorithm.weighted_mean, num_clients=num_clients,
        clients_per_round=per_round, rounds=config.rounds, task=task_kind(config),
        weights_shared=algorithm.shares != "none", records=int(np.min(sizes)),
        participations=participations,
        own_server_update=algorithm.server_update is not Algorithm.server_update)


def personal_partition(config: Config, dataset: Dataset, partition: Partition) -> Partition:
    """The partition whose clients hold their training parts, their test (and validation)
    parts beside them (`evaluation.personal`); a ConfigError where a client gets no sample of
    a part it needs. A dataset that generates its clients is split on the workers."""
    train = partition_labels(dataset) if dataset.train is not None else np.empty(0, np.int64)
    test, val = (sample_labels(split.y) if split is not None else None
                 for split in (dataset.test, dataset.val))
    return split_personal(partition, train, config.evaluation.personal, config.seed,
                          test_labels=test, val_labels=val)


def task_feature_dim(config: Config, input_shape, num_classes: int) -> int | None:
    """The width of the models' features: the group's common one (None where its members
    differ), or the model's (None: it has no feature head; such models are not built just to
    say so)."""
    het = config.model.heterogeneous
    if het is not None:
        return common_feature_dim(het, tuple(input_shape), num_classes)
    if not MODELS[config.model.name].has_feature_head:
        return None
    return build_model(config.model.name, input_shape, num_classes,
                       config.model.params).feature_dim


def check_driver_memory(num_clients: int) -> None:
    """Refuse, before any work, a partition of an in-memory dataset that the driver's memory
    cannot hold (ValueError: what it needs, what there is, what to do instead)."""
    available = _available_memory()
    needed = num_clients * BYTES_PER_CLIENT
    if available is not None and needed > available // 2:
        raise ValueError(
            f"num_clients={num_clients} needs about {needed / 2**30:.1f} GiB in the driver to "
            f"partition an in-memory dataset, and {available / 2**30:.1f} GiB is available: "
            "lower num_clients, or use a dataset that generates its clients (synthetic_fedprox)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def partition_labels(dataset: Dataset) -> np.ndarray:
    """One label per training sample for the partitioners and label histograms: the class, or
    for segmentation masks whether the image shows any foreground (0/1)."""
    return sample_labels(dataset.train.y)


def sample_labels(y: np.ndarray) -> np.ndarray:
    """One label per sample of a split's targets `y` (see `partition_labels`)."""
    if y.ndim == 1:
        return y
    return (y.reshape(len(y), -1).max(axis=1) > 0).astype(np.int64)


def model_members(config: Config) -> tuple[str, ...]:
    """The clients' architectures by member index: the members of `model.heterogeneous`'s
    group, or the one model of `model.name`."""
    het = config.model.heterogeneous
    if het is None:
        return (config.model.name,)
    return group_members(het)


def member_index(config: Config, client_id: int) -> int:
    """The member (index into `model_members`) client `client_id` trains: 0 in a homogeneous
    run, else by `model.heterogeneous.assign`."""
    het = config.model.heterogeneous
    if het is None:
        return 0
    return member_of(client_id, config.data.partition.num_clients, len(group_members(het)),
                     het.assign)


def new_model(config: Config, info: TaskInfo, algorithm=None, member: int = 0) -> nn.Module:
    """The model of `config.model` (of its group's `member` in a heterogeneous run), with the
    modules `algorithm` adds to it (FedBCS: style recalibration and fusion layers)."""
    het = config.model.heterogeneous
    if het is None:
        model = build_model(config.model.name, info.input_shape, info.num_classes,
                            config.model.params)
    else:
        model = build_member(model_members(config)[member], info.input_shape, info.num_classes,
                             het.feature_dim)
    return algorithm.prepare_model(model) if algorithm is not None else model


def initial_model(config: Config, info: TaskInfo, algorithm=None, member: int = 0) -> nn.Module:
    """The round-0 model (of `member`), initialised from the run seed without touching global
    RNG state. Member 0 keeps the seed of every homogeneous run, so their results stay the
    same; each other member has its own."""
    seed = derive_seed(config.seed, MODEL_INIT, *([member] if member else []))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_model(config, info, algorithm, member)


def make_algorithm(config: Config, info: TaskInfo, device: torch.device):
    return algorithm_class(config.algorithm.name)(config.algorithm.params, info, device)


def has_global_model(config: Config) -> bool:
    """Whether the method's clients share one whole model, which global evaluation scores
    (`Algorithm.shares`); the others keep all or part of theirs (personalised evaluation)."""
    return algorithm_class(config.algorithm.name).shares == "model"


def keeps_client_state(config: Config) -> bool:
    """Whether the engine keeps per-client state between rounds (the algorithm's own, or the
    clients' optimiser state)."""
    return algorithm_class(config.algorithm.name).stateful or config.train.keep_optimizer_state
