"""Clients of different architectures (`model.heterogeneous`): groups of registered models,
which client gets which member, and a common feature width so members can share a head or
prototypes.

Groups are named after HtFLlib's HtFE-x groups (Zhang et al., "HtFLlib: A Comprehensive
Heterogeneous Federated Learning Library and Benchmark", KDD 2025), where x is how many
architectures the group holds; the members here are small enough to train on a CPU and run
on 8×8 digits as on 28×28 MNIST. They differ in depth and width:

    htfe2  cnn, mlp
    htfe4  cnn, cnn_wide, cnn_deep, mlp
    htfe5  cnn, cnn_wide, cnn_deep, mlp, resnet10

Client k of N gets member k mod M (`assign: by_client_id`) or member k·M // N (`blocks`:
contiguous id ranges). With `feature_dim`, every member's features are projected to that width
(Linear + ReLU, as HtFLlib's feature_dim does) and the classifier reads them, so every member's
head (`classifier.*`, the `head` of `raysim.algorithm.weights_part`) has one shape and can be
averaged, and every member's prototypes have one dimension.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from raysim.config import Config, ConfigError, HeterogeneousConfig
from raysim.nn.models import ModelOutput, build_model
from raysim.registry import DATASETS, MODELS, RegistryError, algorithm_class

MODEL_GROUPS: dict[str, tuple[str, ...]] = {
    "htfe2": ("cnn", "mlp"),
    "htfe4": ("cnn", "cnn_wide", "cnn_deep", "mlp"),
    "htfe5": ("cnn", "cnn_wide", "cnn_deep", "mlp", "resnet10"),
}

KEY = "model.heterogeneous"


class ProjectedMember(nn.Module):
    """A member whose features pass through `projection` (Linear(member width, feature_dim) +
    ReLU) before a new `classifier` (Linear(feature_dim, C)). The member's own classifier is an
    nn.Identity, so the state dict holds no weights that nothing trains."""

    has_feature_head = True
    task = "classification"
    width_argument = None

    def __init__(self, extractor: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        extractor.classifier = nn.Identity()
        self.extractor = extractor
        self.feature_dim = feature_dim
        self.projection = nn.Sequential(nn.Linear(extractor.feature_dim, feature_dim), nn.ReLU())
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        features = self.projection(self.extractor(x).features)
        return ModelOutput(features, self.classifier(features))


def group_members(het: HeterogeneousConfig) -> tuple[str, ...]:
    """The architectures of `het`, in member order: a group's, or the listed names."""
    groups = [name for name in het.models if name in MODEL_GROUPS]
    if groups and len(het.models) > 1:
        raise ConfigError(f"{KEY}.models: the group {groups[0]!r} stands alone; name one group "
                          "or list model names")
    return MODEL_GROUPS[groups[0]] if groups else tuple(het.models)


def member_of(client_id: int, num_clients: int, num_members: int, assign: str) -> int:
    """Client `client_id`'s member (elementwise on integer arrays too)."""
    if assign == "by_client_id":
        return client_id % num_members
    if assign == "blocks":
        return client_id * num_members // num_clients
    raise ValueError(f"unknown assignment {assign!r}")


def build_member(name: str, input_shape: tuple[int, int, int], num_classes: int,
                 feature_dim: int | None) -> nn.Module:
    """The registered model `name` with its defaults; with `feature_dim`, projected to it
    (`ProjectedMember`). Draws its weights from the global RNG, like `build_model`: seed it
    under torch.random.fork_rng as raysim.task.initial_model does."""
    model = build_model(name, input_shape, num_classes)
    return model if feature_dim is None else ProjectedMember(model, feature_dim, num_classes)


def common_feature_dim(het: HeterogeneousConfig, input_shape: tuple[int, int, int],
                       num_classes: int) -> int | None:
    """`het.feature_dim`, else the members' own feature width where they all have one and it
    is the same; None otherwise."""
    if het.feature_dim is not None:
        return het.feature_dim
    dims = {_probe(name, tuple(input_shape), num_classes)[0] for name in group_members(het)}
    return dims.pop() if len(dims) == 1 else None


