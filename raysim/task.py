"""A Task is everything a run needs besides the engine: data, partition, model factory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raysim.algorithm import TaskInfo
from raysim.config import Config
from raysim.data import Dataset, DatasetRequest, Partition, make_partition
from raysim.data.datasets import with_validation
from raysim.data.domain_split import hold_out_domains
from raysim.nn.models import build_model
from raysim.registry import DATASETS, MODELS, algorithm_class
from raysim.seeding import MODEL_INIT, derive_seed


@dataclass(frozen=True)
class Task:
    dataset: Dataset
    partition: Partition
    info: TaskInfo


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
    spec = dataset.spec
    feature_dim = None  # models without a feature head are not built just to say so
    if MODELS[config.model.name].has_feature_head:
        feature_dim = build_model(config.model.name, spec.input_shape, spec.num_classes,
                                  config.model.params).feature_dim
    info = TaskInfo(
        num_classes=spec.num_classes,
        input_shape=tuple(spec.input_shape),
        feature_dim=feature_dim,
        train=config.train,
        seed=config.seed,
        kind=spec.task,
        num_clients=part.num_clients,
        protocol=config.evaluation.protocol,
    )
    return Task(dataset=dataset, partition=partition, info=info)


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
    y = dataset.train.y
    if y.ndim == 1:
        return y
    return (y.reshape(len(y), -1).max(axis=1) > 0).astype(np.int64)


def new_model(config: Config, info: TaskInfo, algorithm=None) -> nn.Module:
    """The model of `config.model`, with the modules `algorithm` adds to it (FedBCS: style
    recalibration and fusion layers)."""
    model = build_model(config.model.name, info.input_shape, info.num_classes,
                        config.model.params)
    return algorithm.prepare_model(model) if algorithm is not None else model


def initial_model(config: Config, info: TaskInfo, algorithm=None) -> nn.Module:
    """The round-0 global model, initialised from the run seed without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, MODEL_INIT))
        return new_model(config, info, algorithm)


def make_algorithm(config: Config, info: TaskInfo, device: torch.device):
    return algorithm_class(config.algorithm.name)(config.algorithm.params, info, device)


def keeps_client_state(config: Config) -> bool:
    """Whether the engine keeps per-client state between rounds (the algorithm's own, or the
    clients' optimiser state)."""
    return algorithm_class(config.algorithm.name).stateful or config.train.keep_optimizer_state
