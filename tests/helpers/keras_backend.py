"""Keras in the pytest process: its backend is fixed when keras is first imported, by
KERAS_BACKEND; without it Keras would pick TensorFlow, which the adapter does not support.
The shared tables run Keras on torch in process (eager, no compile per case) unless
KERAS_BACKEND says otherwise, and on the other backend in a subprocess (`other_backend_run`)."""

from __future__ import annotations

import os
import subprocess
import sys

BACKENDS = ("torch", "jax")
os.environ.setdefault("KERAS_BACKEND", "torch")


def backend() -> str:
    return os.environ["KERAS_BACKEND"]


def other_backend_run(test_file: str, selection: str) -> tuple[int, str]:
    """pytest on `test_file -k selection` with the other Keras backend, one OpenMP thread, JAX
    with x64:
    (return code, the tail of its output)."""
    other = next(name for name in BACKENDS if name != backend())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         "-rs", test_file, "-k", selection],
        # JAX needs x64 for the float64 cases (Keras' own floatx stays float32)
        env=dict(os.environ, KERAS_BACKEND=other, OMP_NUM_THREADS="1", JAX_ENABLE_X64="1"),
        capture_output=True, text=True,
        timeout=900)
    return result.returncode, (result.stdout + result.stderr)[-6000:]
