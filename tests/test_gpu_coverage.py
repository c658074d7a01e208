"""GPU cases beyond the core's parametrised tests and tests/test_torch_cuda.py: the optax and
Keras adapters on a GPU, DistributedASGO and FSDPASGO on a world of one with NCCL, the bf16
Gram's float32 accumulation, `root_method="auto"` where it switches to the iteration, and CuPy's
batched eigh. Every case carries the gpu marker and skips without an NVIDIA GPU (see conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asgo_core import ASGOConfig, init_state, step
from asgo_core.adapters.torch import ASGO
from helpers.gpu import gpu_available
from helpers.numerics import jax_x64, relative_error
from helpers.processes import free_port

pytestmark = pytest.mark.gpu
TESTS = Path(__file__).resolve().parent


def _require(name):
    if not gpu_available(name):
        pytest.skip("no NVIDIA GPU on this machine")


# ------------------------------------------------------------------ optax and Keras on a GPU

def _optax_run(device, steps=6):
    import jax
    import optax

    from asgo_core.adapters.optax import asgo
    rng = np.random.default_rng(0)
    shapes = {"w": (24, 40), "v": (3, 16, 8), "b": (24,)}
    params = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(steps)]
    params = jax.device_put(params, device)
    tx = asgo(1e-2, precondition_frequency=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.device_put(g, device), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_optax_adapter_on_the_gpu_matches_the_cpu_in_float64():
    _require("jax-gpu")
    import jax
    with jax_x64():
        on_gpu = _optax_run(jax.devices("gpu")[0])
        on_cpu = _optax_run(jax.devices("cpu")[0])
        assert {d.platform for leaf in jax.tree.leaves(on_gpu) for d in leaf.devices()} == {"gpu"}
        for name in on_cpu:
            assert relative_error(on_gpu[name], on_cpu[name]) < 1e-10, name


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_keras_adapter_cases_on_the_gpu(keras_backend):
    """tests/keras_cases.py with the Keras backend on its default device, the GPU."""
    _require("jax-gpu" if keras_backend == "jax" else "torch-cuda")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         "-rs", str(TESTS / "keras_cases.py")],
        env=dict(os.environ, KERAS_BACKEND=keras_backend), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


# ------------------------------------------------- DistributedASGO and FSDPASGO, NCCL, world 1

STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 8))


def _batch(device):
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(32, 16, generator=generator), torch.randn(32, 8, generator=generator)
    return inputs.to(device), targets.to(device)


def _train(model, optimizer, device):
    inputs, targets = _batch(device)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _world_of_one(rank: int, port: int, kind: str, out_path: str):
    import torch.distributed as dist

    from asgo_core.adapters.torch_distributed import DistributedASGO, FSDPASGO
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model().cuda()
        if kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            fully_shard(model, mesh=init_device_mesh("cuda", (1,)))
            optimizer = FSDPASGO(model.parameters(), lr=0.05, precondition_frequency=2)
        else:
            optimizer = DistributedASGO(model.parameters(), lr=0.05, precondition_frequency=2)
        _train(model, optimizer, "cuda")
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        torch.save([p.detach().cpu() for p in params], out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["distributed", "fsdp"])
def test_a_world_of_one_with_nccl_matches_single_process_asgo(kind, tmp_path):
    _require("torch-cuda")
    out_path = str(tmp_path / "params.pt")
    torch.multiprocessing.spawn(_world_of_one, args=(free_port(), kind, out_path), nprocs=1)
    single = _model().cuda()
    _train(single, ASGO(single.parameters(), lr=0.05, precondition_frequency=2), "cuda")
    for expected, actual in zip(single.parameters(), torch.load(out_path)):
        torch.testing.assert_close(actual, expected.detach().cpu(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ matmul_dtype="bfloat16"

def test_the_bf16_gram_on_cuda_is_a_float32_gemm_output():
    _require("torch-cuda")
    from asgo_core.backends import torch as torch_backend
    G = torch.randn(3, 8, 512, device="cuda").to(torch.bfloat16)
    gram = torch_backend.gram_update(torch.zeros(3, 8, 8, device="cuda"), G, 0.0, 1.0)
    exact = G.double() @ G.double().mT
    assert gram.dtype == torch.float32
    assert float((gram.double() - exact).norm() / exact.norm()) < 1e-6


def test_bf16_matmuls_train_on_cuda_with_float32_statistics():
    _require("torch-cuda")
    model = _model().cuda()
    optimizer = ASGO(model.parameters(), lr=0.05, matmul_dtype="bfloat16")
    inputs, targets = _batch("cuda")
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = optimizer.state[model[0].weight]
    assert state["gram"] and all(gram.dtype == torch.float32 for gram in state["gram"])


def test_bf16_matmuls_with_optax_on_the_gpu_stay_close_to_float32():
    _require("jax-gpu")
    import jax
    import jax.numpy as jnp

    from asgo_core.adapters.optax import asgo
    device = jax.devices("gpu")[0]
    rng = np.random.default_rng(3)
    params = jax.device_put({"w": rng.standard_normal((64, 96)).astype(np.float32)}, device)
    grads = jax.device_put({"w": rng.standard_normal((64, 96)).astype(np.float32)}, device)
    updates = {}
    for dtype in (None, "bfloat16"):
        tx = asgo(1e-2, matmul_dtype=dtype)
        updates[dtype], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert updates["bfloat16"]["w"].dtype == jnp.float32
    assert 0 < relative_error(updates["bfloat16"]["w"], updates[None]["w"]) < 5e-2


# ------------------------------------------------------------------ root_method="auto"

def _core_update(W, G, method):
    config = ASGOConfig(root_method=method, weight_decay=0.0)
    update, _ = step(G, init_state(W, config), W, config, refresh_root=True)
    return update


@pytest.mark.parametrize("k", [16, 600])
def test_auto_on_cuda_takes_the_method_the_backend_chooses(k):
    _require("torch-cuda")
    from asgo_core.backends import torch as torch_backend
    generator = torch.Generator().manual_seed(k)
    W, G = (torch.randn(k, 2 * k, generator=generator).cuda() for _ in range(2))
    chosen = torch_backend.choose_root_method(k, torch.float32, W.device)
    assert torch.equal(_core_update(W, G, "auto"), _core_update(W, G, chosen))
    other = "eigh" if chosen == "polar_express" else "polar_express"
    assert not torch.equal(_core_update(W, G, "auto"), _core_update(W, G, other))


def test_auto_on_the_jax_gpu_switches_to_the_iteration_at_256():
    _require("jax-gpu")
    import jax
    device = jax.devices("gpu")[0]
    rng = np.random.default_rng(5)
    W, G = (jax.device_put(rng.standard_normal((300, 600)).astype(np.float32), device) for _ in range(2))
    update = jax.jit(lambda W, G, method: _core_update(W, G, method), static_argnums=2)
    assert np.array_equal(np.asarray(update(W, G, "auto")), np.asarray(update(W, G, "polar_express")))


# ------------------------------------------------------------------ CuPy's batched eigh

@pytest.mark.parametrize("k, batch", [(100, 50), (384, 6), (64, 1)])
def test_cupy_eigh_decomposes_a_batch_in_one_call_and_passes_its_residual_check(k, batch):
    _require("cupy")
    import cupy

    from asgo_core.backends import cupy as cupy_backend
    rng = np.random.default_rng(k)
    G = rng.standard_normal((batch, k, k // 2)).astype(np.float32)
    A = G @ np.swapaxes(G, -1, -2)
    values, vectors = cupy_backend.eigh(cupy.asarray(A))
    values, vectors = values.get(), vectors.get()
    assert np.isfinite(vectors).all()
    expected = np.linalg.eigvalsh(A.astype(np.float64))
    # a backward-stable eigensolver: |δλ| ≤ c·k·eps·‖A‖₂, here c = 10 (batched Jacobi at
    # k = 384 measured 0.45 of it on an H100; a failed solve is off by far more, or NaN)
    bound = 10 * k * float(np.finfo(np.float32).eps) * np.max(np.abs(expected))
    assert np.max(np.abs(values - expected)) <= bound


def test_torch_and_cupy_share_the_gpu_through_dlpack():
    _require("cupy")
    _require("torch-cuda")
    import cupy
    tensor = torch.randn(4, 32, 32, device="cuda")
    assert torch.equal(torch.from_dlpack(cupy.from_dlpack(tensor) * 2), tensor * 2)

