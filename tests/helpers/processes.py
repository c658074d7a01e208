"""Child Python processes that import what this pytest process imports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BENCHMARKS = TESTS.parent / "benchmarks"


def env_importing(*folders: Path, base: dict | None = None) -> dict:
    """`base` (default os.environ) with `folders` first on PYTHONPATH: a child interpreter then
    imports from tests/ or benchmarks/ as pytest does here (tests/conftest.py puts tests/ on the
    path, pyproject.toml's pythonpath benchmarks/)."""
    base = os.environ if base is None else base
    return dict(base, PYTHONPATH=os.pathsep.join(filter(None, [*map(str, folders), base.get("PYTHONPATH")])))


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
