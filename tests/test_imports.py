"""The core stays framework-free, and the raw folders never install as top-level modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_numpy_step_imports_no_framework():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import asgo_core
        from asgo_core import ASGOConfig, init_state, inverse_root, step
        W = np.ones((3, 4))
        update, state = step(np.arange(12.0).reshape(3, 4), init_state(W, ASGOConfig()), W, ASGOConfig())
        assert np.all(np.isfinite(update))
        inverse_root(np.eye(3), method="polar_express")
        loaded = [name for name in ("torch", "jax", "cupy", "optax", "backends", "adapters")
                  if name in sys.modules]
        print(",".join(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_backends_and_adapters_install_under_asgo_core():
    script = textwrap.dedent("""
        import sys
        import asgo_core.backends, asgo_core.adapters
        print(asgo_core.backends.__name__, asgo_core.adapters.__name__)
        print("backends" in sys.modules, "adapters" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd="/")
    assert result.stdout.splitlines() == ["asgo_core.backends asgo_core.adapters", "False False"]
