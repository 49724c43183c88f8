"""From a config file (or mapping) and overrides to a validated, typed, frozen `Config`.

Parsing (`raysim.config`) checks each section on its own, plug-in sections with the `Config`
of the plug-in they name, resolved through the registries. What spans plug-ins is checked here,
once, before any Ray work: a method on a task it does not run, a model of the wrong task, a
method needing features on a model without a feature head, a dataset that brings its own
clients, the evaluation protocol's implied settings, personalised evaluation and heterogeneous
clients against what the method shares and keeps, the leakage probe, the privacy mechanism against
what the method uploads, and the method's own `check_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raysim.algorithm import Algorithm, PersonalModel, task_kind
from raysim.config import (
    Config,
    ConfigError,
    apply_override,
    deep_copy,
    parse_config,
    read_yaml,
    require,
)
from raysim.data.personal import check_personal_config
from raysim.methods.leakage import SUPPORTED_UPLOADS, unreadable, upload_kind
from raysim.methods.privacy import check_method
from raysim.nn.heterogeneous import check_heterogeneous
from raysim.registry import (
    DATASETS,
    MODELS,
    algorithm_class,
    algorithm_names,
    resolve_config,
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (or only defaults), apply `-o` overrides, validate."""
    raw = read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: Sequence[str] = ()) -> Config:
    """A raw config mapping with `-o` style overrides applied, parsed and validated."""
    raw = deep_copy(raw)
    for override in overrides:
        apply_override(raw, override)
    return validate(parse_config(raw, resolve_config))


def validate(config: Config) -> Config:
    """`config` itself, once every check across its plug-ins passes (else a ConfigError)."""
    check_data(config)
    check_model_and_method(config)
    check_heterogeneous(config)
    check_protocol(config)
    check_personal(config)
    check_personal_config(config)
    check_leakage_probe(config)
    check_privacy(config)
    num_clients = config.data.partition.num_clients
    require(config.clients_per_round <= num_clients, "clients_per_round",
            f"{config.clients_per_round} > data.partition.num_clients ({num_clients}); "
            "lower clients_per_round or raise num_clients")
    return config


def check_data(config: Config) -> None:
    """A dataset that generates each client's samples brings its own partition and test set."""
    data = config.data
    if not getattr(DATASETS[data.dataset], "generates_clients", False):
        return
    require(data.partition.kind == "natural", "data.partition.kind",
            f"{data.dataset} generates each client's own samples: set "
            "data.partition.kind: natural")
    require(not data.val_fraction, "data.val_fraction",
            f"{data.dataset} has no validation split: its test set is held-out data of its own "
            "clients")


def check_model_and_method(config: Config) -> None:
    algorithm = algorithm_class(config.algorithm.name)
    model = MODELS[config.model.name]
    task = task_kind(config)
    # a heterogeneous group's members are checked as a group (raysim.nn.heterogeneous)
    heterogeneous = config.model.heterogeneous is not None
    if model.task != task and not heterogeneous:
        fitting = [name for name in MODELS if MODELS[name].task == task]
        raise ConfigError(
            f"model.name: {config.model.name!r} is not a {task} model, but dataset "
            f"{config.data.dataset!r} is a {task} task; use one of {', '.join(fitting)}"
        )
    if task not in algorithm.tasks:
        fitting = [n for n in algorithm_names() if task in algorithm_class(n).tasks]
        raise ConfigError(
            f"algorithm.name: {config.algorithm.name} runs {' and '.join(algorithm.tasks)} "
            f"tasks, but dataset {config.data.dataset!r} is a {task} task; methods that run "
            f"it: {', '.join(fitting)}"
        )
    check_config = getattr(algorithm, "check_config", None)
    if check_config is not None:
        check_config(config)
    # on segmentation the features are the U-Net's stage maps (raysim.methods.features)
    if (algorithm.needs_features and task == "classification" and not model.has_feature_head
            and not heterogeneous):
        with_heads = [name for name in MODELS if MODELS[name].has_feature_head]
        raise ConfigError(
            f"algorithm.name: {config.algorithm.name} works on the model's features, but "
            f"model {config.model.name!r} has no feature head; use one of {', '.join(with_heads)}"
        )


