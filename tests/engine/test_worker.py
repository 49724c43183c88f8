"""The client worker: many virtual clients in one process, each trained as a fresh model would
be from the broadcast, in client-id order with its own state and generator; retries, drops,
the exact pre-summed weights, evaluation sums; and the same as a Ray actor."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import small_config

from algorithms.fedavg import FedAvg
from raysim.algorithm import Broadcast, ClientContext, ClientUpdate, copy_weights
from raysim.engine.deferred import Deferred
from raysim.engine.worker import (
    ClientWorker,
    all_finite,
    as_tensor,
    assigned_device,
    check_finite,
    gpu_memory_mb,
)
from raysim.methods.aggregation import WeightSum
from raysim.nn.training import ClientData, Preprocess
from raysim.seeding import client_generator, sample_clients
from raysim.task import build_task, initial_model, make_algorithm, new_model

CPU = torch.device("cpu")


class OwnAggregate(FedAvg):
    """A method that aggregates on the server itself: its workers send every client's weights."""

    weighted_mean = False

    def aggregate(self, ctx, state, updates):
        return super().aggregate(ctx, state, updates)


@pytest.fixture(scope="module")
def task():
    return build_task(small_config())


@pytest.fixture(autouse=True)
def one_thread():
    """Workers train with one thread (`resources.worker.num_cpus: 1`); so do the references
    here, so both sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_worker(task, **overrides) -> ClientWorker:
    partition = task.partition
    return ClientWorker(small_config(**overrides), task.dataset,
                        (partition.offsets, partition.indices), task.info)


def first_broadcast(task) -> Broadcast:
    return Broadcast(copy_weights(initial_model(small_config(), task.info)))


def client_samples(task, client_id: int) -> np.ndarray:
    partition = task.partition
    return partition.indices[partition.offsets[client_id]:partition.offsets[client_id + 1]]


def trained_here(task, broadcast: Broadcast, round_index: int, client_id: int,
                 **overrides) -> ClientUpdate:
    """Client `client_id`'s round on a model built for it alone, from its own samples."""
    config = small_config(**overrides)
    algorithm = make_algorithm(config, task.info, CPU)
    model = new_model(config, task.info, algorithm)
    train = task.dataset.train
    data = ClientData(torch.from_numpy(train.x), torch.from_numpy(train.y),
                      torch.from_numpy(client_samples(task, client_id)),
                      Preprocess(task.dataset.spec, CPU))
    ctx = ClientContext(client_id, round_index, client_generator(config.seed, round_index,
                                                                 client_id), CPU, config.train)
    return algorithm.client_update(ctx, model, broadcast, data, None)


