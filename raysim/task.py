"""A Task is everything a run needs besides the engine: data, partition, model factory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysim.algorithm import TaskInfo
from raysim.config import Config
from raysim.data import Dataset, Partition, load_dataset, make_partition
from raysim.models import build_model
from raysim.registry import algorithm_class
from raysim.seeding import MODEL_INIT, derive_seed


@dataclass(frozen=True)
class Task:
    dataset: Dataset
    partition: Partition
    info: TaskInfo


def build_task(config: Config) -> Task:
    data = config.data
    dataset = load_dataset(data.dataset, data.root, data.download, data.test_fraction)
    part = data.partition
    partition = make_partition(
        dataset.train.y, dataset.spec.num_classes, kind=part.kind, num_clients=part.num_clients,
        seed=config.seed, alpha=part.alpha, classes_per_client=part.classes_per_client,
        min_size=part.min_size, long_tail_rho=data.long_tail.rho,
        domains=dataset.train.domain, within=part.within,
    )
    probe = build_model(config.model.name, dataset.spec.input_shape, dataset.spec.num_classes)
    info = TaskInfo(
        num_classes=dataset.spec.num_classes,
        input_shape=tuple(dataset.spec.input_shape),
        feature_dim=probe.feature_dim,
        train=config.train,
        seed=config.seed,
    )
    return Task(dataset=dataset, partition=partition, info=info)


def new_model(config: Config, info: TaskInfo) -> nn.Module:
    return build_model(config.model.name, info.input_shape, info.num_classes)


def initial_model(config: Config, info: TaskInfo) -> nn.Module:
    """The round-0 global model, initialised from the run seed without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, MODEL_INIT))
        return new_model(config, info)


def make_algorithm(config: Config, info: TaskInfo, device: torch.device):
    return algorithm_class(config.algorithm.name)(config.algorithm.params, info, device)
