"""The driver: samples clients, dispatches them to the worker pool, hands results to the server
actor, evaluates, and yields one `RoundResult` per round. It stays thin: no model weights or
client updates pass through it (object refs go straight from workers to the server).

Evaluation after a round scores the global model on the test (and validation) split, for
methods whose clients share one whole model, and with `evaluation.personal` each evaluated
client's deployed model on its own parts (`raysim.engine.personal_eval`): its stored state is
asked of the server right after the round's server step, so it is the state after that round.
With `privacy`, clients may be sampled by a seeded Poisson draw, each round's clip C (where it
adapts) is asked of the server, and ε after the round is a metric (`raysim.engine.privatize`).
With `train.client_group` = K > 1 the sampled clients go to workers as whole groups of K, cut in
client-id order (`raysim.engine.grouped.assign_groups`), so no group depends on the worker count.
Given a warm pool (`raysim.engine.warm`), the server and workers are the actors a finished run
left there, reloaded with this run, and go back to it at the end.

It also keeps the run alive. A round is a pure function of the server state before it (every
draw comes from (seed, round, client id) and aggregation is in client-id order), so:
- a dead worker actor is replaced and the groups of clients whose results were lost are run
  again on the new one; the round's result is the one it would have been;
- a dead server actor is recreated from the newest checkpoint and the rounds since are
  replayed before the run goes on.
Every retry, drop, restart and replay is reported as a failure record of the round it hit.
A dead GCS server or raylet of the Ray this driver started cannot be survived: the run stops
(`ClusterFailed`) within seconds, instead of waiting on actors that can no longer be created.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysim.config import Config
from raysim.data.domain_split import UNSEEN
from raysim.engine.backends import make_backend
from raysim.engine.cluster import embedded_failure
from raysim.engine.evaluation import eval_batches, reduce_domain_eval
from raysim.engine.grouped import assign_groups
from raysim.engine.personal_eval import contiguous_chunks, evaluated_clients, summarize
from raysim.engine.privatize import EPSILON_METRIC, EpsilonMeter
from raysim.engine.server import Restore
from raysim.engine.warm import Pool, PoolShape, WarmPool
from raysim.nn.training import steps_per_epoch
from raysim.seeding import round_clients
from raysim.task import Task, has_global_model, keeps_client_state
from raysim.types import RoundResult


class RunStopped(Exception):
    """The run cannot go on (too few clients succeeded, too many actor restarts). `round` is
    the last round whose state is complete."""

    def __init__(self, message: str, round_index: int) -> None:
        super().__init__(message)
        self.round = round_index


class ClusterFailed(RunStopped):
    """A process the Ray cluster cannot run without (GCS server, raylet) died: no actor can be
    replaced and no checkpoint asked of the server; the run's actors are gone or soon will be."""


HEALTH_SECONDS = 1.0  # while waiting for results, how often the cluster is looked at


def failure_record(round_index: int, kind: str, reason: str, client: int = -1,
                   actor: str = "", attempt: int = 0) -> dict[str, Any]:
    return {"round": round_index, "kind": kind, "client": client, "actor": actor,
            "attempt": attempt, "reason": reason}


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


@dataclass
class RoundWork:
    """One dispatched round: what each worker slot trains, and the refs of its results."""

    round: int
    sampled: int
    groups: list[list[int]]
    train_refs: list[Any]  # per worker slot; None where the slot got no clients
    report_ref: Any
    eval_refs: list[Any]
    evaluate: bool
    checkpoint: bool
    personal: bool = False  # evaluate the clients' deployed models after the round
    # per worker slot: the clients it scores personally, their states' ref, its result's ref
    personal_groups: list[list[int]] = field(default_factory=list)
    personal_states: list[Any] = field(default_factory=list)
    personal_refs: list[Any] = field(default_factory=list)


