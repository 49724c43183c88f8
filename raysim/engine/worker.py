"""A client worker: one long-lived process that hosts many virtual clients, one at a time.

It receives the dataset once (zero-copy from the object store), builds the model (one per
architecture of a heterogeneous group) and the algorithm once, and per client only loads the
broadcast weights and swaps the index set (or, for a dataset that generates its clients,
generates the client's samples). With `train.client_group` = K > 1 it trains its clients in
groups of K at once, cut from them in client-id order (`raysim.engine.grouped`), and finishes
each update as it does one by one. For a method whose weights are averaged by sample count,
it sums its clients' weights itself (exactly, see `raysim.methods.aggregation`), so one
payload per worker reaches the server, not one per client. Under `privacy` each upload is
privatised (local DP) or its delta clipped (central DP, then summed with weight 1) right after
the client's step, before the sum and the leakage probe (`raysim.engine.privatize`). With
`evaluation.personal` it also scores the model each client would deploy on that client's own
test and validation parts (`evaluate_personal`). The class is plain Python; the engine wraps
it with `ray.remote`.
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
    LocalRound,
    PersonalModel,
    SummedWeights,
    TaskInfo,
    Weights,
    copy_weights,
)
from raysim.config import Config
from raysim.data import Dataset
from raysim.data.domain_split import UNSEEN
from raysim.data.personal import split_client
from raysim.engine.deferred import Deferred, arrived
from raysim.engine.grouped import client_groups, train_clients, why_one_by_one
from raysim.engine.personal_eval import ClientSums
from raysim.engine.privatize import ClippedDelta, privatize_client
from raysim.methods.aggregation import WeightSum
from raysim.methods.diagnostics import anchor_alignment
from raysim.methods.leakage import LeakageProbe, LeakageSettings, probed_clients, upload_kind
from raysim.methods.prototypes import local_prototypes
from raysim.nn.training import ClientData, Preprocess, make_optimizer
from raysim.seeding import (
    LEAKAGE,
    PERSONAL_EVAL,
    client_generator,
    client_generators,
    derive_seed,
    round_clients,
)
from raysim.task import (
    initial_model,
    make_algorithm,
    member_index,
    model_members,
    new_model,
    sample_labels,
)


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    update: ClientUpdate | None
    error: str | None = None
    seconds: float = 0.0
    retries: tuple[str, ...] = ()  # why each earlier attempt failed
    train_seconds: float = 0.0  # inside the method's client step (the rest is the engine's)
    clipped: ClippedDelta | None = None  # central DP: what the worker sums for this client


@dataclass(frozen=True)
class GroupResult:
    """One worker's clients of a round: their results in client-id order and, for
    `weighted_mean` methods, the exact sum of their weights (the updates then carry none; under
    central DP the sum of their clipped deltas, each with weight 1)."""

    clients: list[ClientResult]
    weight_sum: WeightSum | None = None
    unclipped: int = 0  # central DP: clients whose update C did not clip (adaptive clipping)


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Wrap a (read-only, object-store) numpy array without copying on CPU."""
    if array.flags.writeable:  # torch warns only about read-only arrays
        return torch.from_numpy(array).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable array: we never write to it
        return torch.from_numpy(array).to(device)


def assigned_device(num_gpus: float) -> torch.device:
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def gpu_memory_mb(device: torch.device) -> dict[str, float] | None:
    """On a CUDA device, this process's peak allocated GPU memory and what PyTorch's caching
    allocator holds now (reserved: kept between rounds unless emptied), in MiB; else None."""
    if device.type != "cuda":
        return None
    return {"peak_allocated": torch.cuda.max_memory_allocated(device) / 2**20,
            "reserved": torch.cuda.memory_reserved(device) / 2**20}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def check_finite(update: ClientUpdate) -> str | None:
    for name, tensor in update.weights.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            return f"non-finite values in {name!r}"
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. On a plain CPU tensor numpy answers in a third of torch's
    time, which counts for a group's hundreds of small uploads."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) \
            and not tensor.requires_grad and not tensor.is_neg():
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


