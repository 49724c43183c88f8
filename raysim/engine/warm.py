"""Warm workers: the actors of a finished run, kept for the next run that asks for the same
actors (`PoolShape`); it reloads them with its own config, dataset and model instead of
starting processes that import torch and raysim again.

Two places keep them, both booked by a `PoolBook`:

- `process_pool()`, in this process, for the trials of a sweep: Tune gives a finished trial's
  process (and its placement group) to the next trial with the same resources, and the actors
  the trial created inside that group wait there for it.
- `cluster_pool()`, on the cluster `raysim up` started (`raysim.engine.head`): detached actors
  that outlive a launch, booked by a registry actor, so the next `raysim launch` finds them.

A reloaded actor runs its class's `__init__` again on the new run's arguments, so a warm run
gives the cold run's bits (tests/engine/test_warm.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from raysim.engine.head import process_alive

REGISTRY_NAME = "raysim-warm-pool"
REGISTRY_NAMESPACE = "raysim"


@dataclass(frozen=True)
class PoolShape:
    """What a pool's actors were created with, which a reload cannot change."""

    num_workers: int
    worker: tuple[float, float]  # CPUs, GPUs of each worker
    server: tuple[float, float]
    server_pinned: bool  # on the driver's node (a disk store writes into the run directory)

    @classmethod
    def of(cls, resources: Any, num_workers: int, server_pinned: bool) -> PoolShape:
        return cls(num_workers, (resources.worker.num_cpus, resources.worker.num_gpus),
                   (resources.server.num_cpus, resources.server.num_gpus), server_pinned)

    def describe(self) -> str:
        (cpus, gpus), (server_cpus, server_gpus) = self.worker, self.server
        pinned = ", pinned" if self.server_pinned else ""
        return (f"{self.num_workers} worker(s) × {cpus:g} CPU/{gpus:g} GPU, server "
                f"{server_cpus:g} CPU/{server_gpus:g} GPU{pinned}")


@dataclass
class Pool:
    """One run's actors between runs. `holds`: what they last loaded (dataset and model);
    `holder`: the driver using them, (host, pid), None while parked."""

    shape: PoolShape
    workers: list[Any]
    server: Any
    holds: str
    holder: tuple[str, int] | None = None
    number: int = 0


@dataclass
class Lent:
    """What `PoolBook.lend` gives a run: a pool (None: the run starts its own actors), a
    note saying why it is not fully warm, and parked actors that no longer fit (to kill)."""

    pool: Pool | None
    note: str | None = None
    retired: list[Any] = field(default_factory=list)


class PoolBook:
    """Which pools are parked and which are lent. Plain Python: kept in this process for a
    sweep's trials, in a detached registry actor on a `raysim up` cluster."""

    def __init__(self) -> None:
        self.pools: list[Pool] = []
        self.numbers = 0

    def lend(self, shape: PoolShape, holds: str, holder: tuple[str, int]) -> Lent:
        self._reclaim()
        parked = [p for p in self.pools if p.holder is None]
        match = next((p for p in parked if p.shape == shape), None)
        if match is not None:
            match.holder = holder
            note = None if match.holds == holds else (
                f"the warm workers held {match.holds}; they reload with {holds} (the same "
                "processes, no new start)")
            return Lent(dataclasses.replace(match), note)
        if parked:  # they hold resources the run's own actors may need
            self.pools = [p for p in self.pools if p.holder is not None]
            retired = [a for p in parked for a in (*p.workers, p.server)]
            return Lent(None, f"the warm pool has {parked[0].shape.describe()}; this run asks "
                        f"for {shape.describe()}: a fresh pool starts", retired)
        if self.pools:
            busy = self.pools[0].holder
            return Lent(None, f"the warm pool is in use by another run (process {busy[1]} on "
                        f"{busy[0]}): this run starts a pool of its own")
        return Lent(None)

    def give(self, pool: Pool) -> None:
        """Park `pool` (a lent one, or a run's fresh one) for the next run."""
        pool = dataclasses.replace(pool, holder=None)
        if not pool.number:
            self.numbers += 1
            pool.number = self.numbers
        self.pools = [p for p in self.pools if p.number != pool.number] + [pool]

    def drop(self, parked_only: bool = True) -> list[Any]:
        """Forget the parked pools (every pool with `parked_only=False`); returns their
        actors, to kill."""
        gone = [p for p in self.pools if p.holder is None or not parked_only]
        self.pools = [p for p in self.pools if p not in gone]
        return [a for p in gone for a in (*p.workers, p.server)]

    def _reclaim(self) -> None:
        """A pool lent to a driver that died on this host (kill -9) is parked again."""
        host = socket.gethostname()
        for pool in self.pools:
            if pool.holder is not None and pool.holder[0] == host \
                    and not process_alive(pool.holder[1]):
                pool.holder = None


class WarmPool:
    """A run's way to its warm actors: `lend` at the start, `give` at the end. `detached`:
    its actors outlive the driver that creates them (a cluster pool)."""

    detached = False

    def lend(self, shape: PoolShape, holds: str) -> Lent:
        raise NotImplementedError

    def give(self, pool: Pool) -> None:
        raise NotImplementedError

    @staticmethod
    def holder() -> tuple[str, int]:
        return socket.gethostname(), os.getpid()


class ProcessPool(WarmPool):
    """Pools kept in this process: a sweep's trials, one after another in a process Tune
    reuses. Its actors belong to this process and end with it."""

    def __init__(self) -> None:
        self.book = PoolBook()

    def lend(self, shape: PoolShape, holds: str) -> Lent:
        return self.book.lend(shape, holds, self.holder())

    def give(self, pool: Pool) -> None:
        self.book.give(pool)


class ClusterPool(WarmPool):
    """Pools kept on a `raysim up` cluster by its registry actor: detached actors that wait
    for the next launch."""

    detached = True

    def __init__(self) -> None:
        import ray

        self.ray = ray
        # the book itself, as a detached actor
        self.registry = ray.remote(PoolBook).options(
            name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, lifetime="detached",
            get_if_exists=True, num_cpus=0).remote()

    def lend(self, shape: PoolShape, holds: str) -> Lent:
        return self.ray.get(self.registry.lend.remote(shape, holds, self.holder()))

    def give(self, pool: Pool) -> None:
        self.ray.get(self.registry.give.remote(pool))

    def drop(self, parked_only: bool = True) -> int:
        """Kill the parked pools' actors (every pool's with `parked_only=False`); returns how
        many actors went."""
        actors = self.ray.get(self.registry.drop.remote(parked_only))
        for actor in actors:
            self.ray.kill(actor)
        return len(actors)


_process_pool: ProcessPool | None = None


def process_pool() -> ProcessPool:
    """This process's pool (made on first use)."""
    global _process_pool
    if _process_pool is None:
        _process_pool = ProcessPool()
    return _process_pool
