"""The worker and server as Ray actors: each process registers the tensor transport, and a
worker reads the shared dataset from the object store once."""

from __future__ import annotations

from typing import Any

import ray

from raysim.engine.server import Server
from raysim.engine.transport import register_tensor_transport
from raysim.engine.worker import ClientWorker


class RemoteClientWorker(ClientWorker):
    def __init__(self, config: Any, shared: list, info: Any) -> None:
        register_tensor_transport()
        dataset, client_split = ray.get(shared)
        super().__init__(config, dataset, client_split, info)


class RemoteServer(Server):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_tensor_transport()
        super().__init__(*args, **kwargs)
