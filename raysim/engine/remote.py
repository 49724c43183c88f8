"""The worker and server as Ray actors: each process registers the tensor transport, and a
worker reads the shared dataset from the object store once. Both can be reloaded for a new
run in the same process (a warm pool, `raysim.engine.warm`)."""

from __future__ import annotations

import gc
from typing import Any

import ray

from raysim.engine.server import Server
from raysim.engine.transport import register_tensor_transport
from raysim.engine.worker import ClientWorker


class Reloadable:
    def reload(self, *args: Any) -> None:
        """Become what the new run's arguments would create, in this process: everything
        the last run left is dropped, and `__init__` runs again."""
        self.__dict__.clear()
        gc.unfreeze()  # the last run's objects, frozen at its start, may be garbage now
        gc.collect()
        type(self).__init__(self, *args)


class RemoteClientWorker(Reloadable, ClientWorker):
    def __init__(self, config: Any, shared: list, info: Any) -> None:
        register_tensor_transport()
        dataset, client_split = ray.get(shared)
        super().__init__(config, dataset, client_split, info)
        # What the process holds now (torch, Ray, the dataset: ~10^5 objects) lives as long as
        # it does: kept out of the cyclic collector's full passes, each ~0.15 s of a round.
        gc.freeze()


class RemoteServer(Reloadable, Server):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_tensor_transport()
        super().__init__(*args, **kwargs)
        gc.freeze()  # as a worker's: its rounds are on every worker's path

