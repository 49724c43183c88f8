"""Every extension point by name, through entry-point groups: methods, datasets, partitioners,
models and sinks. The bundled ones register themselves in pyproject.toml exactly as a
third-party package does (see examples/plugin/): one mechanism for both.

A registry reads like a mapping from names to the registered objects. An object is imported
when it is first asked for, then checked against its contract, so a plug-in that fails to
import, lacks a hook, or shares its name with another package's gives one error naming it,
while the config is validated (before Ray starts). Names may also be `module:attr` import
paths (an object being prototyped outside any package; it must import on every Ray node).

A plug-in may declare a frozen dataclass `Config` of its own keys, which the config's section
naming it parses (`resolve_config`); one without has no keys. This module and `raysim.config`
know nothing of each other: the config parser asks for a Config through `resolve_config`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Any

# The environment variable naming shipped plug-ins: {group: {name: "module:attr"}} as JSON.
SHIPPED_ENV = "RAYSIM_SHIPPED_PLUGINS"


class RegistryError(KeyError):
    """A name that does not resolve to a usable plug-in; `args[0]` is the one-line reason."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Mapping):
    def __init__(self, group: str, kind: str, contract: tuple[str, ...]) -> None:
        self.group, self.kind, self.contract = group, kind, contract
        self._loaded: dict[str, Any] = {}

    @cached_property
    def _points(self) -> dict[str, EntryPoint]:
        found: dict[str, EntryPoint] = {}
        for point in entry_points(group=self.group):
            other = found.get(point.name)
            if other is not None and _package(other) != _package(point):
                raise RegistryError(
                    f"two packages register the {self.kind} {point.name!r} ({self.group}): "
                    f"{_package(other)} ({other.value}) and {_package(point)} ({point.value}); "
                    "uninstall one of them")
            found[point.name] = point
        # plug-ins a driver shipped to this worker of a joined cluster: their packages came
        # through Ray's runtime_env, their entry points (installed metadata) cannot
        shipped = json.loads(os.environ.get(SHIPPED_ENV, "{}")).get(self.group, {})
        for name, value in shipped.items():
            found.setdefault(name, EntryPoint(name=name, value=value, group=self.group))
        return found

    def entry_point(self, name: str) -> str | None:
        """The `module:attr` that registers `name` (None: not registered by that name)."""
        point = self._points.get(name)
        return point.value if point is not None else None

    def names(self) -> list[str]:
        return sorted(self._points)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._points)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._points or ":" in name)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = self._check(name, *self._load(name))
        return self._loaded[name]

    def _load(self, name: str) -> tuple[Any, str]:
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr), name
            except (ImportError, AttributeError) as error:
                raise RegistryError(f"cannot import {self.kind} {name!r}: {error}") from None
            except (Exception, SystemExit) as error:  # the module's own code raised or exited
                raise RegistryError(f"the {self.kind} {name!r} {_import_failure(error)}"
                                    ) from None
        points = self._points
        if name not in points:
            if not points:
                raise RegistryError(f"no {self.kind}s registered under {self.group!r}; install "
                                    "raysim (pip install -e .)")
            raise RegistryError(f"unknown {self.kind} {name!r}; choose one of "
                                f"{', '.join(sorted(points))}")
        point = points[name]
        try:
            return point.load(), f"{point.value}, from {_package(point)}"
        # whatever a plug-in's import raises; an import that calls sys.exit() is a failure
        # too, not the end of raysim with the plug-in's exit code (0: "success")
        except (Exception, SystemExit) as error:
            raise RegistryError(
                f"the {self.kind} plug-in {name!r} ({point.value}, from {_package(point)}) "
                f"{_import_failure(error)}") from None

    def _check(self, name: str, obj: Any, origin: str) -> Any:
        missing = [attr for attr in self.contract if not hasattr(obj, attr)]
        if missing:
            raise RegistryError(f"the {self.kind} plug-in {name!r} ({origin}) lacks "
                                f"{', '.join(missing)}, which every {self.kind} must have")
        own = getattr(obj, "Config", None)
        if own is not None and not (isinstance(own, type) and dataclasses.is_dataclass(own)):
            raise RegistryError(f"the {self.kind} plug-in {name!r} ({origin}) has a Config "
                                "that is not a dataclass (its keys must be dataclass fields)")
        return obj


def _import_failure(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"exited while being imported (SystemExit({error.code!r}))"
    first = str(error).strip().splitlines()
    return f"failed to import: {type(error).__name__}: {first[0] if first else ''}"


def _package(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return dist.name if dist is not None else "an unknown package"


# The kinds match the plug-in kinds of raysim.config's sections (ALGORITHM, DATASET, ...).
ALGORITHMS = Registry("raysim.algorithms", "algorithm", (
    "Config", "client_update", "server_round", "evaluate_batch", "init_server", "broadcast",
    "prepare_model", "tasks", "stateful", "needs_features", "reported_metrics"))
DATASETS = Registry("raysim.datasets", "dataset", ("task", "load", "check"))
PARTITIONERS = Registry("raysim.partitioners", "partition kind", ("__call__",))
MODELS = Registry("raysim.models", "model", ("has_feature_head", "task"))
SINKS = Registry("raysim.sinks", "sink", ("start", "log_round", "finish"))
REGISTRIES = {registry.kind: registry
              for registry in (ALGORITHMS, DATASETS, PARTITIONERS, MODELS, SINKS)}


def resolve_config(kind: str, name: str) -> type | None:
    """The Config dataclass of the plug-in of `kind` named `name` (None: it declares none),
    or RegistryError: the config parser's resolver (`raysim.config.parse_config`)."""
    return getattr(REGISTRIES[kind][name], "Config", None)


def algorithm_names() -> list[str]:
    return ALGORITHMS.names()


def algorithm_class(name: str) -> type:
    """The algorithm class registered as `name`, or imported from `module:Class`.
    RegistryError (a KeyError) says why not."""
    return ALGORITHMS[name]
