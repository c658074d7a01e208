"""Gaps a mutation check found (issue 14): accumulate="sum" against the independent reference
with beta2 ≠ beta1 (with beta2 = beta1, swapping the two betas in the sum path went unnoticed)."""

from __future__ import annotations

import numpy as np
import pytest

from asgo_core import ASGOConfig, DASGOConfig, init_state, step
from helpers.reference import reference_asgo, reference_dasgo

LR = 0.05


def run_core(W0, grads, config):
    W = W0.copy()
    state = init_state(W, config)
    for G in grads:
        update, state = step(G, state, W, config)
        W = W - LR * update
    return W, state


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_asgo_sum_matches_the_reference_with_distinct_betas(shape):
    rng = np.random.default_rng(40)
    W0, grads = rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(8)]
    config = ASGOConfig(accumulate="sum", beta1=0.8, beta2=0.95)
    W, state = run_core(W0, grads, config)
    W_ref, M_ref, V_ref, _ = reference_asgo(W0, grads, lr=LR, beta1=0.8, beta2=0.95, accumulate="sum")
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.momentum, M_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.gram[0][0], V_ref, rtol=1e-10, atol=1e-12)


def test_dasgo_sum_matches_the_reference_with_distinct_betas():
    rng = np.random.default_rng(41)
    W0, grads = rng.standard_normal((6, 11)), [rng.standard_normal((6, 11)) for _ in range(8)]
    config = DASGOConfig(accumulate="sum", beta1=0.7, beta2=0.9)
    W, state = run_core(W0, grads, config)
    W_ref, M_ref, v_ref = reference_dasgo(W0, grads, lr=LR, beta1=0.7, beta2=0.9, accumulate="sum")
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.second_moment, v_ref, rtol=1e-10, atol=1e-12)
