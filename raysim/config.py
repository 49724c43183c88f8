"""Experiment configuration: YAML → typed, validated dataclasses, with dotted overrides.

Every key a user can write is a dataclass field below, with its default. Parsing rejects unknown
keys (suggesting the nearest valid one), wrong types and out-of-range values with a
`ConfigError` naming the dotted key, before any Ray work starts. The algorithm's own
hyperparameters (`algorithm: {name: fedprox, mu: 0.01}`) are validated against that algorithm's
`Config` dataclass, so defaults live in exactly one place: the algorithm file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


def require(condition: bool, key: str, message: str) -> None:
    """Range checks in config dataclasses (algorithms' included) raise through this."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def lookup(registry: Any, name: str, key: str) -> Any:
    """`registry[name]` (a plug-in registry of `raysim.registry`), or a ConfigError at `key`
    saying why not (unknown, with the known names; failed import; missing contract)."""
    from raysim.registry import RegistryError

    try:
        return registry[name]
    except RegistryError as error:
        raise ConfigError(f"{key}: {error}") from None


# How the `domains` partition splits one domain's samples among that domain's clients.
WITHIN_DOMAIN_KINDS: tuple[str, ...] = ("iid", "dirichlet")


@dataclass
class PartitionConfig:
    """How the training split is divided among clients (see `raysim.data.partition`)."""

    kind: str = "dirichlet"
    num_clients: int = 50
    alpha: float = 0.5  # Dirichlet concentration: over labels (dirichlet*), over sizes (quantity)
    classes_per_client: int = 2  # shards: exactly k classes per client
    min_size: int = 2  # dirichlet / quantity: redraw until every client holds this many samples
    within: str = "iid"  # domains: how each domain's samples are split among its clients
    path: str | None = None  # file: a Parquet table client → sample (raysim.data.partition_file)
    overlap: bool = False  # file: clients may share samples

    def __post_init__(self) -> None:
        from raysim.registry import PARTITIONERS

        lookup(PARTITIONERS, self.kind, "kind")
        require(self.kind != "file" or self.path is not None, "path",
                "kind 'file' reads a partition file: set data.partition.path (write one with "
                "`raysim partition CONFIG --out FILE`)")
        require(self.num_clients >= 1, "num_clients", "must be >= 1")
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(self.classes_per_client >= 1, "classes_per_client", "must be >= 1")
        require(self.min_size >= 1, "min_size", "must be >= 1")
        require(self.within in WITHIN_DOMAIN_KINDS, "within",
                f"choose one of {', '.join(WITHIN_DOMAIN_KINDS)}")


@dataclass
class LongTailConfig:
    """Global long tail applied before partitioning: class c keeps n_max·ρ^(−c/(C−1))."""

    rho: float = 1.0

    def __post_init__(self) -> None:
        require(self.rho >= 1, "rho", f"imbalance ratio must be >= 1 (got {self.rho})")


@dataclass
class SyntheticConfig:
    """Size of the offline multi-site segmentation sets (synthetic_organ, synthetic_nuclei)."""

    sites: int = 4
    train_per_site: int = 48
    val_per_site: int = 12
    test_per_site: int = 24
    image_size: int = 64  # square; a multiple of 16 so a 4-level U-Net divides it evenly

    def __post_init__(self) -> None:
        require(self.sites >= 1, "sites", "must be >= 1")
        require(self.train_per_site >= 1, "train_per_site", "must be >= 1")
        require(self.val_per_site >= 1, "val_per_site", "must be >= 1")
        require(self.test_per_site >= 1, "test_per_site", "must be >= 1")
        require(self.image_size >= 32 and self.image_size % 16 == 0, "image_size",
                f"must be a multiple of 16 and >= 32 (got {self.image_size})")


@dataclass
class FedProxSyntheticConfig:
    """synthetic_fedprox: Synthetic(α, β) of the FedProx paper, any number of clients, each
    generated from (seed, client id) when it is sampled (raysim.data.synthetic_fedprox)."""

    alpha: float = 1.0  # spread of the clients' labelling models (std of u_k)
    beta: float = 1.0  # spread of the clients' input means (std of B_k)
    iid: bool = False  # the paper's IID variant: one shared model, zero input means
    seed: int = 0  # the dataset's own seed: the same clients for every run seed
    size_mu: float = 4.0  # client sizes: ⌊LogNormal(size_mu, size_sigma)⌋ + size_min
    size_sigma: float = 2.0
    size_min: int = 50
    test_clients: int = 100  # the test set: held-out samples of this many clients
    test_per_client: int = 100

    def __post_init__(self) -> None:
        require(self.alpha >= 0, "alpha", f"must be >= 0 (got {self.alpha})")
        require(self.beta >= 0, "beta", f"must be >= 0 (got {self.beta})")
        require(self.size_sigma >= 0, "size_sigma", f"must be >= 0 (got {self.size_sigma})")
        require(self.size_min >= 1, "size_min", "must be >= 1")
        require(self.test_clients >= 1, "test_clients", "must be >= 1")
        require(self.test_per_client >= 1, "test_per_client", "must be >= 1")


@dataclass
class DomainSource:
    """One domain of `data.dataset: domains`: a single-domain dataset read from its own root,
    optionally subsampled (a seeded draw of its train / test split)."""

    name: str = ""
    dataset: str = ""
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None

    def __post_init__(self) -> None:
        from raysim.registry import DATASETS

        require(bool(self.name), "name", "every domain needs a name (its metrics' suffix)")
        lookup(DATASETS, self.dataset, "dataset")
        require(self.dataset != "domains", "dataset", "a domain cannot be a `domains` dataset")
        require(DATASETS[self.dataset].task == "classification", "dataset",
                f"{self.dataset} is not a classification dataset")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be >= 1 (got {value})")


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None  # folder holding the dataset files (not needed for digits)
    download: bool = False  # let torchvision fetch a missing dataset into root
    test_fraction: float = 0.25  # held-out share, for datasets without an official test split
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    long_tail: LongTailConfig = field(default_factory=LongTailConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_fedprox: FedProxSyntheticConfig = field(default_factory=FedProxSyntheticConfig)
    image_size: int | None = None  # prostate_mri / nuclei: resize to this square; None = native
    # how resized masks are resampled: nearest (stays binary) or area (the FedBCS code's MONAI
    # `Resized` default: area means truncated to 0/1 as its `.long()` casts do, which erodes
    # boundaries); None: nearest, or area under evaluation.protocol: official
    label_resize: str | None = None
    # share of the training data held out for validation (model selection), seeded and
    # stratified by class (and domain), for classification sets without a validation split of
    # their own; nuclei: the share of each site's train list (default there: 0.2, and 0 under
    # evaluation.protocol: official, which trains on the whole list); 0: none held out
    val_fraction: float | None = None
    # multi-domain datasets: domains held out of training entirely, evaluated apart
    # (test_<metric>/unseen/<domain>); train_domains (default: all others) limits training
    test_domains: list[str] = field(default_factory=list)
    train_domains: list[str] | None = None
    # dataset `domains`: its domains, and the image shape [C, H, W] they are brought to
    # (needed where they differ)
    domains: list[DomainSource] = field(default_factory=list)
    domain_shape: list[int] | None = None

    def __post_init__(self) -> None:
        from raysim.registry import DATASETS

        dataset = lookup(DATASETS, self.dataset, "dataset")
        if getattr(dataset, "generates_clients", False):
            require(self.partition.kind == "natural", "partition.kind",
                    f"{self.dataset} generates each client's own samples: set "
                    "data.partition.kind: natural")
        require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require(self.image_size is None or (self.image_size >= 16 and self.image_size % 16 == 0),
                "image_size", f"must be a multiple of 16 (got {self.image_size})")
        require(self.val_fraction is None or 0 <= self.val_fraction < 1, "val_fraction",
                "must be in [0, 1) (0: no validation split)")
        require(self.label_resize in (None, "nearest", "area"), "label_resize",
                f"choose nearest or area (got {self.label_resize!r})")
        require(not self.val_fraction or not getattr(dataset, "generates_clients", False),
                "val_fraction", f"{self.dataset} has no validation split: its test set is "
                "held-out data of its own clients")
        self._check_domains()

    def _check_domains(self) -> None:
        if self.dataset != "domains":
            require(not self.domains, "domains", "only for data.dataset: domains")
            return
        require(bool(self.domains), "domains", "list the domains, e.g. [{name: mnist, dataset: "
                "mnist, root: data/mnist}, {name: usps, dataset: usps, root: data/usps}]")
        names = [d.name for d in self.domains]
        twice = next((n for n in names if names.count(n) > 1), None)
        require(twice is None, "domains", f"two domains are named {twice!r}")
        shape = self.domain_shape
        require(shape is None or (len(shape) == 3 and all(v >= 1 for v in shape)),
                "domain_shape", f"expected [channels, height, width] (got {shape})")


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: int | None = None  # base width (unet: 32, resnet10: 32); None: the model's default

    def __post_init__(self) -> None:
        from raysim.registry import MODELS

        model = lookup(MODELS, self.name, "name")
        if self.width is not None:
            with_width = [n for n in MODELS if MODELS[n].width_argument]
            require(model.width_argument is not None, "width",
                    f"model {self.name!r} has no width setting; models with one: "
                    f"{', '.join(with_width)}")
            require(self.width >= 1, "width", "must be >= 1")


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # sgd | adam
    # Keep each client's optimiser state (momentum, Adam moments) across its rounds, as the
    # FedBCS code does; the weights still restart from the global model every round.
    keep_optimizer_state: bool = False

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "local_epochs", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.optimizer in ("sgd", "adam"), "optimizer", "choose one of sgd, adam")


@dataclass
class ActorResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        require(self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus), "num_gpus",
                 "fractions are allowed only below 1 (e.g. 0.25 packs four actors per GPU)")


