"""Numerical helpers of the parity tests: JAX float64 for one test, tolerances, relative errors."""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def jax_x64():
    """Enable JAX float64 for one test only, restoring the previous setting afterwards."""
    import jax
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def tolerance(dtype: str) -> float:
    """The one relative tolerance per dtype used by parity tests."""
    return {"float64": 1e-10, "float32": 1e-4}[str(dtype)]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))
