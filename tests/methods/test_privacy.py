"""DP mechanisms: clipping bounds each client's and each record's contribution exactly (hand
cases), the central sum is noised once with a fixed denominator, noise is seeded, noiseless
local statistics equal the methods' own uploads, noised counts stop the probe's exact count
recovery, adaptive clipping, and every bad privacy value is one line."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config

from algorithms.fedhpro import FedHPro, GradientUpdate
from algorithms.fedproto import FedProto
from raysim.algorithm import Broadcast, ClientContext, LocalRound, TaskInfo
from raysim.config import (
    AdaptiveClipConfig,
    ConfigError,
    LocalPrivacyConfig,
    PrivacyConfig,
    TrainConfig,
    parse_dataclass,
)
from raysim.methods.aggregation import WeightSum
from raysim.methods.leakage import read_prototypes
from raysim.methods.privacy import (
    central_update,
    client_noise_generator,
    clip_update,
    next_clip,
    plan_privacy,
    private_pixel_prototypes,
    private_prototypes,
    privatize_upload,
    privatize_weights,
    server_noise_generator,
    sum_noise_multiplier,
    summed_deltas,
)
from raysim.methods.prototypes import class_means
from raysim.nn.models import MLP
from raysim.nn.training import ClientData
from raysim.seeding import poisson_sample

INF = 1e9  # a clip bound nothing reaches


class Flat:
    """Stored samples are the model's input already."""

    def __call__(self, x, generator=None):
        return x

    def batch(self, x, y, generator=None):
        return x, y


def plan(mechanism="central", uploads="weights", **keys):
    keys.setdefault("noise_multiplier", 1.0)
    privacy = PrivacyConfig(mechanism=mechanism, **keys)
    return plan_privacy(privacy, method="m", uploads=uploads, weighted_mean=True,
                        num_clients=100, clients_per_round=4, rounds=10)


def test_clipping_bounds_a_client_update_over_all_its_tensors():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # ‖Δ‖ = 5
    clipped, norm = clip_update(delta, 1.0)
    assert norm == 5.0
    assert clipped["a"].tolist() == pytest.approx([0.6, 0.0]) and clipped["b"].item() == \
        pytest.approx(0.8)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values())) == \
        pytest.approx(1.0, abs=1e-15)
    unchanged, _ = clip_update(delta, 10.0)
    assert all(torch.equal(unchanged[k], delta[k].double()) for k in delta)


def test_central_sum_is_exact_noised_once_and_divided_by_the_expected_clients():
    received = {"w": torch.zeros(3), "steps": torch.tensor(7)}
    deltas = [{"w": torch.tensor([3.0, 4.0, 0.0])}, {"w": torch.tensor([0.0, 0.0, 0.5])},
              {"w": torch.tensor([-6.0, 8.0, 0.0])}]
    one, two = WeightSum(), WeightSum()  # two workers, then merged
    for i, delta in enumerate(deltas):
        clipped, _ = clip_update(delta, 1.0)
        (one if i < 2 else two).add(clipped, 1)
    summed = summed_deltas(one.merge(two))
    assert summed["w"].tolist() == pytest.approx([0.6 - 0.6, 0.8 + 0.8, 0.5])
    noiseless = plan(noise_multiplier=0.0)
    weights = central_update(received, summed, noiseless, 1.0, server_noise_generator(0, 1))
    assert weights["w"].tolist() == pytest.approx([0.0, 1.6 / 4, 0.5 / 4])  # K = 4, not 3
    assert weights["steps"].item() == 7  # integer buffers are not aggregated
    # the noise: N(0, σ²C²) on the sum, once; the same generator seed gives the same bits
    big = {"w": torch.zeros(200_000, dtype=torch.float64)}
    noisy = plan(noise_multiplier=2.0)
    first = central_update({"w": torch.zeros(200_000)}, big, noisy, 0.5,
                           server_noise_generator(5, 3))
    again = central_update({"w": torch.zeros(200_000)}, big, noisy, 0.5,
                           server_noise_generator(5, 3))
    other = central_update({"w": torch.zeros(200_000)}, big, noisy, 0.5,
                           server_noise_generator(5, 4))
    assert torch.equal(first["w"], again["w"]) and not torch.equal(first["w"], other["w"])
    assert first["w"].double().std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)