@dataclass
class ResourcesConfig:
    num_workers: int = 2
    worker: ActorResources = field(default_factory=ActorResources)
    server: ActorResources = field(default_factory=lambda: ActorResources(num_cpus=0.0))
    # ray: actors on a Ray cluster; local: the same round loop in this process, one client
    # after another (for pdb and quick tests; the same results)
    backend: str = "ray"

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", "must be >= 1")
        require(self.backend in ("ray", "local"), "backend", "choose one of ray, local")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "raysim"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.mode in ("online", "offline", "disabled"), "mode",
                 "choose one of online, offline, disabled")


@dataclass
class LoggingConfig:
    progress: bool = True  # live progress line on the console
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # more sinks by registered name (`raysim.sinks` entry points), each made as cls(run_dir);
    # W&B joins them whenever wandb.mode is not disabled
    sinks: list[str] = field(default_factory=list)
    # `raysim launch` draws curves.png (the headline metric per round) and partition.png
    # (samples per client and class, coloured by domain)
    curves: bool = True

    def __post_init__(self) -> None:
        from raysim.registry import SINKS

        for i, name in enumerate(self.sinks):
            lookup(SINKS, name, f"sinks[{i}]")


@dataclass
class CheckpointConfig:
    """Checkpoints under `<run dir>/checkpoints/`: every N rounds, after the last round and on
    an interrupt. `raysim resume RUN_DIR` continues from the newest complete one."""

    every: int = 10  # 0: only after the last round and on an interrupt
    keep: int = 2  # the newest this many stay on disk

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", "must be >= 0 (0: only at the end and on interrupt)")
        require(self.keep >= 1, "keep", "must be >= 1")


