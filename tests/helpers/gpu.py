"""Whether a GPU backend runs here (the conftest's GPU selection and tests that add GPU runs)."""

from __future__ import annotations

import functools
import glob

import pytest


@functools.cache
def nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU, asked of the driver's device files, not of a
    framework (which may be the broken part)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


@functools.cache
def gpu_backend_problem(name: str) -> str | None:
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


def gpu_available(name: str) -> bool:
    """True when GPU backend `name` runs here; False only on a machine without an NVIDIA GPU.
    With a GPU present, a backend that cannot use it fails the calling test."""
    if not nvidia_gpu_present():
        return False
    problem = gpu_backend_problem(name)
    if problem is not None:
        pytest.fail(f"{name}: this machine has an NVIDIA GPU but {problem}", pytrace=False)
    return True
