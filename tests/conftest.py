"""Shared test fixtures: the array backends every core test runs on, and per-dtype tolerances.

GPU backends (torch-cuda, jax-gpu, cupy) join when a GPU is present and skip themselves
otherwise; CPU backends never skip (a missing CPU framework is an install error, not a skip).
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest


def _gpu_available(name: str) -> bool:
    try:
        if name == "torch-cuda":
            import torch
            return torch.cuda.is_available()
        if name == "jax-gpu":
            import jax
            return any(d.platform == "gpu" for d in jax.devices())
        if name == "cupy":
            import cupy
            return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
    return False


class Backend:
    """An array namespace plus how to move NumPy data in and out of it."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            import array_api_compat.numpy as xp
        elif name == "array-api-strict":
            xp = importlib.import_module("array_api_strict")
        elif name in ("torch", "torch-cuda"):
            import array_api_compat.torch as xp
        elif name in ("jax", "jax-gpu"):
            import jax.numpy as xp
        elif name == "cupy":
            import array_api_compat.cupy as xp
        self.xp = xp

    def asarray(self, array, dtype: str):
        x = np.asarray(array, dtype=dtype)
        if self.name == "torch-cuda":
            import torch
            return torch.as_tensor(x, device="cuda")
        if self.name == "jax-gpu":
            import jax
            return jax.device_put(x, jax.devices("gpu")[0])
        return self.xp.asarray(x, dtype=getattr(self.xp, dtype))

    def to_numpy(self, x) -> np.ndarray:
        if self.name == "array-api-strict":
            return np.asarray(x._array)
        if self.name in ("torch", "torch-cuda"):
            return x.detach().cpu().numpy()
        if self.name == "cupy":
            return x.get()
        return np.asarray(x)


CPU_BACKENDS = ("numpy", "array-api-strict", "torch", "jax")
GPU_BACKENDS = ("torch-cuda", "jax-gpu", "cupy")


@pytest.fixture(params=CPU_BACKENDS + GPU_BACKENDS)
def backend(request):
    if request.param in GPU_BACKENDS and not _gpu_available(request.param):
        pytest.skip(f"{request.param}: no GPU on this machine")
    if request.param.startswith("jax"):
        with jax_x64():
            yield Backend(request.param)
    else:
        yield Backend(request.param)


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


@pytest.fixture
def xp(backend):
    return backend.xp


def tolerance(dtype: str) -> float:
    """The one relative tolerance per dtype used by parity tests."""
    return {"float64": 1e-10, "float32": 1e-4}[str(dtype)]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))
