"""The server: holds the global state and the client-state store, runs the algorithm's server
step. Plain Python; the engine wraps it with `ray.remote` and its own resource request, so
server-side learning (trained prototypes, generators) can take a GPU fraction.

The state is kept per round: `states[r]` is the server state after round r, and the broadcast
of round r is built from `states[r - 1]`. Running round r again (after a dead worker) therefore
starts from the same state, and a round whose step never ran leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysim.algorithm import Broadcast, ClassAnchors, ServerContext, TaskInfo
from raysim.config import Config
from raysim.engine.client_store import make_store
from raysim.engine.privatize import central_server_round, round_clip
from raysim.engine.worker import GroupResult, assigned_device, peak_rss_mb
from raysim.methods.aggregation import WeightSum
from raysim.methods.diagnostics import server_diagnostics
from raysim.seeding import server_generator
from raysim.state_io import pack, unpack
from raysim.task import initial_model, keeps_client_state, make_algorithm

SERVER_FILE = "server_state.safetensors"


def average_client_metrics(updates: list) -> dict[str, float]:
    """Sample-weighted mean of each client metric, over the clients that reported it."""
    keys = dict.fromkeys(k for u in updates for k in u.metrics)
    out = {}
    for key in keys:
        reporting = [u for u in updates if key in u.metrics]
        total = sum(u.num_samples for u in reporting)
        out[key] = sum(u.metrics[key] * u.num_samples for u in reporting) / total
    return out


@dataclass(frozen=True)
class Restore:
    """Where a server starts from: the state after `round`, as a checkpoint holds it."""

    round: int
    files: dict[str, bytes]
    others: dict[int, dict[str, bytes]] = field(default_factory=dict)  # other kept checkpoints


@dataclass(frozen=True)
class ServerReport:
    """One round's server step as the driver receives it."""

    metrics: dict[str, float]  # averaged client metrics, clients_ok/failed, server_<name>
    failures: dict[int, str]  # client id → why its result is missing
    retries: list[tuple[int, int, str]]  # (client id, attempt, reason) of each retry
    client_seconds: dict[int, float]
    train_seconds: float  # the clients' seconds in the method's step, summed
    insufficient: bool = False  # too few clients succeeded: the state did not change
    server_seconds: float = 0.0
    checkpoint: dict[str, bytes] | None = None  # the state files after the round, when asked