def test_adaptive_clipping_moves_towards_the_quantile_and_keeps_the_budget():
    sigma, count_noise = 1.0, 2.0
    sum_sigma = sum_noise_multiplier(sigma, count_noise)
    # the pair (sum at σ_Δ, count at σ_b with sensitivity 1/2) is one Gaussian of σ
    assert sum_sigma ** -2 + (2 * count_noise) ** -2 == pytest.approx(sigma ** -2)
    adaptive = plan(adaptive=AdaptiveClipConfig(target_quantile=0.5, clip_lr=0.2,
                                                count_noise=1.0))
    assert adaptive.sum_noise_multiplier == pytest.approx(sum_noise_multiplier(1.0, 1.0))
    calm = dataclasses.replace(adaptive, count_noise=1e-12)  # a noiseless count
    # every client of 4 unclipped: b̃ = 1 > γ = 0.5, so C shrinks by exp(−0.2·0.5)
    assert next_clip(2.0, 4, calm, server_noise_generator(0, 1, 1)) == \
        pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(2.0, 0, calm, server_noise_generator(0, 1, 1)) == \
        pytest.approx(2.0 * math.exp(0.1))


def test_local_weights_are_clipped_and_noised_from_the_client_stream():
    received = {"w": torch.zeros(2), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(9)}
    clipped = privatize_weights(trained, received, 1.0, 0.0, client_noise_generator(0, 1, 2))
    assert clipped["w"].tolist() == pytest.approx([0.6, 0.8]) and clipped["n"].item() == 3
    a = privatize_weights(trained, received, 1.0, 1.0, client_noise_generator(0, 1, 2))
    b = privatize_weights(trained, received, 1.0, 1.0, client_noise_generator(0, 1, 2))
    c = privatize_weights(trained, received, 1.0, 1.0, client_noise_generator(0, 1, 3))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_prototypes_clip_each_sample_so_a_class_sum_moves_by_at_most_b():
    features = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])
    labels = torch.tensor([0, 0, 1])
    g = torch.Generator()
    stats = private_prototypes(features, labels, 3, 1.0, 0.0, "noised", g)
    # clipped to norm 1: (0.6, 0.8), (0.3, 0.4) → mean (0.45, 0.6); (0, −1)
    assert torch.allclose(stats.means, torch.tensor([[0.45, 0.6], [0.0, -1.0], [0.0, 0.0]]))
    assert stats.counts.tolist() == [2, 1, 0] and stats.present.tolist() == [True, True, False]
    # one more sample, however large, moves class 1's sum by at most B = 1
    more = private_prototypes(torch.cat([features, torch.tensor([[100.0, 0.0]])]),
                              torch.cat([labels, torch.tensor([1])]), 3, 1.0, 0.0, "noised", g)
    moved = more.means[1].double() * 2 - stats.means[1].double() * 1
    assert moved.norm().item() == pytest.approx(1.0)
    withheld = private_prototypes(features, labels, 3, 1.0, 0.0, "withheld", g)
    assert withheld.counts.tolist() == [1, 1, 0]
    # noiseless and unclipped: the plain class means
    free = private_prototypes(features, labels, 3, INF, 0.0, "noised", g)
    means, _ = class_means(features, labels, 3)
    assert torch.allclose(free.means, means)


def test_noised_counts_stop_exact_count_recovery():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(torch.arange(3, 13))  # 3..12 per class
    features = torch.randn(len(labels), 8, generator=g)
    true_counts = torch.bincount(labels, minlength=10).double()
    exact = private_prototypes(features, labels, 10, 1.0, 0.0, "noised", g)
    noised = private_prototypes(features, labels, 10, 1.0, 1.0, "noised",
                                client_noise_generator(0, 1, 0))
    for stats, recovered in ((exact, True), (noised, False)):
        update = SimpleNamespace(counts=stats.counts, prototypes=stats.means, weights={})
        inferred = read_prototypes(update, {})
        assert torch.equal(inferred.counts.round(), true_counts) is recovered


def fedhpro_step(model, data):
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(2), torch.device("cpu"),
                        TrainConfig())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return ctx, LocalRound(ctx, model, Broadcast(weights), data, None)


def test_noiseless_class_gradients_are_fedhpros_own():
    info = TaskInfo(3, (1, 1, 6), 4, TrainConfig())
    method = FedHPro(FedHPro.Config(dsa=False, batch_real=100), info)
    torch.manual_seed(0)
    model = MLP((1, 1, 6), 3, width=8).double()
    x = torch.randn(11, 1, 1, 6, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 2, 2, 2, 0, 2, 0])  # class 1 absent
    data = ClientData(x, y, torch.arange(11), Flat())
    ctx, step = fedhpro_step(model, data)
    own = method.real_gradients(ctx, model, data)
    update = GradientUpdate(weights=step.broadcast.weights, num_samples=11, **own)
    free = plan("local", "class_gradients", noise_multiplier=0.0,
                local=LocalPrivacyConfig(feature_clip=INF), clip=INF)
    private = privatize_upload(update, step, free, client_noise_generator(0, 1, 0))
    for key in ("feature_grads", "weight_grads", "bias_grads"):
        assert torch.allclose(getattr(private, key), own[key].float(), atol=1e-6), key
    assert private.present.tolist() == [True, False, True] and private.num_samples == 1
    # with noise, the count read from ‖Wᵀ∂b‖/‖u‖ is no longer exact, and the bits are seeded
    noisy = plan("local", "class_gradients", noise_multiplier=1.0, clip=INF)
    a = privatize_upload(update, step, noisy, client_noise_generator(0, 1, 0))
    b = privatize_upload(update, step, noisy, client_noise_generator(0, 1, 0))
    assert torch.equal(a.feature_grads, b.feature_grads)
    assert not torch.allclose(a.bias_grads, own["bias_grads"].float(), atol=1e-3)


