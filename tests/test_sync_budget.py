"""The host-synchronisation budget of a core step on a GPU backend, counted on the CPU.

On CUDA every read of a tensor's value on the host (bool(), float(), int(), .item(), .tolist())
waits for the queued kernels, and a tensor made from a Python scalar is a blocking host→device
copy. The torch backend reads masks only where that is free (on the CPU); these tests make it
take its CUDA path (`_mask_is_free_to_read` → False) and count both kinds of event through the
torch tensor API, so the budget stated in docs/gpu.md is enforced without a GPU:

    non-refresh step: 0 host reads;
    refresh step: one read per fallback level that can run, per block group (`run_if`):
        2 for an iterative root of float32 statistics (eigh, then eigh in float64),
        1 for eigh (float64 retry) or an iterative root of float64 statistics, 0 for eigh in float64;
    nonfinite="raise": 1 more read per step; no host→device copy of a Python scalar, ever.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asgo_core import ASGOConfig, DASGOConfig, init_state, step
from asgo_core.backends import torch as torch_backend

READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")
SCALAR_TYPES = (bool, int, float, complex)


class Recorder:
    """Host reads of tensor values and tensors built from Python scalars, by name."""

    def __init__(self):
        self.reads: list[str] = []
        self.scalar_copies: list[str] = []


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(torch_backend, "_mask_is_free_to_read", lambda mask: False)
    record = Recorder()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            record.reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("asarray", "as_tensor", "tensor", "scalar_tensor"):
        original = getattr(torch, name)

        def built(data, *args, _name=name, _original=original, **kwargs):
            if isinstance(data, SCALAR_TYPES):
                record.scalar_copies.append(_name)
            return _original(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, built)
    return record


def test_the_recorder_sees_reads_and_scalar_copies(recorder):
    x = torch.ones(2)
    bool(x[0]), float(x[1]), x.sum().item()
    torch.asarray(1.0)
    assert recorder.reads == ["__bool__", "__float__", "item"]
    assert recorder.scalar_copies == ["asarray"]


def _run_steps(config, dtype, refreshes, shape=(2, 12, 20)):
    """A refresh step to start, then one step per entry of `refreshes`; returns the counts of
    the later steps only (the first step's state creation is not a step)."""
    rng = np.random.default_rng(40)
    W = torch.as_tensor(rng.standard_normal(shape), dtype=dtype)
    state = init_state(W, config)
    _, state = step(torch.as_tensor(rng.standard_normal(shape), dtype=dtype), state, W, config,
                    refresh_root=True)
    return W, state, [torch.as_tensor(rng.standard_normal(shape), dtype=dtype) for _ in refreshes]


# (root_method, statistics dtype) → host reads per block group on a refresh step
REFRESH_READS = {
    ("eigh", torch.float32): 1,
    ("eigh", torch.float64): 0,
    ("polar_express", torch.float32): 2,
    ("coupled_newton", torch.float32): 2,
    ("newton_schulz", torch.float64): 1,
}


@pytest.mark.parametrize("method, dtype", list(REFRESH_READS))
def test_host_reads_per_step_stay_within_the_budget(recorder, method, dtype):
    # max_precond_dim 5 splits the 12 rows into two block groups (sizes 5 and 2)
    config = ASGOConfig(root_method=method, max_precond_dim=5, precondition_frequency=2)
    W, state, grads = _run_steps(config, dtype, refreshes=(False, True))
    groups = len(state.gram)
    assert groups == 2
    counts = []
    for refresh, G in zip((False, True), grads):
        recorder.reads.clear()
        _, state = step(G, state, W, config, refresh_root=refresh)
        counts.append(len(recorder.reads))
    assert counts == [0, REFRESH_READS[(method, dtype)] * groups]
    assert recorder.scalar_copies == []


def test_nonfinite_raise_adds_one_read_per_step(recorder):
    config = ASGOConfig(nonfinite="raise")
    W, state, grads = _run_steps(config, torch.float32, refreshes=(False,))
    recorder.reads.clear()
    step(grads[0], state, W, config, refresh_root=False)
    assert len(recorder.reads) == 1


def test_dasgo_steps_read_nothing(recorder):
    config = DASGOConfig()
    W, state, grads = _run_steps(config, torch.float32, refreshes=(False, False))
    recorder.reads.clear()
    for G in grads:
        _, state = step(G, state, W, config)
    assert recorder.reads == []
    assert recorder.scalar_copies == []


def test_a_skipped_matrix_costs_no_extra_read(recorder):
    """A NaN gradient in one matrix of the stack is masked on the device, not branched on."""
    config = ASGOConfig(root_method="eigh", precondition_frequency=2)
    W, state, grads = _run_steps(config, torch.float32, refreshes=(False,))
    grads[0][1, 0, 0] = float("nan")
    recorder.reads.clear()
    _, state = step(grads[0], state, W, config, refresh_root=False)
    assert recorder.reads == []
    assert state.skipped.tolist() == [0, 1]
