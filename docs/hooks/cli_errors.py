"""MkDocs hook: error examples produced by running the command line at build time, so a page
shows the messages raysim prints today.

A page lists the commands between markers:

    <!-- raysim-errors
    raysim launch yaml/quickstart.yaml -o data.partiton.alpha=0.1
    -->

and gets a console block with each command and the line it printed. Every command must be a
user error (exit code 2) that stops before any Ray work; the Ray address is set to a closed
port and the run directory to a temporary one, so a command that does not fail cannot start a
run. One that does not fail as a user error is a warning, which `--strict` turns into a failed
build. The commands run in this process (the configuration reference has imported raysim
already), which keeps the build fast.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import tempfile
from typing import Any

BLOCK = re.compile(r"<!-- raysim-errors\n(?P<commands>.*?)-->", re.DOTALL)
UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens, nothing starts

log = logging.getLogger("mkdocs.hooks.cli_errors")


def error_line(command: str) -> str:
    """What `command` (a `raysim …` line) prints on stderr, run in this process through the
    console script's entry point; ValueError unless it fails as a user error (exit code 2)."""
    from raysim.cli import main

    words = shlex.split(command)
    if words[:1] != ["raysim"]:
        raise ValueError(f"not a raysim command: {command!r}")
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = UNREACHABLE
    stderr = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()):
            extra = ["--run-dir", scratch] if words[1:2] == ["launch"] else []
            code = main([*words[1:], *extra])
    finally:
        if saved is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = saved
    output = stderr.getvalue().strip()
    if code != 2 or UNREACHABLE in output:
        raise ValueError(f"`{command}` is shown as a user error but exited with {code}: "
                         f"{output.splitlines()[-1] if output else '(nothing on stderr)'}")
    return output


def console(commands: list[str]) -> str:
    lines = ["```console"]
    for command in commands:
        try:
            output = error_line(command)
        except ValueError as error:
            log.warning("%s", error)
            output = "(no error)"
        lines += [f"$ {command}", output]
    return "\n".join(lines + ["```"])


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def substitute(match: re.Match) -> str:
        commands = [line.strip() for line in match["commands"].splitlines() if line.strip()]
        return console(commands)

    return BLOCK.sub(substitute, markdown)
