"""The server: holds the global state and every client's persistent state, runs the algorithm's
server step. Plain Python; the engine wraps it with `ray.remote` and its own resource request, so
server-side learning (hyper-prototypes, trainable prototypes) can take a GPU fraction."""

from __future__ import annotations

import time
from typing import Any

import torch

from raysim.algorithm import Broadcast, ServerContext, TaskInfo
from raysim.config import Config
from raysim.diagnostics import server_diagnostics
from raysim.engine.worker import ClientResult, assigned_device
from raysim.seeding import server_generator
from raysim.task import initial_model, keeps_client_state, make_algorithm


def average_client_metrics(updates: list) -> dict[str, float]:
    """Sample-weighted mean of each client metric, over the clients that reported it."""
    keys = dict.fromkeys(k for u in updates for k in u.metrics)
    out = {}
    for key in keys:
        reporting = [u for u in updates if key in u.metrics]
        total = sum(u.num_samples for u in reporting)
        out[key] = sum(u.metrics[key] * u.num_samples for u in reporting) / total
    return out


class Server:
    def __init__(self, config: Config, info: TaskInfo) -> None:
        torch.set_num_threads(max(1, int(config.resources.server.num_cpus)))
        self.device = assigned_device(config.resources.server.num_gpus)
        self.seed = config.seed
        self.algorithm = make_algorithm(config, info, self.device)
        self.state = self.algorithm.init_server(initial_model(config, info, self.algorithm))
        self.client_states: dict[int, Any] = {}
        self.stateful = keeps_client_state(config)

    def broadcast(self) -> Broadcast:
        return self.algorithm.broadcast(self.state)

    def states_for(self, client_ids: list[int]) -> list[Any]:
        return [self.client_states.get(cid) for cid in client_ids]

    def aggregate(self, round_index: int, *worker_results: list[ClientResult]) -> dict[str, Any]:
        """Run the server step on this round's updates, in client-id order whatever the worker.

        Returns the round's report: averaged client metrics, per-client seconds and failures.
        """
        results = sorted((r for batch in worker_results for r in batch), key=lambda r: r.client_id)
        ok = [r for r in results if r.update is not None]
        failures = {r.client_id: r.error for r in results if r.update is None}
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if ok:
            updates = [r.update for r in ok]
            ctx = ServerContext(round_index, server_generator(self.seed, round_index), self.device)
            self.state = self.algorithm.server_round(ctx, self.state, updates)
            metrics.update({f"server_{k}": float(v) for k, v in self.state.metrics.items()})
            if self.stateful:
                for r in ok:
                    self.client_states[r.client_id] = r.update.state
            metrics.update(self._diagnostics())
            metrics.update(average_client_metrics(updates))
            metrics["samples"] = float(sum(u.num_samples for u in updates))
        metrics["clients_ok"] = float(len(ok))
        metrics["clients_failed"] = float(len(failures))
        return {
            "metrics": metrics,
            "failures": failures,
            "server_seconds": time.perf_counter() - start,
            "client_seconds": {r.client_id: r.seconds for r in ok},
        }

    def _diagnostics(self) -> dict[str, float]:
        anchors = self.algorithm.anchors(self.algorithm.broadcast(self.state))
        if anchors is None:
            return {}
        return server_diagnostics(anchors[0].float().cpu(), anchors[1].cpu(), self.state.weights)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.state.weights
