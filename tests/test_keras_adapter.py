"""asgo_core.adapters.keras on both Keras backends it supports, in one pytest run.

Keras fixes its backend when it is imported, so each backend's tests (tests/keras_cases.py)
run in a subprocess of their own with KERAS_BACKEND set; a failure there fails this test with
that run's output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = os.path.join(os.path.dirname(__file__), "keras_cases.py")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_adapter_on_backend(backend):
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         "-rs", CASES], env=env, capture_output=True, text=True, timeout=540)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-6000:]
