"""Differential privacy in the round loop: where the engine applies the run's plan
(`TaskInfo.privacy`, resolved before Ray by `raysim.task.privacy_plan`) with the mechanisms of
`raysim.methods.privacy`.

- Worker, per client, after its step and before the worker's exact sum and the leakage probe
  (`privatize_client`): local DP privatises the upload from the client's own noise stream;
  central DP clips the client's delta from the broadcast to C, which the worker then sums with
  weight 1 (the upload the probe reads is the broadcast plus that clipped delta: what the
  server sees of the client).
- Server, once per round (`central_server_round`): the noised sum over the expected clients per
  round replaces the sample-weighted mean, then the method's `server_update`; with adaptive
  clipping the next round's C is part of the server state (`CLIP_METRIC` in its metrics, so it
  is checkpointed and logged as `server_privacy_clip`).
- Driver, after each round (`EpsilonMeter`): ε at δ, recomputed from the round cursor.

Every draw comes from (seed, round[, client]) streams, so the bits do not depend on the worker
count, a replayed round or a resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raysim.algorithm import Algorithm, ClientUpdate, LocalRound, ServerContext, ServerState
from raysim.methods.aggregation import WeightSum
from raysim.methods.privacy import (
    COUNT_STREAM,
    SUM_STREAM,
    PrivacyPlan,
    central_update,
    client_delta,
    client_noise_generator,
    clip_update,
    next_clip,
    privatize_upload,
    server_noise_generator,
    summed_deltas,
)
from raysim.seeding import round_clients

CLIP_METRIC = "privacy_clip"  # adaptive clipping's C for the next round, in the server state
EPSILON_METRIC = "privacy_epsilon"


@dataclass(frozen=True)
class ClippedDelta:
    """A client's contribution to central DP's sum: clip(Δ_k, C) in float64, and whether
    ‖Δ_k‖ ≤ C (adaptive clipping counts those)."""

    delta: dict[str, Tensor]
    unclipped: bool


def privatize_client(plan: PrivacyPlan, update: ClientUpdate, step: LocalRound, seed: int,
                     clip: float) -> tuple[ClientUpdate, ClippedDelta | None]:
    """The upload as it leaves the worker, and for central DP the clipped delta to sum.
    `step`: the client's round with its trained model; `clip`: this round's C."""
    ctx = step.ctx
    if plan.mechanism == "local":
        generator = client_noise_generator(seed, ctx.round, ctx.client_id)
        return privatize_upload(update, step, plan, generator), None
    received = step.broadcast.weights
    clipped, norm = clip_update(client_delta(update.weights, received), clip)
    seen = {name: (received[name].detach().cpu().double() + clipped[name]).to(value.dtype)
            if name in clipped else value for name, value in update.weights.items()}
    return dataclasses.replace(update, weights=seen), ClippedDelta(clipped, norm <= clip)


def round_clip(plan: PrivacyPlan | None, state: ServerState) -> float | None:
    """C for the round after `state`: adaptive clipping's, else the configured one (None
    without central DP)."""
    if plan is None or plan.mechanism != "central":
        return None
    return float(state.metrics.get(CLIP_METRIC, plan.clip)) if plan.adaptive else plan.clip


def central_server_round(algorithm: Algorithm, plan: PrivacyPlan, ctx: ServerContext,
                         state: ServerState, updates: list[ClientUpdate],
                         summed: WeightSum | None, unclipped: int, seed: int) -> ServerState:
    """Central DP's server step: w + (Σ_k clip(Δ_k) + N(0, σ_Δ²C²)) / K in place of the
    aggregate (no client at all, a Poisson round that drew none, adds the noise alone), then
    the method's `server_update`; with adaptive clipping, C moves towards its quantile."""
    received = algorithm.broadcast(state).weights
    clip = round_clip(plan, state)
    if summed is not None and summed.count:
        total = summed_deltas(summed)
    else:
        total = {name: torch.zeros(value.shape, dtype=torch.float64)
                 for name, value in received.items() if value.is_floating_point()}
    weights = central_update(received, total, plan, clip,
                             server_noise_generator(seed, ctx.round, SUM_STREAM))
    new = algorithm.server_update(ctx, state, weights, updates)
    if plan.adaptive is None:
        return new
    following = next_clip(clip, unclipped, plan,
                          server_noise_generator(seed, ctx.round, COUNT_STREAM))
    return dataclasses.replace(new, metrics={**new.metrics, CLIP_METRIC: following})


class EpsilonMeter:
    """ε at the plan's δ after round r: central DP composes one event per round; local DP one
    per participation of a client, reported for the client that has taken part most often
    (sampling is recomputed from the seed, so a resumed run counts the same)."""

    def __init__(self, plan: PrivacyPlan, seed: int, num_clients: int, per_round: int) -> None:
        self.plan, self.seed = plan, seed
        self.num_clients, self.per_round = num_clients, per_round
        self.accountant = plan.make_accountant()
        self.counts = np.zeros(num_clients if plan.mechanism == "local" else 0, np.int64)
        self.counted = 0  # rounds whose participations are in `counts`

    def epsilon(self, round_index: int) -> float:
        if self.plan.mechanism == "central":
            return self.accountant.epsilon(round_index)
        while self.counted < round_index:
            self.counted += 1
            self.counts[round_clients(self.seed, self.counted, self.num_clients,
                                      self.per_round, self.plan.poisson)] += 1
        return self.accountant.epsilon(int(self.counts.max(initial=0)))