@dataclass
class FaultToleranceConfig:
    """What a run survives: dead worker actors are replaced (their clients rerun), a client
    that raises is retried and then dropped, and a round where too few clients succeed stops
    the run (with a checkpoint) instead of averaging the survivors."""

    max_actor_restarts: int = 10  # dead worker or server actors replaced over the whole run
    max_client_retries: int = 1  # a client that raises is tried this many more times
    min_clients_fraction: float = 0.5  # of the sampled clients that must succeed in a round

    def __post_init__(self) -> None:
        require(self.max_actor_restarts >= 0, "max_actor_restarts", "must be >= 0")
        require(self.max_client_retries >= 0, "max_client_retries", "must be >= 0")
        require(0 <= self.min_clients_fraction <= 1, "min_clients_fraction",
                f"must be in [0, 1] (got {self.min_clients_fraction})")


@dataclass
class ClientStateConfig:
    """Where stateful methods keep each client's state between its rounds."""

    store: str = "memory"  # memory (the server actor's RAM) | disk (files in the run dir)

    def __post_init__(self) -> None:
        require(self.store in ("memory", "disk"), "store", "choose one of memory, disk")


@dataclass
class EvaluationConfig:
    """What a run reports. `default`: every metric on the test split, the reported round chosen
    on the validation split; `official` (segmentation): FedBCS's published protocol, to compare
    with its numbers like for like: the maximum test Dice over rounds, one-sided ASD (MONAI's
    default), area-resized labels and, on nuclei, training on the whole train list."""

    protocol: str = "default"  # default | official

    def __post_init__(self) -> None:
        require(self.protocol in PROTOCOLS, "protocol",
                f"choose one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")


