from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysim.algorithm import weights_part
from raysim.config import ConfigError, HeterogeneousConfig
from raysim.nn.heterogeneous import (
    MODEL_GROUPS,
    ProjectedMember,
    build_member,
    check_group,
    common_feature_dim,
    group_members,
    member_of,
)
from raysim.nn.models import ModelOutput

DIGITS, MNIST = (1, 8, 8), (1, 28, 28)
HTFE5 = HeterogeneousConfig(models=("htfe5",))


class Needs28(nn.Module):
    """A test-only member that takes flattened 28×28 images and nothing else."""

    has_feature_head = True
    task = "classification"
    width_argument = None

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.feature_dim = 16
        self.encoder = nn.Linear(28 * 28, 16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        features = self.encoder(x.flatten(1))
        return ModelOutput(features, self.classifier(features))


def seeded(name, shape, feature_dim, seed=7):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_member(name, shape, 10, feature_dim)


def test_groups_name_how_many_architectures_and_differ_in_depth_and_width():
    assert group_members(HTFE5) == ("cnn", "cnn_wide", "cnn_deep", "mlp", "resnet10")
    for name, members in MODEL_GROUPS.items():
        assert int(name.removeprefix("htfe")) == len(set(members))
    assert group_members(HeterogeneousConfig(models=("mlp", "cnn"))) == ("mlp", "cnn")
    convs = {name: [m.out_channels for m in seeded(name, MNIST, None).modules()
                    if isinstance(m, nn.Conv2d)] for name in ("cnn", "cnn_wide", "cnn_deep")}
    assert convs == {"cnn": [32, 64], "cnn_wide": [64, 128], "cnn_deep": [32, 32, 64, 64]}


@pytest.mark.parametrize("shape", [DIGITS, MNIST])
def test_every_member_runs_on_digits_and_mnist_shapes(shape):
    x = torch.randn(3, *shape)
    for name in group_members(HTFE5):
        model = seeded(name, shape, None)
        out = model(x)
        assert out.features.shape == (3, model.feature_dim) and out.logits.shape == (3, 10)
        assert model.has_feature_head and model.task == "classification"
        assert torch.allclose(out.logits, model.classifier(out.features))


def test_deep_cnn_pools_twice_where_the_input_allows():
    pools = {shape: sum(isinstance(m, nn.MaxPool2d) for m in seeded("cnn_deep", shape, None)
                        .modules()) for shape in (DIGITS, MNIST, (1, 2, 2))}
    assert pools == {DIGITS: 2, MNIST: 2, (1, 2, 2): 0}


@pytest.mark.parametrize("shape", [DIGITS, MNIST])
def test_projection_gives_one_feature_dim_and_one_head_shape(shape):
    x = torch.randn(2, *shape)
    heads = []
    for name in group_members(HTFE5):
        model = seeded(name, shape, 32)
        assert isinstance(model, ProjectedMember) and model.feature_dim == 32
        out = model(x)
        assert out.features.shape == (2, 32) and out.logits.shape == (2, 10)
        assert torch.equal(out.logits, model.classifier(out.features))
        weights = model.state_dict()
        # the member's own classifier is gone: every classifier entry is the new head's
        assert [k for k in weights if "classifier" in k] == ["classifier.weight", "classifier.bias"]
        heads.append({k: v.shape for k, v in weights_part(weights, "head").items()})
        body = weights_part(weights, "body")
        assert body and not any(k.startswith("classifier.") for k in body)
        assert body.keys() | weights_part(weights, "head").keys() == weights.keys()
    assert all(head == heads[0] for head in heads)
    assert heads[0] == {"classifier.weight": (10, 32), "classifier.bias": (10,)}


def test_a_shared_head_is_averageable_across_members():
    models = [seeded(name, DIGITS, 16) for name in ("cnn", "mlp", "cnn_deep")]
    heads = [weights_part(m.state_dict(), "head") for m in models]
    mean = {k: sum(h[k] for h in heads) / len(heads) for k in heads[0]}
    x = torch.randn(4, *DIGITS)
    for model in models:
        model.load_state_dict(mean, strict=False)
        assert torch.equal(model.classifier.weight, mean["classifier.weight"])
        assert model(x).logits.shape == (4, 10)


def test_build_is_seeded_deterministic():
    for name in group_members(HTFE5):
        a, b = seeded(name, DIGITS, 24), seeded(name, DIGITS, 24)
        c = seeded(name, DIGITS, 24, seed=8)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    # without a feature_dim a member is the registered model itself, initialised identically
    from raysim.nn.models import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        plain = build_model("cnn", DIGITS, 10)
    assert all(torch.equal(v, seeded("cnn", DIGITS, None).state_dict()[k])
               for k, v in plain.state_dict().items())


def test_member_of_by_client_id_and_blocks():
    assert [member_of(k, 10, 4, "by_client_id") for k in range(10)] == [0, 1, 2, 3] * 2 + [0, 1]
    assert [member_of(k, 10, 4, "blocks") for k in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    # blocks covers every member with contiguous ranges, even for a million clients
    n, m = 1_000_000, 5
    edges = [member_of(k, n, m, "blocks") for k in (0, n // m - 1, n // m, n - 1)]
    assert edges == [0, 0, 1, 4]
    with pytest.raises(ValueError, match="unknown assignment"):
        member_of(0, 10, 4, "random")


def test_common_feature_dim():
    assert common_feature_dim(HTFE5, DIGITS, 10) is None  # 128, 256, 128, 64, 256
    assert common_feature_dim(HeterogeneousConfig(models=("cnn", "cnn_deep")), DIGITS, 10) == 128
    assert common_feature_dim(HeterogeneousConfig(models=("htfe4",), feature_dim=48),
                              DIGITS, 10) == 48


def check(models, shape=DIGITS, task="classification", needs_features=False, feature_dim=None):
    het = HeterogeneousConfig(models=tuple(models), feature_dim=feature_dim)
    check_group(het, shape, 10, task, needs_features)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check(["htfe-4"]), "model.heterogeneous.models: unknown model or group 'htfe-4'; "
                                "did you mean 'htfe4'?"),
    (lambda: check(["cnn", "cnn_wid"]), "unknown model or group 'cnn_wid'; did you mean "
                                        "'cnn_wide'? models: cnn, cnn_deep, cnn_wide,"),
    (lambda: check(["htfe4", "mlp"]), "model.heterogeneous.models: the group 'htfe4' stands "
                                      "alone; name one group or list model names"),
    (lambda: check(["cnn", "unet"]), "model.heterogeneous.models: member 'unet' is a "
                                     "segmentation model, and the data is a classification "
                                     "task; use classification models (cnn, cnn_deep,"),
    (lambda: check(["unet"], task="segmentation"),
     "model.heterogeneous: groups of architectures run classification tasks, and the dataset "
     "is a segmentation task; remove model.heterogeneous"),
    (lambda: check(["cnn", "test_heterogeneous:Needs28"]),
     "model.heterogeneous.models: member 'test_heterogeneous:Needs28' cannot take the "
     "dataset's input shape (1, 8, 8) (mat1 and mat2 shapes cannot be multiplied"),
    (lambda: check(["cnn", "logreg"], feature_dim=64),
     "model.heterogeneous.models: feature_dim: 64 needs a feature dimension that member "
     "'logreg' cannot produce (it has no feature head); use members with one (cnn,"),
    (lambda: check(["logreg", "mlp"], needs_features=True),
     "model.heterogeneous.models: the method's features needs a feature dimension that member "
     "'logreg' cannot produce"),
    (lambda: check(["htfe4"], needs_features=True),
     "model.heterogeneous.feature_dim: the members' feature dims differ (cnn 128, cnn_wide "
     "256, cnn_deep 128, mlp 64) and the method needs one; set model.heterogeneous.feature_dim "
     "(e.g. 256)"),
])
def test_check_group_errors(call, message):
    with pytest.raises(ConfigError) as caught:
        call()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_group_accepts_what_runs():
    check(["htfe5"])  # no features needed: the widths may differ
    check(["htfe5"], needs_features=True, feature_dim=32)
    check(["htfe5"], shape=MNIST, needs_features=True, feature_dim=32)
    check(["cnn", "cnn_deep"], needs_features=True)  # both 128 wide
    check(["cnn", "logreg"])  # a member without features, where none are needed
    check(["cnn", "test_heterogeneous:Needs28"], shape=MNIST)
    check(["htfe4"], shape=None, needs_features=True)  # the shape is not known yet


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check(["cnn", "mlp", "cnn_wide"], shape=(1, 9, 9))  # a shape no other test probed
    assert torch.equal(torch.rand(3), expected)


def test_projected_member_parameter_counts():
    # the projection adds exactly Linear(member width, d) and the head Linear(d, C)
    for name in ("cnn", "mlp"):
        plain, projected = seeded(name, DIGITS, None), seeded(name, DIGITS, 20)
        width = plain.feature_dim
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        own_head = math.prod(plain.classifier.weight.shape) + plain.classifier.bias.numel()
        assert count(projected) == count(plain) - own_head + (width * 20 + 20) + (20 * 10 + 10)


def test_validation_refuses_a_group_before_any_data_loads():
    from raysim.data.datasets import load_dataset
    from raysim.nn.heterogeneous import check_heterogeneous
    from raysim.run.validate import config_from_dict

    def config(dataset, **het):
        return config_from_dict({"data": {"dataset": dataset},
                                 "algorithm": {"name": "fedproto_personal"},
                                 "model": {"heterogeneous": het},
                                 "evaluation": {"personal": {"split": "fraction"}}})

    with pytest.raises(ConfigError, match="did you mean 'cnn_wide'"):
        config("digits", models=["cnn", "cnn_wid"])
    # mnist declares its 1×28×28 spec, so the widths are checked with no file read
    with pytest.raises(ConfigError, match="the members' feature dims differ"):
        config("mnist", models=["htfe4"])
    assert config("mnist", models=["htfe4"], feature_dim=64).model.heterogeneous.feature_dim == 64
    # digits' shape is known once it loads: the same check then runs with the loaded spec
    digits = config("digits", models=["htfe4"])
    with pytest.raises(ConfigError, match="the members' feature dims differ"):
        check_heterogeneous(digits, load_dataset("digits").spec)