class Server:
    def __init__(
        self, config: Config, info: TaskInfo, run_dir: str | None = None,
        restore: Restore | None = None,
    ) -> None:
        """`restore`: a checkpoint's state files (and the other kept checkpoints' store files)
        to continue after its round."""
        torch.set_num_threads(max(1, int(config.resources.server.num_cpus)))
        self.device = assigned_device(config.resources.server.num_gpus)
        self.config = config
        self.algorithm = make_algorithm(config, info, self.device)
        self.stateful = keeps_client_state(config)
        self.privacy = info.privacy
        self.central = self.privacy is not None and self.privacy.mechanism == "central"
        self.store = make_store(config.client_state.store, Path(run_dir) if run_dir else None)
        if restore is None:
            # a heterogeneous group's shared part (a head, of one shape in every member by
            # construction) starts as member 0's; a method sharing no weights keeps none
            initial = self.algorithm.init_server(
                initial_model(config, info, self.algorithm, member=0))
            self.states = {0: initial}
        else:
            self.states = {restore.round: unpack(restore.files[SERVER_FILE])}
            if self.stateful:
                self.store.restore(restore.files, restore.others)

    @property
    def latest(self) -> int:
        return max(self.states)

    def ping(self) -> int:
        return os.getpid()

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "round": self.latest, "clients_with_state": len(self.store),
                "peak_rss_mb": peak_rss_mb()}

    def broadcast(self, round_index: int) -> Broadcast:
        """What the clients of `round_index` receive: built from the state after the round
        before. Fails when that round's server step did not run (its clients failed)."""
        state = self.states.get(round_index - 1)
        if state is None:
            raise RuntimeError(f"round {round_index - 1} has no server state (its step failed)")
        return self.algorithm.broadcast(state)

    def privacy_clip(self, round_index: int) -> float | None:
        """Central DP's clip C for `round_index` (adaptive clipping moves it every round)."""
        return round_clip(self.privacy, self.states[round_index - 1])

    def states_for(self, client_ids: list[int]) -> list[Any]:
        return self.store.get(client_ids)

    def aggregate(
        self, round_index: int, sampled: int, checkpoint: bool, *groups: GroupResult
    ) -> ServerReport:
        """Run the server step on this round's updates, in client-id order whatever the worker.
        The workers' weight sums (weighted-mean methods) are added up exactly, so the result
        does not depend on how clients were spread over workers.

        Returns the round's report: averaged client metrics, failures, per-client retries and
        seconds, and with `checkpoint` the files of a checkpoint of the state after the round.
        When fewer than `fault_tolerance.min_clients_fraction` of the `sampled` clients
        succeeded, no state changes and the report says `insufficient`. Under central DP the
        noised mean of the clipped deltas replaces the aggregate; a Poisson-sampled round
        that drew no client adds the noise alone (central DP) or keeps the state.
        """
        results = sorted((r for group in groups for r in group.clients),
                         key=lambda r: r.client_id)
        sums = [g.weight_sum for g in groups if g.weight_sum is not None]
        summed = None
        if sums:
            summed = WeightSum()
            for part in sums:
                summed.merge(part)
        ok = [r for r in results if r.update is not None]
        failures = {r.client_id: r.error for r in results if r.update is None}
        retries = [(r.client_id, attempt, reason) for r in results
                   for attempt, reason in enumerate(r.retries, start=1)]
        metrics: dict[str, float] = {"clients_ok": float(len(ok)),
                                     "clients_failed": float(len(failures))}
        report = ServerReport(metrics=metrics, failures=failures, retries=retries,
                              client_seconds={r.client_id: r.seconds for r in ok},
                              train_seconds=sum(r.train_seconds for r in ok))
        needed = self.config.fault_tolerance.min_clients_fraction * sampled
        if sampled and (not ok or len(ok) < needed):
            return dataclasses.replace(report, insufficient=True)
        start = time.perf_counter()
        updates = [r.update for r in ok]
        ctx = ServerContext(round_index, server_generator(self.config.seed, round_index),
                            self.device)
        before = self.states[round_index - 1]
        if self.central:
            state = central_server_round(self.algorithm, self.privacy, ctx, before, updates,
                                         summed, sum(g.unclipped for g in groups),
                                         self.config.seed)
        elif not updates:  # no client drawn: nothing to aggregate
            state = dataclasses.replace(before, metrics={})
        else:
            state = self.algorithm.server_round(ctx, before, updates, summed)
        self.states = {round_index - 1: self.states[round_index - 1], round_index: state}
        metrics.update({f"server_{k}": float(v) for k, v in state.metrics.items()})
        if self.stateful:
            self.store.put(round_index, {r.client_id: r.update.state for r in ok})
        if self.config.diagnostics.anchors and isinstance(self.algorithm, ClassAnchors):
            metrics.update(self._diagnostics(state))
        metrics.update(average_client_metrics(updates))
        metrics["samples"] = float(sum(u.num_samples for u in updates))
        return dataclasses.replace(
            report, server_seconds=time.perf_counter() - start,
            checkpoint=self.snapshot(round_index) if checkpoint else None)

    def snapshot(self, round_index: int) -> dict[str, bytes]:
        """The files of a checkpoint after `round_index`, which must be the latest round."""
        if round_index != self.latest:
            raise RuntimeError(f"snapshot of round {round_index}, but the server is at "
                               f"round {self.latest}")
        files = {SERVER_FILE: pack(self.states[round_index])}
        if self.stateful:
            files.update(self.store.snapshot(round_index))
        return files

    def release(self, checkpoint_round: int) -> None:
        """A checkpoint was deleted (the disk store may drop what only it kept)."""
        self.store.release(checkpoint_round)

    def _diagnostics(self, state: Any) -> dict[str, float]:
        anchors = self.algorithm.anchors(self.algorithm.broadcast(state))
        if anchors is None:
            return {}
        return server_diagnostics(anchors[0].float().cpu(), anchors[1].cpu(),
                                  self.algorithm.classifier(state.weights))

    def weights(self) -> dict[str, torch.Tensor]:
        return self.states[self.latest].weights
