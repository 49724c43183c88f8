"""The plug-in code a run needs on every node of a cluster it joins.

Bundled plug-ins come with raysim itself. A plug-in from another package (a method, dataset,
partitioner, model or sink named by the config, registered by entry point or as `module:attr`)
is shipped to the cluster's workers as a Ray `runtime_env` `py_modules` entry: its top-level
package folder, uploaded once by Ray and put on every worker's path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from raysim.config import ConfigError
from raysim.registry import ALGORITHMS, DATASETS, MODELS, PARTITIONERS, SINKS

BUNDLED = ("raysim", "algorithms")


def named_plugins(config: Any) -> list[tuple[Any, str]]:
    """(registry, name) of every plug-in the config names."""
    return [(ALGORITHMS, config.algorithm.name), (DATASETS, config.data.dataset),
            (PARTITIONERS, config.data.partition.kind), (MODELS, config.model.name),
            *((SINKS, sink.name) for sink in config.logging.sinks)]


def plugins_of(config: Any) -> list[Any]:
    """Every plug-in object the config names."""
    return [registry[name] for registry, name in named_plugins(config)]


def shipped_entry_points(config: Any) -> dict[str, dict[str, str]]:
    """{entry-point group: {name: "module:attr"}} of the config's non-bundled plug-ins named by
    a registered name: the workers of a joined cluster get the packages but not their installed
    metadata, so they learn the names from this (`raysim.registry.SHIPPED_ENV`)."""
    shipped: dict[str, dict[str, str]] = {}
    for registry, name in named_plugins(config):
        value = registry.entry_point(name)
        if value is not None and value.split(".")[0].split(":")[0] not in BUNDLED:
            shipped.setdefault(registry.group, {})[name] = value
    return shipped


def plugin_packages(config: Any) -> list[str]:
    """The folders of the top-level packages that hold the config's non-bundled plug-ins, for
    `runtime_env={"py_modules": ...}`. A plug-in that is a lone module, not a package, cannot
    be shipped this way: ConfigError saying how to install it on the cluster instead."""
    folders: list[str] = []
    for plugin in plugins_of(config):
        module = getattr(plugin, "__module__", None) or type(plugin).__module__
        top = module.split(".")[0]
        if top in BUNDLED or top == "__main__":
            continue
        spec = importlib.util.find_spec(top)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise ConfigError(
                f"the plug-in module {top!r} is a single file, which cannot be shipped to the "
                "cluster's workers: make it a package (a folder with __init__.py) or install it "
                "on every node (pip install on each, or `raysim submit`, which ships the "
                "working directory)")
        folder = str(Path(locations[0]).resolve())
        if folder not in folders:
            folders.append(folder)
    return folders
