"""Personalised evaluation and heterogeneous clients in the engine: each evaluated client's
deployed model scored on its own parts (the same numbers as a loop written here), the round's
summaries, one model per architecture with its own seed and nothing averaged across them, the
method-vs-setting checks, and the same bits whatever the worker count, a lost worker or a
kill -9 and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import in_one_process, metrics_of, small_config, without_timing
from test_durable import (
    assert_same_state,
    final_state,
    kill_9_after_round_2,
    reference_run,
    tiny_raw,
)

from algorithms.fedavg import FedAvg
from raysim.algorithm import (
    ClientContext,
    LocalRound,
    PersonalModel,
    copy_weights,
    weights_part,
)
from raysim.config import ConfigError
from raysim.engine.backends import LocalActor, LocalBackend
from raysim.engine.personal_eval import contiguous_chunks, evaluated_clients, summarize
from raysim.engine.simulation import Simulation
from raysim.engine.worker import ClientWorker
from raysim.nn.training import ClientData, Preprocess
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare, prepare_resume
from raysim.run.checkpoints import newest_complete
from raysim.seeding import (
    MODEL_INIT,
    PERSONAL_EVAL,
    PERSONAL_SAMPLE,
    client_generator,
    derive_seed,
    sample_clients,
)
from raysim.task import (
    build_task,
    initial_model,
    make_algorithm,
    member_index,
    model_members,
    new_model,
)

CPU = torch.device("cpu")
GROUP = {"model.heterogeneous.models": "[htfe2]", "model.heterogeneous.feature_dim": 16}


class SharedHead(PersonalModel, FedAvg):
    """LG-FedAvg's split: heads averaged, bodies personal (runs on a group of architectures)."""

    shares = "head"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def personal_config(**overrides):
    """Two rounds in this process (12 clients, 4 a round), personal test parts of a quarter."""
    return in_one_process(small_config(**{"rounds": 2, "evaluation.personal.test_fraction": 0.25,
                                          **overrides}))


def run(config, tmp_path: Path, num_workers: int | None = None, backend=None):
    """All rounds of `config`; the last broadcast, server weights and client states; the task."""
    prepared = prepare(config, tmp_path / f"run{num_workers}")
    simulation = Simulation(config, prepared.task, num_workers=num_workers)
    if backend is not None:
        simulation.backend = backend
    simulation.start()
    try:
        results = list(simulation.rounds())
        get, server = simulation.backend.get, simulation.server
        broadcast = get(server.broadcast.remote(config.rounds + 1))
        states = get(server.states_for.remote(list(range(12))))
        weights = simulation.global_weights()
    finally:
        simulation.shutdown()
    return results, (broadcast, weights, states), prepared.task


# ------------------------------------------------------------------ the summaries


def test_summaries_are_the_per_client_metrics_mean_weighted_spread_and_p10():
    rng = np.random.default_rng(0)
    sums = []
    for client in (2, 5, 7, 11):
        n_test, n_val = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        sums.append((client, {
            "test": {"accuracy": float(rng.integers(0, n_test + 1)),
                     "loss": float(rng.random() * n_test), "count": float(n_test)},
            "val": {"accuracy": float(rng.integers(0, n_val + 1)),
                    "loss": float(rng.random() * n_val), "count": float(n_val)}}))
    rows, out = summarize(sums)
    assert out["personal_clients"] == 4
    for part in ("test", "val"):
        for metric in ("accuracy", "loss"):
            name = f"personal_{part}_{metric}"
            values = [s[part][metric] / s[part]["count"] for _, s in sums]
            sizes = [s[part]["count"] for _, s in sums]
            assert [v for c, n, v in rows if n == name] == values
            assert [c for c, n, _ in rows if n == name] == [2, 5, 7, 11]
            mean = sum(values) / 4
            assert out[name] == pytest.approx(mean, rel=1e-12)
            assert out[f"{name}_weighted"] == pytest.approx(
                sum(s[part][metric] for _, s in sums) / sum(sizes), rel=1e-12)
            assert out[f"{name}_std"] == pytest.approx(
                (sum((v - mean) ** 2 for v in values) / 4) ** 0.5, rel=1e-12)
            low = sorted(values)  # linear interpolation at rank 0.1·(n−1) = 0.3
            assert out[f"{name}_p10"] == pytest.approx(low[0] + 0.3 * (low[1] - low[0]),
                                                       rel=1e-12)


