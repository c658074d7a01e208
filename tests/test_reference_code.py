"""ASGO with the reference options takes the reference code's steps (benchmarks/reference_asgo.py:
the authors' optimizer as written there, one matrix at a time, the PolarExpress root)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asgo_core.adapters.torch import ASGO
from helpers.numerics import relative_error, tolerance
from reference_asgo import REFERENCE_OPTIONS, ReferenceStyleASGO  # benchmarks/ (pytest's pythonpath)

# wide (left side), tall (right side), square (right side, as in the reference code)
SHAPES = [(6, 10), (12, 6), (8, 8)]
STEPS = 10


def twin_parameters(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    return ([torch.nn.Parameter(w.clone()) for w in weights],
            [torch.nn.Parameter(w.clone()) for w in weights])


def run_both(asgo_options: dict, gradient_rank: int | None = None):
    ours, theirs = twin_parameters()
    optimizers = (ASGO(ours, lr=0.02, **asgo_options), ReferenceStyleASGO(theirs, lr=0.02))
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for mine, reference in zip(ours, theirs):
            grad = torch.randn(mine.shape, generator=generator, dtype=torch.float64)
            if gradient_rank is not None:
                grad = low_rank(grad, gradient_rank)
            mine.grad, reference.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    return optimizers, ours, theirs


def low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def test_reference_options_take_the_reference_codes_steps():
    (asgo, reference), ours, theirs = run_both(REFERENCE_OPTIONS)
    for mine, their in zip(ours, theirs):
        assert relative_error(mine.detach(), their.detach()) < tolerance("float64")
        mine_state, their_state = asgo.state[mine], reference.state[their]
        assert relative_error(mine_state["momentum"], their_state["momentum_buffer"]) < 1e-12
        assert relative_error(mine_state["gram"][0], their_state["precond"]) < 1e-12


@pytest.mark.parametrize("options", [{}, dict(REFERENCE_OPTIONS, side="left")],
                         ids=["default-damping", "other-side"])
def test_the_comparison_detects_a_different_algorithm(options):
    """The default relative damping eps·‖V‖_F, or preconditioning the other side of the tall
    and square matrices, moves the weights well beyond the tolerance of the test above."""
    _, ours, theirs = run_both(options)
    worst = max(relative_error(m.detach(), t.detach()) for m, t in zip(ours, theirs))
    assert worst > 100 * tolerance("float64")


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_deficient_gradients_stay_close_to_the_reference_code(rank):
    """With fewer gradient directions than k, V is singular; the reference code adds no damping
    there, the reference options add 1e-10. Both steps stay within 1e-6 of each other, since the
    momentum lies in V's range."""
    _, ours, theirs = run_both(REFERENCE_OPTIONS, gradient_rank=rank)
    for mine, their in zip(ours, theirs):
        assert np.isfinite(mine.detach().numpy()).all()
        assert relative_error(mine.detach(), their.detach()) < 1e-6
