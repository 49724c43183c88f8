"""Ray Jobs: submit a run to a cluster's job server (the dashboard address, port 8265 by
default), follow its logs, ask its status. The project folder is shipped as the job's
`working_dir`, so the cluster runs exactly this code; every node still needs raysim's
dependencies installed (see yaml/cluster/)."""

from __future__ import annotations

import asyncio
import secrets
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from raysim.config import ConfigError
from raysim.engine.cluster import AUTH_HELP

# Never uploaded: environments, outputs, VCS data and datasets (the cluster has its own).
# Gitignore patterns; a leading / anchors at the project root (raysim/data/ is code).
WORKING_DIR_EXCLUDES = ["/.venv", "/runs", "/wandb", "/.git", "/data", "__pycache__",
                        ".pytest_cache", ".ruff_cache", "*.egg-info"]
FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def launch_entrypoint(config_path: str, overrides: Sequence[str], run_dir: str | None,
                      python: str = "python") -> str:
    """The job's command: `raysim launch` of the config (a path inside the project)."""
    root = project_root()
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"raysim submit ships the project folder, but raysim runs from {root}; "
                          "install it from a checkout (pip install -e .)")
    path = Path(config_path).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(f"{config_path}: the config must lie inside {root}, which is shipped "
                          "to the cluster as the job's working directory")
    command = [python, "-m", "raysim.cli", "launch", path.relative_to(root).as_posix()]
    for override in overrides:
        command += ["-o", override]
    if run_dir:
        command += ["--run-dir", run_dir]
    return shlex.join(command)


def submit(config_path: str, overrides: Sequence[str], address: str | None,
           run_dir: str | None = None, python: str = "python") -> str:
    """Validate the config here, submit it as a Ray job; returns the job's submission id."""
    from raysim.run.validate import load_config

    config = load_config(config_path, overrides)
    entrypoint = launch_entrypoint(config_path, overrides, run_dir, python)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    job_id = f"raysim_{config.name}_{stamp}_{secrets.token_hex(2)}"
    client = job_client(address)
    return _call(address, client.submit_job, entrypoint=entrypoint, submission_id=job_id,
                 runtime_env={"working_dir": str(project_root()),
                              "excludes": WORKING_DIR_EXCLUDES},
                 metadata={"raysim_config": config_path, "raysim_name": config.name})


def status(job_id: str, address: str | None) -> dict[str, Any]:
    info = _call(address, job_client(address).get_job_info, job_id)
    return {"status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "entrypoint": info.entrypoint}


def logs(job_id: str, address: str | None) -> str:
    return _call(address, job_client(address).get_job_logs, job_id)


def follow_logs(job_id: str, address: str | None, out=None) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    out = out or sys.stdout
    client = job_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _call(address, asyncio.run, tail())
    return status(job_id, address)["status"]


def job_client(address: str | None):
    """A client for the job server at `address` (http://HEAD:8265; default:
    RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as Ray's own `ray job` CLI)."""
    from ray.job_submission import JobSubmissionClient

    return _call(address, JobSubmissionClient, address)


def _call(address: str | None, function, *args, **kwargs):
    """Run a job-server call; connection and authentication failures become ConfigError."""
    from ray.exceptions import AuthenticationError


    where = address or "the default job server address"
    try:
        return function(*args, **kwargs)
    except AuthenticationError:
        raise ConfigError(f"the Ray job server at {where} requires token authentication and "
                          f"rejected this process: {AUTH_HELP}") from None
    except ConnectionError as error:
        raise ConfigError(f"cannot reach a Ray job server at {where} ({error}); give the "
                          "dashboard address, e.g. --address http://HEAD:8265") from None
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConfigError(f"Ray job server at {where}: {first}") from None
