"""One local Ray for the whole session (2 CPUs, like CI), real torch, small data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Worker processes import test-only algorithms (`test_algorithms:Counting`) by module path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def small_config(**overrides):
    """A seconds-long digits run: 12 clients, 4 per round, 3 rounds, 1 local epoch."""
    from raysim.config import config_from_dict

    raw = {
        "name": "test",
        "seed": 3,
        "rounds": 3,
        "clients_per_round": 4,
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5,
                                                      "num_clients": 12}},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "resources": {"num_workers": 2, "worker": {"num_cpus": 1}},
        "logging": {"progress": False},
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])
