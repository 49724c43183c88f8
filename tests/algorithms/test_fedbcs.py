"""FedBCS: FSR forms, the factored feature path, prototypes, losses, server clustering, config
errors (spec fedbcs.md §2–§3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from algorithms.fedbcs import (
    AlignmentObjective,
    BCSBroadcast,
    BCSUpdate,
    FedBCS,
    prototype_contrastive_loss,
)
from raysim.algorithm import ClientContext, LocalRound, ServerContext, TaskInfo
from raysim.config import ConfigError, TrainConfig
from raysim.nn.fedbcs_unet import (
    ContextFusion,
    DenseFeatures,
    FactoredFeatures,
    FedBCSUNet,
    StyleRecalibration,
    level_order,
)
from raysim.nn.models import UNet
from raysim.nn.segmentation import resize_labels
from raysim.nn.training import ClientData


class AsStored:
    """A dataset whose stored samples are already the model's input."""

    def batch(self, x, y, generator=None):
        return x, y


def fsr_pair(channels: int, seed: int = 0) -> tuple[StyleRecalibration, StyleRecalibration]:
    g = torch.Generator().manual_seed(seed)
    fft = StyleRecalibration(channels, "fft").double()
    with torch.no_grad():
        fft.mix_logits.copy_(torch.tensor([0.03, -0.05]).view(2, 1, 1))
        fft.gamma.copy_(0.5 + torch.rand(channels, 1, 1, generator=g))
        fft.beta.copy_(torch.randn(channels, 1, 1, generator=g))
    closed = StyleRecalibration(channels, "closed_form").double()
    closed.load_state_dict(fft.state_dict())
    return fft, closed


def gradients(module: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor, offset=None):
    y = module(x)
    if offset is not None:
        y = y + offset(module, x)
    return y, torch.autograd.grad((y * probe).sum(), [x, *module.parameters()])


def dc_clamp_offset(module: StyleRecalibration, x: torch.Tensor) -> torch.Tensor:
    """The one term by which the FFT form differs (§2.3): IN(x) has a zero DC coefficient,
    which the code's denormal clamp raises to √1e-5, with x's DC phase (its mean's sign)."""
    w = torch.softmax(module.mix_logits / module.temperature, 0)
    h, wd = x.shape[-2:]
    sign = torch.where(x.mean((-2, -1), keepdim=True) >= 0, 1.0, -1.0).to(x.dtype)
    return module.gamma * w[0] * math.sqrt(1e-5) * sign / (h * wd)


@pytest.mark.parametrize("channels,size", [(16, 32), (8, 64)])
def test_fsr_fft_and_closed_form_agree_in_outputs_and_gradients(channels, size):
    fft, closed = fsr_pair(channels)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=g, dtype=torch.float64,
                    requires_grad=True)
    probe = torch.randn(2, channels, size, size, generator=g, dtype=torch.float64)
    y_fft, g_fft = gradients(fft, x, probe)
    y_closed, g_closed = gradients(closed, x, probe)
    assert (y_fft - y_closed).abs().max() < 1e-5
    assert (g_fft[0] - g_closed[0]).abs().max() < 1e-5  # what flows on to earlier layers
    # The parameters' gradients sum the clamp's tiny per-pixel offset over every pixel; with
    # that documented term added, the two forms agree to rounding.
    y_exact, g_exact = gradients(closed, x, probe, offset=dc_clamp_offset)
    assert (y_fft - y_exact).abs().max() < 1e-9
    for a, b in zip(g_fft, g_exact):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_fsr_mixing_extremes_give_instance_norm_and_identity():
    fft, _ = fsr_pair(4)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        fft.gamma.fill_(1.0)
        fft.beta.zero_()
        fft.mix_logits.copy_(torch.tensor([0.0, -10.0]).view(2, 1, 1))  # w → [1, 0]
        assert torch.allclose(fft(x), F.instance_norm(x), atol=1e-4)
        fft.mix_logits.copy_(torch.tensor([-10.0, 0.0]).view(2, 1, 1))  # w → [0, 1]
        assert torch.allclose(fft(x), x, atol=1e-9)


def make_method(**config) -> tuple[FedBCS, UNet]:
    info = TaskInfo(num_classes=2, input_shape=(3, 32, 32), feature_dim=None,
                    train=TrainConfig(), kind="segmentation")
    method = FedBCS(FedBCS.Config(**config), info)
    torch.manual_seed(0)
    model = method.prepare_model(UNet((3, 32, 32), 2, width=4)).double()
    return method, model


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (torch.rand(3, 32, 32, generator=g) > 0.6).long()
    return x, y


