"""The command line and cluster operations: `raysim launch|resume|config|tune|submit|logs|status`,
joining a cluster, Ray Jobs."""

from raysim.cli.main import main

__all__ = ["main"]