@dataclass
class PreparedGroup:
    """A group's clients' data, models and contexts, and the seconds it took to make them."""

    datas: list[ClientData]
    models: list[torch.nn.Module]
    contexts: list[ClientContext]
    seconds: float


class ClientWorker:
    def __init__(
        self, config: Config, dataset: Dataset, client_split: tuple, info: TaskInfo,
    ) -> None:
        """`client_split`: the partition's (offsets, indices), client k's (training) samples
        being indices[offsets[k]:offsets[k+1]], and optionally its `personal` parts
        (`raysim.data.personal.PersonalParts`, None without); indices is None for a dataset
        that generates its clients (`dataset.clients`)."""
        torch.set_num_threads(max(1, math.floor(config.resources.worker.num_cpus)))
        self.config = config
        self.info = info
        self.device = assigned_device(config.resources.worker.num_gpus)
        self.algorithm = make_algorithm(config, info, self.device)
        # one model per architecture, built once; a client trains its member's
        self.models = [new_model(config, info, self.algorithm, member).to(self.device)
                       for member in range(len(model_members(config)))]
        self.model = self.models[0]
        self._initial: dict[int, Weights] = {}  # member → its round-0 weights, made once
        self.preprocess = Preprocess(dataset.spec, self.device)
        self.generated = dataset.clients
        self._last_generated: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._positions = torch.arange(0, device=self.device)  # 0..n-1, grown as needed
        if dataset.train is not None:
            self.train_x = as_tensor(dataset.train.x, self.device)
            self.train_y = as_tensor(dataset.train.y, self.device)
        self.eval_splits = {
            name: (as_tensor(split.x, self.device), as_tensor(split.y, self.device))
            for name, split in (("test", dataset.test), ("val", dataset.val),
                                (UNSEEN, dataset.unseen))
            if split is not None
        }
        self.offsets, self.indices, *rest = client_split
        self.personal = rest[0] if rest else None
        self.personal_config = config.evaluation.personal
        # the splits clients' parts index: train, and test / val (personalised evaluation)
        self.parts = {**self.eval_splits, **({"train": (self.train_x, self.train_y)}
                                             if dataset.train is not None else {})}
        self.presum = self.algorithm.weighted_mean
        self.max_retries = config.fault_tolerance.max_client_retries
        self.diagnose_anchors = config.diagnostics.anchors and isinstance(self.algorithm,
                                                                          ClassAnchors)
        self.probe = leakage_probe(config, self.model, self.algorithm, dataset.spec)
        self.privacy = info.privacy  # uploads privatised before the sum and the probe
        # K > 1: clients train in groups of K where an architecture allows it (else one by one,
        # as the note printed before the run said)
        groupable = any(why_one_by_one(self.algorithm, model) is None
                        for model in self.models)
        self.group_size = config.train.client_group if groupable else 1
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
                "peak_rss_mb": peak_rss_mb(), "gpu_mb": gpu_memory_mb(self.device)}

    def ping(self) -> int:
        return os.getpid()

    def train(
        self, broadcast: Broadcast | Deferred, round_index: int, client_ids: list[int],
        states: list[Any] | Deferred, clip: float | Deferred | None = None,
    ) -> GroupResult:
        """Round `round_index` of these clients, in client-id order. `clip`: central DP's C of
        this round where clipping adapts (else the plan's). What the server sends may come
        `Deferred`: the first group's data are made before it is fetched."""
        ordered = sorted(client_ids)
        groups = client_groups(ordered, self.group_size) if self.group_size > 1 else []
        first = self._prepare_group(round_index, groups[0]) if groups else None
        broadcast, states, clip = arrived(broadcast), arrived(states), arrived(clip)
        by_id = dict(zip(client_ids, states, strict=True))
        if groups:
            results = [result for i, group in enumerate(groups)
                       for result in self._train_group(
                           broadcast, round_index, group, [by_id[c] for c in group], clip,
                           first if i == 0 else self._prepare_group(round_index, group))]
        else:
            results = [self._train_one(broadcast, round_index, cid, by_id[cid], clip)
                       for cid in ordered]
        if not self.presum:
            return GroupResult(results)
        summed, counts, unclipped = [], [], 0
        for i, result in enumerate(results):
            if result.update is not None:
                if result.clipped is not None:  # central DP: sample counts are private too
                    summed.append(result.clipped.delta)
                    counts.append(1)
                    unclipped += result.clipped.unclipped
                else:
                    summed.append(result.update.weights)
                    counts.append(result.update.num_samples)
                results[i] = dataclasses.replace(
                    result, update=dataclasses.replace(result.update, weights=SummedWeights()),
                    clipped=None)
        return GroupResult(results, WeightSum().add_many(summed, counts), unclipped)

    def client_data(self, client_id: int, part: str = "train") -> ClientData:
        """Client `client_id`'s samples of one part (`train`; `test` and `val` with
        `evaluation.personal`): an index view of the worker's dataset, or generated (and then
        split here, as the driver splits in-memory data)."""
        if self.generated is not None:
            return self._generated_data(client_id, *self._generated_client(client_id), part)
        if part == "train":
            offsets, indices, source = self.offsets, self.indices, "train"
        else:
            parts = self.personal
            offsets, indices, source = (
                (parts.test_offsets, parts.test_indices, parts.test_source) if part == "test"
                else (parts.val_offsets, parts.val_indices, parts.val_source))
        lo, hi = int(offsets[client_id]), int(offsets[client_id + 1])
        x, y = self.parts[source]
        return ClientData(x, y, as_tensor(indices[lo:hi], self.device), self.preprocess)

    def client_datas(self, client_ids: list[int]) -> list[ClientData]:
        """`client_data` (train) of each client; a generated dataset that can generate many
        clients at once (`many`) does so for all of them."""
        many = getattr(self.generated, "many", None)
        if many is None:
            return [self.client_data(cid) for cid in client_ids]
        return [self._generated_data(cid, as_tensor(x, self.device), as_tensor(y, self.device))
                for cid, (x, y) in zip(client_ids, many(client_ids), strict=True)]

    def _generated_client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A generated client's samples, kept for the client last asked for: its training,
        test and validation parts come from one generation."""
        if self._last_generated is None or self._last_generated[0] != client_id:
            x, y = self.generated.client(client_id)
            self._last_generated = (client_id, as_tensor(x, self.device),
                                    as_tensor(y, self.device))
        return self._last_generated[1], self._last_generated[2]

    def _generated_data(self, client_id: int, x: torch.Tensor, y: torch.Tensor,
                        part: str = "train") -> ClientData:
        """A generated client's samples (x, y) as the ClientData of one of its parts."""
        if self.personal_config is None:  # every sample: a view of one arange, made once
            if len(self._positions) < len(y):
                self._positions = torch.arange(max(len(y), 2 * len(self._positions)),
                                               device=self.device)
            return ClientData(x, y, self._positions[:len(y)], self.preprocess)
        personal = self.personal_config
        train, val, test = split_client(sample_labels(y.cpu().numpy()), personal.test_fraction,
                                        personal.val_fraction, self.config.seed, client_id)
        chosen = {"train": train, "val": val, "test": test}[part]
        positions = as_tensor(np.ascontiguousarray(chosen, dtype=np.int64), self.device)
        return ClientData(x, y, positions, self.preprocess)

    def personal_parts(self) -> tuple[str, ...]:
        """The parts each client's deployed model is scored on: test, and val where asked."""
        if self.personal_config is None:
            return ()
        if self.generated is not None:
            return ("test", "val") if self.personal_config.val_fraction else ("test",)
        return ("test", "val") if self.personal.val_offsets is not None else ("test",)

    def model_for(self, client_id: int) -> torch.nn.Module:
        """The model of client `client_id`'s architecture (the one model, homogeneous)."""
        return self.models[member_index(self.config, client_id)]

    def context(self, client_id: int, round_index: int,
                generator: torch.Generator) -> ClientContext:
        """A client step's context; methods with personal models get the round-0 weights of
        the client's architecture (where its kept part starts)."""
        initial = None
        if isinstance(self.algorithm, PersonalModel):
            member = member_index(self.config, client_id)
            if member not in self._initial:
                self._initial[member] = copy_weights(
                    initial_model(self.config, self.info, self.algorithm, member))
            initial = self._initial[member]
        return ClientContext(client_id=client_id, round=round_index, generator=generator,
                             device=self.device, train=self.config.train,
                             initial_weights=initial)

    def _train_one(
        self, broadcast: Broadcast, round_index: int, client_id: int, state: Any,
        clip: float | None = None,
    ) -> ClientResult:
        """One client's round. A client that raises is tried again (from the same generator
        seed, so a success is the same update) up to `fault_tolerance.max_client_retries`
        times, then dropped with its reason; non-finite weights are dropped at once. Under
        `privacy` the upload is privatised before the leakage probe reads it."""
        start = time.perf_counter()
        data = self.client_data(client_id)
        model = self.model_for(client_id)
        failed: list[str] = []
        while True:
            ctx = self.context(client_id, round_index,
                               client_generator(self.config.seed, round_index, client_id))
            try:
                began = time.perf_counter()
                update = self.algorithm.client_update(ctx, model, broadcast, data, state)
                trained = time.perf_counter() - began
                break
            except Exception:  # retried, then reported and dropped; the round goes on
                failed.append(traceback.format_exc(limit=8))
                if len(failed) > self.max_retries:
                    return ClientResult(client_id, None, failed[-1], retries=tuple(failed[:-1]))
        result = self._finish(LocalRound(ctx, model, broadcast, data, state), update, clip)
        return dataclasses.replace(result, seconds=time.perf_counter() - start,
                                   retries=tuple(failed), train_seconds=trained)

    def _prepare_group(self, round_index: int, client_ids: list[int]) -> PreparedGroup:
        """What a group's step needs before anything from the server: its clients' data,
        models and contexts."""
        start = time.perf_counter()
        datas = self.client_datas(client_ids)
        models = [self.model_for(cid) for cid in client_ids]
        generators = client_generators(self.config.seed, round_index, client_ids)
        contexts = [self.context(cid, round_index, generator)
                    for cid, generator in zip(client_ids, generators, strict=True)]
        return PreparedGroup(datas, models, contexts, time.perf_counter() - start)

    def _train_group(
        self, broadcast: Broadcast, round_index: int, client_ids: list[int], states: list[Any],
        clip: float | None, prepared: PreparedGroup,
    ) -> list[ClientResult]:
        """One group of `train.client_group` clients (ascending ids) trained at once
        (`raysim.engine.grouped`), each update finished as `_train_one` finishes it. A group
        that raises trains its clients one by one, under `_train_one`'s retry rules."""
        start = time.perf_counter() - prepared.seconds
        datas, models, contexts = prepared.datas, prepared.models, prepared.contexts

        def finish(i: int, update: ClientUpdate) -> ClientResult:
            return self._finish(LocalRound(contexts[i], models[i], broadcast, datas[i],
                                           states[i]), update, clip)

        try:
            results = train_clients(self.algorithm, models, datas, contexts, broadcast, states,
                                    finish)
        except Exception:  # the same clients again one by one: a success is the same update
            failed = traceback.format_exc(limit=8)
            return [dataclasses.replace(result, retries=(failed, *result.retries))
                    for result in (self._train_one(broadcast, round_index, cid, state, clip)
                                   for cid, state in zip(client_ids, states))]
        share = (time.perf_counter() - start) / len(client_ids)  # the group's time, split
        return [dataclasses.replace(result, seconds=share, train_seconds=share)
                for result in results]

    def _finish(self, step: LocalRound, update: ClientUpdate,
                clip: float | None = None) -> ClientResult:
        """What follows a client's step while `step.model` holds its trained weights: a
        non-finite update is dropped, then the anchor diagnostic, privatisation (the round's
        clip C where it adapts, else the plan's) and the leakage probe."""
        client_id, round_index = step.ctx.client_id, step.ctx.round
        problem = check_finite(update)
        if problem:
            return ClientResult(client_id, None, problem)
        if self.diagnose_anchors:
            update = self._with_anchor_alignment(update, step.broadcast, step.data, step.model)
        clipped, trained_weights = None, None
        if self.privacy is not None:
            trained_weights = update.weights  # the true class means are the trained model's
            update, clipped = privatize_client(
                self.privacy, update, step, self.config.seed,
                self.privacy.clip if clip is None else clip)
        if self.probe is not None and self._probes(round_index, client_id):
            leaked = self.probe.measure(update, step.broadcast.weights, step.data,
                                        torch.Generator().manual_seed(derive_seed(
                                            self.config.seed, LEAKAGE, round_index, client_id)),
                                        trained_weights)
            update = dataclasses.replace(update, metrics={**update.metrics, **leaked})
        return ClientResult(client_id, update, None, clipped=clipped)

    def _probes(self, round_index: int, client_id: int) -> bool:
        probe, config = self.config.diagnostics.leakage, self.config
        if round_index % probe.every:
            return False
        sampled = round_clients(config.seed, round_index, config.data.partition.num_clients,
                                config.clients_per_round,
                                self.privacy is not None and self.privacy.poisson)
        return client_id in probed_clients(sampled, probe.clients_per_round)

    def _with_anchor_alignment(
        self, update: ClientUpdate, broadcast: Broadcast, data: ClientData,
        model: torch.nn.Module,
    ) -> ClientUpdate:
        """Diagnostic `anchor_cosine`: how well the trained local class means line up with the
        global anchors this client was pulled towards (`diagnostics.anchors`)."""
        anchors = self.algorithm.anchors(broadcast)
        if anchors is None:
            return update
        # the class means the method sends, else one pass over the client's data for them
        means, counts = self.algorithm.local_means(update) or \
            local_prototypes(model, data, len(anchors[0]))
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

    def evaluate_personal(
        self, broadcast: Broadcast, round_index: int, client_ids: list[int], states: list[Any]
    ) -> list[ClientSums]:
        """Per client (in id order): the metric sums, on each of its parts (test, and val
        where it has one), of the model it would deploy after the round whose server state
        `broadcast` is built from (`Algorithm.deployed_model`, given its training part and
        stored state; fine-tuning draws from its own generator)."""
        return [(cid, self._evaluate_client(broadcast, round_index, cid, state))
                for cid, state in sorted(zip(client_ids, states), key=lambda pair: pair[0])]

    def _evaluate_client(
        self, broadcast: Broadcast, round_index: int, client_id: int, state: Any
    ) -> dict[str, dict[str, float]]:
        generator = torch.Generator().manual_seed(
            derive_seed(self.config.seed, PERSONAL_EVAL, round_index, client_id))
        step = LocalRound(self.context(client_id, round_index, generator),
                          self.model_for(client_id), broadcast, self.client_data(client_id),
                          state)
        model = self.algorithm.deployed_model(step)
        if model is None:
            raise RuntimeError(f"{type(self.algorithm).__name__}.deployed_model gave no model "
                               "to score personally")
        model.eval()
        scores = {}
        for part in self.personal_parts():
            totals: dict[str, float] = {}
            for x, y in self.client_data(client_id, part).ordered_batches(
                    self.config.eval_batch_size):
                for key, value in self.algorithm.evaluate_batch(model, broadcast, x, y).items():
                    totals[key] = totals.get(key, 0.0) + float(value)
            scores[part] = totals
        return scores


def leakage_probe(config: Config, model: Any, algorithm: Any, spec: Any) -> Any:
    """The worker's `LeakageProbe` where `diagnostics.leakage` is on, else None."""
    settings = config.diagnostics.leakage
    if not settings.clients_per_round:
        return None
    return LeakageProbe(model, upload_kind(algorithm), spec.num_classes, spec.mean, spec.std,
                        LeakageSettings(settings.inversion_steps, settings.inversion_classes,
                                        settings.dlg_max_samples, settings.dlg_steps))
