"""A comparison file: one setting, the methods to compare on it, one tuning budget for all of
them, the seeds to report. Parsing and validation only (no Ray): every method's tuning sweep
and seed reruns are built and checked before any trial starts.

```yaml
name: digits_a0.5
setting: ../settings/digits_a0.5.yaml        # the base config (relative to this file)
overrides: {data.val_fraction: 0.15}          # fixed for every method and trial
methods:                                      # a registered name, or a labelled variant
  - fedavg
  - fedprox
  - {label: fedproto_nearest, algorithm: {name: fedproto, inference: prototype}}
budget:
  trials: 8                                   # per method: random draws from its search space
  scheduler: {name: asha, grace_period: 5, reduction_factor: 2}   # over rounds, on validation
  draws: per_key                              # every method tries the same learning rates
search_overrides: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}     # e.g. Adam settings
seeds: [0, 1, 2]                              # the best configuration is rerun on each
```

Each method's search space is the one it declares (`raysim.algorithm.search_space_of`), so
every method gets the same number of trials over its own hyperparameters and the shared learning
rate. Trials are ranked by the best validation value of the task's headline metric (`val_accuracy`,
`val_dice`); the test split chooses nothing. With `draws: per_key` (the default) each searched
key draws from a generator of its own, so trial k of every method tries the same learning rate
and a ranking does not hang on which method drew the lucky one; `draws: tune` lets Tune draw a
trial's keys in turn from one generator, which gives each method other learning rates.

A setting with `evaluation.personal` compares the clients' own models: `personal_val_<m>` ranks
and `personal_test_<m>` is reported; where clients have no validation parts (`val_fraction: 0`,
FedProto's protocol) `personal_test_<m>` ranks too, and the report says it selected on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysim.algorithm import search_space_of
from raysim.config import (
    ConfigError,
    deep_copy,
    override_value,
    parse_yaml,
    read_yaml,
    require,
    set_dotted,
)
from raysim.registry import DATASETS, RegistryError, algorithm_class, algorithm_names
from raysim.run.validate import config_from_dict
from raysim.tune.sweep import (
    DRAWS,
    Scheduler,
    Sweep,
    absolute_data_root,
    check_keys,
    parse_scheduler,
    parse_search,
)
from raysim.types import headline_metric

COMPARE_KEYS = ("name", "setting", "overrides", "methods", "budget", "search_overrides",
                "seeds", "max_concurrent_trials", "trial_driver_cpus", "max_failures", "seed")
BUDGET_KEYS = ("trials", "scheduler", "draws")
METHOD_KEYS = ("label", "algorithm", "search")
HEADLINE = {"classification": "accuracy", "segmentation": "dice"}  # higher is better
FLAT_SECTIONS = ("overrides.", "search_overrides.")  # mappings keyed by dotted config keys


@dataclass(frozen=True)
class Method:
    """One compared method: its label in the tables, its fixed algorithm keys, and its search
    space (the declared one with the comparison's overrides applied)."""

    label: str
    algorithm: dict
    search: dict[str, dict]

    @property
    def name(self) -> str:
        return self.algorithm["name"]


@dataclass(frozen=True)
class Comparison:
    name: str
    base: dict  # the setting's raw config with the overrides applied
    methods: tuple[Method, ...]
    trials: int
    scheduler: Scheduler
    seeds: tuple[int, ...]
    task: str  # classification | segmentation
    max_concurrent_trials: int | None = None
    trial_driver_cpus: float = 0.0
    max_failures: int = 2
    seed: int = 0  # seeds the draws of every method's trials
    draws: str = "per_key"  # per_key | tune (see `Sweep.draws`)
    personal: bool = False  # the setting evaluates personally (evaluation.personal)
    personal_val: bool = False  # ... and its clients have validation parts

    @property
    def headline(self) -> str:
        return HEADLINE[self.task]

    @property
    def selection_metric(self) -> str:
        """`val_<m>`; with personalised evaluation `personal_val_<m>`, or `personal_test_<m>`
        where clients have no validation parts (selection on the test parts: the report
        says so)."""
        split = "test" if self.personal and not self.personal_val else "val"
        return headline_metric(self.task, self.personal, split)

    @property
    def test_metric(self) -> str:
        return headline_metric(self.task, self.personal)

    def method_base(self, method: Method) -> dict:
        raw = deep_copy(self.base)
        raw["algorithm"] = deep_copy(method.algorithm)
        raw["name"] = f"{self.name}_{method.label}"
        return raw

    def tuning_sweep(self, method: Method) -> Sweep:
        """`trials` random draws from the method's space, ranked by their best validation
        round, with the budget's scheduler stopping poor ones early."""
        return Sweep(
            name=f"{self.name}_{method.label}_tune", base=self.method_base(method),
            search=parse_search(method.search), metric=self.selection_metric, mode="max",
            rank_by="best", scheduler=self.scheduler, num_samples=self.trials,
            max_concurrent_trials=self.max_concurrent_trials,
            trial_driver_cpus=self.trial_driver_cpus, max_failures=self.max_failures,
            seed=self.seed, draws=self.draws)

    def seed_sweep(self, method: Method, tuned: dict[str, Any]) -> Sweep:
        """The tuned configuration run once on every seed, to the last round."""
        raw = self.method_base(method)
        for key, value in tuned.items():
            set_dotted(raw, key, value)
        return Sweep(
            name=f"{self.name}_{method.label}_seeds", base=raw,
            search=parse_search({"seed": {"grid": list(self.seeds)}}),
            metric=self.selection_metric, mode="max", rank_by="best",
            max_concurrent_trials=self.max_concurrent_trials,
            trial_driver_cpus=self.trial_driver_cpus, max_failures=self.max_failures)

    def validate(self) -> None:
        """Every method's tuning sweep and its seed reruns at the corners of its space."""
        rounds = config_from_dict(self.method_base(self.methods[0])).rounds
        require(self.scheduler.name != "asha" or self.scheduler.grace_period <= rounds,
                "budget.scheduler.grace_period",
                f"{self.scheduler.grace_period} > rounds ({rounds})")
        for method in self.methods:
            try:
                sweep = self.tuning_sweep(method)
                sweep.validate()
                corner = {dim.key: dim.corners()[0] for dim in sweep.search}
                self.seed_sweep(method, corner).validate()
            except ConfigError as error:
                raise ConfigError(f"methods.{method.label}: {error}") from None


def load_comparison(path: str | Path, overrides: list[str] = ()) -> Comparison:
    """Read and validate a comparison file; `overrides` are `KEY=VALUE` on its own keys (e.g.
    budget.trials=2, overrides.rounds=3, seeds=[0])."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file {str(path)!r} not found")
    raw = parse_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    for override in overrides:
        key, sep, text = override.partition("=")
        require(bool(sep and key.strip()), f"override {override!r}",
                "expected KEY=VALUE, e.g. budget.trials=2")
        value = override_value(text, f"override {override!r}")
        section = next((s for s in FLAT_SECTIONS if key.startswith(s)), None)
        if section:  # overrides.train.lr=0.1 sets the dotted key `train.lr` of `overrides`
            flat = raw.setdefault(section[:-1], {})
            require(isinstance(flat, dict), section[:-1], "expected a mapping of dotted keys")
            flat[key[len(section):]] = value
        else:
            set_dotted(raw, key.strip(), value, where=f"override {override!r}")
    comparison = parse_comparison(raw, path.parent, default_name=path.stem)
    comparison.validate()
    return comparison


def parse_comparison(raw: dict, folder: Path, default_name: str = "compare") -> Comparison:

    check_keys(raw, COMPARE_KEYS, "")
    if "setting" not in raw:
        raise ConfigError("setting: missing; name the base config, e.g. "
                          "setting: ../settings/digits_a0.5.yaml")
    base = absolute_data_root(read_yaml((folder / str(raw["setting"])).resolve()))
    overrides = raw.get("overrides") or {}
    require(isinstance(overrides, dict), "overrides",
            "expected a mapping of dotted keys to values, e.g. {rounds: 30}")
    for key, value in overrides.items():
        set_dotted(base, str(key), value)
    base.pop("algorithm", None)  # each method brings its own
    try:
        # checked with the first method: a personalised or model-heterogeneous setting is
        # refused with the default method (fedavg); every method is checked on it later
        setting = config_from_dict({**base, "algorithm": _first_algorithm(raw.get("methods"))})
    except ConfigError as error:
        raise ConfigError(f"setting: {error}") from None
    task = DATASETS[setting.data.dataset].task
    if setting.evaluation.protocol != "default":
        raise ConfigError("setting: evaluation.protocol: official selects rounds on the test "
                          "set, and a comparison selects on validation; use the default "
                          "protocol (compare official numbers with `raysim launch`)")
    personal = setting.evaluation.personal
    if task == "classification" and setting.data.val_fraction is None and personal is None:
        raise ConfigError("setting: it has no validation split, and a comparison selects on "
                          "validation; add overrides: {data.val_fraction: 0.15}")
    budget = raw.get("budget")
    require(isinstance(budget, dict), "budget",
            "missing; e.g. budget: {trials: 8, scheduler: {name: asha, grace_period: 5}}")
    check_keys(budget, BUDGET_KEYS, "budget")
    trials = budget.get("trials")
    require(isinstance(trials, int) and not isinstance(trials, bool) and trials >= 1,
            "budget.trials", f"must be an integer >= 1 (trials per method; got {trials!r})")
    try:
        scheduler = parse_scheduler(budget.get("scheduler"))
    except ConfigError as error:
        raise ConfigError(f"budget.{error}") from None
    draws = budget.get("draws", "per_key")
    require(draws in DRAWS, "budget.draws",
            f"must be one of {', '.join(DRAWS)} (got {draws!r}); per_key gives every method the "
            "same learning rates")
    seeds = raw.get("seeds")
    require(isinstance(seeds, list) and bool(seeds)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
            "seeds", f"missing; list the seeds to rerun the tuned methods on, e.g. seeds: "
            f"[0, 1, 2] (got {seeds!r})")
    require(len(set(seeds)) == len(seeds), "seeds", f"a seed is listed twice: {seeds}")
    shared = raw.get("search_overrides") or {}
    require(isinstance(shared, dict), "search_overrides",
            "expected a mapping of dotted keys to domains, e.g. "
            "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    methods = _parse_methods(raw.get("methods"), task, shared)
    concurrency = raw.get("max_concurrent_trials")
    require(concurrency is None or (isinstance(concurrency, int) and concurrency >= 1),
            "max_concurrent_trials", f"must be an integer >= 1 (got {concurrency!r})")
    driver_cpus, max_failures = raw.get("trial_driver_cpus", 0.0), raw.get("max_failures", 2)
    require(isinstance(driver_cpus, int | float) and not isinstance(driver_cpus, bool)
            and 0 <= driver_cpus < math.inf, "trial_driver_cpus",
            f"must be a number >= 0 (got {driver_cpus!r})")
    require(isinstance(max_failures, int) and not isinstance(max_failures, bool)
            and max_failures >= 0, "max_failures",
            f"must be an integer >= 0 (got {max_failures!r})")
    seed = raw.get("seed", 0)
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
            "seed", f"must be an integer in [0, 2**32) (got {seed!r})")
    return Comparison(
        name=str(raw.get("name", default_name)), base=base, methods=methods, trials=trials,
        scheduler=scheduler, seeds=tuple(seeds), task=task, max_concurrent_trials=concurrency,
        trial_driver_cpus=float(driver_cpus), max_failures=max_failures, seed=seed, draws=draws,
        personal=personal is not None, personal_val=personal is not None
        and personal.val_fraction > 0)


def _first_algorithm(methods: Any) -> dict:
    """The algorithm keys of the first listed method ({} where there is none to read yet)."""
    first = methods[0] if isinstance(methods, list) and methods else None
    if isinstance(first, str):
        return {"name": first}
    chosen = first.get("algorithm") if isinstance(first, dict) else None
    return deep_copy(chosen) if isinstance(chosen, dict) and isinstance(
        chosen.get("name"), str) else {}


def _parse_methods(raw: Any, task: str, shared: dict) -> tuple[Method, ...]:

    require(isinstance(raw, list) and bool(raw), "methods",
            "missing; list the methods to compare, e.g. methods: [fedavg, fedprox]")
    methods = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"label": entry, "algorithm": {"name": entry}}
        where = f"methods[{i}]"
        require(isinstance(entry, dict), where,
                "expected a method name or {label: ..., algorithm: {name: ..., ...}}")
        check_keys(entry, METHOD_KEYS, where)
        algorithm = entry.get("algorithm")
        require(isinstance(algorithm, dict) and isinstance(algorithm.get("name"), str),
                f"{where}.algorithm", "expected {name: <method>, <its keys>...}")
        name = algorithm["name"]
        try:
            cls = algorithm_class(name)
        except RegistryError as error:
            raise ConfigError(f"{where}: {error}") from None
        if task not in cls.tasks:
            fitting = [n for n in algorithm_names() if task in algorithm_class(n).tasks]
            raise ConfigError(f"{where}: {name} does not run {task} tasks (the setting's); "
                              f"methods that do: {', '.join(fitting)}")
        extra = entry.get("search") or {}
        require(isinstance(extra, dict), f"{where}.search",
                "expected a mapping of dotted keys to domains")
        space = search_space_of(cls)
        search = {**space, **{k: v for k, v in shared.items()
                              if k in space or not k.startswith("algorithm.")}, **extra}
        label = str(entry.get("label", name))
        methods.append(Method(label=label, algorithm=dict(algorithm), search=search))
    labels = [m.label for m in methods]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    require(duplicate is None, "methods",
            f"{duplicate!r} is listed twice; give one of them another label")
    return tuple(methods)


def tuned_values(method: Method, row: Any) -> dict[str, Any]:
    """The swept values of a trials-table row, as plain Python values."""
    return {key: (row[key].item() if hasattr(row[key], "item") else row[key])
            for key in method.search}

