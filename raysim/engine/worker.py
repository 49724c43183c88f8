"""A client worker: one long-lived process that hosts many virtual clients, one at a time.

It receives the dataset once (zero-copy from the object store), builds the model and the
algorithm once, and per client only loads the broadcast weights and swaps the index set (or,
for a dataset that generates its clients, generates the client's samples). For a method whose
weights are averaged by sample count, it sums its clients' weights itself (exactly, see
`raysim.methods.aggregation`), so one payload per worker reaches the server, not one per
client. The class is plain Python; the engine wraps it with `ray.remote`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raysim.algorithm import (
    Broadcast,
    ClassAnchors,
    ClientContext,
    ClientUpdate,
    SummedWeights,
    TaskInfo,
)
from raysim.config import Config
from raysim.data import Dataset
from raysim.data.domain_split import UNSEEN
from raysim.methods.aggregation import WeightSum
from raysim.methods.diagnostics import anchor_alignment
from raysim.methods.leakage import LeakageProbe, LeakageSettings, probed_clients, upload_kind
from raysim.methods.prototypes import local_prototypes
from raysim.nn.training import ClientData, Preprocess, make_optimizer
from raysim.seeding import LEAKAGE, client_generator, derive_seed, sample_clients
from raysim.task import make_algorithm, new_model


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    update: ClientUpdate | None
    error: str | None = None
    seconds: float = 0.0
    retries: tuple[str, ...] = ()  # why each earlier attempt failed
    train_seconds: float = 0.0  # inside the method's client step (the rest is the engine's)


@dataclass(frozen=True)
class GroupResult:
    """One worker's clients of a round: their results in client-id order and, for
    `weighted_mean` methods, the exact sum of their weights (the updates then carry none)."""

    clients: list[ClientResult]
    weight_sum: WeightSum | None = None


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Wrap a (read-only, object-store) numpy array without copying on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable array: we never write to it
        return torch.from_numpy(array).to(device)


def assigned_device(num_gpus: float) -> torch.device:
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def check_finite(update: ClientUpdate) -> str | None:
    for name, tensor in update.weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"non-finite values in {name!r}"
    return None


class ClientWorker:
    def __init__(
        self, config: Config, dataset: Dataset,
        client_split: tuple[np.ndarray, np.ndarray | None], info: TaskInfo,
    ) -> None:
        """`client_split`: the partition's (offsets, indices), client k's samples being
        indices[offsets[k]:offsets[k+1]]; indices is None for a dataset that generates its
        clients (`dataset.clients`)."""
        torch.set_num_threads(max(1, math.floor(config.resources.worker.num_cpus)))
        self.config = config
        self.device = assigned_device(config.resources.worker.num_gpus)
        self.algorithm = make_algorithm(config, info, self.device)
        self.model = new_model(config, info, self.algorithm).to(self.device)
        self.preprocess = Preprocess(dataset.spec, self.device)
        self.generated = dataset.clients
        if dataset.train is not None:
            self.train_x = as_tensor(dataset.train.x, self.device)
            self.train_y = as_tensor(dataset.train.y, self.device)
        self.eval_splits = {
            name: (as_tensor(split.x, self.device), as_tensor(split.y, self.device))
            for name, split in (("test", dataset.test), ("val", dataset.val),
                                (UNSEEN, dataset.unseen))
            if split is not None
        }
        self.offsets, self.indices = client_split
        self.presum = self.algorithm.weighted_mean
        self.max_retries = config.fault_tolerance.max_client_retries
        self.diagnose_anchors = config.diagnostics.anchors and isinstance(self.algorithm,
                                                                          ClassAnchors)
        self.probe = leakage_probe(config, self.model, self.algorithm, dataset.spec)
        # The first optimiser built in a process imports torch._dynamo (~1 s): pay it now,
        # not inside the first client's timed step.
        make_optimizer(self.model, config.train)

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: process, device, threads, Ray node and assigned GPU ids."""
        ray = sys.modules.get("ray")  # a worker outside Ray (the local backend) never loads it
        placed = ray is not None and ray.is_initialized()
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads(),
                "node_id": ray.get_runtime_context().get_node_id() if placed else None,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if placed else [],
                "peak_rss_mb": peak_rss_mb()}

    def ping(self) -> int:
        return os.getpid()

    def train(
        self, broadcast: Broadcast, round_index: int, client_ids: list[int], states: list[Any]
    ) -> GroupResult:
        results = [
            self._train_one(broadcast, round_index, cid, state)
            for cid, state in sorted(zip(client_ids, states), key=lambda pair: pair[0])
        ]
        if not self.presum:
            return GroupResult(results)
        total = WeightSum()
        for i, result in enumerate(results):
            if result.update is not None:
                total.add(result.update.weights, result.update.num_samples)
                results[i] = dataclasses.replace(
                    result, update=dataclasses.replace(result.update, weights=SummedWeights()))
        return GroupResult(results, total)

    def client_data(self, client_id: int) -> ClientData:
        """Client `client_id`'s samples: an index view of the worker's dataset, or generated."""
        if self.generated is not None:
            x, y = self.generated.client(client_id)
            return ClientData(as_tensor(x, self.device), as_tensor(y, self.device),
                              torch.arange(len(y), device=self.device), self.preprocess)
        lo, hi = int(self.offsets[client_id]), int(self.offsets[client_id + 1])
        indices = as_tensor(self.indices[lo:hi], self.device)
        return ClientData(self.train_x, self.train_y, indices, self.preprocess)

    def _train_one(
        self, broadcast: Broadcast, round_index: int, client_id: int, state: Any
    ) -> ClientResult:
        """One client's round. A client that raises is tried again (from the same generator
        seed, so a success is the same update) up to `fault_tolerance.max_client_retries`
        times, then dropped with its reason; non-finite weights are dropped at once."""
        start = time.perf_counter()
        data = self.client_data(client_id)
        failed: list[str] = []
        while True:
            ctx = ClientContext(
                client_id=client_id,
                round=round_index,
                generator=client_generator(self.config.seed, round_index, client_id),
                device=self.device,
                train=self.config.train,
            )
            try:
                began = time.perf_counter()
                update = self.algorithm.client_update(ctx, self.model, broadcast, data, state)
                trained = time.perf_counter() - began
                break
            except Exception:  # retried, then reported and dropped; the round goes on
                failed.append(traceback.format_exc(limit=8))
                if len(failed) > self.max_retries:
                    return ClientResult(client_id, None, failed[-1], retries=tuple(failed[:-1]))
        retries = tuple(failed)
        problem = check_finite(update)
        if problem:
            return ClientResult(client_id, None, problem, retries=retries)
        if self.diagnose_anchors:
            update = self._with_anchor_alignment(update, broadcast, data)
        if self.probe is not None and self._probes(round_index, client_id):
            leaked = self.probe.measure(update, broadcast.weights, data, torch.Generator(
                ).manual_seed(derive_seed(self.config.seed, LEAKAGE, round_index, client_id)))
            update = dataclasses.replace(update, metrics={**update.metrics, **leaked})
        return ClientResult(client_id, update, None, time.perf_counter() - start, retries,
                            trained)

    def _probes(self, round_index: int, client_id: int) -> bool:
        probe, config = self.config.diagnostics.leakage, self.config
        if round_index % probe.every:
            return False
        sampled = sample_clients(config.seed, round_index, config.data.partition.num_clients,
                                 config.clients_per_round)
        return client_id in probed_clients(sampled, probe.clients_per_round)

    def _with_anchor_alignment(
        self, update: ClientUpdate, broadcast: Broadcast, data: ClientData
    ) -> ClientUpdate:
        """Diagnostic `anchor_cosine`: how well the trained local class means line up with the
        global anchors this client was pulled towards (`diagnostics.anchors`)."""
        anchors = self.algorithm.anchors(broadcast)
        if anchors is None:
            return update
        # the class means the method sends, else one pass over the client's data for them
        means, counts = self.algorithm.local_means(update) or \
            local_prototypes(self.model, data, len(anchors[0]))
        cosine = anchor_alignment(means, counts, anchors[0].float(), anchors[1])
        if cosine is None:
            return update
        return dataclasses.replace(update, metrics={**update.metrics, "anchor_cosine": cosine})

    def evaluate(
        self, broadcast: Broadcast, batches: list[tuple[str, int, int]]
    ) -> list[dict[str, float]]:
        """Metric sums of the global model over the given ranges (split, start, stop)."""
        self.model.load_state_dict(broadcast.weights)
        self.model.eval()
        sums = []
        for split, start, stop in batches:
            xs, ys = self.eval_splits[split]
            x, y = self.preprocess.batch(xs[start:stop], ys[start:stop])
            sums.append(self.algorithm.evaluate_batch(self.model, broadcast, x, y))
        return sums


def leakage_probe(config: Config, model: Any, algorithm: Any, spec: Any) -> Any:
    """The worker's `LeakageProbe` where `diagnostics.leakage` is on, else None."""
    settings = config.diagnostics.leakage
    if not settings.clients_per_round:
        return None
    return LeakageProbe(model, upload_kind(algorithm), spec.num_classes, spec.mean, spec.std,
                        LeakageSettings(settings.inversion_steps, settings.inversion_classes,
                                        settings.dlg_max_samples, settings.dlg_steps))
