"""Arguments an actor receives before they exist. Ray resolves a task's direct `ObjectRef`
arguments before the task starts; a ref inside a `Deferred` is passed on as it is, and the
actor fetches it when it needs it. A worker's round is sent with its broadcast deferred, so the
worker makes its clients' data while the server is still aggregating the round before."""

from __future__ import annotations

from typing import Any


class Deferred:
    """A Ray object ref the receiving actor fetches itself (`arrived`)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def fetch(self) -> Any:
        import ray  # only a Ray backend makes these

        return ray.get(self.ref)


def arrived(value: Any) -> Any:
    """`value`, fetched first where it was sent `Deferred`."""
    return value.fetch() if isinstance(value, Deferred) else value