def test_evaluated_clients_are_a_seeded_sample_cheap_for_a_million_clients():
    everyone = evaluated_clients(3, 1, 12, 0)
    assert everyone.tolist() == list(range(12))
    sample = evaluated_clients(3, 4, 10**6, 1000)
    expected = np.random.default_rng(derive_seed(3, PERSONAL_SAMPLE, 4)).choice(
        10**6, size=1000, replace=False)
    assert sample.tolist() == sorted(expected.tolist())
    assert evaluated_clients(3, 5, 10**6, 1000).tolist() != sample.tolist()
    # contiguous runs, whatever the pool size: the same clients in the same order
    for workers in (1, 3, 7):
        chunks = contiguous_chunks(sample, workers)
        assert len(chunks) == workers and sum(chunks, []) == sample.tolist()
    assert contiguous_chunks(np.arange(2), 5) == [[0], [1]]


# ------------------------------------------------------------------ models per member


def test_member_zero_keeps_the_homogeneous_seed_and_other_members_have_their_own():
    config = small_config(**GROUP, **{"algorithm.name": "lg_fedavg",
                                      "evaluation.personal.test_fraction": 0.25})
    homogeneous = small_config()
    info = build_task(homogeneous).info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(3, MODEL_INIT))
        reference = new_model(homogeneous, info)
    for name, tensor in initial_model(homogeneous, info).state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name])
    task = build_task(config)
    assert task.members == model_members(config) == ("cnn", "mlp")
    assert task.info.feature_dim == 16
    second = initial_model(config, task.info, member=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(3, MODEL_INIT, 1))
        assert all(torch.equal(a, b) for a, b in zip(
            second.state_dict().values(), new_model(config, task.info, member=1).state_dict()
            .values()))
    assert [member_index(config, k) for k in range(4)] == [0, 1, 0, 1]
    assert [task.member_of(k) for k in range(4)] == [0, 1, 0, 1]
    blocks = small_config(**GROUP, **{"algorithm.name": "lg_fedavg",
                                      "evaluation.personal.test_fraction": 0.25,
                                      "model.heterogeneous.assign": "blocks"})
    assert [member_index(blocks, k) for k in (0, 5, 6, 11)] == [0, 0, 1, 1]
    heads = [weights_part(initial_model(config, task.info, member=m).state_dict(), "head")
             for m in (0, 1)]
    assert {k: v.shape for k, v in heads[0].items()} == {k: v.shape for k, v in heads[1].items()}


def test_weights_are_never_averaged_across_architectures(tmp_path):
    """After round 1 every sampled client's body is what it trains alone from its own
    architecture's round-0 weights, and the server's head is the sample-weighted mean of the
    heads they sent."""
    config = personal_config(rounds=1, **GROUP, **{"algorithm.name": "test_personal:SharedHead"})
    results, (_, server, states), task = run(config, tmp_path)
    algorithm = make_algorithm(config, task.info, CPU)
    start = algorithm.broadcast(algorithm.init_server(initial_model(config, task.info,
                                                                   algorithm)))
    preprocess = Preprocess(task.dataset.spec, CPU)
    x, y = torch.from_numpy(task.dataset.train.x), torch.from_numpy(task.dataset.train.y)
    heads, counts = [], []
    sampled = sample_clients(config.seed, 1, 12, 4)
    assert {member_index(config, k) for k in sampled} == {0, 1}  # both architectures trained
    for cid in range(12):
        if cid not in sampled:
            assert states[cid] is None
            continue
        member = member_index(config, cid)
        model = new_model(config, task.info, algorithm, member)
        initial = copy_weights(initial_model(config, task.info, algorithm, member))
        ctx = ClientContext(cid, 1, client_generator(config.seed, 1, cid), CPU, config.train,
                            initial_weights=initial)
        data = ClientData(x, y, torch.from_numpy(task.partition.indices_of(cid)), preprocess)
        update = algorithm.client_update(ctx, model, start, data, None)
        alone = weights_part(copy_weights(model), "body")
        kept = states[cid]["personal"]
        assert kept.keys() == alone.keys()
        assert all(torch.equal(kept[k], alone[k]) for k in alone)
        heads.append(update.weights)
        counts.append(update.num_samples)
    for key, value in server.items():
        mean = sum(n * h[key].double() for n, h in zip(counts, heads)) / sum(counts)
        assert torch.allclose(value.double(), mean, atol=1e-6)
    assert set(server) == set(heads[0]) and all(k.startswith("classifier.") for k in server)
    assert "test_accuracy" not in results[0].metrics  # no global model to score


# ------------------------------------------------------------------ scores per client


CASES = {
    # personal models of two architectures, validation parts, a sample of the clients
    "fedproto_personal": {"algorithm.name": "fedproto_personal", **GROUP,
                          "evaluation.personal.val_fraction": 0.2,
                          "evaluation.personal.clients": 5},
    # the global model fine-tuned on each client, test parts drawn from the test split, only
    # after the last round
    "finetuned": {"algorithm.name": "fedavg", "evaluation.personal.split": "test_set",
                  "evaluation.personal.finetune_epochs": 1, "evaluation.personal.every": 2,
                  "evaluation.personal.clients": 4},
}