PROTOCOLS = ("default", "official")


@dataclass
class LeakageConfig:
    """The honest-but-curious server probe (`raysim.methods.leakage`): on `clients_per_round`
    of each round's sampled clients (the lowest ids), every `every` rounds, what the server can
    infer from the upload against the client's data, logged as `leak_*` metrics. 0: off."""

    clients_per_round: int = 0
    every: int = 1
    inversion_steps: int = 200  # optimisation steps of each feature inversion
    inversion_classes: int = 3  # class means inverted into images per probed client
    dlg_max_samples: int = 8  # weights-only uploads: gradient inversion up to this client size
    dlg_steps: int = 200

    def __post_init__(self) -> None:
        for key in ("clients_per_round", "inversion_steps", "dlg_max_samples", "dlg_steps"):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        require(self.every >= 1, "every", "must be >= 1")
        require(self.inversion_classes >= 1, "inversion_classes", "must be >= 1")


@dataclass
class DiagnosticsConfig:
    """Extra measurements that cost time, off unless asked for."""

    # methods with global class anchors: cosine of clients' local class means to the anchors,
    # the anchors' self-classification and their inter-class cosine, every round
    anchors: bool = False
    leakage: LeakageConfig = field(default_factory=LeakageConfig)


@dataclass
class AlgorithmConfig:
    """`name` picks a registered algorithm; the other keys are that algorithm's `Config`."""

    name: str = "fedavg"
    params: Any = None  # an instance of the algorithm's Config dataclass


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 20
    clients_per_round: int = 10
    eval_every: int = 1  # evaluate the global model every this many rounds (and after the last)
    # Fixed evaluation batches: models whose BatchNorm uses batch statistics at test time (the
    # FedBCS U-Net) give results that depend on it (the FedBCS code uses 16).
    eval_batch_size: int = 128
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=lambda: _parse_algorithm({}, "algorithm"))
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    client_state: ClientStateConfig = field(default_factory=ClientStateConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.clients_per_round >= 1, "clients_per_round", "must be >= 1")
        self._check_model_fits_algorithm()
        self._resolve_protocol()
        self._check_leakage_probe()
        num_clients = self.data.partition.num_clients
        require(self.clients_per_round <= num_clients, "clients_per_round",
                 f"{self.clients_per_round} > data.partition.num_clients ({num_clients}); "
                 "lower clients_per_round or raise num_clients")


    def _check_leakage_probe(self) -> None:
        from raysim.methods.leakage import SUPPORTED_UPLOADS
        from raysim.registry import DATASETS, MODELS, algorithm_class, algorithm_names

        probe = self.diagnostics.leakage
        if not probe.clients_per_round:
            return
        uploads = getattr(algorithm_class(self.algorithm.name), "uploads", "weights")
        if uploads not in SUPPORTED_UPLOADS:
            known = [n for n in algorithm_names()
                     if getattr(algorithm_class(n), "uploads", "weights") in SUPPORTED_UPLOADS]
            raise ConfigError(f"diagnostics.leakage: the probe reads "
                              f"{', '.join(SUPPORTED_UPLOADS)} uploads, and {self.algorithm.name} "
                              f"uploads {uploads}; methods it supports: {', '.join(known)}")
        require(DATASETS[self.data.dataset].task == "classification"
                and MODELS[self.model.name].has_feature_head, "diagnostics.leakage",
                "the probe needs a classification task and a model with a feature head")
        require(probe.clients_per_round <= self.clients_per_round,
                "diagnostics.leakage.clients_per_round",
                f"{probe.clients_per_round} > clients_per_round ({self.clients_per_round}): the "
                "probe reads clients of the round")
        try:
            import skimage.metrics  # noqa: F401
        except ImportError:
            raise ConfigError("diagnostics.leakage: needs scikit-image for SSIM; pip install "
                              "'raysim[leakage]'") from None

    def _resolve_protocol(self) -> None:
        """The data settings the evaluation protocol implies, where left unset."""
        from raysim.registry import DATASETS

        official = self.evaluation.protocol == "official"
        if official and DATASETS[self.data.dataset].task != "segmentation":
            raise ConfigError("evaluation.protocol: official is FedBCS's segmentation protocol; "
                              f"dataset {self.data.dataset!r} is not a segmentation task (use "
                              "the default protocol)")
        if self.data.label_resize is None:
            self.data.label_resize = "area" if official else "nearest"
        if official and self.data.dataset == "nuclei" and self.data.val_fraction is None:
            self.data.val_fraction = 0.0

    def _check_model_fits_algorithm(self) -> None:
        from raysim.registry import DATASETS, MODELS, algorithm_class

        algorithm = algorithm_class(self.algorithm.name)
        model = MODELS[self.model.name]
        task = DATASETS[self.data.dataset].task
        if model.task != task:
            fitting = [name for name in MODELS if MODELS[name].task == task]
            raise ConfigError(
                f"model.name: {self.model.name!r} is not a {task} model, but dataset "
                f"{self.data.dataset!r} is a {task} task; use one of {', '.join(fitting)}"
            )
        if task not in algorithm.tasks:
            from raysim.registry import algorithm_names

            fitting = [n for n in algorithm_names() if task in algorithm_class(n).tasks]
            raise ConfigError(
                f"algorithm.name: {self.algorithm.name} runs {' and '.join(algorithm.tasks)} "
                f"tasks, but dataset {self.data.dataset!r} is a {task} task; methods that run "
                f"it: {', '.join(fitting)}"
            )
        check_task = getattr(algorithm, "check_task", None)
        if check_task is not None:
            check_task(self.algorithm.params, task)
        # on segmentation the features are the U-Net's stage maps (raysim.methods.features)
        if algorithm.needs_features and task == "classification" and not model.has_feature_head:
            with_heads = [name for name in MODELS if MODELS[name].has_feature_head]
            raise ConfigError(
                f"algorithm.name: {self.algorithm.name} works on the model's features, but "
                f"model {self.model.name!r} has no feature head; use one of {', '.join(with_heads)}"
            )


