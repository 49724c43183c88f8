"""The Ray connection: joining an existing cluster (or starting an embedded one), fitting the
resource request to it, and where the actors landed. Joining: a fast reachability check
before `ray.init`, and one clear error for an unreachable address or a token-authentication
mismatch.

Ray (2.52+) can require a shared token from every process of a cluster. `ray.init()` of a new
local Ray and `ray start --head` on a machine that already has a token file (~/.ray/auth_token)
turn it on; a process that joins with an explicit address only sends its token when
`RAY_AUTH_MODE=token` is set in its environment (the token itself comes from `RAY_AUTH_TOKEN`,
the file named by `RAY_AUTH_TOKEN_PATH`, or ~/.ray/auth_token, in that order).

An embedded Ray is lean (docs/guide/startup.md has what each part costs): no dashboard unless
`resources.dashboard`, no usage reporting, and not even the API server Ray would start without
the dashboard (it would serve usage reporting only). For a launch it is sized to the run, and
its worker processes import torch and raysim's actor modules as they start, so the actors find
them loaded; `start_early` starts it on a thread while the driver still validates and prepares.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from raysim.config import Config, ConfigError, ResourcesConfig
from raysim.engine import watchdog
from raysim.engine.head import PRELOAD, free_port, join_settings, running_head

PROBE_SECONDS = 5.0

AUTH_HELP = (
    "set RAY_AUTH_MODE=token and give this process the cluster's token: RAY_AUTH_TOKEN=<token>, "
    "RAY_AUTH_TOKEN_PATH=<file holding it>, or the file ~/.ray/auth_token "
    "(`ray get-auth-token` prints it on the head node)"
)

# Runs in a child process: Ray's GCS client retries and logs for tens of seconds, and a child
# can be abandoned at the deadline.
_GCS_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    print("auth")
except Exception as error:
    print("other", (str(error).strip().splitlines() or [type(error).__name__])[-1])
else:
    print("ok")
"""


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS (which also resolves `auto`, as in
    `ray.init`), else the cluster `raysim up` started (`raysim.engine.head`); None starts a
    local Ray."""
    if address and address != "auto":
        return address
    given = os.environ.get("RAY_ADDRESS") or address
    if given:
        return given
    head = running_head()
    return head.address if head is not None else None


def on_raysim_head(address: str | None) -> bool:
    """Whether the cluster to join is the one `raysim up` started (it keeps warm workers)."""
    head = running_head()
    return head is not None and cluster_address(address) == head.address


def connect(address: str | None = None, py_modules: Sequence[str] = (),
            env_vars: dict[str, str] | None = None,
            resources: ResourcesConfig | None = None) -> str | None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local Ray (or
    finish starting the one `start_early` began). An unreachable cluster or rejected token
    raises ConfigError, quickly. `py_modules`: package folders every worker of a joined cluster
    needs (the run's plug-ins), shipped by Ray's `runtime_env` with `env_vars` (what names
    them); an embedded Ray's workers import them from this machine as it does. `resources`:
    one run's, which sizes an embedded Ray to it (`embedded_options`). An embedded Ray's
    processes end with this process, however it ends (`raysim.engine.watchdog`). Returns the
    embedded Ray's dashboard address when it has one."""
    import ray

    target = cluster_address(address)
    if target is None and _early.thread is not None:
        return _early.join()
    if ray.is_initialized():
        return None
    if target is None:
        return start_embedded(resources)
    check_target(target)
    client = "://" in target
    try:
        with warnings.catch_warnings():  # Ray Client warns, then raises; the error says it all
            warnings.simplefilter("ignore", UserWarning)
            options: dict = {} if client else {"include_dashboard": False}
            if py_modules:
                options["runtime_env"] = {"py_modules": list(py_modules),
                                          "env_vars": dict(env_vars or {})}
            ray.init(address=target, logging_level="WARNING", **options)
    except Exception as error:
        if is_auth_failure(error):
            raise ConfigError(f"the Ray cluster at {target} rejected this process's "
                              f"authentication token: {AUTH_HELP}") from None
        if isinstance(error, ConnectionError):
            hint = ""
            if client and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                # Ray Client reports a rejected token as a timeout.
                hint = f"; if the cluster uses token authentication, {AUTH_HELP}"
            raise ConfigError(f"cannot join the Ray cluster at {target}: {error}{hint}") from None
        raise
    return None



