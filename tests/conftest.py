"""Shared test fixtures: the array backends every core test runs on, and per-dtype tolerances.

GPU backends (torch-cuda, jax-gpu, cupy) join when a GPU is present and skip themselves on a
machine without an NVIDIA GPU; on a machine with one, a backend that cannot use it (a CPU-only
build, a missing or broken CUDA library) FAILS its tests, so a broken GPU stack never passes as
skipped. Every GPU case carries the `gpu` marker (`pytest -m gpu` runs them all). CPU backends
never skip (a missing CPU framework is an install error, not a skip).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import os

# Before any test imports JAX: its default takes 75% of GPU memory at the first array, which
# torch and CuPy, on the same GPU in this process, then lack.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np
import pytest

# Parameter values that put a test case on a GPU.
GPU_PARAMETER_VALUES = {"torch-cuda": "torch-cuda", "cuda": "torch-cuda", "jax-gpu": "jax-gpu", "cupy": "cupy"}


@functools.cache
def _nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU, asked of the driver's device files, not of a
    framework (which may be the broken part)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


@functools.cache
def _gpu_backend_problem(name: str) -> str | None:
    """None when backend `name` can use a GPU; otherwise what is wrong with it."""
    try:
        if name == "torch-cuda":
            import torch
            if torch.cuda.is_available():
                return None
            return f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
        if name == "jax-gpu":
            import jax
            if any(d.platform == "gpu" for d in jax.devices()):
                return None
            return f"jax {jax.__version__} sees no GPU (install jax[cuda13])"
        if name == "cupy":
            import cupy
            return None if cupy.cuda.runtime.getDeviceCount() > 0 else "cupy sees no device"
    except Exception as error:  # any failure to start is the finding to report
        return f"{type(error).__name__}: {error}"
    raise ValueError(f"unknown GPU backend {name!r}; accepted: torch-cuda | jax-gpu | cupy")


def _gpu_available(name: str) -> bool:
    """True when GPU backend `name` runs here; False only on a machine without an NVIDIA GPU.
    With a GPU present, a backend that cannot use it fails the calling test."""
    if not _nvidia_gpu_present():
        return False
    problem = _gpu_backend_problem(name)
    if problem is not None:
        pytest.fail(f"{name}: this machine has an NVIDIA GPU but {problem}", pytrace=False)
    return True


def _gpu_backends_of(item) -> set[str]:
    """The GPU backends a collected test case is parametrised with."""
    values = getattr(getattr(item, "callspec", None), "params", {}).values()
    return {GPU_PARAMETER_VALUES[v] for v in values if isinstance(v, str) and v in GPU_PARAMETER_VALUES}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _gpu_backends_of(item):
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any skipif of the test itself: no GPU → skip; a GPU and a broken backend → fail."""
    backends = _gpu_backends_of(item)
    if not backends:
        return
    if not _nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    for name in sorted(backends):
        _gpu_available(name)


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
        pytest.skip(f"{request.param}: no NVIDIA GPU on this machine")
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
