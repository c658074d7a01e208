"""benchmarks/gpu_check.py's own checks, on the CPU: its float32 parity catches TF32 and a
fallback that fired, and its timings take several runs after compiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpu_check  # benchmarks/ (pyproject.toml: pytest's pythonpath)
import harness
from asgo_core.backends import torch as torch_backend

TF32_DROPPED_BITS = 13  # float32 keeps 23 fraction bits, TF32 10


def _tf32(x):
    """x rounded to the nearest TF32 value (what a TF32 tensor core reads), as float32."""
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32):
        return x
    bits = x.contiguous().view(torch.int32)
    half, mask = 1 << (TF32_DROPPED_BITS - 1), -(1 << TF32_DROPPED_BITS)
    return torch.bitwise_and(bits + half, mask).view(torch.float32)


@pytest.fixture
def tf32_matmuls(monkeypatch):
    """Every torch GEMM the core reaches takes TF32-rounded float32 inputs, as with
    torch.backends.cuda.matmul.allow_tf32 = True on a GPU."""
    for name in ("matmul", "bmm", "baddbmm"):
        exact = getattr(torch, name)
        rounded = lambda *args, exact=exact, **kwargs: exact(*map(_tf32, args), **kwargs)  # noqa: E731
        monkeypatch.setattr(torch, name, rounded)


@pytest.fixture(scope="module")
def problem():
    start, grads = gpu_check.parity_problem()
    reference = gpu_check.run_core(start, grads, gpu_check.parity_config("eigh"), lambda a: a)
    return reference, start, grads


def _float32_parity(problem):
    target = gpu_check.Target("torch-cpu", torch, "cpu")
    reference, start, grads = problem
    error = lambda: gpu_check.parity_error(target, "eigh", "float32", reference, start, grads)  # noqa: E731
    return gpu_check.checked(error, gpu_check.TOLERANCE["float32"])


def test_float32_parity_passes_in_float32(problem):
    assert _float32_parity(problem)["passed"]


def test_float32_parity_fails_on_tf32_matmul_inputs(problem, tf32_matmuls):
    record = _float32_parity(problem)
    assert record["error"] > gpu_check.TOLERANCE["float32"]
    assert not record["passed"]


def test_parity_fails_when_a_fallback_fired(problem, monkeypatch):
    """An eigh that fails every float32 matrix: the float64 retry gives accurate roots, so only
    the fallback count shows it."""
    exact = torch_backend.eigh

    def failing_in_float32(A):
        values, vectors = exact(A)
        return (values, vectors * torch.nan) if A.dtype == torch.float32 else (values, vectors)

    monkeypatch.setattr(torch_backend, "eigh", failing_in_float32)
    record = _float32_parity(problem)
    assert not record["passed"] and "fallbacks" in record["verdict"]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _NoWait:
    def synchronize(self, result):
        pass


def test_a_slow_cell_still_gets_three_timed_runs(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)

    def six_seconds():
        clock.now += 6.0

    figures = gpu_check.timed(_NoWait(), six_seconds)
    assert figures["repeats"] == 3 and figures["median_ms"] == 6000.0 and figures["warmup_s"] == 6.0


def test_compilation_is_timed_apart_from_the_runs(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)

    def run(x):
        clock.now += 0.5
        return x

    class Jitted:
        def lower(self, *args):
            return self

        def compile(self):
            clock.now += 30.0
            return run

    figures = gpu_check.timed(_NoWait(), Jitted(), np.ones(2))
    assert figures["compile_s"] == 30.0 and figures["warmup_s"] == 0.5
    assert figures["repeats"] == 3 and figures["median_ms"] == 500.0


def test_a_cell_over_its_budget_stops_after_the_warm_up(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    calls = []

    def slow():
        calls.append(1)
        clock.now += gpu_check.CELL_BUDGET_S + 1

    figures = gpu_check.timed(_NoWait(), slow)
    assert figures["over_budget"] and figures["repeats"] == 0 and len(calls) == 1