def test_noiseless_prototype_upload_is_fedprotos_own_and_weights_are_privatised():
    info = TaskInfo(3, (1, 1, 6), 4, TrainConfig())
    method = FedProto(FedProto.Config(), info)
    torch.manual_seed(0)
    model = MLP((1, 1, 6), 3, width=8)
    x = torch.randn(9, 1, 1, 6, generator=torch.Generator().manual_seed(1))
    data = ClientData(x, torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1]), torch.arange(9), Flat())
    _, step = fedhpro_step(model, data)
    with torch.no_grad():
        model.classifier.bias += 3.0  # "training": a change of norm √27 ≈ 5.2
    step.trained = method.after_training(step)
    update = method.upload(step)
    free = plan("local", "prototypes", noise_multiplier=0.0, clip=1.0,
                local=LocalPrivacyConfig(feature_clip=INF))
    private = privatize_upload(update, step, free, client_noise_generator(0, 1, 0))
    assert torch.allclose(private.prototypes, update.prototypes, atol=1e-6)
    assert private.counts.tolist() == [5, 4, 0] and private.num_samples == 1
    rise = private.weights["classifier.bias"] - step.broadcast.weights["classifier.bias"]
    assert rise.tolist() == pytest.approx([1 / math.sqrt(3)] * 3)  # the delta clipped to C = 1


def fedbcs_rounds(tmp_path, name, **privacy):
    from test_durable import tiny_raw

    from raysim.run import execute, prepare
    from raysim.run.validate import config_from_dict

    raw = tiny_raw("fedbcs", rounds=2)  # the durable tests' small FedBCS run
    raw["train"]["local_epochs"] = 2
    raw["resources"]["backend"] = "local"
    if privacy:
        raw["privacy"] = {"mechanism": "local", **privacy}
    summary = execute(prepare(config_from_dict(raw), tmp_path / name))
    return {k: v for k, v in summary.final.items() if k.startswith("test_")}


def test_fedbcs_under_local_dp_uploads_the_per_batch_prototypes(tmp_path):
    """With no noise and no bound, FedBCS's private upload is its own (the batches' means
    summed over the batches showing a class is the running mean the objective keeps; equal
    sites weigh alike either way); with noise, the run moves."""
    plain = fedbcs_rounds(tmp_path, "plain")
    free = fedbcs_rounds(tmp_path, "free", noise_multiplier=0.0, clip=1e9,
                         local={"feature_clip": 1e9})
    noised = fedbcs_rounds(tmp_path, "noised", noise_multiplier=2.0, clip=1e9,
                           local={"feature_clip": 0.1})
    assert plain and free.keys() == plain.keys()
    assert free == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert noised != plain


