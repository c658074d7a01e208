"""The parts of the GPU paths a CPU can run: the bf16 Gram's float32 accumulation, `auto` from a
timing table, a multi-device JAX array's device, and the JAX memory setting of the GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from asgo_core.backends import torch as torch_backend
from helpers.processes import BENCHMARKS, TESTS, env_importing

ROOT = Path(__file__).resolve().parents[1]


def test_a_bfloat16_gram_is_summed_and_returned_in_float32():
    """Each product of two bf16 values is exact in float32; a bf16 result would round every
    Gram increment to 8 significant bits (relative error ~1e-3 on 512 terms)."""
    G = torch.randn(3, 8, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    V = torch.zeros(3, 8, 8)
    gram = torch_backend.gram_update(V, G, 0.0, 1.0)
    exact = G.double() @ G.double().mT
    assert gram.dtype == torch.float32
    assert float((gram.double() - exact).norm() / exact.norm()) < 1e-6


def test_a_bfloat16_gram_keeps_decay_and_weight():
    G = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    V = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2))
    wide = G.double()
    expected = 0.9 * V.double() + 0.1 * (wide @ wide.mT)
    torch.testing.assert_close(torch_backend.gram_update(V, G, 0.9, 0.1).double(), expected,
                               rtol=1e-6, atol=1e-6)


TIMINGS = {64: {"eigh": 0.5, "polar_express": 2.0}, 384: {"eigh": 30.0, "polar_express": 4.0},
           4096: {"eigh": 900.0, "polar_express": 60.0}}


@pytest.mark.parametrize("k, expected", [(16, "eigh"), (100, "eigh"), (200, "polar_express"),
                                         (384, "polar_express"), (8192, "polar_express")])
def test_auto_picks_the_faster_method_at_the_nearest_measured_size(k, expected):
    assert torch_backend.fastest_root_method(k, TIMINGS) == expected


def test_auto_on_cuda_follows_the_timing_table_and_the_cpu_keeps_eigh(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch_backend, "CUDA_ROOT_TIMINGS_MS", TIMINGS)
    assert torch_backend.choose_root_method(384, torch.float32, cuda) == "polar_express"
    assert torch_backend.choose_root_method(64, torch.float32, cuda) == "eigh"
    assert torch_backend.choose_root_method(4096, torch.float32, torch.device("cpu")) == "eigh"


def test_auto_on_cuda_without_measurements_leaves_eigh_above_batched_jacobi_sizes(monkeypatch):
    monkeypatch.setattr(torch_backend, "CUDA_ROOT_TIMINGS_MS", {})
    cuda = torch.device("cuda")
    assert torch_backend.choose_root_method(32, torch.float32, cuda) == "eigh"
    assert torch_backend.choose_root_method(100, torch.float32, cuda) == "polar_express"
    assert torch_backend.choose_root_method(384, torch.float32, cuda) == "polar_express"


SHARDED = textwrap.dedent("""
    import json
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from asgo_core import _xp, inverse_root
    from asgo_core.backends import jax as backend
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 16, 24))
    A = G @ np.swapaxes(G, -1, -2)
    mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("batch",))
    sharded = jax.device_put(A, NamedSharding(mesh, P("batch")))
    values, _ = backend.eigh(sharded)
    root = inverse_root(sharded, method="auto")
    print(json.dumps({"devices": len(sharded.devices()),
                      "device": type(_xp.device(sharded)).__name__,
                      "choice": backend.choose_root_method(16, sharded.dtype, _xp.device(sharded)),
                      "eigenvalues": float(np.max(np.abs(np.asarray(values) - np.linalg.eigvalsh(A)))),
                      "root": float(np.max(np.abs(np.asarray(root) - np.asarray(inverse_root(A)))))}))
""")


def test_an_array_on_two_devices_reports_a_sharding_and_still_finds_its_platform():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["devices"] == 2 and found["device"].endswith("Sharding")
    assert found["choice"] == "eigh"  # the CPU platform's choice
    assert found["eigenvalues"] < 1e-9 and found["root"] < 1e-12


@pytest.mark.parametrize("module, folder", [("conftest", TESTS), ("gpu_check", BENCHMARKS)])
def test_the_gpu_runs_keep_jax_from_preallocating_gpu_memory(module, folder):
    """torch, JAX and CuPy share the GPU in one process; JAX's default takes 75% of it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    code = f"import os, {module}; print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env_importing(folder, base=env), cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "false"


