"""A sweep file: a base experiment, a search space over dotted config keys, the metric to
optimise. Parsing and validation only (no Ray): every trial config a sweep can produce is built
and checked before any trial starts.

```yaml
name: digits_alpha_algorithm
experiment: ../settings/digits_a0.5.yaml   # the base config (relative to this file)
overrides: {rounds: 5, train.local_epochs: 2}   # fixed for every trial
search:
  data.partition.alpha: {grid: [0.1, 0.5, 1.0]}
  algorithm.name: {grid: [fedavg, fedprox, fedproto]}
algorithm_params: {fedprox: {mu: 0.01}}    # merged into `algorithm` when that method is drawn
metric: test_accuracy
mode: max
scheduler: none                             # or {name: asha, grace_period: 1, reduction_factor: 2}
```
"""

from __future__ import annotations

import difflib
import itertools
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysim.config import (
    Config,
    ConfigError,
    deep_copy,
    merge,
    parse_yaml,
    read_yaml,
    require,
    set_dotted,
)
from raysim.registry import algorithm_class
from raysim.results.metric_names import check_metric, default_mode
from raysim.run.validate import config_from_dict

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = ("name", "experiment", "overrides", "search", "algorithm_params", "metric", "mode",
              "rank_by", "scheduler", "num_samples", "max_concurrent_trials", "trial_driver_cpus",
              "max_failures", "seed", "draws")
SAMPLED_KINDS = ("choice", "uniform", "loguniform", "randint")
DRAWS = ("tune", "per_key")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor")
MAX_VALIDATION_POINTS = 4096  # beyond this, each key's values are checked one key at a time


@dataclass(frozen=True)
class SearchDimension:
    """One swept key: `grid`/`choice` list their values; `uniform`/`loguniform` take
    [low, high]; `randint` takes [low, high) (high excluded, as `tune.randint`)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def corners(self) -> tuple[Any, ...]:
        """The values validation builds configs from: every listed value, or both bounds."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def draw(self, count: int, seed: int) -> list[Any]:
        """`count` values of a sampled key from a generator of its own, seeded by (seed, key):
        the same key and range give the same values in any sweep, whatever else it searches,
        and more trials only append to them."""
        rng = np.random.default_rng([seed % 2**32, zlib.crc32(self.key.encode())])
        if self.kind == "choice":
            return [self.values[i] for i in rng.integers(len(self.values), size=count)]
        if self.kind == "randint":
            return [int(v) for v in rng.integers(self.values[0], self.values[1], size=count)]
        low, high = self.values
        if self.kind == "loguniform":
            values = np.exp(rng.uniform(np.log(low), np.log(high), size=count))
        else:
            values = rng.uniform(low, high, size=count)
        return [float(v) for v in np.clip(values, low, high)]  # exp(log(high)) may round above


@dataclass(frozen=True)
class Scheduler:
    name: str = "none"  # none | asha
    grace_period: int = 1  # rounds every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class Sweep:
    name: str
    base: dict  # the experiment's raw config (its `base:` chain merged), overrides applied
    search: tuple[SearchDimension, ...]
    metric: str
    mode: str
    rank_by: str = "final"  # final | best: which value of the metric picks the best trial
    algorithm_params: dict = field(default_factory=dict)
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    trial_driver_cpus: float = 0.0
    max_failures: int = 2  # a failed trial (lost node, dead driver) restarts from its checkpoint
    seed: int | None = None  # seeds the sampling of uniform/loguniform/randint/choice keys
    # tune: Tune's generator draws every sampled key of a trial in turn; per_key: each key
    # draws from its own generator (`SearchDimension.draw`), so sweeps that share a key and
    # its range try the same values of it (a comparison's methods, the same learning rates)
    draws: str = "tune"

    @property
    def keys(self) -> list[str]:
        return [dim.key for dim in self.search]

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The validated config of one trial: the base with the trial's values set."""
        return config_from_dict(self.trial_raw(params))

    def trial_raw(self, params: dict[str, Any]) -> dict:
        """The base with the trial's values set. A trial that draws another algorithm than the
        base's starts from that algorithm's defaults (the base's algorithm keys belong to the
        base's algorithm); `algorithm_params` of the drawn algorithm come next, swept keys last."""
        raw = deep_copy(self.base)
        base_algorithm = raw.get("algorithm") if isinstance(raw.get("algorithm"), dict) else {}
        name = params.get("algorithm.name", base_algorithm.get("name", "fedavg"))
        if name != base_algorithm.get("name", "fedavg"):
            raw["algorithm"] = {"name": name}
        if isinstance(name, str) and name in self.algorithm_params:
            raw["algorithm"] = merge(raw.get("algorithm") or {}, self.algorithm_params[name])
        for key, value in params.items():
            set_dotted(raw, key, value)
        return raw

    def drawn_points(self) -> list[dict[str, Any]]:
        """With `draws: per_key`, the sampled keys' values of each of the `num_samples` trials
        (grid keys still multiply them); empty when Tune draws."""
        sampled = [dim for dim in self.search if dim.kind in SAMPLED_KINDS]
        if self.draws != "per_key" or not sampled:
            return []
        columns = {dim.key: dim.draw(self.num_samples, self.seed or 0) for dim in sampled}
        return [{key: values[i] for key, values in columns.items()}
                for i in range(self.num_samples)]

    def validation_points(self) -> list[dict[str, Any]]:
        """Every grid point with every bound of the sampled keys; one key at a time when the
        full product is too large."""
        corners = [dim.corners() for dim in self.search]
        if math.prod(len(c) for c in corners) <= MAX_VALIDATION_POINTS:
            return [dict(zip(self.keys, combo)) for combo in itertools.product(*corners)]
        first = {dim.key: dim.corners()[0] for dim in self.search}
        return [{**first, dim.key: value} for dim in self.search for value in dim.corners()]

    def validate(self) -> list[Config]:
        """Build the config of every validation point (ConfigError names the point), and check
        the metric against what each point's algorithm reports. Returns the configs."""
        for dim in self.search:  # a key typo is reported alone, before any combination
            _check_point(self, {dim.key: dim.corners()[0]})
        configs = [_check_point(self, point) for point in self.validation_points()]
        check_metric(self.metric, configs)
        rounds = max(config.rounds for config in configs)
        require(self.scheduler.name != "asha" or self.scheduler.grace_period <= rounds,
                 "scheduler.grace_period", f"{self.scheduler.grace_period} > rounds ({rounds})")
        return configs