def check_protocol(config: Config) -> None:
    """`evaluation.protocol: official` is FedBCS's segmentation protocol; what it implies for
    the data (area-resized labels, nuclei's whole train list) the datasets compute from it."""
    if config.evaluation.protocol == "official" and task_kind(config) != "segmentation":
        raise ConfigError("evaluation.protocol: official is FedBCS's segmentation protocol; "
                          f"dataset {config.data.dataset!r} is not a segmentation task (use "
                          "the default protocol)")


def check_personal(config: Config) -> None:
    """Personalised evaluation needs a model each client deploys (its own, or the global one
    fine-tuned); a personal model is scored only that way; a group of architectures cannot
    share weights of one architecture."""
    name, personal = config.algorithm.name, config.evaluation.personal
    algorithm = algorithm_class(name)
    keeps_model = issubclass(algorithm, PersonalModel)
    if config.model.heterogeneous is not None and algorithm.shares in ("model", "body"):
        what = "whole model" if algorithm.shares == "model" else "body (all but the head)"
        fitting = [n for n in algorithm_names() if algorithm_class(n).shares in ("head", "none")]
        raise ConfigError(
            f"model.heterogeneous: {name} averages its clients' {what}, which needs one "
            "architecture for every client; methods that run on a group of architectures: "
            f"{', '.join(fitting) or 'none registered'}")
    if personal is None:
        require(not keeps_model, "evaluation.personal",
                f"{name} keeps a personal model per client, which only personalised "
                "evaluation scores: add evaluation.personal (e.g. -o "
                "evaluation.personal.split=fraction)")
        return
    deploys = keeps_model or algorithm.deployed_model is not Algorithm.deployed_model
    if not deploys and not personal.finetune_epochs:
        raise ConfigError(
            f"evaluation.personal: {name} keeps no personal model and does not fine-tune: use "
            "fedavg_ft, evaluation.personal.finetune_epochs: 1, or a personalised method "
            "such as fedper/fedproto_personal")
    num_clients = config.data.partition.num_clients
    require(personal.clients <= num_clients, "evaluation.personal.clients",
            f"{personal.clients} > data.partition.num_clients ({num_clients}); use 0 to "
            "evaluate every client")


def check_leakage_probe(config: Config) -> None:
    probe = config.diagnostics.leakage
    if not probe.clients_per_round:
        return
    method = algorithm_class(config.algorithm.name)
    why = unreadable(method)
    if why is not None:
        known = [n for n in algorithm_names() if unreadable(algorithm_class(n)) is None]
        raise ConfigError(f"diagnostics.leakage: the probe reads "
                          f"{', '.join(SUPPORTED_UPLOADS)} uploads, and {config.algorithm.name} "
                          f"cannot be read: {why}; methods it supports: {', '.join(known)}")
    require(task_kind(config) == "classification" and MODELS[config.model.name].has_feature_head,
            "diagnostics.leakage",
            "the probe needs a classification task and a model with a feature head")
    require(probe.clients_per_round <= config.clients_per_round,
            "diagnostics.leakage.clients_per_round",
            f"{probe.clients_per_round} > clients_per_round ({config.clients_per_round}): the "
            "probe reads clients of the round")
    try:
        import skimage.metrics  # noqa: F401
    except ImportError:
        raise ConfigError("diagnostics.leakage: needs scikit-image for SSIM; pip install "
                          "'raysim[leakage]'") from None


def check_privacy(config: Config) -> None:
    """The privacy mechanism covers what the method uploads (σ's calibration, which needs
    the partition, comes with the task: `raysim.task.privacy_plan`)."""
    algorithm = algorithm_class(config.algorithm.name)
    check_method(config.privacy.mechanism, config.algorithm.name, upload_kind(algorithm),
                 algorithm.weighted_mean, task_kind(config),
                 algorithm.server_update is not Algorithm.server_update)