@pytest.mark.parametrize("case", list(CASES))
def test_personal_metrics_are_each_clients_deployed_model_on_its_own_parts(tmp_path, case):
    config = personal_config(**CASES[case])
    results, (broadcast, _, states), task = run(config, tmp_path)
    last = results[-1]
    algorithm = make_algorithm(config, task.info, CPU)
    dataset, parts = task.dataset, task.partition.personal
    preprocess = Preprocess(dataset.spec, CPU)
    splits = {name: (torch.from_numpy(s.x), torch.from_numpy(s.y))
              for name, s in (("train", dataset.train), ("test", dataset.test),
                              ("val", dataset.val)) if s is not None}
    evaluated = sorted({c for c, _, _ in last.client_metrics})
    personal = config.evaluation.personal
    assert len(evaluated) == personal.clients == last.metrics["personal_clients"]
    assert bool(results[0].client_metrics) == (personal.every == 1)
    expected_rows = []
    for cid in evaluated:
        member = member_index(config, cid)
        ctx = ClientContext(
            cid, 2, torch.Generator().manual_seed(derive_seed(config.seed, PERSONAL_EVAL, 2, cid)),
            CPU, config.train,
            initial_weights=copy_weights(initial_model(config, task.info, algorithm, member)))
        train = ClientData(*splits["train"], torch.from_numpy(task.partition.indices_of(cid)),
                           preprocess)
        step = LocalRound(ctx, new_model(config, task.info, algorithm, member), broadcast,
                          train, states[cid])
        model = algorithm.deployed_model(step).eval()
        for part, source, indices in (("test", parts.test_source, parts.test_of(cid)),
                                      ("val", parts.val_source,
                                       parts.val_of(cid) if parts.has_val else None)):
            if indices is None:
                continue
            totals: dict[str, float] = {}
            for start in range(0, len(indices), config.eval_batch_size):
                chosen = torch.from_numpy(indices[start:start + config.eval_batch_size])
                xb, yb = preprocess.batch(splits[source][0][chosen], splits[source][1][chosen])
                for key, value in algorithm.evaluate_batch(model, broadcast, xb, yb).items():
                    totals[key] = totals.get(key, 0.0) + value
            expected_rows += [(cid, f"personal_{part}_{k}", totals[k] / totals["count"])
                              for k in totals if k != "count"]
    assert list(last.client_metrics) == expected_rows
    accuracies = [v for _, n, v in expected_rows if n == "personal_test_accuracy"]
    assert last.metrics["personal_test_accuracy"] == pytest.approx(np.mean(accuracies))
    assert ("personal_val_accuracy" in last.metrics) == parts.has_val
    # a method with one global model is scored globally too; personal models are not
    assert ("test_accuracy" in last.metrics) == (case == "finetuned")


def test_generated_clients_are_split_on_the_worker_as_split_client_does():
    from raysim.data.personal import split_client

    config = small_config(**{"data.dataset": "synthetic_fedprox", "data.partition.kind": "natural",
                             "data.partition.num_clients": 12, "algorithm.name": "fedavg",
                             "evaluation.personal.finetune_epochs": 1,
                             "evaluation.personal.val_fraction": 0.2})
    task = build_task(config)
    assert task.partition.generated
    worker = ClientWorker(config, task.dataset, (task.partition.offsets,
                                                 task.partition.indices, None), task.info)
    assert worker.personal_parts() == ("test", "val")
    for cid in (0, 7):
        x, y = task.dataset.clients.client(cid)
        expected = split_client(y, 0.25, 0.2, config.seed, cid)
        got = [worker.client_data(cid, part).indices.numpy() for part in ("train", "val", "test")]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert sorted(np.concatenate(got).tolist()) == list(range(len(y)))


# ------------------------------------------------------------------ a lost worker


class WorkerLost(Exception):
    """What a dead actor's result raises, in this test's backend."""


class LosesOneWorker(LocalBackend):
    """The local backend, except that the first worker's first personal evaluation is lost
    with the worker, as a killed Ray actor's is."""

    errors = (WorkerLost,)

    def __init__(self) -> None:
        self.created: list[LocalActor] = []
        self.dead: set[int] = set()

    def worker(self, config, shared, info) -> LocalActor:
        actor = super().worker(config, shared, info)
        if not self.created:
            instance = actor._instance

            def dies(*args):
                self.dead.add(id(actor))
                raise WorkerLost("the worker died")

            instance.evaluate_personal = dies
        self.created.append(actor)
        return actor

    def alive(self, actor) -> bool:
        return id(actor) not in self.dead