def _check_point(sweep: Sweep, point: dict[str, Any]) -> Config:
    try:
        return sweep.trial_config(point)
    except ConfigError as error:
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        raise ConfigError(f"search point {where}: {error}") from None


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (every trial config included)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    raw = parse_yaml(path) or {}
    sweep = parse_sweep(raw, path.parent, default_name=path.stem)
    sweep.validate()
    return sweep


def parse_sweep(raw: Any, folder: Path, default_name: str = "sweep") -> Sweep:
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep: expected a mapping of keys, got {type(raw).__name__}")
    check_keys(raw, SWEEP_KEYS, "")
    if "experiment" not in raw:
        raise ConfigError("experiment: missing; name the base config, e.g. "
                          "experiment: ../settings/digits_a0.5.yaml")
    base = read_yaml((folder / str(raw["experiment"])).resolve())
    base = absolute_data_root(base)
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("overrides: expected a mapping of dotted keys to values")
    for key, value in overrides.items():
        set_dotted(base, str(key), value)
    try:
        config_from_dict(base)
    except ConfigError as error:  # a misspelt override is named as such; other problems may
        if "unknown key" in str(error):  # be resolved by the searched values
            raise ConfigError(f"overrides: {error}") from None
    search = parse_search(raw.get("search"))
    metric = raw.get("metric", "test_accuracy")
    if not isinstance(metric, str):
        raise ConfigError(f"metric: expected a metric name, got {metric!r}")
    mode = raw.get("mode", default_mode(metric))
    require(mode in ("max", "min"), "mode", f"choose max or min (got {mode!r})")
    rank_by = raw.get("rank_by", "final")
    require(rank_by in ("final", "best"), "rank_by",
             f"choose final (the last reported value) or best (over all rounds); got {rank_by!r}")
    num_samples = raw.get("num_samples", 1)
    require(isinstance(num_samples, int) and num_samples >= 1, "num_samples",
             f"must be an integer >= 1 (got {num_samples!r})")
    concurrency = raw.get("max_concurrent_trials")
    require(concurrency is None or (isinstance(concurrency, int) and concurrency >= 1),
             "max_concurrent_trials", f"must be an integer >= 1 (got {concurrency!r})")
    max_failures = raw.get("max_failures", 2)
    require(isinstance(max_failures, int) and not isinstance(max_failures, bool)
             and max_failures >= 0, "max_failures",
             f"must be an integer >= 0 (got {max_failures!r})")
    driver_cpus = raw.get("trial_driver_cpus", 0.0)
    require(isinstance(driver_cpus, (int, float)) and not isinstance(driver_cpus, bool)
            and 0 <= driver_cpus < math.inf, "trial_driver_cpus",
             f"must be a number >= 0 (got {driver_cpus!r})")
    seed = raw.get("seed")
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)
                             and 0 <= seed < 2**32), "seed",
            f"must be an integer in [0, 2**32) (got {seed!r})")
    draws = raw.get("draws", "tune")
    require(draws in DRAWS, "draws", f"must be one of {', '.join(DRAWS)} (got {draws!r})")
    return Sweep(
        name=str(raw.get("name", default_name)), base=base, search=search, metric=metric,
        mode=mode, rank_by=rank_by, algorithm_params=_parse_algorithm_params(raw),
        scheduler=parse_scheduler(raw.get("scheduler")), num_samples=num_samples,
        max_concurrent_trials=concurrency, trial_driver_cpus=float(driver_cpus), seed=seed,
        max_failures=max_failures, draws=draws,
    )


