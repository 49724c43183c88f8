"""Nothing of an embedded Ray outlives the driver that started it.

`ray.init()` binds the head's processes (GCS server, raylet, monitors) to the driver through the
kernel (PR_SET_PDEATHSIG), but not what the raylet starts: when the driver dies without Ray's
own shutdown (`kill -9`, a second Ctrl-C's immediate exit), the dashboard and runtime-env
agents keep waiting on a GCS that is gone, for minutes. `start` runs this file as a small
process outside the driver's process group that waits for the driver's end (the pipe whose
write end the driver holds reads EOF however it ends; its parent pid changing is the fallback)
and then ends every process of that Ray session: SIGTERM, then SIGKILL.

A process belongs to the session when an option on its command line names the session
directory, or it writes a file there (Ray's processes rename themselves, but their logs are
there; a reader of those logs, `tail -f`, is not one of them). The directory is unique to the
session, so no other Ray on the machine (a `ray start` cluster, another driver's) is touched.
Only the standard library: the process starts in milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL
POLL_SECONDS = 0.5  # how often the fallback looks at the parent pid
PASSES = 3  # a process the raylet started while the first pass ran is found by the next

_running: list[subprocess.Popen] = []


def start(session_dir: str) -> subprocess.Popen:
    """Watch this process: when it ends, however it ends, the processes of the Ray session in
    `session_dir` end too. A watch started before (an earlier session of this process, shut
    down since) sweeps its own session now and exits."""
    for earlier in _running:
        if earlier.stdin is not None:
            earlier.stdin.close()
    _running.clear()
    # the pipe's write end stays here only (close_fds): nothing else keeps it open
    watch = subprocess.Popen(
        [sys.executable, "-S", os.path.abspath(__file__), session_dir, str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # a terminal's Ctrl-C reaches the driver, not the watch
    _running.append(watch)
    return watch


def session_processes(session_dir: str, exclude: set[int] | frozenset[int] = frozenset()
                      ) -> list[int]:
    """Pids of the live processes of the Ray session in `session_dir`."""
    root = os.path.realpath(session_dir)
    named = {os.path.abspath(session_dir).encode(), root.encode()}  # as given, and resolved
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                args = file.read().split(b"\0")
            if any(arg.startswith(b"--") and _names(arg, path) for arg in args for path in named) \
                    or _writes_in(entry, root):
                found.append(int(entry))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _names(arg: bytes, root: bytes) -> bool:
    """Whether a command-line argument names the directory `root` or a path under it."""
    start = arg.find(root)
    while start >= 0:
        end = start + len(root)
        if end == len(arg) or arg[end:end + 1] in (b"/", b",", b" ", b"'", b'"'):
            return True
        start = arg.find(root, start + 1)
    return False


def _writes_in(pid: str, root: str) -> bool:
    """Whether process `pid` holds a file under `root` open for writing."""
    prefix = root + os.sep
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info
                             if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if flags & (os.O_WRONLY | os.O_RDWR):
            return True
    return False


def end_session(session_dir: str, exclude: set[int] | frozenset[int] = frozenset(),
                grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after `grace` seconds;
    returns the pids it signalled."""
    signalled: list[int] = []
    for _ in range(PASSES):
        pids = session_processes(session_dir, exclude)
        if not pids:
            break
        signalled.extend(pids)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = session_processes(session_dir, exclude)
        # looked up again just now: a pid reused by another process is not in the list
        _signal(pids, signal.SIGKILL)
    return sorted(set(signalled))


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:  # already gone
            pass


def watch(session_dir: str, driver: int) -> None:
    """Wait until `driver` ends (EOF on stdin, or a new parent), then end the session."""
    while True:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], POLL_SECONDS)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
        if os.getppid() != driver:
            break
    end_session(session_dir, exclude={os.getpid(), driver})


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(sys.argv[1], int(sys.argv[2]))
