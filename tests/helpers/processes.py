"""Child Python processes that import what this pytest process imports."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BENCHMARKS = TESTS.parent / "benchmarks"


def env_importing(*folders: Path, base: dict | None = None) -> dict:
    """`base` (default os.environ) with `folders` first on PYTHONPATH: a child interpreter then
    imports from tests/ or benchmarks/ as pytest does here (tests/conftest.py puts tests/ on the
    path, pyproject.toml's pythonpath benchmarks/)."""
    base = os.environ if base is None else base
    return dict(base, PYTHONPATH=os.pathsep.join(filter(None, [*map(str, folders), base.get("PYTHONPATH")])))
