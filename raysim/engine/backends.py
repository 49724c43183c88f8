"""Where the round loop's actors live. The simulation creates its server and workers through a
backend and calls them as `actor.method.remote(...)`, getting back refs it passes on or `get`s:

- `RayBackend` (default): Ray actors with their CPU/GPU fractions, the object store between
  them; a dead actor shows up as an error the simulation recovers from.
- `LocalBackend` (`resources.backend: local`, `raysim launch --local`): the same classes as
  plain objects in this process; a call runs at once and its ref holds the result (or the
  exception, raised by `get`). Nothing imports Ray: step through a round with pdb.

Both run the same calls in the same order, so they give the same metrics bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

from raysim.engine.deferred import Deferred
from raysim.engine.server import Server
from raysim.engine.worker import ClientWorker

PING_SECONDS = 10.0  # a busy actor answers a ping after its current task; a dead one at once


class RayBackend:
    name = "ray"

    def __init__(self) -> None:
        import ray
        from ray.exceptions import RayError

        # Ray and what imports it load only for the Ray backend (the local one never needs it)
        from raysim.engine.transport import register_tensor_transport

        self.ray = ray
        self.detached = False  # actors that outlive this driver (a `raysim up` warm pool)
        self.errors: tuple[type[BaseException], ...] = (RayError,)
        # Results lost with a dead actor are handled by the simulation (rerun, replay) and
        # reported as failure records; Ray's log line for each discarded ref would repeat them.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        register_tensor_transport()

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return self.ray.get(refs, timeout=timeout)

    def later(self, ref: Any) -> Deferred:
        """`ref` as an argument the receiving actor fetches when it needs it."""
        return Deferred(ref)

    def share(self, dataset: Any, client_split: Any) -> list[Any]:
        """Put once, read zero-copy by every worker on a node."""
        return [self.ray.put(dataset), self.ray.put(client_split)]

    def worker(self, config: Any, shared: list[Any], info: Any) -> Any:
        from raysim.engine.remote import RemoteClientWorker  # imports Ray: Ray backend only

        return self._actor(RemoteClientWorker, config.resources.worker,
                           (config, shared, info))

    def server(self, config: Any, args: tuple, pin_here: bool) -> Any:
        """`pin_here`: on this node (a server that writes into the run directory)."""
        from raysim.engine.remote import RemoteServer  # imports Ray: Ray backend only

        return self._actor(RemoteServer, config.resources.server, (config, *args), pin_here)

    def _actor(self, cls: type, resources: Any, args: tuple, pin_here: bool = False) -> Any:
        options: dict[str, Any] = {"num_cpus": resources.num_cpus,
                                   "num_gpus": resources.num_gpus}
        if self.detached:
            options["lifetime"] = "detached"
        if pin_here:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                self.ray.get_runtime_context().get_node_id(), soft=False)
        return self.ray.remote(cls).options(**options).remote(*args)

    def kill(self, actor: Any) -> None:
        self.ray.kill(actor)

    def alive(self, actor: Any) -> bool:
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            self.ray.get(actor.ping.remote(), timeout=PING_SECONDS)
        except GetTimeoutError:
            return True  # busy with a task: alive
        except RayActorError:
            return False
        return True

    def succeeded(self, ref: Any) -> bool:
        try:
            self.ray.get(ref)
        except self.errors:
            return False
        return True


class LocalRef:
    """The outcome of a call that has already run."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, LocalRef) else value


class _LocalMethod:
    def __init__(self, method: Any) -> None:
        self.method = method

    def remote(self, *args: Any) -> LocalRef:
        try:
            return LocalRef(self.method(*(_resolve(a) for a in args)))
        except Exception as error:  # kept in the ref, raised where the result is used
            return LocalRef(error=error)


class LocalActor:
    """An object whose methods are called as `actor.method.remote(*args)`."""

    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._instance, name))


class LocalBackend:
    name = "local"
    errors: tuple[type[BaseException], ...] = ()  # no actor can die: every error is raised

    def put(self, value: Any) -> LocalRef:
        return LocalRef(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        if isinstance(refs, list):
            return [_resolve(r) for r in refs]
        return _resolve(refs)

    def later(self, ref: Any) -> Any:
        return ref  # made already: resolved as every argument is

    def share(self, dataset: Any, client_split: Any) -> tuple[Any, Any]:
        return dataset, client_split

    def worker(self, config: Any, shared: tuple[Any, Any], info: Any) -> LocalActor:
        return LocalActor(ClientWorker(config, *shared, info))

    def server(self, config: Any, args: tuple, pin_here: bool) -> LocalActor:
        return LocalActor(Server(config, *args))

    def kill(self, actor: Any) -> None:
        pass

    def alive(self, actor: Any) -> bool:
        return True

    def succeeded(self, ref: Any) -> bool:
        return isinstance(ref, LocalRef) and ref.error is None


def make_backend(name: str) -> RayBackend | LocalBackend:
    return LocalBackend() if name == "local" else RayBackend()