def embedded_options(resources: ResourcesConfig | None = None) -> dict[str, Any]:
    """`ray.init` options of an embedded Ray. With one run's `resources`: as many CPUs as its
    worker pool and server ask, plus one (never more than the machine has), so Ray's
    pre-started worker processes, one per CPU, are the run's actors-to-be; they import
    `PRELOAD` as they start, while the driver prepares. Without: the machine's CPUs and
    nothing preloaded (a sweep's trials share the cluster)."""
    options: dict[str, Any] = {
        "include_dashboard": bool(resources is not None and resources.dashboard),
        "logging_level": "WARNING",
    }
    if resources is not None:
        pool = resources.num_workers * resources.worker.num_cpus + resources.server.num_cpus
        # the extra CPU keeps fit_resources' floor((cpus - server) / worker) clear of rounding
        options["num_cpus"] = min(os.cpu_count() or 1, math.ceil(pool) + 1)
        options["_system_config"] = {"preload_python_modules": list(PRELOAD)}
    return options


def start_embedded(resources: ResourcesConfig | None = None) -> str | None:
    """Start an embedded local Ray (`embedded_options`) and its watchdog; returns the
    dashboard's address when it has one."""
    import ray

    # Ray reports usage to its developers unless told not to; an embedded Ray never does
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = embedded_options(resources)
    with contextlib.ExitStack() as stack:
        if not options["include_dashboard"]:
            stack.enter_context(_without_api_server())
        stack.enter_context(_agent_on_a_free_port())
        if threading.current_thread() is not threading.main_thread():
            # Ray's SIGTERM handler only exits; the run installs its own (run/interrupts.py)
            stack.enter_context(_quiet(logging.getLogger("ray._private.worker"),
                                       "SIGTERM handler is not set"))
        context = ray.init(address="local", **options)  # never a `ray start` cluster
    session_dir = _embedded_node_session()
    if session_dir is not None:
        watchdog.start(session_dir)
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else None


@contextlib.contextmanager
def _without_api_server() -> Iterator[None]:
    """Ray starts its API server (the dashboard's process) even without the dashboard, to run
    its usage-stats module only, and `ray.init` waits until it is up: about 1 s of a 2-core
    machine's start. With usage reporting off it would serve nothing, so it is not started.
    A Ray without this hook of its node record starts it as usual."""
    try:
        from ray._private.node import Node
    except ImportError:
        yield
        return
    original = Node.__dict__.get("start_api_server")
    if original is None:
        yield
        return

    def skip(node: Any, **_: Any) -> None:
        node._webui_url = ""  # what Ray records when it runs without a dashboard

    Node.start_api_server = skip
    try:
        yield
    finally:
        Node.start_api_server = original


@contextlib.contextmanager
def _agent_on_a_free_port() -> Iterator[None]:
    """`ray.init` has no option for its dashboard agent's port, and its default is one fixed
    port that another Ray on this machine (a `raysim up` head, the user's own) may hold: then
    the node starts ~4 s later (`raysim.engine.head.free_port`). The embedded Ray's agent is
    given a free port instead. A Ray whose parameters lack this field starts as usual."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:
        yield
        return
    original = RayParams.__init__
    default = inspect.signature(original).parameters.get("dashboard_agent_listen_port")
    if default is None:
        yield
        return

    def init(params: Any, *args: Any, **kwargs: Any) -> None:
        original(params, *args, **kwargs)
        if params.dashboard_agent_listen_port == default.default:
            params.dashboard_agent_listen_port = free_port()

    RayParams.__init__ = init
    try:
        yield
    finally:
        RayParams.__init__ = original


@contextlib.contextmanager
def _quiet(logger: logging.Logger, message: str) -> Iterator[None]:
    """`logger` without its records that start with `message`."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(message)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class _HeldLogs:
    """Holds the records that reach the handlers of Ray's logger (its start-up warnings) until
    `release` prints them: a mistake found while Ray starts early stays the command's one
    line."""

    class _Hold(logging.Filter):
        def __init__(self, handler: logging.Handler, held: list) -> None:
            super().__init__()
            self.handler, self.held = handler, held

        def filter(self, record: logging.LogRecord) -> bool:
            self.held.append((self.handler, record))
            return False

    def __init__(self) -> None:
        self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self.holds = [self._Hold(h, self.held) for h in logging.getLogger("ray").handlers]
        for hold in self.holds:
            hold.handler.addFilter(hold)

    def release(self) -> None:
        for hold in self.holds:
            hold.handler.removeFilter(hold)
        for handler, record in self.held:
            handler.handle(record)
        self.held.clear()


