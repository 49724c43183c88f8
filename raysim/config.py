"""Experiment configuration: YAML → typed, frozen dataclasses, with dotted overrides.

This module holds the core sections (run keys, `data`, `model`, `train`, `resources`, ...), the
parser, YAML reading and overrides. It imports no plug-in: a section that names a plug-in
(`data.dataset`, `data.partition.kind`, `model.name`, `algorithm.name`, each of
`logging.sinks`) takes that plug-in's own keys beside its core ones, and the parser asks a
resolver for the plug-in's `Config` dataclass to parse them with:

    algorithm: {name: fedprox, mu: 0.01}            # mu: FedProx.Config
    data: {dataset: synthetic_organ, sites: 6,      # sites: the dataset's Config
           partition: {kind: dirichlet, alpha: 0.1, num_clients: 50}}   # alpha: dirichlet's

So defaults live in exactly one place, the plug-in. Parsing rejects unknown keys (suggesting the
nearest valid one), wrong types and out-of-range values with a `ConfigError` naming the dotted
key. Checks that span plug-ins (a model of the wrong task, a method on a task it does not run)
are `raysim.run.validate`'s, which also holds `load_config`: the one way to a validated config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


MAX_INT = 2**63 - 1  # integer keys are 64-bit (numpy, torch, Parquet columns)
# A YAML document's size once its aliases are expanded (every use of `*anchor` copies the
# anchored value when the config is copied): bounds "billion laughs" documents.
MAX_YAML_NODES = 1_000_000


def require(condition: bool, key: str, message: str) -> None:
    """Range checks in config dataclasses (plug-ins' included) raise through this."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# The kinds of plug-in a section can name (`raysim.registry` keeps one registry per kind).
ALGORITHM, DATASET, PARTITIONER, MODEL, SINK = (
    "algorithm", "dataset", "partition kind", "model", "sink")

# (kind, name) → the plug-in's Config dataclass (None: it declares none), or a KeyError whose
# first argument says why there is no such plug-in (`raysim.registry.resolve_config`).
Resolver = Callable[[str, str], type | None]

_PLUGIN = "raysim.plugin"


def plugin_params(kind: str, by: str) -> Any:
    """A section's field holding the `Config` instance of the plug-in of `kind` that the
    section's field `by` names; the section's keys that are not its own belong to it."""
    return field(default=None, metadata={_PLUGIN: (kind, by)})


@dataclass(frozen=True)
class NoParams:
    """The Config of a plug-in that declares no keys of its own."""


def config_class(plugin: Any) -> type:
    """The dataclass of a plug-in's own keys (`NoParams` where it declares none)."""
    return getattr(plugin, "Config", None) or NoParams


# Spellings that moved: the old section → where its keys are now.
MOVED = {"data.synthetic": "data", "data.synthetic_fedprox": "data"}


# --------------------------------------------------------------------------- core sections


@dataclass(frozen=True)
class PartitionConfig:
    """How the training split is divided among clients: `kind` picks a registered
    partitioner (`raysim.data.partitioners`), whose own keys (alpha, ...) sit beside it."""

    kind: str = "dirichlet"
    params: Any = plugin_params(PARTITIONER, "kind")
    num_clients: int = 50

    def __post_init__(self) -> None:
        require(self.num_clients >= 1, "num_clients", "must be >= 1")


@dataclass(frozen=True)
class LongTailConfig:
    """Global long tail applied before partitioning: class c keeps n_max·ρ^(−c/(C−1))."""

    rho: float = 1.0

    def __post_init__(self) -> None:
        require(self.rho >= 1, "rho", f"imbalance ratio must be >= 1 (got {self.rho})")


@dataclass(frozen=True)
class DataConfig:
    """`dataset` picks a registered dataset; its own keys (sizes, image_size, ...) sit beside
    the core ones below."""

    dataset: str = "digits"
    params: Any = plugin_params(DATASET, "dataset")
    root: str | None = None  # folder holding the dataset files (not needed for digits)
    download: bool = False  # let torchvision fetch a missing dataset into root
    test_fraction: float = 0.25  # held-out share, for datasets without an official test split
    # share of the training data held out for validation (model selection), seeded and
    # stratified by class (and domain), for classification sets without a validation split of
    # their own; a dataset may read it itself (nuclei: the share of each site's train list);
    # None: the dataset's default (none held out, nuclei 0.2); 0: none held out
    val_fraction: float | None = None
    # multi-domain datasets: domains held out of training entirely, evaluated apart
    # (test_<metric>/unseen/<domain>); train_domains (default: all others) limits training
    test_domains: tuple[str, ...] = ()
    train_domains: tuple[str, ...] | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    long_tail: LongTailConfig = field(default_factory=LongTailConfig)

    def __post_init__(self) -> None:
        require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require(self.val_fraction is None or 0 <= self.val_fraction < 1, "val_fraction",
                "must be in [0, 1) (0: no validation split)")


ASSIGNMENTS = ("by_client_id", "blocks")


@dataclass(frozen=True)
class HeterogeneousConfig:
    """Clients of different architectures (`model.heterogeneous`): `models` lists registered
    model names, or names one group (`htfe2`, `htfe4`, `htfe5`: see `raysim.nn.heterogeneous`);
    `assign` gives client k the member k mod M (`by_client_id`) or the k·M // N-th
    (`blocks`: contiguous id ranges). With `feature_dim` every member's features are
    projected to that width (a linear layer, as HtFLlib does), so prototypes and a shared head
    have one dimension; without it the members must already agree."""

    models: tuple[str, ...] = ()
    assign: str = "by_client_id"
    feature_dim: int | None = None

    def __post_init__(self) -> None:
        require(len(self.models) >= 1, "models", "name at least one model, or a group (htfe4)")
        require(self.assign in ASSIGNMENTS, "assign", f"choose one of {', '.join(ASSIGNMENTS)}")
        require(self.feature_dim is None or self.feature_dim >= 1, "feature_dim", "must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """`name` picks a registered model; its own keys (e.g. `width`) sit beside it.
    `heterogeneous` gives clients different architectures instead (`name` is then unused)."""

    name: str = "cnn"
    params: Any = plugin_params(MODEL, "name")
    heterogeneous: HeterogeneousConfig | None = None


@dataclass(frozen=True)
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
    # Client groups: train up to this many sampled clients at once, their weights stacked, one
    # vectorised step for all (docs/client_groups.md); 1 trains them one by one. A method or
    # model that cannot be grouped trains one by one, with a note.
    client_group: int = 1
    # with client_group > 1: a method or model that cannot be grouped is an error, not a note
    client_group_strict: bool = False

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "local_epochs", "must be >= 1")
        require(self.client_group >= 1, "client_group",
                f"must be >= 1 (got {self.client_group}; 1 trains clients one by one)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.optimizer in ("sgd", "adam"), "optimizer", "choose one of sgd, adam")


@dataclass(frozen=True)
class ActorResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        require(self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus), "num_gpus",
                 "fractions are allowed only below 1 (e.g. 0.25 packs four actors per GPU)")


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 2
    worker: ActorResources = field(default_factory=ActorResources)
    server: ActorResources = field(default_factory=lambda: ActorResources(num_cpus=0.0))
    # ray: actors on a Ray cluster; local: the same round loop in this process, one client
    # after another (for pdb and quick tests; the same results)
    backend: str = "ray"
    dashboard: bool = False  # an embedded Ray's dashboard (docs/guide/startup.md: its cost)

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", "must be >= 1")
        require(self.backend in ("ray", "local"), "backend", "choose one of ray, local")


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "raysim"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(self.mode in ("online", "offline", "disabled"), "mode",
                 "choose one of online, offline, disabled")


@dataclass(frozen=True)
class SinkConfig:
    """One of `logging.sinks`: a registered sink's name, or `{name: ..., <its keys>}`."""

    SHORTHAND: ClassVar[str] = "name"  # a bare string is the name

    name: str = ""
    params: Any = plugin_params(SINK, "name")


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True  # live progress line on the console
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # more sinks by registered name (`raysim.sinks` entry points); W&B joins them whenever
    # wandb.mode is not disabled
    sinks: tuple[SinkConfig, ...] = ()
    # `raysim launch` draws curves.png (the headline metric per round) and partition.png
    # (samples per client and class, coloured by domain)
    curves: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints under `<run dir>/checkpoints/`: every N rounds, after the last round and on
    an interrupt. `raysim resume RUN_DIR` continues from the newest complete one."""

    every: int = 10  # 0: only after the last round and on an interrupt
    keep: int = 2  # the newest this many stay on disk

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", "must be >= 0 (0: only at the end and on interrupt)")
        require(self.keep >= 1, "keep", "must be >= 1")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ClientStateConfig:
    """Where stateful methods keep each client's state between its rounds."""

    store: str = "memory"  # memory (the server actor's RAM) | disk (files in the run dir)

    def __post_init__(self) -> None:
        require(self.store in ("memory", "disk"), "store", "choose one of memory, disk")


PROTOCOLS = ("default", "official")
PERSONAL_SPLITS = ("fraction", "test_set")


@dataclass(frozen=True)
class PersonalConfig:
    """Personalised evaluation (`evaluation.personal`): each client's model as it would deploy
    it (its personal model, or the global one after `finetune_epochs` of local fine-tuning) is
    scored on that client's own test part, and on its validation part for model selection.

    `split`: `fraction` (PFLlib/HtFLlib) splits each client's samples, per class and seeded per
    client, into train/val/test parts of `val_fraction`/`test_fraction`; `test_set` (FedProto)
    keeps every training sample and draws each client's test part from the dataset's test
    split with the client's own label distribution (`test_fraction`/(1 − `test_fraction`) test
    samples per training sample; validation, where asked, from the dataset's validation split).
    `every`: evaluated rounds (and the last); `clients`: 0 evaluates every registered client,
    N a seeded sample of N each evaluated round (for large federations)."""

    split: str = "fraction"
    test_fraction: float = 0.25
    val_fraction: float = 0.0
    every: int = 1
    clients: int = 0
    # FL-bench's finetune: a method with one global model (no personal model) is scored after
    # this many local epochs on it; methods that keep personal models ignore it
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        require(self.split in PERSONAL_SPLITS, "split",
                f"choose one of {', '.join(PERSONAL_SPLITS)}")
        require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        require(self.test_fraction + self.val_fraction < 1, "val_fraction",
                "test_fraction + val_fraction must leave training samples (< 1)")
        require(self.every >= 1, "every", "must be >= 1")
        require(self.clients >= 0, "clients", "must be >= 0 (0: every client)")
        require(self.finetune_epochs >= 0, "finetune_epochs", "must be >= 0")


@dataclass(frozen=True)
class EvaluationConfig:
    """What a run reports. `default`: every metric on the test split, the reported round chosen
    on the validation split; `official` (segmentation): FedBCS's published protocol, to compare
    with its numbers like for like: the maximum test Dice over rounds, one-sided ASD (MONAI's
    default), area-resized labels and, on nuclei, training on the whole train list."""

    protocol: str = "default"  # default | official
    personal: PersonalConfig | None = None  # per-client test parts and personalised metrics

    def __post_init__(self) -> None:
        require(self.protocol in PROTOCOLS, "protocol",
                f"choose one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Extra measurements that cost time, off unless asked for."""

    # methods with global class anchors: cosine of clients' local class means to the anchors,
    # the anchors' self-classification and their inter-class cosine, every round
    anchors: bool = False
    leakage: LeakageConfig = field(default_factory=LeakageConfig)


PRIVACY_MECHANISMS = ("none", "central", "local")
CLIENT_SAMPLING = ("fixed", "poisson")
ACCOUNTANTS = ("rdp", "pld")
PRIVATE_COUNTS = ("noised", "withheld")


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """Adaptive clipping (Andrew et al., NeurIPS 2021): C follows the `target_quantile` γ of
    the clients' update norms, C ← C·exp(−η_C(b̃ − γ)), b̃ the noised share of unclipped
    clients; `count_noise` σ_b is that count's noise (None: expected clients per round / 20, as
    in the paper), which must exceed σ/2."""

    target_quantile: float = 0.5  # γ: the share of clients whose update C should not clip
    clip_lr: float = 0.2  # η_C of the geometric update
    count_noise: float | None = None  # σ_b (None: clients_per_round / 20)

    def __post_init__(self) -> None:
        require(0 < self.target_quantile < 1, "target_quantile", "must be in (0, 1)")
        require(self.clip_lr > 0, "clip_lr", f"must be > 0 (got {self.clip_lr})")
        require(self.count_noise is None or self.count_noise > 0, "count_noise",
                "must be > 0 (omit it for clients_per_round / 20)")


@dataclass(frozen=True)
class LocalPrivacyConfig:
    """Local DP of class statistics: each sample's feature vector (per-sample gradient for
    class gradients, per-batch class means for pixel prototypes) is clipped to L2 norm
    `feature_clip` B, so each class sum moves by at most B; the class counts are `noised` and
    uploaded, or `withheld` (only which classes the noised count shows is sent)."""

    feature_clip: float = 1.0  # B: each record's L2 bound in the class sums
    counts: str = "noised"  # noised | withheld

    def __post_init__(self) -> None:
        require(self.feature_clip > 0, "feature_clip", f"must be > 0 (got {self.feature_clip})")
        require(self.counts in PRIVATE_COUNTS, "counts",
                f"choose one of {', '.join(PRIVATE_COUNTS)}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (`raysim.methods.privacy`, accounting `raysim.methods.accounting`).

    `central`: each client's update (its delta from the broadcast) clipped to L2 norm `clip`
    C, summed, N(0, σ²C²) added once on the server, divided by the expected clients per round
    (DP-FedAvg). `local`: each client privatises its upload before it leaves. `sampling`:
    `fixed` clients_per_round of the clients each round, or `poisson` (each client with
    probability clients_per_round / clients); each has its own accounting. σ is
    `noise_multiplier`, or calibrated before the run to reach `target_epsilon` at `delta`
    (None: 1/N^1.1) after the last round."""

    mechanism: str = "none"  # none | central | local
    noise_multiplier: float | None = None  # σ: noise standard deviation / clip bound
    clip: float = 1.0  # C: L2 bound of a client's update (central; local weights)
    delta: float | None = None  # δ (None: 1/N^1.1, N clients, or samples per client locally)
    target_epsilon: float | None = None  # ε after the last round: calibrates σ before the run
    sampling: str = "fixed"  # fixed | poisson client sampling, each with its accounting
    accountant: str = "rdp"  # rdp | pld (dp-accounting); pld needs poisson for central DP
    adaptive: AdaptiveClipConfig | None = None  # central: C follows a quantile of the norms
    local: LocalPrivacyConfig = field(default_factory=LocalPrivacyConfig)

    def __post_init__(self) -> None:
        require(self.mechanism in PRIVACY_MECHANISMS, "mechanism",
                f"choose one of {', '.join(PRIVACY_MECHANISMS)}")
        require(self.noise_multiplier is None or self.noise_multiplier >= 0, "noise_multiplier",
                f"must be >= 0 (got {self.noise_multiplier})")
        require(self.clip > 0, "clip", f"must be > 0 (got {self.clip})")
        require(self.delta is None or 0 < self.delta < 1, "delta",
                f"must be in (0, 1) (got {self.delta}); omit it for 1/N^1.1")
        require(self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon",
                f"must be > 0 (got {self.target_epsilon})")
        require(self.sampling in CLIENT_SAMPLING, "sampling",
                f"choose one of {', '.join(CLIENT_SAMPLING)}")
        require(self.accountant in ACCOUNTANTS, "accountant",
                f"choose one of {', '.join(ACCOUNTANTS)}")
        if self.mechanism == "none":
            return
        require(self.noise_multiplier is None or self.target_epsilon is None, "target_epsilon",
                "set noise_multiplier or target_epsilon (which calibrates it), not both")
        require(self.noise_multiplier is not None or self.target_epsilon is not None,
                "noise_multiplier", f"{self.mechanism} DP needs noise_multiplier (σ) or "
                "target_epsilon")
        require(not (self.accountant == "pld" and self.sampling == "fixed"
                     and self.mechanism == "central"), "accountant",
                "dp-accounting's PLD has no fixed-size (without replacement) sampling; use "
                "accountant: rdp, or sampling: poisson")
        require(self.adaptive is None or self.mechanism == "central", "adaptive",
                "adaptive clipping adapts central DP's clip; remove it for local DP")


@dataclass(frozen=True)
class AlgorithmConfig:
    """`name` picks a registered algorithm; the other keys are that algorithm's `Config`."""

    name: str = "fedavg"
    params: Any = plugin_params(ALGORITHM, "name")


@dataclass(frozen=True)
class Config:
    name: str = "experiment"  # runs/<name>-<time>/: letters, digits and . _ - + = , @ only
    seed: int = 0
    rounds: int = 20
    clients_per_round: int = 10
    eval_every: int = 1  # evaluate the global model every this many rounds (and after the last)
    # Fixed evaluation batches: models whose BatchNorm uses batch statistics at test time (the
    # FedBCS U-Net) give results that depend on it (the FedBCS code uses 16).
    eval_batch_size: int = 128
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    client_state: ClientStateConfig = field(default_factory=ClientStateConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # off unless asked for

    def __post_init__(self) -> None:
        check_run_name(self.name)
        # checked here, not when the partition first draws from it (which would blame it)
        require(self.seed >= 0, "seed", f"must be >= 0 (got {self.seed})")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.clients_per_round >= 1, "clients_per_round", "must be >= 1")


# A run's name becomes one directory name (runs/<name>-<time>): one path component of these
# characters, so it can neither leave runs/ nor smuggle control characters into a path.
NAME_PUNCTUATION = "._-+=,@"
MAX_NAME_BYTES = 200  # the time stamp and the file system's 255-byte limit leave this much


def check_run_name(name: str) -> None:
    """A ConfigError naming the first character of `name` a run directory cannot hold."""
    require(name != "", "name", "must not be empty")
    bad = next((c for c in name if not (c.isalnum() or c in NAME_PUNCTUATION)), None)
    require(bad is None, "name", f"{name!r} contains {bad!r}: a run name is one directory name "
            f"of letters, digits and {' '.join(NAME_PUNCTUATION)} (choose where the run goes "
            "with --run-dir)")
    require(not name.startswith("."), "name", f"{name!r} must not start with '.'")
    require(len(name.encode()) <= MAX_NAME_BYTES, "name",
            f"longer than {MAX_NAME_BYTES} bytes ({len(name.encode())})")


# --------------------------------------------------------------------------- parsing


def parse_config(raw: dict, resolve: Resolver) -> Config:
    """The typed config of a raw mapping, plug-in sections parsed with the Configs `resolve`
    returns; cross-plug-in checks are `raysim.run.validate`'s."""
    return parse_dataclass(Config, raw, resolve=resolve)


def parse_dataclass(cls: type, raw: Any, path: str = "", resolve: Resolver | None = None) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and each class's ranges.
    Sections that name a plug-in need `resolve` (see `parse_config`)."""
    where = path or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    plugin = _plugin_field(cls)
    own = {name: f for name, f in fields.items() if plugin is None or name != plugin[0]}
    kwargs: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = _join(path, key)
        if key in own:
            kwargs[key] = _coerce(hints[key], value, dotted, resolve)
        elif plugin is not None:
            rest[key] = value
        else:
            raise ConfigError(_unknown(dotted, value, list(own), path))
    for name in own:  # sections left at their defaults still resolve the plug-ins they name
        if name not in kwargs and _holds_plugins(hints[name]):
            kwargs[name] = _coerce(hints[name], {}, _join(path, name), resolve)
    if plugin is not None:
        params_field, kind, by = plugin
        if resolve is None:
            raise TypeError(f"parsing {cls.__name__} needs a plug-in resolver")
        name = kwargs.get(by, own[by].default)
        try:
            params_cls = resolve(kind, name) or NoParams
        except KeyError as error:  # unknown, failed to import, or breaks its contract
            reason = error.args[0] if error.args else error
            raise ConfigError(f"{_join(path, by)}: {reason}") from None
        shadowed = [f.name for f in dataclasses.fields(params_cls) if f.name in own]
        if shadowed:  # those keys would always reach the section, never the plug-in
            raise ConfigError(f"{_join(path, by)}: the {kind} {name!r} declares keys that "
                              f"{path or 'the config'} has already: {', '.join(shadowed)}; "
                              "rename them in its Config")
        kwargs[params_field] = parse_params(params_cls, rest, path, resolve,
                                            f"{kind} {name!r}", list(own))
    return _construct(cls, kwargs, path)


def parse_params(cls: type, raw: dict, path: str = "", resolve: Resolver | None = None,
                 owner: str = "", section_keys: list[str] | tuple[str, ...] = ()) -> Any:
    """A plug-in's Config `cls` from its keys `raw` (those of its section that are not the
    section's own); an unknown key names the plug-in `owner` (e.g. "dataset 'digits'") and the
    nearest key of the section or the plug-in."""
    keys = [f.name for f in dataclasses.fields(cls) if f.init]
    renamed = getattr(cls, "RENAMED_KEYS", {})  # a plug-in's retired key → what to write now
    for key, value in raw.items():
        if key not in keys:
            dotted = _join(path, key)
            if key in renamed:
                raise ConfigError(f"{dotted}: {renamed[key]}")
            raise ConfigError(_unknown(dotted, value, [*section_keys, *keys], path, owner))
    return parse_dataclass(cls, raw, path, resolve)


def _construct(cls: type, kwargs: dict, path: str) -> Any:
    try:
        return cls(**kwargs)
    except ConfigError as error:  # a range check: prefix the section path
        raise ConfigError(f"{path}.{error}" if path else str(error)) from None


@functools.cache
def _plugin_field(cls: type) -> tuple[str, str, str] | None:
    """(field name, plug-in kind, name field) of a section that names a plug-in."""
    for f in dataclasses.fields(cls):
        if _PLUGIN in f.metadata:
            return (f.name, *f.metadata[_PLUGIN])
    return None


def _holds_plugins(hint: Any) -> bool:
    hint = _unwrap_optional(hint)
    if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return False
    if _plugin_field(hint) is not None:
        return True
    return any(_holds_plugins(h) for h in typing.get_type_hints(hint).values())


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _coerce(hint: Any, value: Any, key: str, resolve: Resolver | None = None) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(inner, value, key, resolve)
    if dataclasses.is_dataclass(hint):
        shorthand = getattr(hint, "SHORTHAND", None)
        if shorthand is not None and isinstance(value, str):
            try:
                return parse_dataclass(hint, {shorthand: value}, key, resolve)
            except ConfigError as error:  # the bare name is the item itself: name it so
                message = str(error)
                prefix = f"{key}.{shorthand}: "
                raise ConfigError(f"{key}: {message[len(prefix):]}"
                                  if message.startswith(prefix) else message) from None
        return parse_dataclass(hint, value, key, resolve)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"config field {key}: use tuple[X, ...], not {hint!r}")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        items = [_coerce(args[0], item, f"{key}[{i}]", resolve) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            # numpy and torch take 64-bit integers: a larger one would overflow deep in a run
            if -MAX_INT - 1 <= value <= MAX_INT:
                return value
            raise ConfigError(f"{key}: {value} does not fit in a 64-bit integer")
    elif hint is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads `1e-3` as a string
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf, nan, 1e999: every range check passes nan
                raise ConfigError(f"{key}: must be a finite number (got {value!r})")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported type {hint!r}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown(dotted: str, value: Any, valid: list[str], path: str, owner: str = "") -> str:
    """The one-line error for an unknown key: where it moved, or the nearest valid key (of the
    section, and of the plug-in `owner` the section names, which the message names too)."""
    moved = MOVED.get(dotted)
    if moved is not None:
        if isinstance(value, dict) and value:
            first = next(iter(value))
            return f"{dotted}.{first}: moved to {moved}.{first}"
        return f"{dotted}: its keys moved to {moved}"
    close = difflib.get_close_matches(dotted.rpartition(".")[2], valid, n=1, cutoff=0.6)
    where = f" for {owner}" if owner else ""
    if close:
        return f"unknown key {dotted!r}{where}; did you mean {_join(path, close[0])!r}?"
    return f"unknown key {dotted!r}{where}; valid keys here: {', '.join(valid)}"


def config_to_dict(config: Any) -> dict:
    """The resolved config as plain data: every key, defaults included (round-trips). A
    plug-in's keys sit in the section that names it, as they are written."""
    out: dict[str, Any] = {}
    plugin = _plugin_field(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if plugin is not None and f.name == plugin[0]:
            if value is not None:
                out.update(config_to_dict(value))
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        out = config_to_dict(value)
        shorthand = getattr(value, "SHORTHAND", None)
        return out[shorthand] if shorthand is not None and list(out) == [shorthand] else out
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- overrides, I/O


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a raw config mapping; the value is read as YAML (numbers, lists)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {override!r}: expected KEY=VALUE, e.g. data.partition.alpha=0.1"
        )
    where = f"override {override!r}"
    set_dotted(raw, key.strip(), override_value(text, where), where=where)


def override_value(text: str, where: str) -> Any:
    """The VALUE of a KEY=VALUE override read as plain YAML (None when empty); a ConfigError
    naming the override `where` for text that is not YAML or carries a tag (`!!binary`,
    `!!python/...`: a value is plain data)."""
    if not text.strip():
        return None
    try:
        if any(isinstance(token, yaml.TagToken) for token in yaml.scan(text)):
            raise ConfigError(f"{where}: YAML tags (!...) are not accepted in a value; write "
                              "the plain value (quote it to pass text starting with !)")
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "syntax error"
        raise ConfigError(f"{where}: the value is not valid YAML ({' '.join(problem.split())}); "
                          "quote it to pass it as text") from None
    except RecursionError:
        raise ConfigError(f"{where}: the value is nested too deeply") from None
    except ConfigError:
        raise
    except ValueError as error:  # an integer of more than 4300 digits
        raise ConfigError(f"{where}: {_value_error(error)}") from None
    check_expanded_size(value, where)
    return value


def _value_error(error: ValueError) -> str:
    first = (str(error).splitlines() or [""])[0].partition(";")[0]
    return f"a value YAML cannot read ({first})"


MAX_YAML_DEPTH = 100  # sections and lists nested deeper are no config (or an alias loops)


def check_expanded_size(value: Any, where: str) -> None:
    """A ConfigError naming `where` when YAML data expands (aliases copied out, as
    `deep_copy` does) to more than MAX_YAML_NODES values or nests deeper than MAX_YAML_DEPTH
    (an alias inside the value it names never ends)."""
    sizes: dict[int, int] = {}  # shared (aliased) values are counted once per use, cheaply

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, dict | list):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels, or an "
                              "alias (*name) refers to the value that holds it")
        total = 1
        for child in (*node.keys(), *node.values()) if isinstance(node, dict) else node:
            total += size(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{where}: expands to more than {MAX_YAML_NODES:,} values "
                                  "once its aliases (*name) are copied out")
        sizes[id(node)] = total
        return total

    size(value, 0)


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
        value = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_line(path, text, error)) from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as error:  # an integer of more than 4300 digits
        raise ConfigError(f"{path}: {_value_error(error)}") from None
    check_expanded_size(value, str(path))
    return value


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


def deep_copy(raw: Any) -> Any:
    """A copy of a raw (YAML) config's nested dicts and lists."""
    if isinstance(raw, dict):
        return {key: deep_copy(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [deep_copy(value) for value in raw]
    return raw
