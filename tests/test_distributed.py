"""Distributed training on this CPU: torch (gloo, 2 and 4 processes launched torchrun-style)
and JAX (4 host devices in a subprocess), each against the single-process optimizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed_worker as worker
from asgo_core.adapters.torch import ASGO
from asgo_core.adapters.torch_distributed import assign_owners, parameter_cost

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, world_size: int, out_dir) -> list[dict]:
    """Run `world_size` worker processes (as torchrun would) and load what each rank saved."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, WORKER, mode, str(out_dir)],
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world_size)]
    try:
        outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def single_process_replay(grads_per_step: list[dict], options=worker.OPTIONS, reload_at=None):
    """The plain ASGO on the gradients the distributed run saw (with a state_dict reload)."""
    model = worker.make_model()
    params = dict(model.named_parameters())
    optimizer = ASGO(worker.make_param_groups(model), **options)
    for step, grads in enumerate(grads_per_step):
        if step == reload_at:
            saved = optimizer.state_dict()
            optimizer = ASGO(worker.make_param_groups(model), **options)
            optimizer.load_state_dict(saved)
        for name, grad in grads.items():
            params[name].grad = grad
        optimizer.step()
    state_by_name = {name: optimizer.state.get(p) for name, p in params.items()}
    return {name: p.detach() for name, p in params.items()}, optimizer.state_dict(), state_by_name


def assert_same(actual, expected, where="state"):
    """Bitwise equality of nested state (tensors by torch.equal, dtype included)."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_owners_balance_cost_deterministically():
    costs = [parameter_cost(torch.empty(64, 256), "asgo"), parameter_cost(torch.empty(64, 256), "asgo"),
             parameter_cost(torch.empty(16, 16), "asgo"), parameter_cost(torch.empty(1000), "adamw")]
    assert costs[0] == 4 * 64 * 256 * 64 + 64 ** 3
    assert assign_owners(costs, 2) == [0, 1, 0, 1]  # equal loads: the lower rank
    assert assign_owners(costs, 8) == [0, 1, 2, 3]  # more ranks than items: some own nothing


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_owner_split_equals_single_process_bitwise(world_size, tmp_path):
    ranks = launch("ddp", world_size, tmp_path)
    grads = ranks[0]["grads"]
    assert grads[0]["unused.weight"] is None and grads[0]["rank0_only.weight"] is not None
    owners = {name: rank for rank, saved in enumerate(ranks) for name in saved["owned"]}
    assert sorted(owners) == sorted(ranks[0]["params"]) and len(set(owners.values())) == world_size
    expected_params, expected_state, _ = single_process_replay(grads, reload_at=worker.RELOAD_AT_STEP)
    for rank, saved in enumerate(ranks):
        assert_same(saved["grads"], grads, f"rank {rank} grads")  # DDP gave every rank the same
        assert_same(saved["params"], expected_params, f"rank {rank} params")
        assert_same(saved["state_dict"], expected_state, f"rank {rank} state_dict")


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_equals_single_process(world_size, tmp_path):
    """Gathered buckets (rows preconditioned, head blocks) and AdamW are bitwise; the sharded
    Gram sums per-rank partial Grams, so those matrices agree to float32 rounding."""
    ranks = launch("fsdp", world_size, tmp_path)
    grads = ranks[0]["grads"]
    expected_params, _, expected_state = single_process_replay(grads, worker.FSDP_OPTIONS)
    sharded = ranks[0]["sharded_gram_state"]
    assert {"blocks.0.v_proj.weight", "blocks.0.fc1.weight", "head.weight"} <= set(sharded)
    assert "blocks.0.fc2.weight" not in sharded and "blocks.0.q_proj.weight" not in sharded
    for rank, saved in enumerate(ranks):
        for name in expected_params:
            difference = (saved["params"][name] - expected_params[name]).abs().max().item()
            if name in sharded:
                assert difference < 1e-5, (rank, name, difference)
            else:
                assert difference == 0.0, (rank, name, difference)
        for name, state in saved["sharded_gram_state"].items():
            rows = expected_params[name].shape[0] // world_size
            assert state["momentum"].shape[0] == rows  # momentum stays sharded like the weight
            expected_gram = expected_state[name]["gram"][0][0]  # block group 0, block 0
            torch.testing.assert_close(state["gram"], expected_gram, rtol=1e-5, atol=1e-6)


def test_jax_sharded_over_a_mesh_equals_unsharded():
    script = os.path.join(os.path.dirname(__file__), "jax_sharded_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    assert report["moved"] > 0.1  # the runs trained: the comparison below is not trivial
    assert report["param_difference"] < 5e-5 and report["state_difference"] < 5e-4
    assert report["param_specs"] == {"w_in": "P(None, 'model')", "b_in": "P('model',)",
                                     "w_mid": "P('model',)", "w_out": "P(None, 'model')",
                                     "w_out2": "P(None, 'model')"}
    momentum = [spec for path, spec in report["state_specs"].items() if path.endswith("momentum")]
    grams = [spec for path, spec in report["state_specs"].items() if "gram" in path or "root" in path]
    assert momentum and all("'model'" in spec for spec in momentum)  # sharded like the params
    assert grams and all(spec == "P()" for spec in grams)            # k×k: replicated
