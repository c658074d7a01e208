"""asgo_core.adapters.keras on both Keras backends it supports, in one pytest run.

Keras fixes its backend when it is imported, so each backend's tests (tests/keras_cases.py)
run in a subprocess of their own with KERAS_BACKEND set; a failure there fails this test with
that run's output. Both subprocesses start together, one OpenMP thread each (LAPACK's threads
spin against each other on a busy two-core machine: a 64×64 eigh took 117 ms with two threads
here, 1 ms with one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = os.path.join(os.path.dirname(__file__), "keras_cases.py")
BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    """backend → (process, path of its output), all started at once; stopped if left running."""
    runs = {}
    for backend in BACKENDS:
        log = tmp_path_factory.mktemp("keras") / f"{backend}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                 "ignore::DeprecationWarning", "-rs", CASES],
                env=dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1"), stdout=out,
                stderr=subprocess.STDOUT)
        runs[backend] = (process, log)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_adapter_on_backend(backend, backend_runs):
    process, log = backend_runs[backend]
    returncode = process.wait(timeout=540)
    output = log.read_text()
    assert returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-6000:]
