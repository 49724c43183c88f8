"""The driver: samples clients, dispatches them to the worker pool, hands results to the server
actor, evaluates, and yields one `RoundResult` per round. It stays thin: no model weights or
client updates pass through it (object refs go straight from workers to the server)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from raysim.config import Config
from raysim.engine.evaluation import eval_batches, reduce_domain_eval
from raysim.engine.server import Server
from raysim.engine.transport import register_tensor_transport
from raysim.engine.worker import ClientWorker
from raysim.seeding import sample_clients
from raysim.task import Task, keeps_client_state
from raysim.training import steps_per_epoch


@dataclass(frozen=True)
class RoundResult:
    round: int  # 1-based
    metrics: dict[str, float]  # client averages, test metrics when evaluated, timings
    failures: dict[int, str] = field(default_factory=dict)  # client id → reason it was dropped
    seconds: float = 0.0


def balance(client_ids: Sequence[int], costs: Sequence[int], num_workers: int) -> list[list[int]]:
    """Longest-processing-time-first assignment: costliest clients first, each to the least
    loaded worker, so no worker idles while another finishes a big client. Deterministic."""
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    loads = [0] * num_workers
    for cid in sorted(client_ids, key=lambda c: (-int(costs[c]), c)):
        w = min(range(num_workers), key=lambda i: (loads[i], i))
        groups[w].append(cid)
        loads[w] += int(costs[cid])
    return groups


class _RemoteClientWorker(ClientWorker):
    def __init__(self, config: Config, data_refs: list, info: Any) -> None:
        register_tensor_transport()
        dataset, client_indices = ray.get(data_refs)
        super().__init__(config, dataset, client_indices, info)


class _RemoteServer(Server):
    def __init__(self, config: Config, info: Any) -> None:
        register_tensor_transport()
        super().__init__(config, info)


class Simulation:
    """One FL run on a Ray pool. `ray.init` must have been called."""

    def __init__(self, config: Config, task: Task, num_workers: int | None = None) -> None:
        self.config = config
        self.task = task
        self.num_workers = num_workers or config.resources.num_workers
        self.stateful = keeps_client_state(config)
        self.sizes = task.partition.sizes
        self.costs = steps_per_epoch(self.sizes, config.train.batch_size)  # for balancing
        # Fixed evaluation batches per split: the validation split (model selection) where the
        # dataset has one, and the test split.
        self.eval_groups = {
            name: eval_batches(split.domain, len(split.y), config.eval_batch_size)
            for name, split in (("val", task.dataset.val),
                                ("test", task.dataset.test))
            if split is not None
        }
        self.workers: list[Any] = []
        self.server: Any = None

    def start(self) -> list[dict[str, Any]]:
        """Create the server and the worker pool; return once every worker is ready."""
        res = self.config.resources
        register_tensor_transport()
        # Put once, read zero-copy by every worker on a node.
        data_refs = [ray.put(self.task.dataset), ray.put(self.task.partition.client_indices)]
        worker_cls = ray.remote(_RemoteClientWorker).options(
            num_cpus=res.worker.num_cpus, num_gpus=res.worker.num_gpus,
        )
        self.workers = [
            worker_cls.remote(self.config, data_refs, self.task.info)
            for _ in range(self.num_workers)
        ]
        self.server = ray.remote(_RemoteServer).options(
            num_cpus=res.server.num_cpus, num_gpus=res.server.num_gpus
        ).remote(self.config, self.task.info)
        return ray.get([w.describe.remote() for w in self.workers])

    def rounds(self) -> Iterator[RoundResult]:
        """Run all rounds, one round of lookahead: round r+1 is dispatched before round r's
        results are collected, so logging never leaves the workers idle."""
        cfg = self.config
        broadcast = self.server.broadcast.remote()
        pending = None
        last = time.perf_counter()
        for r in range(1, cfg.rounds + 1):
            report_ref = self._dispatch_training(r, broadcast)
            broadcast = self.server.broadcast.remote()  # w_{r}, after the server step of round r
            evaluate = r % cfg.eval_every == 0 or r == cfg.rounds
            eval_refs = self._dispatch_evaluation(broadcast) if evaluate else []
            if pending is not None:
                result = self._collect(*pending, started=last)
                last = time.perf_counter()
                yield result
            pending = (r, report_ref, eval_refs)
        yield self._collect(*pending, started=last)

    def _dispatch_training(self, r: int, broadcast: Any) -> Any:
        cfg = self.config
        sampled = sample_clients(cfg.seed, r, len(self.sizes), cfg.clients_per_round)
        refs = []
        for worker, group in zip(self.workers, balance(sampled, self.costs, self.num_workers)):
            if not group:
                continue
            states = self.server.states_for.remote(group) if self.stateful else [None] * len(group)
            refs.append(worker.train.remote(broadcast, r, group, states))
        return self.server.aggregate.remote(r, *refs)

    def _dispatch_evaluation(self, broadcast: Any) -> list[Any]:
        """Fixed test batches spread evenly, so evaluation adds the same load to every worker
        (it sits on each worker's path to the next round)."""
        batches = [(split, *b) for split, groups in self.eval_groups.items()
                   for _, group in groups for b in group]
        shards = np.array_split(np.arange(len(batches)), min(self.num_workers, len(batches)))
        return [
            worker.evaluate.remote(broadcast, [batches[i] for i in shard])
            for worker, shard in zip(self.workers, shards)
        ]

    def _collect(self, r: int, report_ref: Any, eval_refs: list[Any], started: float):
        report = ray.get(report_ref)
        metrics = dict(report["metrics"])
        if eval_refs:
            sums = iter([s for part in ray.get(eval_refs) for s in part])  # in batch order
            names = self.task.dataset.spec.domains
            for split, split_groups in self.eval_groups.items():
                groups = [(names[d] if d >= 0 else "", [next(sums) for _ in batches])
                          for d, batches in split_groups]
                metrics.update(reduce_domain_eval(groups, split))
        seconds = time.perf_counter() - started
        metrics["round_seconds"] = seconds
        metrics["samples_per_second"] = metrics.get("samples", 0.0) * \
            self.config.train.local_epochs / seconds
        return RoundResult(round=r, metrics=metrics, failures=report["failures"], seconds=seconds)

    def global_weights(self) -> dict:
        return ray.get(self.server.weights.remote())

    def shutdown(self) -> None:
        for actor in [*self.workers, self.server]:
            if actor is not None:
                ray.kill(actor)
        self.workers, self.server = [], None