def test_pixel_prototypes_clip_each_batch_block():
    batch_means = {"enc": torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [9.0, 9.0]]])}
    shown = {"enc": torch.tensor([[True, True], [True, False]])}
    free, counts = private_pixel_prototypes(batch_means, shown, INF, 0.0, "noised",
                                            torch.Generator())
    # FedBCS's mean over the batches showing each class
    assert torch.allclose(free["enc"], torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    assert counts["enc"].tolist() == [2, 1]
    clipped, _ = private_pixel_prototypes(batch_means, shown, 1.0, 0.0, "noised",
                                          torch.Generator())
    # batch 1's block ((3, 0), (0, 4)) has norm 5 → ×0.2; batch 2's (1, 0) stays
    assert torch.allclose(clipped["enc"], torch.tensor([[0.8, 0.0], [0.0, 0.8]]))


def test_poisson_sampling_is_seeded_and_has_the_rate():
    first = poisson_sample(1, 2, 10_000, 0.05)
    assert first == poisson_sample(1, 2, 10_000, 0.05) != poisson_sample(1, 3, 10_000, 0.05)
    assert first == sorted(first) and abs(len(first) - 500) < 80


def test_plan_refuses_what_a_mechanism_does_not_cover():
    base = {"noise_multiplier": 1.0}

    def plan_for(mechanism, uploads, weighted_mean=True, task="classification",
                 own_server_update=False, **keys):
        privacy = PrivacyConfig(mechanism=mechanism, **{**base, **keys})
        return plan_privacy(privacy, method="meth", uploads=uploads,
                            weighted_mean=weighted_mean, num_clients=50, clients_per_round=5,
                            rounds=10, task=task, own_server_update=own_server_update)

    with pytest.raises(ConfigError, match=r"^privacy.mechanism: central DP noises the mean "
                       r"model update only; meth also uploads class gradients"):
        plan_for("central", "class_gradients")
    with pytest.raises(ConfigError, match=r"^privacy.mechanism: central DP adds its noise to "
                       r"the mean of clipped client deltas; meth aggregates"):
        plan_for("central", "weights", weighted_mean=False)
    with pytest.raises(ConfigError, match=r"^privacy.mechanism: local DP does not know meth's "
                       r"upload 'logits'; it privatises: weights, prototypes, "
                       r"class_gradients, pixel_prototypes$"):
        plan_for("local", "logits")
    assert plan_for("local", "pixel_prototypes", task="segmentation").kind == "pixel_prototypes"
    for mechanism in ("central", "local"):  # SCAFFOLD's control variates are covered by neither
        with pytest.raises(ConfigError, match=r"^privacy.mechanism: meth's server step reads "
                           r"more of each client's upload than its weights"):
            plan_for(mechanism, "weights", own_server_update=True)
    with pytest.raises(ConfigError, match=r"^privacy.mechanism: local DP of meth's pixel "
                       r"prototypes on a segmentation task"):
        plan_for("local", "prototypes", task="segmentation")
    with pytest.raises(ConfigError, match=r"^privacy.adaptive.count_noise: 0.25 must exceed "
                       r"noise_multiplier/2 = 0.5"):  # default σ_b: 5 clients / 20
        plan_for("central", "weights", adaptive=AdaptiveClipConfig())
    loose = plan_for("central", "weights", delta=0.05)
    assert loose.warnings == ("privacy.delta: 0.05 >= 1/N = 0.02 (N = 50 clients) lets a "
                              "mechanism publish one record outright; the usual choice is "
                              "1/N^1.1 = 0.0135",)
    assert plan_for("central", "weights").delta == pytest.approx(50 ** -1.1)
    assert plan_for("central", "weights").warnings == ()


@pytest.mark.parametrize("key, value, message", [
    ("mechanism", "secure", "privacy.mechanism: choose one of none, central, local"),
    ("noise_multiplier", -1, "privacy.noise_multiplier: must be >= 0 (got -1.0)"),
    ("clip", 0, "privacy.clip: must be > 0 (got 0.0)"),
    ("delta", 1, "privacy.delta: must be in (0, 1) (got 1.0); omit it for 1/N^1.1"),
    ("target_epsilon", 0, "privacy.target_epsilon: must be > 0 (got 0.0)"),
    ("sampling", "stratified", "privacy.sampling: choose one of fixed, poisson"),
    ("accountant", "prv", "privacy.accountant: choose one of rdp, pld"),
    ("local.feature_clip", -2, "privacy.local.feature_clip: must be > 0 (got -2.0)"),
    ("local.counts", "exact", "privacy.local.counts: choose one of noised, withheld"),
    ("adaptive.target_quantile", 1, "privacy.adaptive.target_quantile: must be in (0, 1)"),
    ("adaptive.clip_lr", 0, "privacy.adaptive.clip_lr: must be > 0 (got 0.0)"),
    ("adaptive.count_noise", 0, "privacy.adaptive.count_noise: must be > 0 (omit it for "
                                "clients_per_round / 20)"),
    ("target_epsilon", 2, "privacy.target_epsilon: set noise_multiplier or target_epsilon "
                          "(which calibrates it), not both"),
    ("noise_multiplier", None, "privacy.noise_multiplier: central DP needs noise_multiplier "
                               "(σ) or target_epsilon"),
    ("accountant", "pld", "privacy.accountant: dp-accounting's PLD has no fixed-size "
                          "(without replacement) sampling; use accountant: rdp, or "
                          "sampling: poisson"),
])
def test_each_bad_privacy_value_is_one_line(key, value, message):
    raw = {"mechanism": "central", "noise_multiplier": 1.0}
    section, _, leaf = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[leaf] = value
    with pytest.raises(ConfigError) as error:
        parse_dataclass(PrivacyConfig, raw, "privacy")
    assert str(error.value) == message


def test_privacy_is_off_by_default_and_a_config_key():
    assert small_config().privacy.mechanism == "none"
    config = small_config(**{"privacy.mechanism": "local", "privacy.target_epsilon": 4,
                             "privacy.local.counts": "withheld"})
    assert config.privacy.target_epsilon == 4.0 and config.privacy.local.counts == "withheld"
    with pytest.raises(ConfigError, match=r"^privacy.adaptive: adaptive clipping adapts central "
                       r"DP's clip; remove it for local DP$"):
        small_config(**{"privacy.mechanism": "local", "privacy.noise_multiplier": 1,
                        "privacy.adaptive": "{}"})