class Simulation:
    """One FL run on a pool of workers: Ray actors (`ray.init` must have been called), or with
    `resources.backend: local` plain objects in this process (see `raysim.engine.backends`).

    `restore` starts after a checkpoint's round; `load_checkpoint` returns the newest complete
    checkpoint when the server actor must be recreated (default: the last one this simulation
    produced, kept in memory)."""

    def __init__(
        self, config: Config, task: Task, num_workers: int | None = None,
        run_dir: str | None = None, restore: Restore | None = None,
        load_checkpoint: Callable[[], Restore | None] | None = None,
        pool: WarmPool | None = None,
    ) -> None:
        self.config = config
        self.task = task
        self.num_workers = num_workers or config.resources.num_workers
        self.stateful = keeps_client_state(config)
        self.global_model = has_global_model(config)  # else no global evaluation
        self.personal = config.evaluation.personal
        self.sizes = task.partition.sizes
        self.costs = steps_per_epoch(self.sizes, config.train.batch_size)  # for balancing
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.restore = restore
        self.first_round = restore.round + 1 if restore else 1
        # without a loader (no run directory), the last checkpoint is kept in memory
        self._last_checkpoint = restore
        self._keep_checkpoints = load_checkpoint is None
        self.load_checkpoint = load_checkpoint or (lambda: self._last_checkpoint)
        # Fixed evaluation batches per split: the validation split (model selection) where the
        # dataset has one, and the test split.
        self.eval_groups = {
            name: eval_batches(split.domain, len(split.y), config.eval_batch_size)
            for name, split in (("val", task.dataset.val), ("test", task.dataset.test),
                                (UNSEEN, task.dataset.unseen))
            if split is not None
        }
        self.backend = make_backend(config.resources.backend)
        # a warm pool (Ray only): the actors come from it and go back to it
        self.pool = pool if self.backend.name == "ray" else None
        if self.pool is not None:
            self.backend.detached = self.pool.detached
        # the book's number of the pool this run holds (0: none yet); at the end the run's
        # actors go back under it, so a lent pool whose actors had died is replaced
        self._pool_number = 0
        self.pool_note: str | None = None  # why the run is not (fully) warm
        self.warm = False
        self.workers: list[Any] = []
        self.server: Any = None
        self.shared: Any = None
        self.restarts = 0
        self.stop_requested = False
        self.cluster_failed = False
        # only the Ray backend has a cluster to lose (the local one has none)
        self._watch_cluster = self.backend.name == "ray"
        self._events: list[dict[str, Any]] = []  # records waiting for the next round's result
        self._broadcasts: dict[int, Any] = {}
        # differential privacy: who is sampled, central DP's adaptive clip, ε after each round
        plan = task.info.privacy
        self.poisson = plan is not None and plan.poisson
        self.adaptive_clip = plan is not None and plan.adaptive is not None
        self.epsilon = EpsilonMeter(plan, config.seed, len(self.sizes),
                                    config.clients_per_round) if plan is not None else None

    # ------------------------------------------------------------------ actors
    def start(self) -> list[dict[str, Any]]:
        """Create the server and the worker pool; return once every worker is ready."""
        partition = self.task.partition
        self.shared = self.backend.share(self.task.dataset, (
            partition.offsets, partition.indices, partition.personal))
        if not self._reload_warm():
            self.workers = [self._new_worker() for _ in range(self.num_workers)]
            self.server = self._new_server(self.restore)
        return self._get([w.describe.remote() for w in self.workers], self.first_round)

    def _new_worker(self) -> Any:
        return self.backend.worker(self.config, self.shared, self.task.info)

    def _new_server(self, restore: Restore | None) -> Any:
        return self.backend.server(self.config, self._server_args(restore), self._pin_server)

    def _server_args(self, restore: Restore | None) -> tuple:
        return self.task.info, self.run_dir, restore

    @property
    def _pin_server(self) -> bool:
        # the disk store writes into the run directory: keep the server on this node
        return self.config.client_state.store == "disk" and self.stateful

    @property
    def _shape(self) -> PoolShape:
        """What this run's actors are created with (a warm pool's key)."""
        return PoolShape.of(self.config.resources, self.num_workers, self._pin_server)

    def _reload_warm(self) -> bool:
        """Take the warm pool's actors, if it has some of this run's shape, and reload them
        with this run (`raysim.engine.warm`); False: the run creates its own."""
        if self.pool is None:
            return False
        lent = self.pool.lend(self._shape, self._holds())
        for actor in lent.retired:
            self.backend.kill(actor)
        self.pool_note = lent.note
        if lent.pool is None:
            return False
        self._pool_number = lent.pool.number
        workers, server = lent.pool.workers, lent.pool.server
        reloads = [w.reload.remote(self.config, self.shared, self.task.info) for w in workers]
        reloads.append(server.reload.remote(self.config, *self._server_args(self.restore)))
        try:
            self.backend.get(reloads)
        except self.backend.errors:  # one died while parked: this run starts its own
            for actor in (*workers, server):
                self.backend.kill(actor)
            self.pool_note = "a warm actor had died: a fresh pool starts"
            return False
        self.workers, self.server = list(workers), server
        self.warm = True
        return True

    def _holds(self) -> str:
        model = self.config.model
        name = "heterogeneous models" if model.heterogeneous is not None else model.name
        return f"{self.config.data.dataset} / {name}"

    def describe(self) -> list[dict[str, Any]]:
        """Process ids and placement of the workers, then the server's (for fault tests)."""
        return self.backend.get([w.describe.remote() for w in self.workers]
                                + [self.server.describe.remote()])

    # ------------------------------------------------------------------ the round loop
    def request_stop(self) -> None:
        """Finish the rounds already dispatched, start no new one (an interrupt)."""
        self.stop_requested = True

    def rounds(self) -> Iterator[RoundResult]:
        """Run the rounds, one round of lookahead: round r+1 is dispatched before round r's
        results are collected, so logging never leaves the workers idle."""
        inflight: deque[RoundWork] = deque()
        next_round = self.first_round
        last = time.perf_counter()
        while True:
            while (len(inflight) < 2 and next_round <= self.config.rounds
                   and not self.stop_requested):
                inflight.append(self._dispatch(next_round))
                next_round += 1
            if not inflight:
                return
            try:
                result = self._collect(inflight[0], started=last)
            except self.backend.errors as error:
                self._recover(error, inflight)
                continue
            inflight.popleft()
            last = time.perf_counter()
            if result.checkpoint is not None and self._keep_checkpoints:
                self._last_checkpoint = Restore(result.round, result.checkpoint)
            yield result

    def _checkpoint_due(self, r: int) -> bool:
        every = self.config.checkpoint.every
        return r == self.config.rounds or (every > 0 and r % every == 0)

    def _broadcast(self, r: int) -> Any:
        """The ref of round r's broadcast, made once: round r-1's evaluation shares it."""
        if r not in self._broadcasts:
            self._broadcasts = {k: v for k, v in self._broadcasts.items() if k >= r - 1}
            self._broadcasts[r] = self.server.broadcast.remote(r)
        return self._broadcasts[r]

    def _dispatch(self, r: int, replay: bool = False) -> RoundWork:
        cfg = self.config
        sampled = round_clients(cfg.seed, r, len(self.sizes), cfg.clients_per_round,
                                self.poisson)
        # client groups go to workers whole, so what a group holds is the same for any count
        groups = assign_groups(sampled, self.costs, cfg.train.client_group, self.num_workers) \
            if cfg.train.client_group > 1 else balance(sampled, self.costs, self.num_workers)
        work = RoundWork(
            round=r, sampled=len(sampled), groups=groups,
            train_refs=[self._train(i, r, g) if g else None for i, g in enumerate(groups)],
            report_ref=None, eval_refs=[],
            evaluate=not replay and self.global_model and (r % cfg.eval_every == 0
                                                           or r == cfg.rounds),
            checkpoint=not replay and self._checkpoint_due(r),
            personal=not replay and self.personal is not None and (
                r % self.personal.every == 0 or r == cfg.rounds),
        )
        self._aggregate(work)
        return work

    def _train(self, slot: int, r: int, group: list[int]) -> Any:
        """A worker's share of round r. What the server makes for it (the broadcast, the
        clients' states, the round's clip) goes deferred: the worker starts on its clients'
        data while the server still finishes round r-1."""
        later = self.backend.later
        states = later(self.server.states_for.remote(group)) if self.stateful \
            else [None] * len(group)
        # adaptive clipping: this round's C, set by the server step before it
        clip = later(self.server.privacy_clip.remote(r)) if self.adaptive_clip else None
        return self.workers[slot].train.remote(later(self._broadcast(r)), r, group, states, clip)

    def _aggregate(self, work: RoundWork) -> None:
        refs = [ref for ref in work.train_refs if ref is not None]
        work.report_ref = self.server.aggregate.remote(work.round, work.sampled, work.checkpoint,
                                                       *refs)
        # evaluation of the model after round r: round r+1's broadcast
        work.eval_refs = self._dispatch_evaluation(self._broadcast(work.round + 1)) \
            if work.evaluate else []
        if work.personal:
            self._dispatch_personal(work)

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

    def _dispatch_personal(self, work: RoundWork) -> None:
        """Personalised evaluation after round r: the evaluated clients in contiguous runs,
        one per worker, each with its clients' states as the server holds them after round
        r's step (asked now, before any later step is submitted)."""
        cfg = self.config
        ids = evaluated_clients(cfg.seed, work.round, len(self.sizes), self.personal.clients)
        work.personal_groups = contiguous_chunks(ids, self.num_workers)
        work.personal_states = [self.server.states_for.remote(group) if self.stateful
                                else [None] * len(group) for group in work.personal_groups]
        work.personal_refs = [self._evaluate_personal(work, slot)
                              for slot in range(len(work.personal_groups))]

    def _evaluate_personal(self, work: RoundWork, slot: int) -> Any:
        return self.workers[slot].evaluate_personal.remote(
            self._broadcast(work.round + 1), work.round, work.personal_groups[slot],
            work.personal_states[slot])

    def _collect(self, work: RoundWork, started: float) -> RoundResult:
        r = work.round
        report = self._get(work.report_ref, r)
        events = self._events + [
            failure_record(r, "client_retried", reason, client=cid, attempt=attempt)
            for cid, attempt, reason in report.retries
        ] + [failure_record(r, "client_dropped", reason, client=cid)
             for cid, reason in report.failures.items()]
        if report.insufficient:
            ok, needed = int(report.metrics["clients_ok"]), self.config.fault_tolerance
            first = next(iter(report.failures.values()), "no result").strip().splitlines()
            raise RunStopped(
                f"round {r}: only {ok} of {work.sampled} sampled clients succeeded, fewer than "
                f"fault_tolerance.min_clients_fraction={needed.min_clients_fraction}; the first "
                f"failure: {first[-1] if first else 'unknown'}", r - 1)
        metrics = dict(report.metrics)
        if work.eval_refs:
            sums = iter([s for part in self._get(work.eval_refs, r)
                         for s in part])  # in batch order
            names = self.task.dataset.spec.domains
            for split, split_groups in self.eval_groups.items():
                groups = [(names[d] if d >= 0 else "", [next(sums) for _ in batches])
                          for d, batches in split_groups]
                metrics.update(reduce_domain_eval(groups, split))
        client_metrics: list[tuple[int, str, float]] = []
        if work.personal_refs:
            # in client-id order: the runs are contiguous and each worker's result sorted
            scored = [c for part in self._get(work.personal_refs, r) for c in part]
            client_metrics, summaries = summarize(scored)
            metrics.update(summaries)
        if self.epsilon is not None:
            metrics[EPSILON_METRIC] = self.epsilon.epsilon(r)
        self._events = []
        seconds = time.perf_counter() - started
        metrics["round_seconds"] = seconds
        metrics["samples_per_second"] = metrics.get("samples", 0.0) * \
            self.config.train.local_epochs / seconds
        return RoundResult(round=r, metrics=metrics, failures=report.failures, seconds=seconds,
                           events=tuple(events), checkpoint=report.checkpoint,
                           train_seconds=report.train_seconds,
                           client_metrics=tuple(client_metrics))

    # ------------------------------------------------------------------ recovery
    def _recover(self, error: Exception, inflight: deque[RoundWork]) -> None:
        """Replace the actors that died and run again what was lost with them. An error with
        every actor alive is the method's or the engine's own: it is raised."""
        r = inflight[0].round
        self._check_cluster(r)  # a dead raylet makes every actor look dead: nothing to replace
        dead = [i for i, worker in enumerate(self.workers) if not self.backend.alive(worker)]
        server_dead = not self.backend.alive(self.server)
        if not dead and not server_dead:
            raise error
        self._broadcasts = {}
        for slot in dead:
            self._count_restart(r, f"worker {slot}")
            self.backend.kill(self.workers[slot])
            self.workers[slot] = self._new_worker()
            self._events.append(failure_record(r, "worker_restarted", _reason(error),
                                               actor=f"worker {slot}"))
        if server_dead:
            self._count_restart(r, "server")
            self._restart_server(r, _reason(error))
            for i, work in enumerate(inflight):
                inflight[i] = self._dispatch(work.round)
            return
        for work in inflight:
            self._repair(work)

    def _count_restart(self, r: int, actor: str) -> None:
        self.restarts += 1
        limit = self.config.fault_tolerance.max_actor_restarts
        if self.restarts > limit:
            raise RunStopped(f"round {r}: {actor} died, and the run has already replaced "
                             f"fault_tolerance.max_actor_restarts={limit} actors", r - 1)

    def _repair(self, work: RoundWork) -> None:
        """Run again the groups whose results were lost; evaluate again what was lost (a
        personal evaluation with the states it was given, which stay the round's)."""
        if not self.backend.succeeded(work.report_ref):
            for slot, ref in enumerate(work.train_refs):
                if ref is not None and not self.backend.succeeded(ref):
                    work.train_refs[slot] = self._train(slot, work.round, work.groups[slot])
            self._aggregate(work)
            return
        if not all(self.backend.succeeded(ref) for ref in work.eval_refs):
            work.eval_refs = self._dispatch_evaluation(self._broadcast(work.round + 1))
        for slot, ref in enumerate(work.personal_refs):
            if not self.backend.succeeded(ref):
                work.personal_refs[slot] = self._evaluate_personal(work, slot)

    def _restart_server(self, r: int, reason: str) -> None:
        """A new server from the newest checkpoint, then the rounds since it replayed (no
        evaluation: their metrics were logged already)."""
        self.backend.kill(self.server)
        restore = self.load_checkpoint()
        if restore is not None and restore.round >= r:
            restore = None  # a checkpoint of a round not yet collected cannot be
        self.server = self._new_server(restore)
        self._events.append(failure_record(r, "server_restarted", reason, actor="server"))
        start = restore.round + 1 if restore else 1
        for replayed in range(start, r):
            report = self._get(self._dispatch(replayed, replay=True).report_ref, r)
            if report.insufficient:
                raise RunStopped(f"round {replayed}: the replay after a server restart lost "
                                 "too many clients", replayed - 1)
        if start < r:
            self._events.append(failure_record(
                r, "rounds_replayed", f"rounds {start}-{r - 1} replayed from "
                f"{'checkpoint ' + str(restore.round) if restore else 'the initial state'}",
                actor="server"))

    # ------------------------------------------------------------------ the cluster
    def _check_cluster(self, r: int) -> None:
        """ClusterFailed (in round `r`) when the GCS server or raylet of the Ray this driver
        started has died. Its actors may still answer for a while (a minute without a GCS), but
        none can be replaced, and Ray ends a driver that has lost its GCS for good."""
        if not self._watch_cluster:
            return
        what = embedded_failure()
        if what is not None:
            self.cluster_failed = True
            raise ClusterFailed(f"the Ray cluster failed: {what} (in round {r})", r - 1)

    def _get(self, refs: Any, r: int) -> Any:
        """`backend.get`, looking at the cluster every HEALTH_SECONDS while it waits."""
        if not self._watch_cluster:
            return self.backend.get(refs)
        while True:
            self._check_cluster(r)
            try:
                return self.backend.get(refs, timeout=HEALTH_SECONDS)
            except TimeoutError:  # Ray's GetTimeoutError: not ready yet
                continue

    # ------------------------------------------------------------------ state
    def snapshot(self, round_index: int) -> dict[str, bytes]:
        """The files of a checkpoint after `round_index` (the last round the server ran)."""
        return self.backend.get(self.server.snapshot.remote(round_index))

    def release_checkpoint(self, round_index: int) -> None:
        self.server.release.remote(round_index)

    def global_weights(self) -> dict:
        return self.backend.get(self.server.weights.remote())

    def shutdown(self) -> None:
        """Give the actors to the warm pool (when the run has one), else end them."""
        # after a cluster failure the actors go with the cluster; asking Ray could block
        actors = [] if self.cluster_failed else [*self.workers, self.server]
        if self.pool is not None and actors and None not in actors:
            self.pool.give(Pool(self._shape, list(self.workers), self.server, self._holds(),
                                number=self._pool_number))
            actors = []
        for actor in actors:
            if actor is not None:
                self.backend.kill(actor)
        self.workers, self.server = [], None


def _reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
