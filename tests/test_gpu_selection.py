"""GPU test selection: `pytest -m gpu` runs every GPU case, and a broken GPU stack fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import gpu

TESTS = Path(__file__).parent
# A GPU parameter value as it appears in a test id: "[torch-cuda]", "[cuda-float32]", "[x-cupy]".
GPU_ID = re.compile(r"[\[-](torch-cuda|jax-gpu|cupy|cuda)[\]-]")


def _collected(*args) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, cwd=TESTS.parent, timeout=300)
    assert result.returncode in (0, 5), result.stdout[-2000:] + result.stderr[-2000:]
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_gpu_marker_selects_every_gpu_parametrised_case():
    files = [str(TESTS / name) for name in ("test_solvers.py", "test_torch_adapter.py")]
    everything = _collected(*files)
    gpu_cases = {test_id for test_id in everything if GPU_ID.search(test_id)}
    assert len(gpu_cases) > 20  # the check has cases to look at
    assert _collected("-m", "gpu", *files) == gpu_cases


def test_the_gpu_marker_selects_every_case_of_the_gpu_files():
    """The GPU-only files (optax, Keras, a world of one with NCCL, bf16 matmuls, auto, CuPy's
    eigh; the torch adapter on CUDA) are selected whole by -m gpu."""
    files = [str(TESTS / name) for name in ("test_gpu_coverage.py", "test_torch_cuda.py")]
    everything = _collected(*files)
    assert any("optax" in test_id for test_id in everything)
    assert any("keras" in test_id for test_id in everything)
    assert _collected("-m", "gpu", *files) == everything


@pytest.fixture
def gpu_machine(monkeypatch):
    """This machine as one with an NVIDIA GPU whose torch cannot use it."""
    monkeypatch.setattr(gpu, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.gpu_backend_problem.cache_clear()
    yield
    gpu.gpu_backend_problem.cache_clear()


def test_a_broken_gpu_stack_fails_instead_of_skipping(gpu_machine):
    with pytest.raises(pytest.fail.Exception, match="torch-cuda: this machine has an NVIDIA GPU but torch"):
        gpu.gpu_available("torch-cuda")


def test_without_a_gpu_the_gpu_backends_are_unavailable(monkeypatch):
    monkeypatch.setattr(gpu, "nvidia_gpu_present", lambda: False)
    assert [gpu.gpu_available(name) for name in ("torch-cuda", "jax-gpu", "cupy")] == [False, False, False]