def parse_search(raw: Any) -> tuple[SearchDimension, ...]:
    if not raw:
        raise ConfigError("search: empty search space; sweep at least one key, e.g. "
                          "search: {data.partition.alpha: {grid: [0.1, 0.5, 1.0]}}")
    if not isinstance(raw, dict):
        raise ConfigError("search: expected a mapping of dotted keys to {grid: [...]}, "
                          "{choice: [...]}, {uniform: [low, high]}, ...")
    dims = []
    for key, spec in raw.items():
        where = f"search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"{where}: expected exactly one of "
                              + ", ".join(f"{{{k}: [...]}}" for k in SEARCH_KINDS)
                              + f"; got {spec!r}")
        ((kind, values),) = spec.items()
        require(isinstance(values, list) and values, where, f"{kind}: expected a list")
        if kind in ("uniform", "loguniform", "randint"):
            _check_bounds(where, kind, values)
        if kind in ("uniform", "loguniform"):
            values = [float(v) for v in values]
        dims.append(SearchDimension(key=str(key), kind=kind, values=tuple(values)))
    return tuple(dims)


def _check_bounds(where: str, kind: str, values: list) -> None:
    number = int if kind == "randint" else (int, float)
    ok = len(values) == 2 and all(isinstance(v, number) and not isinstance(v, bool)
                                  for v in values)
    require(ok, where, f"{kind}: expected [low, high], two "
             + ("integers" if number is int else "numbers"))
    low, high = values
    require(all(_finite(v) for v in values), where,
            f"{kind}: bounds must be finite numbers (got {low}, {high})")
    require(low < high, where, f"{kind}: low must be < high (got {low}, {high})")
    require(kind != "loguniform" or low > 0, where, f"loguniform: low must be > 0 (got {low})")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _parse_algorithm_params(raw: dict) -> dict:

    params = raw.get("algorithm_params") or {}
    require(isinstance(params, dict), "algorithm_params",
             "expected a mapping of algorithm name to its keys, e.g. {fedprox: {mu: 0.01}}")
    for name, keys in params.items():
        try:
            algorithm_class(str(name))
        except KeyError as error:
            raise ConfigError(f"algorithm_params.{name}: {error.args[0]}") from None
        require(isinstance(keys, dict) and "name" not in keys, f"algorithm_params.{name}",
                 "expected a mapping of that algorithm's keys (without `name`)")
    return params


def parse_scheduler(raw: Any) -> Scheduler:
    if raw in (None, "none"):
        return Scheduler()
    if raw == "asha":
        raw = {"name": "asha"}
    require(isinstance(raw, dict), "scheduler", "expected none, asha or {name: asha, ...}")
    check_keys(raw, SCHEDULER_KEYS, "scheduler")
    require("name" in raw, "scheduler.name", "missing; e.g. {name: asha, grace_period: 1}")
    scheduler = Scheduler(**raw)
    require(scheduler.name in ("none", "asha"), "scheduler.name",
             f"choose none or asha (got {scheduler.name!r})")
    require(isinstance(scheduler.grace_period, int) and scheduler.grace_period >= 1,
             "scheduler.grace_period", "must be an integer >= 1 (rounds)")
    factor = scheduler.reduction_factor
    require(isinstance(factor, (int, float)) and not isinstance(factor, bool)
            and 1 < factor < math.inf,
             "scheduler.reduction_factor", f"must be a number > 1 (got {factor!r})")
    return scheduler


def absolute_data_root(base: dict) -> dict:
    """A relative `data.root` (and each `data.domains[i].root`) is relative to where raysim
    runs; trials run elsewhere (Tune changes their working directory), so pin it to an
    absolute path now."""
    base = deep_copy(base)
    data = base.get("data") if isinstance(base.get("data"), dict) else {}
    sources = [data, *(d for d in data.get("domains") or [] if isinstance(d, dict))]
    for source in sources:
        root = source.get("root")
        if isinstance(root, str) and not Path(root).is_absolute():
            source["root"] = str(Path.cwd() / root)
    return base


def check_keys(raw: dict, allowed: tuple[str, ...], section: str) -> None:
    for key in raw:
        if key not in allowed:
            dotted = f"{section}.{key}" if section else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(allowed)}"
            raise ConfigError(f"unknown key {dotted!r}{hint}")
