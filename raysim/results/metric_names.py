"""The per-round metrics a run reports, by name, so a sweep's metric can be checked before any
trial starts.

Every run reports the engine's metrics; evaluated rounds of methods that share a whole model
add `test_<m>` (and `val_<m>` where the dataset has a validation split), per domain as
`test_<m>/<domain>`; with `evaluation.personal`, rounds it evaluates add `personal_test_<m>`
(the mean over evaluated clients) with `_weighted`, `_std` and `_p10`, `personal_clients`, and
the same for `personal_val_<m>` where clients have validation parts; with `privacy`, runs add
`privacy_epsilon` (and `server_privacy_clip` where clipping adapts); methods with class anchors
add the anchor diagnostics; each method may add its own (client metrics as they are, server
metrics as `server_<name>`), which it declares in its `reported_metrics` class attribute.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from raysim.algorithm import ClassAnchors
from raysim.config import ConfigError
from raysim.registry import algorithm_class, algorithm_names
from raysim.types import PERSONAL_PREFIX

EVALUATION = ("accuracy", "loss", "dice", "hd95", "asd")  # test_<m>, val_<m>, <...>/<domain>
EVALUATION_SPLITS = ("test", "val")
ENGINE = ("train_loss", "train_steps", "samples", "clients_ok", "clients_failed",
          "round_seconds", "samples_per_second")
# with `privacy`: ε spent after each round; central DP's clip C where it adapts
PRIVACY = ("privacy_epsilon",)
ADAPTIVE_CLIP = ("server_privacy_clip",)
ANCHOR_DIAGNOSTICS = ("anchor_cosine", "anchor_self_accuracy", "anchor_interclass_cosine")
LOWER_IS_BETTER = ("loss", "hd95", "asd", "seconds", "epsilon")
# beside each personalised mean over clients: weighted by test-part size, spread, 10th percentile
PERSONAL_SUMMARIES = ("_weighted", "_std", "_p10")
PERSONAL_CLIENTS = "personal_clients"  # how many clients a round evaluated


def evaluation_metrics() -> list[str]:
    return [f"{split}_{name}" for split in EVALUATION_SPLITS for name in EVALUATION]


def personal_metrics() -> list[str]:
    """`personal_test_accuracy`, `personal_test_accuracy_weighted`, ..., `personal_clients`."""
    return [*(f"{PERSONAL_PREFIX}{name}{summary}" for name in evaluation_metrics()
              for summary in ("", *PERSONAL_SUMMARIES)), PERSONAL_CLIENTS]


def algorithm_metrics(name: str, anchors: bool = True) -> list[str]:
    """What the algorithm `name` reports besides the engine and evaluation metrics (with the
    anchor diagnostics where it has anchors and they are switched on)."""

    algorithm = algorithm_class(name)
    names = list(algorithm.reported_metrics)
    if anchors and issubclass(algorithm, ClassAnchors):
        names += ANCHOR_DIAGNOSTICS
    return names


def reportable(algorithm: str, anchors: bool = True, personal: bool = False,
               privacy: Any = None) -> list[str]:
    """What a run of `algorithm` reports: the global evaluation where it shares a whole model
    (the others have no global model to test), the personalised one where `personal`, and ε
    where `privacy` (a config's `privacy` section) is on."""
    evaluation = evaluation_metrics() if algorithm_class(algorithm).shares == "model" else []
    private = () if privacy is None or privacy.mechanism == "none" else (
        *PRIVACY, *(ADAPTIVE_CLIP if privacy.adaptive is not None else ()))
    return [*evaluation, *(personal_metrics() if personal else ()), *ENGINE, *private,
            *algorithm_metrics(algorithm, anchors)]


def check_metric(metric: str, configs: Iterable[Any]) -> None:
    """ConfigError unless every config's run reports `metric`."""

    base = _without_domain(metric)
    configs = list(configs)
    algorithms = sorted({config.algorithm.name for config in configs})
    missing = sorted({c.algorithm.name for c in configs
                      if base not in reportable(c.algorithm.name, c.diagnostics.anchors,
                                                c.evaluation.personal is not None, c.privacy)})
    if base in personal_metrics():
        _check_personal(metric, base, configs)
    if not missing:
        return
    if base in (*PRIVACY, *ADAPTIVE_CLIP):
        need = "privacy (privacy.mechanism: central or local)" if base in PRIVACY else \
            "central DP with adaptive clipping (privacy.adaptive)"
        raise ConfigError(f"metric: {metric!r} is reported only with {need}; "
                          f"{', '.join(missing)} run without it here")
    known = sorted({m for name in algorithms for m in reportable(name, personal=True)})
    if all(base not in reportable(name, personal=True)
           for name in _all_algorithms(algorithms)):
        close = difflib.get_close_matches(base, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known)}"
        raise ConfigError(f"metric: no algorithm reports {metric!r}; {hint}")
    hint = "; the anchor diagnostics need diagnostics.anchors: true" \
        if base in ANCHOR_DIAGNOSTICS else ""
    if base in evaluation_metrics():
        hint = (f"; {'it shares' if len(missing) == 1 else 'they share'} no whole model, so "
                f"there is no global model to test: use {PERSONAL_PREFIX}{base}")
    raise ConfigError(f"metric: {metric!r} is not reported by {', '.join(missing)} "
                      f"(in this sweep's search space){hint}")


def _check_personal(metric: str, base: str, configs: list) -> None:
    """A personalised metric needs personalised evaluation, and its validation values need
    validation parts."""
    if any(c.evaluation.personal is None for c in configs):
        raise ConfigError(f"metric: {metric!r} is reported only with personalised evaluation; "
                          "set evaluation.personal (e.g. evaluation.personal: "
                          "{test_fraction: 0.25, val_fraction: 0.15})")
    if base.startswith(f"{PERSONAL_PREFIX}val_") and any(
            c.evaluation.personal.val_fraction == 0 for c in configs):
        raise ConfigError(f"metric: {metric!r} needs validation parts: set "
                          "evaluation.personal.val_fraction (e.g. 0.15)")


def default_mode(metric: str) -> str:
    """`min` for losses, distances, times and the spread of personalised metrics over clients
    (`personal_test_accuracy_std`), else `max`."""
    base = _without_domain(metric)
    if base.startswith(PERSONAL_PREFIX):
        if base.endswith("_std"):
            return "min"
        # personal_test_loss_p10 is a loss
        base = next((base.removesuffix(s) for s in PERSONAL_SUMMARIES if base.endswith(s)), base)
    return "min" if any(base.endswith(word) for word in LOWER_IS_BETTER) else "max"


def _without_domain(metric: str) -> str:
    """`test_accuracy/svhn` → `test_accuracy` (per-domain evaluation metrics only)."""
    head, sep, _ = metric.partition("/")
    return head if sep and head in evaluation_metrics() else metric


def _all_algorithms(extra: Sequence[str]) -> list[str]:

    return sorted({*algorithm_names(), *extra})