def test_a_lost_personal_evaluation_runs_again_with_the_rounds_states(tmp_path):
    """Round 2 is dispatched (its clients' new states stored) before round 1's personal
    evaluation is collected; the rerun after the worker is replaced still scores the states
    after round 1."""
    config = personal_config(**CASES["fedproto_personal"])
    expected, *_ = run(config, tmp_path / "calm")
    results, *_ = run(config, tmp_path / "lost", backend=LosesOneWorker())
    assert without_timing(results) == without_timing(expected)
    assert [r.client_metrics for r in results] == [r.client_metrics for r in expected]
    assert [e["kind"] for e in results[0].events] == ["worker_restarted"]


# ------------------------------------------------------------------ one run, any workers


@pytest.mark.slow
def test_a_heterogeneous_personal_run_is_the_same_on_two_ray_workers_after_kill_9(
        ray_session, tmp_path):
    """FedProto with personal models on two architectures: the undisturbed run on one worker
    in this process, and the run on two Ray workers whose driver is killed (kill -9) after the
    round-2 checkpoint, resumed (in this process, two workers: quicker than a second Ray
    driver), give the same metrics, server state and client states."""
    raw = tiny_raw("fedavg", rounds=4)  # checkpoints after rounds 2 and 4
    raw["algorithm"] = {"name": "fedproto_personal"}
    raw["model"] = {"heterogeneous": {"models": ["htfe2"], "feature_dim": 16}}
    raw["evaluation"] = {"personal": {"val_fraction": 0.2, "clients": 6}}
    expected = reference_run(raw, tmp_path / "reference")
    raw["resources"]["num_workers"] = 2
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed"
    kill_9_after_round_2(config_file, run_dir)
    run = prepare_resume(run_dir, ["resources.backend=local"])
    assert len(run.history) == 2
    execute(run, [RunDirectory(run_dir)])
    assert metrics_of(run_dir) == expected
    assert (4, "personal_val_accuracy_p10") in expected
    (r1, state), (r2, reference) = final_state(run_dir), final_state(tmp_path / "reference")
    assert r1 == r2 == 4
    assert_same_state(state, reference)
    clients = "client_states.safetensors"
    assert newest_complete(run_dir).read(clients) == \
        newest_complete(tmp_path / "reference").read(clients)


# ------------------------------------------------------------------ refused settings


def refused(**overrides) -> str:
    with pytest.raises(ConfigError) as error:
        small_config(**overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_settings_a_method_cannot_run_are_refused_with_one_line():
    message = refused(**{"evaluation.personal.test_fraction": 0.25})
    assert message == ("evaluation.personal: fedavg keeps no personal model and does not "
                       "fine-tune: use fedavg_ft, evaluation.personal.finetune_epochs: 1, or "
                       "a personalised method such as fedper/fedproto_personal")
    message = refused(**GROUP, **{"algorithm.name": "fedper",
                                  "evaluation.personal.test_fraction": 0.25})
    assert message.startswith("model.heterogeneous: fedper averages its clients' body")
    assert "lg_fedavg" in message and "fedproto_personal" in message and "fedper," not in message
    message = refused(**GROUP, **{"algorithm.name": "fedavg_ft",
                                  "evaluation.personal.test_fraction": 0.25})
    assert message.startswith("model.heterogeneous: fedavg_ft averages its clients' whole model")
    message = refused(**{"algorithm.name": "fedper"})
    assert message.startswith("evaluation.personal: fedper keeps a personal model per client")
    assert "add evaluation.personal" in message
    message = refused(**{"algorithm.name": "fedper", "evaluation.personal.clients": 13})
    assert message == ("evaluation.personal.clients: 13 > data.partition.num_clients (12); use "
                       "0 to evaluate every client")
    message = refused(**{"algorithm.name": "fedper", "evaluation.personal.test_fraction": 0.25,
                         "diagnostics.leakage.clients_per_round": 1})
    assert message.startswith("diagnostics.leakage: the probe reads weights, prototypes, "
                              "class_gradients uploads, and fedper cannot be read: it sends "
                              "only its body, and the probe reads the classifier of what is sent")
    # what stays allowed: the probe on a method that shares its whole model, fine-tuned
    config = small_config(**{"algorithm.name": "fedavg_ft",
                             "evaluation.personal.test_fraction": 0.25,
                             "diagnostics.leakage.clients_per_round": 1})
    assert config.diagnostics.leakage.clients_per_round == 1


def test_the_probe_reads_personal_prototypes_on_a_group(tmp_path):
    """An honest-but-curious server of FedProto's own setting holds no client model: it still
    learns every probed client's label set and exact counts, and has no images to score."""
    config = personal_config(**{"algorithm.name": "fedproto_personal", **GROUP, "rounds": 1,
                                "diagnostics.leakage.clients_per_round": 2})
    results, _, _ = run(config, tmp_path)
    metrics = results[0].metrics
    assert metrics["leak_presence_exact"] == 1.0 and metrics["leak_counts_exact"] == 1.0
    assert "leak_mean_cosine" not in metrics and "leak_image_psnr" not in metrics
