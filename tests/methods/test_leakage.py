"""The leakage probe: what the server recovers exactly (FedHPro's counts and weighted class
means from its per-class gradients, spec fedhpro §8, worked out here by hand; FedProto's
uploads), the estimates from weights, the probe never changing training, and its mistakes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMING, small_config

from algorithms.fedhpro import FedHPro, GradientUpdate
from raysim.algorithm import ClientContext, ClientUpdate, TaskInfo
from raysim.config import ConfigError, TrainConfig
from raysim.methods.leakage import (
    image_scores,
    probed_clients,
    read_class_gradients,
    read_weights,
)
from raysim.nn.models import MLP
from raysim.nn.training import ClientData
from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.validate import config_from_dict


class Flat:
    """Stored samples are the model's input already."""

    def __call__(self, x, generator=None):
        return x

    def batch(self, x, y, generator=None):
        return x, y


def test_fedhpro_uploads_give_exact_counts_and_weighted_class_means():
    torch.manual_seed(0)
    info = TaskInfo(3, (1, 1, 6), 4, TrainConfig())
    method = FedHPro(FedHPro.Config(dsa=False, batch_real=100), info)
    model = MLP((1, 1, 6), 3, width=8).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 1, 1, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 2, 2, 2, 0, 2, 0])  # class 1 absent
    data = ClientData(x, y, torch.arange(11), Flat())
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(2), torch.device("cpu"),
                        TrainConfig())
    received = {k: v.clone() for k, v in model.state_dict().items()}
    update = GradientUpdate(weights=received, num_samples=11,
                            **method.real_gradients(ctx, model, data))
    inferred = read_class_gradients(update, received)
    assert inferred.present.tolist() == [True, False, True]
    assert inferred.counts.tolist() == pytest.approx([7.0, 0.0, 4.0], abs=1e-6)
    with torch.no_grad():  # by hand: Σ_i (1 − p_ic) z_i / Σ_i (1 − p_ic) over class c
        z = model(x).features
        p = F.softmax(model.classifier(z), dim=1)
    for c in (0, 2):
        mine = y == c
        weights = 1 - p[mine, c]
        expected = (weights[:, None] * z[mine]).sum(0) / weights.sum()
        assert torch.allclose(inferred.means[c], expected, atol=1e-6)
        plain = z[mine].mean(0)  # close to, not equal to, the plain class mean
        assert F.cosine_similarity(inferred.means[c], plain, dim=0) > 0.9


def test_classifier_bias_rise_estimates_labels_from_weights():
    received = {"classifier.weight": torch.zeros(4, 2), "classifier.bias": torch.zeros(4)}
    trained = {"classifier.weight": torch.zeros(4, 2),
               "classifier.bias": torch.tensor([0.3, -0.1, 0.1, 0.0])}
    inferred = read_weights(ClientUpdate(weights=trained, num_samples=8), received)
    assert inferred.present.tolist() == [True, False, True, False]
    assert inferred.counts.tolist() == pytest.approx([6.0, 0.0, 2.0, 0.0])
    assert inferred.means is None


def test_image_scores_and_probed_clients():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    psnr, ssim = image_scores(image, image, mean, std)
    assert psnr == pytest.approx(120.0) and ssim == pytest.approx(1.0)
    psnr, ssim = image_scores(image, 1 - image, mean, std)
    assert psnr < 10 and ssim < 0.2
    assert probed_clients([9, 3, 7, 1], 2) == {1, 3}


def run_metrics(method: str, probe: int, tmp_path, **extra) -> list[dict]:
    config = small_config(**{"algorithm.name": method, "resources.backend": "local",
                             "diagnostics.leakage.clients_per_round": probe,
                             "diagnostics.leakage.inversion_steps": 20,
                             "diagnostics.leakage.dlg_max_samples": 1000,
                             "diagnostics.leakage.dlg_steps": 5, **extra})
    collect = CollectRounds()
    execute(prepare(config, tmp_path / f"{method}{probe}"), [collect])
    return collect.rounds


@pytest.mark.parametrize("method", ["fedavg", "fedproto", "fedhpro"])
def test_the_probe_never_changes_training(tmp_path, method):
    extra = {"algorithm.hp_steps": 2, "algorithm.meta_steps": 2, "algorithm.crt_epochs": 2} \
        if method == "fedhpro" else {}
    off = run_metrics(method, 0, tmp_path, **extra)
    on = run_metrics(method, 2, tmp_path, **extra)
    for a, b in zip(off, on):
        leaked = {k for k in b if k.startswith("leak_")}
        assert leaked and not any(k.startswith("leak_") for k in a)
        assert {k: v for k, v in a.items() if k not in TIMING} == \
            {k: v for k, v in b.items() if k not in TIMING | leaked}
    final = on[-1]
    if method == "fedproto":  # its uploads are the counts and the class means themselves
        assert final["leak_counts_exact"] == 1.0 and final["leak_mean_cosine"] == \
            pytest.approx(1.0)
    if method == "fedhpro":
        assert final["leak_counts_exact"] == 1.0 and final["leak_presence_exact"] == 1.0
        assert 0.5 < final["leak_mean_cosine"] < 1.0
    if method == "fedavg":  # gradient inversion ran (every client is small enough here)
        assert "leak_image_psnr" in final and "leak_mean_cosine" not in final


def test_probe_mistakes_are_one_line():
    with pytest.raises(ConfigError, match="diagnostics.leakage: the probe reads weights, "
                                          "prototypes, class_gradients uploads, and fedbcs "
                                          "cannot be read: it uploads pixel_prototypes; "
                                          "methods it supports: fedavg, fedavg_ft, fedgh, "
                                          "fedhpro"):
        config_from_dict({"algorithm": {"name": "fedbcs"}, "model": {"name": "unet"},
                          "clients_per_round": 4, "data": {
                              "dataset": "synthetic_organ",
                              "partition": {"kind": "domains", "num_clients": 6}},
                          "diagnostics": {"leakage": {"clients_per_round": 2}}})
    with pytest.raises(ConfigError, match=r"diagnostics.leakage.clients_per_round: 11 > "
                                          r"clients_per_round \(10\)"):
        config_from_dict({"diagnostics": {"leakage": {"clients_per_round": 11}}})
    with pytest.raises(ConfigError, match="diagnostics.leakage.every: must be >= 1"):
        config_from_dict({"diagnostics": {"leakage": {"every": 0}}})
