"""FedProto, FPL and MOON carried over to segmentation: pixel prototypes of a declared U-Net
stage, checked pixel by pixel against a loop written here, and each method learning to segment
the synthetic organ sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.fedproto import FedProto
from algorithms.fpl import FPL
from algorithms.moon import MOON
from raysim.algorithm import ClientContext, LocalRound, TaskInfo
from raysim.config import ConfigError, TrainConfig
from raysim.nn.models import UNet
from raysim.nn.training import ClientData
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare
from raysim.run.validate import load_config

ROOT = Path(__file__).resolve().parents[2]


class AsStored:
    """A dataset whose stored samples are already the model's input."""

    def batch(self, x, y, generator=None):
        return x, y


def segmentation_round(method_cls, level: str, batch_size: int = 2):
    train = TrainConfig(batch_size=batch_size)
    info = TaskInfo(num_classes=2, input_shape=(1, 32, 32), feature_dim=None, train=train,
                    kind="segmentation")
    method = method_cls(method_cls.Config(feature_level=level), info)
    torch.manual_seed(0)
    model = UNet((1, 32, 32), 2, width=4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 32, 32, generator=g, dtype=torch.float64)
    y = (torch.rand(5, 32, 32, generator=g) > 0.7).long()
    data = ClientData(x, y, torch.arange(5), AsStored())
    ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), torch.device("cpu"), train)
    step = LocalRound(ctx, model, None, data, None)
    return method, model, step, x, y


@pytest.mark.parametrize("level", ["decoder_0", "encoder_1", "decoder_3"])
def test_pixel_prototypes_are_class_means_of_one_stage_by_hand(level):
    method, model, step, x, y = segmentation_round(FedProto, level)
    prototypes, counts = method.after_training(step)
    part, index = level.split("_")
    sums, seen = None, np.zeros(2, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for start in range(0, 5, 2):  # the training batch size: BatchNorm uses batch stats
            stage = getattr(model(x[start:start + 2]), part)[int(index)].numpy()
            step_h = 32 // stage.shape[2]  # nearest neighbour picks every step_h-th label
            sums = np.zeros((2, stage.shape[1])) if sums is None else sums
            for b in range(stage.shape[0]):
                for i in range(stage.shape[2]):
                    for j in range(stage.shape[3]):
                        label = int(y[start + b, i * step_h, j * step_h])
                        sums[label] += stage[b, :, i, j]
                        seen[label] += 1
    assert counts.tolist() == seen.tolist()
    assert prototypes.shape == (2, sums.shape[1])
    np.testing.assert_allclose(prototypes.numpy(), sums / seen[:, None], rtol=1e-6, atol=1e-7)


def test_fpl_aligns_pixels_and_moon_pools_them():
    method, model, step, x, y = segmentation_round(FPL, "decoder_0")
    out = model(x[:2])
    features, labels = method.samples(out, y[:2])
    assert features.shape == (2 * 32 * 32, 4) and labels.shape == (2 * 32 * 32,)
    assert torch.equal(features[33], out.decoder[0][0, :, 1, 1])  # pixel (1, 1) of image 0
    assert labels[33] == y[0, 1, 1]
    moon, model, *_ = segmentation_round(MOON, "decoder_0")
    z = moon.samples.per_image(model(x[:2]))
    assert torch.allclose(z, model(x[:2]).decoder[0].mean((2, 3)))


def test_segmentation_feature_level_and_inference_errors():
    with pytest.raises(ConfigError, match="feature_level: choose one of decoder_0, decoder_1"):
        FedProto.Config(feature_level="bottleneck")
    with pytest.raises(ConfigError, match="algorithm.inference: nearest-prototype inference"):
        load_config(ROOT / "yaml" / "synthetic_organ" / "fedproto.yaml",
                    ["algorithm.inference=prototype"])


@pytest.mark.slow
@pytest.mark.parametrize(("method", "extra"), [
    ("fedproto", []),
    # FPL's classification τ = 0.02 makes the pixel contrastive term dominate: in this setting
    # test Dice falls from 0.156 after round 1 to 0.019 after round 5 (FedAvg: 0.624)
    ("fpl", ["algorithm.tau=0.5"]),
    ("moon", []),
])
def test_carried_over_methods_learn_to_segment(tmp_path, method, extra):
    # test Dice after round 3: fedproto 0.292, fpl 0.305, moon 0.344 (the bar: 0.173)
    overrides = [*extra,
        "rounds=3", "logging.progress=false", "logging.curves=false", "train.local_epochs=3",
        "train.lr=0.003", "data.sites=4", "data.partition.num_clients=4",
        "clients_per_round=4", "data.train_per_site=18",
        "data.val_per_site=6", "data.test_per_site=8",
        "data.image_size=32", "resources.backend=local",
    ]
    config = load_config(ROOT / "yaml" / "synthetic_organ" / f"{method}.yaml", overrides)
    run = prepare(config, tmp_path)
    summary = execute(run, [RunDirectory(tmp_path)])
    masks = run.task.dataset.test.y
    area = masks.reshape(len(masks), -1).sum(1)
    all_background = np.where(area == 0, 1.0, 0.0).mean()
    all_foreground = (2 * area / (masks[0].size + area)).mean()
    assert summary.final["test_dice"] > max(all_background, all_foreground) + 0.05
    assert summary.final["clients_failed"] == 0
    assert summary.best["selected_by"] == "val_dice"