# --------------------------------------------------------------------------- parsing


def parse_dataclass(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and each class's ranges."""
    where = path or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    if cls is AlgorithmConfig:
        return _parse_algorithm(raw, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}{_suggest(str(key), fields, path)}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as error:  # a range check: prefix the section path
        raise ConfigError(f"{path}.{error}" if path else str(error)) from None


def _parse_algorithm(raw: dict, path: str) -> AlgorithmConfig:
    from raysim.registry import algorithm_class

    raw = dict(raw)
    name = raw.pop("name", AlgorithmConfig.name)
    require(isinstance(name, str), f"{path}.name", f"expected a string, got {_describe(name)}")
    try:
        algorithm = algorithm_class(name)
    except KeyError as error:
        raise ConfigError(f"{path}.name: {error.args[0]}") from None
    return AlgorithmConfig(name=name, params=parse_dataclass(algorithm.Config, raw, path))


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported type {hint!r}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(key: str, fields: dict, path: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        dotted = f"{path}.{close[0]}" if path else close[0]
        return f"; did you mean {dotted!r}?"
    return f"; valid keys here: {', '.join(fields)}"


# --------------------------------------------------------------------------- overrides, I/O


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a raw config mapping; the value is read as YAML (numbers, lists)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {override!r}: expected KEY=VALUE, e.g. data.partition.alpha=0.1"
        )
    set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None,
               where=f"override {override!r}")


