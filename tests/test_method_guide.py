"""The method guide's examples (docs/guide/methods.md) run as printed: every block marked
`<!-- guide-example: name -->` is executed into one module, and its methods run on the
in-process backend. Ditto sees no client state only in a client's first round; FedNova
aggregates every client's weights itself, refuses the settings it does not cover, and differs
from FedAvg."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import run_rounds, small_config, without_timing

from raysim.algorithm import ClientUpdate, ServerContext, ServerState
from raysim.config import ConfigError

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "methods.md"
MODULE = "method_guide_examples"  # the blocks' module, named in algorithm.name as MODULE:Class
EXAMPLE = re.compile(r"<!-- guide-example: (\w+) -->\n```python\n(.*?)\n```", re.S)


@pytest.fixture(scope="module")
def guide():
    examples = EXAMPLE.findall(GUIDE.read_text())
    assert [name for name, _ in examples] == ["ditto", "fednova"]
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module
    for name, code in examples:
        exec(compile(code, f"{GUIDE}:{name}", "exec"), module.__dict__)

    class RecordingDitto(module.Ditto):
        """Ditto that records, per client, whether each of its rounds began without state."""

        began_without_state: dict[int, list[bool]] = {}

        def after_training(self, step):
            self.began_without_state.setdefault(step.ctx.client_id, []).append(
                step.state is None)
            return super().after_training(step)

    module.RecordingDitto = RecordingDitto
    yield module
    del sys.modules[MODULE]


def local(**overrides):
    return small_config(**{"resources.backend": "local", **overrides})


def test_ditto_sees_no_state_only_in_a_clients_first_round(guide, tmp_path):
    config = local(**{"algorithm.name": f"{MODULE}:RecordingDitto", "rounds": 4})
    results, weights, states = run_rounds(config, tmp_path)
    seen = guide.RecordingDitto.began_without_state
    assert max(len(rounds) for rounds in seen.values()) >= 2  # 16 participations, 12 clients
    for rounds in seen.values():
        assert rounds == [True] + [False] * (len(rounds) - 1)
    assert all(r.metrics["train_personal_loss"] > 0 for r in results)
    for client, state in enumerate(states):  # the engine kept each trained client's v_k
        assert (state is not None) == (client in seen)
        if state is not None:
            assert set(state["personal"]) == set(weights)
            assert not torch.equal(state["personal"]["classifier.weight"],
                                   weights["classifier.weight"])


def test_fednova_refuses_settings_its_normalisation_does_not_cover(guide):
    name = f"{MODULE}:FedNova"
    with pytest.raises(ConfigError, match="^train.momentum: FedNova here normalises plain SGD "
                                          "steps; set momentum: 0$"):
        local(**{"algorithm.name": name})  # small_config trains with momentum 0.9
    with pytest.raises(ConfigError, match="^train.optimizer: FedNova normalises plain SGD steps; "
                                          "use optimizer: sgd$"):
        local(**{"algorithm.name": name, "train.momentum": 0, "train.optimizer": "adam"})


def test_fednova_normalises_each_update_by_its_local_steps(guide):
    state = ServerState(weights={"w": torch.tensor([1.0])})
    updates = [ClientUpdate({"w": torch.tensor([0.0])}, num_samples=1, num_steps=1),
               ClientUpdate({"w": torch.tensor([-2.0])}, num_samples=3, num_steps=4)]
    ctx = ServerContext(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    new = guide.FedNova().server_round(ctx, state, updates)
    # d = (1, 3/4), p = (1/4, 3/4), τ_eff = 1/4 + 3: w⁺ = 1 − 3.25·(1/4 + 9/16); FedAvg: −1.5
    assert new.weights["w"].item() == pytest.approx(1 - 3.25 * 0.8125)


def test_fednova_gets_every_clients_weights_and_differs_from_fedavg(guide, tmp_path):
    assert not guide.FedNova.weighted_mean  # derived: it overrides aggregate
    sgd = {"train.momentum": 0, "rounds": 2}
    nova, w_nova, _ = run_rounds(local(**sgd, **{"algorithm.name": f"{MODULE}:FedNova"}),
                                 tmp_path / "fednova")
    avg, w_avg, _ = run_rounds(local(**sgd), tmp_path / "fedavg")
    first_nova, first_avg = without_timing(nova)[0], without_timing(avg)[0]
    assert first_nova["train_loss"] == first_avg["train_loss"]  # the same first local rounds
    assert first_nova["test_loss"] != first_avg["test_loss"]
    assert not torch.equal(w_nova["classifier.weight"], w_avg["classifier.weight"])