def check_group(het: HeterogeneousConfig, input_shape: tuple[int, int, int] | None,
                num_classes: int, task: str, needs_features: bool) -> None:
    """A one-line ConfigError for a group the run cannot use: an unknown member; a member the
    data cannot feed (a segmentation model, or one that does not take `input_shape`); a member
    without a feature head where a feature_dim or the method (`needs_features`) asks for
    features; members of different feature widths with no feature_dim where features are
    needed. `input_shape` None (not known before the data loads): what needs a built member
    (input fit, widths) is left for the check with the loaded data's shape."""
    members = group_members(het)
    classes = {name: _resolve(name) for name in members}
    if task != "classification":
        raise ConfigError(f"{KEY}: groups of architectures run classification tasks, and the "
                          f"dataset is a {task} task; remove {KEY}")
    for name, cls in classes.items():
        if cls.task != task:
            raise ConfigError(f"{KEY}.models: member {name!r} is a {cls.task} model, and the "
                              f"data is a {task} task; use {task} models "
                              f"({', '.join(_names(task=task))})")
    wanted = (f"feature_dim: {het.feature_dim}" if het.feature_dim is not None
              else "the method's features" if needs_features else None)
    for name, cls in classes.items():
        if wanted and not cls.has_feature_head:
            raise ConfigError(f"{KEY}.models: {wanted} needs a feature dimension that member "
                              f"{name!r} cannot produce (it has no feature head); use members "
                              f"with one ({', '.join(_names(task=task, features=True))})")
    if input_shape is None:
        return
    shape = tuple(input_shape)
    dims = {}
    for name in members:
        dims[name], error = _probe(name, shape, num_classes)
        if error:
            raise ConfigError(f"{KEY}.models: member {name!r} cannot take the dataset's input "
                              f"shape {shape} ({error}); choose members that fit it")
    if needs_features and het.feature_dim is None and len(set(dims.values())) > 1:
        listed = ", ".join(f"{name} {dim}" for name, dim in dims.items())
        raise ConfigError(f"{KEY}.feature_dim: the members' feature dims differ ({listed}) and "
                          f"the method needs one; set {KEY}.feature_dim "
                          f"(e.g. {max(dims.values())})")


def check_heterogeneous(config: Config, spec: Any = None) -> None:
    """`check_group` for a config: with the loaded dataset's `spec` (a DatasetSpec) where given,
    else, before any data loads, with the spec its plug-in declares (file datasets) or only
    the checks that need no input shape. A method needs one feature width where it works on
    features or shares the head."""
    het = config.model.heterogeneous
    if het is None:
        return
    dataset = DATASETS[config.data.dataset]
    spec = spec if spec is not None else getattr(dataset, "spec", None)
    method = algorithm_class(config.algorithm.name)
    needs = bool(getattr(method, "needs_features", False)) or (
        getattr(method, "shares", "model") == "head")
    if spec is None:
        check_group(het, None, 2, dataset.task, needs)
    else:
        check_group(het, tuple(spec.input_shape), spec.num_classes, spec.task, needs)


def _resolve(name: str) -> Any:
    try:
        return MODELS[name]
    except RegistryError as error:
        known = [*MODELS, *MODEL_GROUPS]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if name in MODELS.names() or ":" in name:  # registered, or a path, but broken
            raise ConfigError(f"{KEY}.models: {error}") from None
        raise ConfigError(f"{KEY}.models: unknown model or group {name!r}; {hint}models: "
                          f"{', '.join(MODELS)}; groups: {', '.join(MODEL_GROUPS)}") from None


def _names(task: str, features: bool = False) -> list[str]:
    return [n for n in MODELS
            if MODELS[n].task == task and (MODELS[n].has_feature_head or not features)]


@lru_cache(maxsize=64)
def _probe(name: str, input_shape: tuple[int, int, int], num_classes: int
           ) -> tuple[int | None, str | None]:
    """(feature width, None) of member `name` run on a batch of zeros of `input_shape`, or
    (None, why it cannot run on it). Leaves the global RNG as it was."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = build_model(name, input_shape, num_classes).eval()
            out = model(torch.zeros(2, *input_shape))
    except Exception as error:  # whatever the member's layers raise on that shape
        lines = str(error).strip().splitlines()
        return None, lines[0] if lines else type(error).__name__
    if tuple(out.logits.shape) != (2, num_classes):
        return None, f"logits of shape {tuple(out.logits.shape)[1:]}, not ({num_classes},)"
    return getattr(model, "feature_dim", None), None