@pytest.mark.parametrize("layers", [
    {}, {"encoder_layers": [1, 2], "decoder_layers": [0, 3]},
    {"encoder_layers": [0, 2, 3], "decoder_layers": [1, 2, 3], "fusion_channels": 5},
])
def test_factored_path_gives_the_official_prototypes_losses_and_gradients(layers):
    method, model = make_method(**layers)
    x, y = batch()
    out = model(x)
    for level in ("encoder", "decoder"):
        fusion = model.fusion[level]
        stages = out.encoder if level == "encoder" else out.decoder
        dense, factored = fusion.materialized(stages), fusion.per_branch(stages)
        assert isinstance(factored, FactoredFeatures)
        assert tuple(dense.shape[-2:]) == factored.size
        labels = resize_labels(y, factored.size)
        for c in (0, 1):
            mask = labels == c
            expected = dense.permute(0, 2, 3, 1)[mask].sum(0)
            assert torch.allclose(factored.class_sums(mask), expected, rtol=1e-10, atol=1e-9)
        g = torch.Generator().manual_seed(2)
        anchors = (torch.randn(3, fusion.dim, generator=g, dtype=torch.float64),
                   torch.tensor([0, 1, 1]))
        loss_dense, _ = method.alignment_loss(DenseFeatures(dense), labels, anchors)
        loss_factored, _ = method.alignment_loss(factored, labels, anchors)
        assert loss_dense.item() == pytest.approx(loss_factored.item(), rel=1e-10)
        params = [p for p in model.parameters() if p.requires_grad]
        g_dense = torch.autograd.grad(loss_dense, params, retain_graph=True, allow_unused=True)
        g_fact = torch.autograd.grad(loss_factored, params, retain_graph=True, allow_unused=True)
        for a, b in zip(g_dense, g_fact):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_level_resolutions_follow_the_official_choice():
    _, model = make_method()
    out = model(batch()[0])
    assert model.fusion["encoder"].per_branch(out.encoder).size == (32, 32)  # H
    assert model.fusion["decoder"].per_branch(out.decoder).size == (8, 8)  # H/4
    assert model.fusion["encoder"].dim == 3 * 32  # 3 branches × the context's width (8w)


def written_onto_the_unet(config: FedBCS.Config) -> UNet:
    """The model as FedBCS once built it, by writing its modules onto the U-Net: the keys,
    order and initial values its checkpoints hold."""
    torch.manual_seed(0)
    model = UNet((3, 32, 32), 2, width=4)
    for i in (1, 2, 3):
        model.recalibrate[i] = StyleRecalibration(model.encoder_channels[i], config.fsr,
                                                  config.fsr_temperature)
    fusion = {}
    for level in config.levels:
        channels = getattr(model, f"{level}_channels")
        stages = level_order(level, getattr(config, f"{level}_layers"))
        fusion[level] = ContextFusion(stages, channels, config.fusion_channels or
                                      channels[max(stages)])
    model.fusion = torch.nn.ModuleDict(fusion)
    return model


@pytest.mark.parametrize("config", [{}, {"levels": ["decoder"], "decoder_layers": [1, 3],
                                         "fusion_channels": 3}])
def test_the_fedbcs_model_wraps_the_unet_under_the_keys_checkpoints_hold(config):
    config = FedBCS.Config(**config)
    torch.manual_seed(0)
    unet = UNet((3, 32, 32), 2, width=4)
    model = FedBCS(config, None).prepare_model(unet)
    assert isinstance(model, FedBCSUNet)
    expected = written_onto_the_unet(config).state_dict()
    weights = model.state_dict()
    assert list(weights) == list(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    # the U-Net given is left as it was: identity hooks, no fusion
    assert all(isinstance(m, torch.nn.Identity) for m in unet.recalibrate)
    assert not hasattr(unet, "fusion")
    x = batch()[0].float()
    assert not torch.equal(model(x).logits, unet(x).logits)  # FSR runs in the wrapped model


def test_the_prototypes_reach_the_upload_through_after_training():
    method, model = make_method()
    x, y = batch()
    data = ClientData(x, y, torch.arange(len(y)), AsStored())
    train = TrainConfig(local_epochs=2, batch_size=2)
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), torch.device("cpu"), train)
    broadcast = BCSBroadcast(weights={k: v.clone() for k, v in model.state_dict().items()})
    update = method.client_update(ctx, model, broadcast, data, None)
    for level in ("encoder", "decoder"):
        assert update.prototypes[level].shape == (2, model.fusion[level].dim)
        assert update.counts[level].max() <= 2  # the last epoch's batches only
    step = LocalRound(ctx, model, broadcast, data, None)
    step.trained = ({"encoder": torch.ones(2, 3)}, {"encoder": torch.tensor([1, 1])})
    assert method.upload(step).prototypes is step.trained[0]


@pytest.mark.parametrize("path", ["per_branch", "materialized"])
def test_local_prototypes_are_batch_means_of_masked_feature_means(path):
    method, model = make_method(feature_path=path)
    batches = [batch(0), batch(1)]
    objective = AlignmentObjective(method, model, BCSBroadcast(weights={}), torch.device("cpu"),
                                   collect_from=0)
    expected = {level: torch.zeros(2, model.fusion[level].dim, dtype=torch.float64)
                for level in ("encoder", "decoder")}
    for x, y in batches:
        objective(x, y)
        out = model(x)
        for level in ("encoder", "decoder"):
            stages = out.encoder if level == "encoder" else out.decoder
            dense = model.fusion[level].materialized(stages).detach()
            labels = resize_labels(y, dense.shape[-2:])
            for c in (0, 1):
                expected[level][c] += dense.permute(0, 2, 3, 1)[labels == c].mean(0) / 2
    prototypes, counts = objective.local_prototypes()
    for level in ("encoder", "decoder"):
        assert counts[level].tolist() == [2, 2]
        assert torch.allclose(prototypes[level].double(), expected[level], rtol=1e-5, atol=1e-6)