def weighted_mean_written_out(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Σ n_k·w_k / Σ n_k in float64, term by term."""
    total = sum(u.num_samples for u in updates)
    return {name: sum(u.num_samples * u.weights[name].double() for u in updates) / total
            for name in updates[0].weights}


def assert_weights_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_each_client_of_a_group_is_trained_as_a_fresh_model_from_its_own_samples(task):
    worker = make_worker(task, **{"algorithm.name": "test_worker:OwnAggregate"})
    broadcast = first_broadcast(task)
    group = worker.train(broadcast, 2, [9, 4, 7], [None] * 3)
    assert group.weight_sum is None  # a method that aggregates itself gets every client's
    assert [r.client_id for r in group.clients] == [4, 7, 9]
    for result in group.clients:
        assert result.error is None and result.retries == ()
        expected = trained_here(task, broadcast, 2, result.client_id)
        assert result.update.num_samples == task.partition.sizes[result.client_id]
        assert result.update.metrics == expected.metrics
        assert_weights_equal(result.update.weights, expected.weights)
    # the model the worker reuses really changed: each client started again from the broadcast
    assert not torch.equal(group.clients[0].update.weights["classifier.weight"],
                           broadcast.weights["classifier.weight"])


def test_a_weighted_mean_method_sends_one_exact_sum_of_its_clients(task):
    worker = make_worker(task)
    broadcast = first_broadcast(task)
    group = worker.train(broadcast, 1, [11, 0, 5], [None] * 3)
    assert [r.client_id for r in group.clients] == [0, 5, 11]
    assert all(len(r.update.weights) == 0 for r in group.clients)  # the sum carries them
    expected = [trained_here(task, broadcast, 1, cid) for cid in (0, 5, 11)]
    assert [r.update.num_samples for r in group.clients] == [u.num_samples for u in expected]
    assert [r.update.metrics for r in group.clients] == [u.metrics for u in expected]
    summed = group.weight_sum
    assert summed.count == 3 and summed.samples == sum(u.num_samples for u in expected)
    mean = summed.mean()
    written = weighted_mean_written_out(expected)
    for name, value in mean.items():
        assert value.dtype == expected[0].weights[name].dtype
        torch.testing.assert_close(value.double(), written[name], rtol=1e-6, atol=1e-7)
    # and it is the same bits as the server summing every client itself, in another order
    server_side = WeightSum()
    for update in reversed(expected):
        server_side.add(update.weights, update.num_samples)
    assert_weights_equal(mean, server_side.mean())


def test_results_come_in_client_id_order_each_with_its_own_state(task):
    worker = make_worker(task, **{"algorithm.name": "test_algorithms:Counting"})
    group = worker.train(first_broadcast(task), 1, [7, 3, 10], [5, None, 1])
    assert [r.client_id for r in group.clients] == [3, 7, 10]
    assert [r.update.state for r in group.clients] == [1, 6, 2]
    assert [r.update.metrics["participations"] for r in group.clients] == [1.0, 6.0, 2.0]


def test_a_client_that_fails_once_is_retried_to_the_same_update(task, monkeypatch):
    from test_algorithms import FailsOnceOnClientZero

    monkeypatch.setattr(FailsOnceOnClientZero, "attempted", set())  # a fresh process's
    flaky = make_worker(task, **{"algorithm.name": "test_algorithms:FailsOnceOnClientZero"})
    broadcast = first_broadcast(task)
    got = flaky.train(broadcast, 3, [0, 2], [None, None])
    plain = make_worker(task).train(broadcast, 3, [0, 2], [None, None])
    zero = got.clients[0]
    assert zero.error is None and len(zero.retries) == 1
    assert "RuntimeError: the first attempt fails" in zero.retries[0]
    assert got.clients[1].retries == ()
    assert [r.update.metrics for r in got.clients] == [r.update.metrics for r in plain.clients]
    assert_weights_equal(got.weight_sum.mean(), plain.weight_sum.mean())


def test_a_client_that_always_fails_is_dropped_after_the_allowed_retries(task):
    worker = make_worker(task, **{"algorithm.name": "test_algorithms:FailsOnClientZero",
                                  "fault_tolerance.max_client_retries": 2})
    group = worker.train(first_broadcast(task), 1, [5, 0], [None, None])
    zero, five = group.clients
    assert zero.client_id == 0 and zero.update is None
    assert "client 0 is broken" in zero.error
    assert len(zero.retries) == 2 and all("client 0 is broken" in r for r in zero.retries)
    assert five.update is not None and five.error is None
    assert group.weight_sum.count == 1 and group.weight_sum.samples == task.partition.sizes[5]


def test_non_finite_weights_are_dropped_without_a_retry(task):
    worker = make_worker(task, **{"algorithm.name": "test_algorithms:FailsOnClientZero",
                                  "algorithm.mode": "nan"})
    zero, one = worker.train(first_broadcast(task), 1, [0, 1], [None, None]).clients
    assert zero.update is None and zero.retries == ()
    assert zero.error == "non-finite values in 'classifier.bias'"
    assert one.update is not None
    assert check_finite(ClientUpdate({"w": torch.tensor([1.0, float("inf")])}, 1)) == \
        "non-finite values in 'w'"
    assert check_finite(ClientUpdate({"w": torch.ones(2), "n": torch.tensor(3)}, 1)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_finds_every_kind_of_non_finite_value_in_any_layout(dtype, bad):
    base = torch.ones(4, 6, dtype=dtype)
    if bad is not None:
        base[2, 3] = bad
    views = [base, base.t(), base[:, 1:], torch._neg_view(base), base.clone().requires_grad_()]
    for view in views:
        assert all_finite(view) is (bad is None)


def test_the_leakage_probe_measures_the_lowest_sampled_clients_of_its_rounds_only(task):
    config = small_config()
    worker = make_worker(task, **{"diagnostics.leakage.clients_per_round": 1,
                                  "diagnostics.leakage.every": 2,
                                  "diagnostics.leakage.inversion_steps": 2,
                                  "diagnostics.leakage.inversion_classes": 1})
    broadcast = first_broadcast(task)
    for round_index in (1, 2):
        sampled = sample_clients(config.seed, round_index, 12, config.clients_per_round)
        group = worker.train(broadcast, round_index, sampled, [None] * len(sampled))
        probed = [r.client_id for r in group.clients
                  if any(k.startswith("leak_") for k in r.update.metrics)]
        assert probed == ([min(sampled)] if round_index == 2 else [])


def test_client_data_is_a_zero_copy_view_of_the_clients_partition_slice(task):
    worker = make_worker(task)
    train = task.dataset.train
    assert worker.train_x.data_ptr() == train.x.ctypes.data  # the shared array, not a copy
    for client_id in range(task.partition.num_clients):
        data = worker.client_data(client_id)
        assert len(data) == task.partition.sizes[client_id]
        assert torch.equal(data.labels, torch.from_numpy(train.y[client_samples(task,
                                                                                 client_id)]))


def test_evaluation_returns_the_metric_sums_of_each_range(task):
    worker = make_worker(task)
    broadcast = first_broadcast(task)
    ranges = [("test", 0, 50), ("test", 50, 120)]
    sums = worker.evaluate(broadcast, ranges)
    model = new_model(small_config(), task.info)
    model.load_state_dict(broadcast.weights)
    model.eval()
    preprocess = Preprocess(task.dataset.spec, CPU)
    test = task.dataset.test
    for (_, start, stop), got in zip(ranges, sums):
        x, y = preprocess.batch(torch.from_numpy(test.x[start:stop]),
                                torch.from_numpy(test.y[start:stop]))
        with torch.no_grad():
            logits = model(x).logits
        assert got["count"] == stop - start
        assert got["accuracy"] == (logits.argmax(1) == y).sum().item()
        assert got["loss"] == pytest.approx(
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), rel=1e-6)
    with pytest.raises(KeyError):
        worker.evaluate(broadcast, [("val", 0, 10)])  # this task has no validation split


def test_outside_ray_a_worker_describes_this_process(task):
    described = make_worker(task).describe()
    assert described["pid"] == os.getpid() and described["device"] == "cpu"
    assert described["threads"] == 1  # resources.worker.num_cpus
    ray = sys.modules.get("ray")  # a driver of the tests' Ray places it on that node
    assert (described["node_id"] is not None) == (ray is not None and ray.is_initialized())
    assert described["gpu_ids"] == []
    assert described["peak_rss_mb"] > 50
    assert described["gpu_mb"] is None  # on a CPU: no GPU memory to report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_memory_mb_counts_what_this_process_allocated_and_holds():
    device = torch.device("cuda", 0)
    _held = torch.ones(2**20, device=device)  # 4 MiB, alive while measured
    memory = gpu_memory_mb(device)
    assert memory["peak_allocated"] >= 4 and memory["reserved"] >= 4


def test_arrays_are_wrapped_without_a_copy_and_devices_follow_the_gpu_request():
    array = np.arange(6, dtype=np.float32)
    array.flags.writeable = False  # as the object store hands them out
    tensor = as_tensor(array, CPU)
    assert tensor.data_ptr() == array.ctypes.data and tensor.tolist() == array.tolist()
    fresh = np.arange(4, dtype=np.int64)  # a writable array (generated here): no copy either
    assert as_tensor(fresh, CPU).data_ptr() == fresh.ctypes.data
    assert assigned_device(0.0) == CPU
    assert assigned_device(0.5) == (torch.device("cuda", 0) if torch.cuda.is_available()
                                    else CPU)



def test_a_grouped_worker_makes_its_first_groups_data_before_fetching_the_servers_part(
        ray_session, task):
    """What the server sends deferred is fetched after the first group is prepared, and the
    round is the round given everything at once."""
    worker = make_worker(task, **{"train.client_group": 2})
    order = []
    prepare = worker._prepare_group

    def prepared(*args):
        order.append("prepare")
        return prepare(*args)

    class Watched(Deferred):
        def fetch(self):
            order.append("fetch")
            return super().fetch()

    broadcast = first_broadcast(task)
    direct = worker.train(broadcast, 4, [8, 1, 6], [None] * 3)
    worker._prepare_group = prepared
    late = worker.train(Watched(ray_session.put(broadcast)), 4, [8, 1, 6],
                        Watched(ray_session.put([None] * 3)))
    assert order == ["prepare", "fetch", "fetch", "prepare"]  # groups [1, 6] and [8]
    assert [r.client_id for r in late.clients] == [1, 6, 8]
    assert [r.update.metrics for r in late.clients] == [r.update.metrics for r in direct.clients]
    assert_weights_equal(late.weight_sum.mean(), direct.weight_sum.mean())

def test_a_worker_actor_trains_its_clients_and_sends_their_exact_sum(ray_session, task):
    """On Ray: the actor reads the shared dataset from the object store, runs its client loop
    in its own process and sends the exact sum the clients' updates make here."""
    from raysim.engine.backends import RayBackend

    backend = RayBackend()
    config = small_config()
    partition = task.partition
    actor = backend.worker(config, backend.share(task.dataset,
                                                 (partition.offsets, partition.indices)),
                           task.info)
    try:
        described = backend.get(actor.describe.remote())
        broadcast = first_broadcast(task)
        group = backend.get(actor.train.remote(broadcast, 4, [8, 1, 6], [None] * 3))
        # as the simulation sends a round: what the server makes, deferred, the same result
        deferred = backend.get(actor.train.remote(
            backend.later(backend.put(broadcast)), 4, [8, 1, 6],
            backend.later(backend.put([None] * 3))))
    finally:
        backend.kill(actor)
    assert [r.update.metrics for r in deferred.clients] == \
        [r.update.metrics for r in group.clients]
    assert_weights_equal(deferred.weight_sum.mean(), group.weight_sum.mean())
    assert described["pid"] != os.getpid() and described["threads"] == 1
    assert described["node_id"] == ray_session.get_runtime_context().get_node_id()
    assert [r.client_id for r in group.clients] == [1, 6, 8]
    expected = [trained_here(task, broadcast, 4, cid) for cid in (1, 6, 8)]
    assert [r.update.metrics for r in group.clients] == [u.metrics for u in expected]
    assert group.weight_sum.samples == sum(u.num_samples for u in expected)
    written = weighted_mean_written_out(expected)
    mean = group.weight_sum.mean()
    for name, value in mean.items():
        torch.testing.assert_close(value.double(), written[name], rtol=1e-6, atol=1e-7)
    here = WeightSum()
    for update in expected:
        here.add(update.weights, update.num_samples)
    assert_weights_equal(mean, here.mean())
