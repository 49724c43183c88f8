"""Algorithms by name, through the `raysim.algorithms` entry-point group.

Names may also be `module:Class` import paths. The bundled methods in `algorithms/` register
themselves in pyproject.toml exactly as a third-party package would: one mechanism for both.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

GROUP = "raysim.algorithms"


@cache
def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def algorithm_names() -> list[str]:
    return sorted(_entry_points())


def algorithm_class(name: str) -> type:
    """The algorithm class registered as `name`, or imported from `module:Class` (a method
    being prototyped outside any package; it must be importable on every Ray node).
    KeyError lists the known names."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise KeyError(f"cannot import algorithm {name!r}: {error}") from None
    points = _entry_points()
    if not points:
        raise KeyError(
            f"no algorithms registered under {GROUP!r}; install raysim (pip install -e .)"
        )
    if name not in points:
        raise KeyError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(points))}")
    return points[name].load()