def set_dotted(raw: dict, key: str, value: Any, where: str | None = None) -> None:
    """Set `a.b.c` in a raw config mapping, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where or key}: {part!r} is not a section")
        node = child
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (or only defaults), apply `-o` overrides, validate."""
    raw = read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(raw, overrides)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping. `base: other.yaml` (relative to this file) is read first and
    this file's keys are merged over it, so an experiment lists only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    raw = parse_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {_describe(raw)}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to {base_path}")
    return merge(read_yaml(base_path, (*seen, path.resolve())), raw)


def parse_yaml(path: Path) -> Any:
    """The YAML document in ``path`` ({} for an empty file). Undecodable bytes and syntax errors
    become a one-line ConfigError naming the file (and, for syntax, line:column), so the CLI's
    single `raysim: error:` line points straight at the mistake."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_line(path, text, error)) from None


def _yaml_error_line(path: Path, text: str, error: yaml.YAMLError) -> str:
    # PyYAML's own str() spans several lines (problem, context, a caret under the source).
    def one_line(value: object) -> str:
        return " ".join(str(value).split())

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = one_line(error.problem or error.context or "syntax error")
        context = f" ({one_line(error.context)})" if error.problem and error.context else ""
        return f"{where}: not valid YAML: {problem}{context}"
    if isinstance(error, yaml.reader.ReaderError):  # a control character such as NUL
        before = text[: error.position]
        line, column = before.count("\n") + 1, error.position - (before.rfind("\n") + 1) + 1
        return (
            f"{path}:{line}:{column}: not valid YAML: unacceptable character "
            f"#x{error.character:04x} ({error.reason})"
        )
    return f"{path}: not valid YAML: {one_line(error)}"


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursively for nested mappings."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    raw = deep_copy(raw)
    for override in overrides:
        apply_override(raw, override)
    return parse_dataclass(Config, raw)


def config_to_dict(config: Any) -> dict:
    """The resolved config as plain data: every key, defaults included (round-trips)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(config, AlgorithmConfig) and f.name == "params":
            out.update(config_to_dict(value))
        elif dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        else:
            out[f.name] = [config_to_dict(v) if dataclasses.is_dataclass(v) else v
                           for v in value] if isinstance(value, list) else value
    return out


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def deep_copy(raw: Any) -> Any:
    """A copy of a raw (YAML) config's nested dicts and lists."""
    if isinstance(raw, dict):
        return {key: deep_copy(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [deep_copy(value) for value in raw]
    return raw
