"""Shared test fixtures: the array backends every core test runs on, and per-dtype tolerances.

GPU backends (torch-cuda, jax-gpu, cupy) join when a GPU is present and skip themselves on a
machine without an NVIDIA GPU; on a machine with one, a backend that cannot use it (a CPU-only
build, a missing or broken CUDA library) FAILS its tests, so a broken GPU stack never passes as
skipped. Every GPU case carries the `gpu` marker (`pytest -m gpu` runs them all). CPU backends
never skip (a missing CPU framework is an install error, not a skip).
"""

from __future__ import annotations

import importlib
import os

# Before any test imports JAX: its default takes 75% of GPU memory at the first array, which
# torch and CuPy, on the same GPU in this process, then lack.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np
import pytest
from helpers.gpu import gpu_available, nvidia_gpu_present
from helpers.gpu_install import start_resolution
from helpers.numerics import jax_x64

# Parameter values that put a test case on a GPU.
GPU_PARAMETER_VALUES = {"torch-cuda": "torch-cuda", "cuda": "torch-cuda", "jax-gpu": "jax-gpu", "cupy": "cupy"}


def _gpu_backends_of(item) -> set[str]:
    """The GPU backends a collected test case is parametrised with."""
    values = getattr(getattr(item, "callspec", None), "params", {}).values()
    return {GPU_PARAMETER_VALUES[v] for v in values if isinstance(v, str) and v in GPU_PARAMETER_VALUES}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _gpu_backends_of(item):
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    """A selected install check resolves in the background while the other tests run."""
    if not session.config.option.collectonly and any(
            item.get_closest_marker("install") for item in session.items):
        start_resolution()


def pytest_runtest_setup(item):
    """Before any skipif of the test itself: no GPU → skip; a GPU and a broken backend → fail."""
    backends = _gpu_backends_of(item)
    if not backends:
        return
    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    for name in sorted(backends):
        gpu_available(name)


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
    if request.param in GPU_BACKENDS and not gpu_available(request.param):
        pytest.skip(f"{request.param}: no NVIDIA GPU on this machine")
    if request.param.startswith("jax"):
        with jax_x64():
            yield Backend(request.param)
    else:
        yield Backend(request.param)


@pytest.fixture
def xp(backend):
    return backend.xp
