"""`raysim up` / `raysim down`: a Ray head on this machine that outlives the command. It is
Ray's own `ray start --head --block`, in a session of its own, lean as an embedded Ray (no
dashboard unless asked, no usage reporting, its worker processes import torch and raysim as
they start), with its own temporary directory so a plain `ray.init()` elsewhere never joins it
by mistake. A record of it (`$RAYSIM_HOME/cluster.json`, default ~/.raysim) lets every later
`raysim launch`, `tune` and `compare` without an address join it by itself, where a launch
finds the warm workers the last one left (`raysim.engine.warm`). `raysim down` ends the head's
process, which stops every Ray process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raysim.config import ConfigError

RECORD = "cluster.json"
# what each worker process of a Ray raysim starts (embedded or `raysim up`) imports as it
# starts, before it takes an actor: torch and everything the worker and server actors run
PRELOAD = ("raysim.engine.remote",)
READY_SECONDS = 120.0


@dataclass(frozen=True)
class Head:
    """A head `raysim up` started: its GCS address, the pid of its `ray start --block`
    process, its temporary directory and log, and its size."""

    address: str
    pid: int
    temp_dir: str
    log: str
    num_cpus: int
    started: str
    auth: str  # Ray's RAY_AUTH_MODE for the head: token or disabled (what joining needs)


def state_dir() -> Path:
    return Path(os.environ.get("RAYSIM_HOME") or "~/.raysim").expanduser()


def running_head() -> Head | None:
    """The head `raysim up` started, while its process runs and its port answers."""
    head = _recorded()
    if head is None or not process_alive(head.pid) or not _answers(head.address):
        return None
    return head


def up(num_cpus: int | None = None, num_gpus: int | None = None,
       dashboard: bool = False) -> Head:
    """Start the head and wait until it answers. ConfigError when one is running already."""
    head = running_head()
    if head is not None:
        raise ConfigError(
            f"up: a cluster started by `raysim up` is already running at {head.address} "
            f"(process {head.pid}, since {head.started}); `raysim launch` joins it by itself; "
            "stop it with `raysim down`")
    other = _ray_start_cluster()
    if other is not None:
        raise ConfigError(
            f"up: a Ray cluster started by `ray start` runs on this machine at {other}; join it "
            f"with `raysim launch --address {other}`, or stop it with `ray stop` first")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        raise ConfigError("up: Ray's `ray` command is not installed beside this Python")
    cpus = num_cpus or os.cpu_count() or 1
    port = free_port()
    temp_dir = Path(f"/tmp/raysim-up-{os.getuid()}")
    shutil.rmtree(temp_dir, ignore_errors=True)
    state_dir().mkdir(parents=True, exist_ok=True)
    log = state_dir() / "cluster.log"
    command = [ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               # not Ray's one fixed agent port, which another Ray here may hold (`free_port`)
               f"--dashboard-agent-listen-port={free_port()}",
               f"--include-dashboard={'true' if dashboard else 'false'}",
               "--system-config", json.dumps({"preload_python_modules": list(PRELOAD)})]
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    auth = _auth_mode()
    # no draining on SIGTERM (`raysim down`): nothing here needs its work moved elsewhere
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": auth,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"{_host()}:{port}"
    deadline = time.monotonic() + READY_SECONDS
    while not (temp_dir / "ray_current_cluster").is_file() or not _answers(address):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process.pid)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"up: `ray start --head` did not come up ({tail[0].strip()}); "
                              f"its log: {log}")
        time.sleep(0.1)
    head = Head(address, process.pid, str(temp_dir), str(log), cpus,
                time.strftime("%Y-%m-%d %H:%M:%S"), auth)
    record = state_dir() / RECORD
    record.with_suffix(".tmp").write_text(json.dumps(asdict(head)))
    record.with_suffix(".tmp").replace(record)
    return head


def join_settings(head: Head) -> None:
    """What this process needs to join `head`: Ray sends a token only when told to."""
    if head.auth == "token" and os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:  # Ray read its settings when it was imported: again
            try:
                from ray._raylet import Config

                Config.initialize("")
            except (ImportError, AttributeError):
                pass


def _auth_mode() -> str:
    """Token authentication as Ray would choose it for a new cluster: as RAY_AUTH_MODE says,
    else on when this machine has a token."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode in ("token", "disabled"):
        return mode
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
        or (Path.home() / ".ray" / "auth_token").is_file()
    return "token" if has_token else "disabled"


def down() -> Head:
    """Stop the head `raysim up` started (its warm workers with it). ConfigError when none
    runs."""
    head = _recorded()
    if head is None or not process_alive(head.pid):
        (state_dir() / RECORD).unlink(missing_ok=True)
        raise ConfigError("down: no cluster started by `raysim up` is running; nothing to stop")
    _stop(head.pid)
    (state_dir() / RECORD).unlink(missing_ok=True)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return head


def _stop(pid: int, seconds: float = 30.0) -> None:
    """SIGTERM to the `ray start --block` process (it stops what it started, then exits),
    SIGKILL to its whole session if it has not gone by `seconds`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reaped here when this process started it
        except ChildProcessError:  # started by another `raysim` process
            pass
        if not process_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _recorded() -> Head | None:
    """The record, None when missing or unreadable (plain JSON, only the known fields)."""
    try:
        data = json.loads((state_dir() / RECORD).read_text())
        return Head(**{k: data[k] for k in Head.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, ended but not yet reaped by its
    parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: it answered the signal
    return state != "Z"


def _answers(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True


def _ray_start_cluster() -> str | None:
    """The address of a cluster `ray start` recorded for this machine, when it answers."""
    try:
        address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return address if address and _answers(address) else None


def free_port() -> int:
    """A TCP port free on this machine now. Ray's per-node dashboard agent listens on one fixed
    port (52365) unless told another; where another Ray on the machine holds it, the agent
    retries for ~4.5 s before the node counts as started."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _host() -> str:
    """This machine's address as Ray names it (what `ray start` records)."""
    try:
        from ray._private.services import get_node_ip_address

        return get_node_ip_address()
    except Exception:
        return "127.0.0.1"