class _EarlyStart:
    """An embedded Ray starting on a thread (`start_early`), joined by `connect`.

    The thread outlives the start: the kernel signals the head's processes when the thread
    that started them ends (Ray binds them with PR_SET_PDEATHSIG, which follows the thread),
    so it waits, idle, until the process ends."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.logs: _HeldLogs | None = None
        self.url: str | None = None
        self.error: BaseException | None = None

    def begin(self, resources: ResourcesConfig) -> None:
        self.ready, self.logs, self.url, self.error = threading.Event(), None, None, None

        def run() -> None:
            try:
                import ray  # noqa: F401  (it sets up the logger whose records are held)

                self.logs = _HeldLogs()
                self.url = start_embedded(resources)
            except BaseException as error:  # re-raised in the driver's thread by join
                self.error = error
            self.ready.set()
            if self.error is None:
                threading.Event().wait()  # the head's processes live as long as this thread

        self.thread = threading.Thread(target=run, name="raysim-ray-start", daemon=True)
        self.thread.start()

    def join(self) -> str | None:
        if self.thread is None:
            return None
        self.ready.wait()
        self.thread = None
        if self.logs is not None:
            self.logs.release()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.url


_early = _EarlyStart()


def start_early(resources: ResourcesConfig) -> None:
    """Start the embedded Ray of a run with `resources` on a thread, now: the driver goes on
    validating and preparing, and `connect` waits for it. For a process that ends with its
    command (the `raysim` command line): a mistake found meanwhile ends the process, and the
    Ray with it."""
    if _early.thread is None:
        _early.begin(resources)


def leave() -> None:
    """Before this process ends at once (`os._exit`): a joined cluster is left properly (a
    Ray Client session would otherwise wait for it), an embedded Ray is not shut down (its
    head's processes end with this process, the watchdog ends the rest): Ray's own shutdown
    would take seconds to stop what goes anyway."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if _embedded_node() is None:
        ray.shutdown()
    else:
        atexit.unregister(ray.shutdown)


def _embedded_node() -> Any:
    """Ray's record of the head node this process started (None: it joined a cluster)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    return node if node is not None and node.all_processes else None


def _embedded_node_session() -> str | None:
    node = _embedded_node()
    return None if node is None else node.get_session_dir_path()


# the processes of a Ray head without which nothing runs, as named in Ray's node record
SYSTEM_PROCESSES = {"gcs_server": "the GCS server", "raylet": "the raylet"}


def embedded_failure() -> str | None:
    """What died of the Ray this process started, e.g. "the raylet (pid 812) was killed by
    SIGKILL"; None while its GCS server and raylet run, or when this process joined a cluster
    (whose failures show up as Ray's errors)."""
    node = _embedded_node()
    if node is None:
        return None
    for kind, info in list(node.all_processes.items()):
        if kind not in SYSTEM_PROCESSES:
            continue
        for process in [i.process for i in info]:
            code = process.poll()
            if code is None:
                continue
            if code < 0:
                try:
                    how = f"was killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"was killed by signal {-code}"
            else:
                how = f"exited with code {code}"
            return f"{SYSTEM_PROCESSES[kind]} (pid {process.pid}) {how}"
    return None


def check_address(address: str) -> None:
    """ConfigError unless something answers at `address` as a Ray cluster would."""
    if address == "auto":
        resolved = _local_cluster_address()
        if resolved is None:
            raise ConfigError("--address auto: no Ray cluster is running on this machine; "
                              "start one with `ray start --head` or give HOST:PORT")
        host, port = split_host_port(resolved)
        _check_port(address, host, port)
        return
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        raise ConfigError(f"--address {address}: use auto, HOST:PORT (the GCS port, 6379 by "
                          "default) or ray://HOST:PORT (Ray Client, port 10001 by default)")
    host, port = split_host_port(rest, address)
    _check_port(address, host, port)
    if scheme == "":
        _check_gcs(address)


def split_host_port(address: str, shown: str | None = None) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address {shown or address}: expected HOST:PORT, "
                          "e.g. 10.0.0.5:6379, auto, or ray://10.0.0.5:10001")
    return host.strip("[]"), int(port)


def is_auth_failure(error: BaseException) -> bool:
    """Whether `error` (or its cause chain) is Ray rejecting the authentication token."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen) \
                or "Unauthenticated" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_port(address: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"cannot reach a Ray cluster at {address} ({host}:{port}: {reason}); start one "
            "with `ray start --head`, or check --address / RAY_ADDRESS"
        ) from None


def _check_gcs(address: str) -> None:
    try:
        probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], capture_output=True,
                               text=True, timeout=3 * PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"{address} accepts connections but does not answer as a Ray cluster; give the "
            "head's GCS port (6379 unless `ray start --port` chose another), not the "
            "dashboard or client port"
        ) from None
    answer = probe.stdout.strip()
    if answer == "auth":
        raise ConfigError(f"the Ray cluster at {address} requires token authentication and "
                          f"rejected this process: {AUTH_HELP}")
    if answer != "ok":
        reason = answer.removeprefix("other").strip() or probe.stderr.strip()[-200:]
        raise ConfigError(f"{address} does not answer as a Ray cluster ({reason}); give the "
                          "head's GCS port (6379 unless `ray start --port` chose another)")


def _local_cluster_address() -> str | None:
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # none running, or a stale record of one
        return None


def placement_notes(workers: list[dict]) -> list[str]:
    """Warnings about where the workers landed (from `ClientWorker.describe`)."""
    on_gpu_ids_without_cuda = [w for w in workers if w.get("gpu_ids") and w["device"] == "cpu"]
    if on_gpu_ids_without_cuda:
        return [f"Ray assigned GPUs to {len(on_gpu_ids_without_cuda)} worker(s) but PyTorch "
                "sees no CUDA device there: they train on CPU"]
    return []


def check_cluster(address: str | None) -> None:
    """Before any work: ConfigError if the cluster to join (address or RAY_ADDRESS) does not
    answer. Nothing to check for a local Ray, or when Ray is already initialised."""
    target = cluster_address(address)
    if target is None:
        return
    import ray

    if not ray.is_initialized():
        check_target(target)


def check_target(target: str) -> None:
    """`check_address`, except for the cluster `raysim up` started (it answered a moment
    ago): this process gets what joining it needs."""
    head = running_head()
    if head is not None and head.address == target:
        join_settings(head)
    else:
        check_address(target)


def fit_resources(config: Config, cluster: dict[str, float]) -> tuple[Config, list[str]]:
    """Adapt the resource request to the cluster: GPUs requested on a cluster without any fall
    back to CPU, and the pool shrinks to what fits. Results do not depend on the pool size."""
    res, notes = config.resources, []
    worker, server = res.worker, res.server
    if (worker.num_gpus > 0 or server.num_gpus > 0) and cluster.get("GPU", 0) == 0:
        notes.append("the cluster reports no GPU: workers and server run on CPU")
        worker = dataclasses.replace(worker, num_gpus=0.0)
        server = dataclasses.replace(server, num_gpus=0.0)
    fits = [res.num_workers]
    if worker.num_cpus > 0:
        fits.append(math.floor((cluster.get("CPU", 0) - server.num_cpus) / worker.num_cpus))
    if worker.num_gpus > 0:
        fits.append(math.floor((cluster.get("GPU", 0) - server.num_gpus) / worker.num_gpus))
    num_workers = min(fits)
    if num_workers < 1:
        raise ConfigError(
            f"resources: one worker needs {worker.num_cpus} CPU / {worker.num_gpus} GPU beside the "
            f"server's {server.num_cpus} CPU / {server.num_gpus} GPU; the cluster has "
            f"{cluster.get('CPU', 0)} CPU / {cluster.get('GPU', 0)} GPU"
        )
    if num_workers < res.num_workers:
        notes.append(f"only {num_workers} of resources.num_workers={res.num_workers} fit")
    resources = dataclasses.replace(res, num_workers=num_workers, worker=worker, server=server)
    return dataclasses.replace(config, resources=resources), notes
