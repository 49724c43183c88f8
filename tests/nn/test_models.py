from __future__ import annotations

import pytest
import torch

from raysim.nn.models import ModelOutput, ResNet10, SmallCNN, build_model


@pytest.mark.parametrize(("name", "shape", "feature_dim"),
                         [("cnn", (1, 8, 8), 128), ("cnn", (3, 32, 32), 128),
                          ("resnet10", (3, 32, 32), 256), ("resnet10", (1, 8, 8), 256)])
def test_models_return_features_and_logits(name, shape, feature_dim):
    model = build_model(name, shape, 10)
    out = model(torch.randn(4, *shape))
    assert isinstance(out, ModelOutput)
    assert out.features.shape == (4, feature_dim) and out.logits.shape == (4, 10)
    assert model.feature_dim == feature_dim
    # the logits are exactly the classifier applied to the features
    assert torch.allclose(out.logits, model.classifier(out.features))


def test_resnet10_matches_the_fedhpro_backbone_size():
    # The official resnet10(nf=32) counts 1,426,346 parameters for 10 classes, of which its
    # unused `encoder` MLP holds (256·256 + 256) + (256·512 + 512) = 197,376.
    params = sum(p.numel() for p in ResNet10((3, 32, 32), 10).parameters())
    assert params == 1_426_346 - 197_376


def test_small_cnn_layout():
    model = SmallCNN((1, 8, 8), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)), (32, 64, (3, 3))
    ]
    assert model.classifier.in_features == 128


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(KeyError, match="choose one of cnn, cnn_deep, cnn_wide, logreg, mlp, "
                                       "resnet10, unet"):
        build_model("vit", (3, 32, 32), 10)


def test_logistic_regression_has_no_feature_head():
    model = build_model("logreg", (1, 8, 8), 10)
    out = model(torch.randn(3, 1, 8, 8))
    assert out.features is None and out.logits.shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 64 * 10 + 10