def test_contrastive_loss_by_hand_and_its_saturation():
    positive = torch.tensor([True, False])
    # cosines ≥ 0.069 saturate both clamps: the loss is log((m₁+m₀)/m₁), gradient zero
    cos = torch.tensor([[0.5, 0.3]], requires_grad=True)
    loss, saturated = prototype_contrastive_loss(cos, positive, tau=0.005)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert saturated.item() == 1.0
    loss.backward()
    assert cos.grad.abs().max() == 0
    # in the active band it is the InfoNCE of the scaled cosines
    cos = torch.tensor([[0.01, 0.02]])
    loss, saturated = prototype_contrastive_loss(cos, positive, tau=0.005)
    e_pos, e_neg = math.exp(2.0), math.exp(4.0)
    assert loss.item() == pytest.approx(-math.log((e_pos + 1e-9) / (e_pos + e_neg + 1e-9)),
                                        rel=1e-5)
    assert saturated.item() == 0.0


def test_server_clusters_each_level_and_keeps_a_class_held_by_one_client():
    method, model = make_method()
    state = method.init_server(model.float())
    dim = {level: model.fusion[level].dim for level in ("encoder", "decoder")}

    def update(fg_value: float, has_foreground: bool) -> BCSUpdate:
        protos = {lvl: torch.stack([torch.ones(d), torch.full((d,), fg_value)])
                  for lvl, d in dim.items()}
        counts = {lvl: torch.tensor([3, 3 if has_foreground else 0]) for lvl in dim}
        return BCSUpdate(weights=state.weights, num_samples=10, prototypes=protos,
                         counts=counts)

    updates = [update(2.0, False), update(-1.0, True), update(5.0, False)]
    ctx = ServerContext(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    new = method.server_round(ctx, state, updates)
    for level in ("encoder", "decoder"):
        clusters, labels = new.prototypes[level]
        assert labels.tolist() == [0, 1]  # identical backgrounds: one cluster
        assert torch.equal(clusters[1], torch.full((dim[level],), -1.0))  # the only holder
        assert new.metrics[f"clusters_{level}_foreground"] == 1.0
    broadcast = method.broadcast(new)
    assert set(broadcast.prototypes) == {"encoder", "decoder"}


@pytest.mark.parametrize("override,message", [
    ("algorithm.encoder_layers=[0,4]", "algorithm.encoder_layers: stage 4 does not exist"),
    ("algorithm.decoder_layers=[2]", "algorithm.decoder_layers: needs at least two stages"),
    ("algorithm.levels=[middle]", "algorithm.levels: choose one or both of encoder, decoder"),
    ("algorithm.fsr=wavelet", "algorithm.fsr: choose one of fft, closed_form, none"),
])
def test_bad_fedbcs_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(**dict([override.split("=", 1)]), **{"algorithm.name": "fedbcs",
                                                             "model.name": "unet"})


def test_methods_run_only_the_tasks_they_declare():
    with pytest.raises(ConfigError, match="algorithm.name: fedbcs runs segmentation tasks, but "
                                          "dataset 'digits' is a classification task; methods "
                                          "that run it: fedavg, fedavg_ft, fedgh, fedhpro, "
                                          "fedhpro_paper, fedper, fedproto"):
        small_config(**{"algorithm.name": "fedbcs"})
    with pytest.raises(ConfigError, match="fedtgp runs classification tasks, but dataset "
                                          "'synthetic_organ' is a segmentation task; methods "
                                          "that run it: fedavg, fedavg_ft, fedbcs, fedproto, "
                                          "fedproto_personal, fedprox, fpl, local, moon, "
                                          "scaffold$"):
        small_config(**{"algorithm.name": "fedtgp", "model.name": "unet",
                        "data.dataset": "synthetic_organ", "data.partition.kind": "domains"})
    with pytest.raises(ConfigError, match="algorithm.inference: nearest-prototype inference "
                                          "classifies whole samples; on a segmentation task "
                                          "use inference: logits"):
        small_config(**{"algorithm.name": "fpl", "algorithm.inference": "prototype",
                        "model.name": "unet", "data.dataset": "synthetic_organ",
                        "data.partition.kind": "domains"})


def test_model_and_dataset_must_be_the_same_kind_of_task():
    with pytest.raises(ConfigError, match="model.name: 'unet' is not a classification model, "
                                          "but dataset 'digits' is a classification task"):
        small_config(**{"model.name": "unet"})
    with pytest.raises(ConfigError, match="use one of unet"):
        small_config(**{"data.dataset": "synthetic_organ", "data.partition.kind": "domains"})
