"""inverse_root: every method against float64 eigh, on every CPU backend and dtype."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgo_core import inverse_root
from helpers.numerics import relative_error
from helpers.reference import inverse_sqrt, spd_matrix

METHODS = ("eigh", "newton_schulz", "polar_express", "coupled_newton")
# Acceptance bounds of the foundation issue: k = 64, condition number 1e4.
SOLVER_TOLERANCE = {"float64": 1e-6, "float32": 1e-3}


def solver_tolerance(dtype: str, condition: float) -> float:
    """The acceptance bound, or 2·κ·eps where that is larger: a backward-stable solver's root
    of a condition-κ matrix is only that accurate (float32 at κ = 1e4: 2.4e-3; cuSOLVER's
    eigh, through JAX and CuPy, measured 1.12e-3 on an H100 where LAPACK's gives less)."""
    return max(SOLVER_TOLERANCE[dtype], 2 * condition * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k, condition", [(8, 1e2), (64, 1e4)])
def test_inverse_root_matches_float64_eigh(backend, method, dtype, k, condition):
    rng = np.random.default_rng(k)
    A = spd_matrix(rng, k, condition, scale=37.0)
    expected = inverse_sqrt(A, 0.0)
    root = inverse_root(backend.asarray(A, dtype), method=method, eps=0.0)
    assert str(root.dtype).endswith(dtype)
    assert relative_error(backend.to_numpy(root), expected) < solver_tolerance(dtype, condition)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_at_a_time(backend, method):
    rng = np.random.default_rng(1)
    stack = np.stack([spd_matrix(rng, 16, 10.0 ** (i + 1)) for i in range(3)]).reshape(3, 1, 16, 16)
    batched = backend.to_numpy(inverse_root(backend.asarray(stack, "float64"), method=method))
    for i in range(3):
        single = backend.to_numpy(inverse_root(backend.asarray(stack[i, 0], "float64"), method=method))
        assert relative_error(batched[i, 0], single) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_relative_damping_is_shared_by_all_methods(method):
    """Every method returns (A + eps·‖A‖_F·I)^{-1/2}: the same damped matrix, whatever the solver."""
    rng = np.random.default_rng(2)
    G = rng.standard_normal((32, 4))
    A = G @ G.T  # rank 4: without damping the root would not exist
    expected = inverse_sqrt(A, 1e-3 * np.linalg.norm(A))
    assert relative_error(inverse_root(A, method=method, eps=1e-3), expected) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_absolute_damping_adds_eps(method):
    rng = np.random.default_rng(3)
    A = spd_matrix(rng, 12, 1e3)
    expected = inverse_sqrt(A, 0.25)
    assert relative_error(inverse_root(A, method=method, eps=0.25, damping="absolute"), expected) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_relative_damping_is_scale_invariant(method):
    """(cA + eps·‖cA‖ I)^{-1/2} = (A + eps·‖A‖ I)^{-1/2}/√c: the same eps means the same thing at any scale."""
    rng = np.random.default_rng(4)
    G = rng.standard_normal((20, 6))
    A = G @ G.T
    small, large = inverse_root(A, method=method, eps=1e-4), inverse_root(1e6 * A, method=method, eps=1e-4)
    assert relative_error(large * 1e3, small) < 1e-7


def test_zero_matrix_has_finite_root_with_damping():
    root = inverse_root(np.zeros((2, 5, 5)), method="polar_express")
    assert np.all(np.isfinite(root))


@given(
    k=st.integers(2, 48),
    log_scale=st.floats(-8, 8),
    log_condition=st.floats(0, 6),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_root_property_on_random_spd(k, log_scale, log_condition, method, seed):
    """For SPD G·Gᵀ + λI of random scale and conditioning, R·(A + δI)·R = I."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((k, max(1, k // 2)))
    A = 10.0**log_scale * (G @ G.T / k + 10.0**-log_condition * np.eye(k))
    eps = 1e-6
    R = inverse_root(A, method=method, eps=eps)
    shifted = A + eps * np.linalg.norm(A) * np.eye(k)
    assert np.linalg.norm(R @ shifted @ R - np.eye(k)) / np.sqrt(k) < 1e-6


@pytest.mark.parametrize(
    "kwargs, field",
    [({"method": "cholesky"}, "method"), ({"eps": -1.0}, "eps"), ({"eps": float("nan")}, "eps"),
     ({"steps": 0}, "steps"), ({"damping": "scaled"}, "damping")],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        inverse_root(np.eye(3), **kwargs)


def test_non_square_input_raises():
    with pytest.raises(ValueError, match="shape"):
        inverse_root(np.ones((3, 4)))


def _failing_eigh(error):
    def eigh(A):
        raise error
    return eigh


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_eigh_non_convergence_becomes_a_nan_root(framework, monkeypatch):
    """The linear-algebra failure of each backend is a failed solve (NaN), for the fallback chain."""
    module = importlib.import_module(f"asgo_core.backends.{framework}")
    monkeypatch.setattr(module, "eigh", _failing_eigh(module.EIGH_ERRORS[0]("did not converge")))
    A = spd_matrix(np.random.default_rng(5), 6, 10.0)
    root = inverse_root(_as_framework_array(A, framework), method="eigh")
    assert np.all(np.isnan(np.asarray(root)))


@pytest.mark.parametrize("error", [MemoryError("out of memory"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_eigh_errors_other_than_non_convergence_propagate(framework, error, monkeypatch):
    """Out-of-memory, asynchronous CUDA errors or graph-capture errors are not a bad matrix:
    hiding them behind a NaN root (counted as a fallback) would hide a broken run."""
    module = importlib.import_module(f"asgo_core.backends.{framework}")
    monkeypatch.setattr(module, "eigh", _failing_eigh(error))
    A = spd_matrix(np.random.default_rng(5), 6, 10.0)
    with pytest.raises(type(error), match=str(error)):
        inverse_root(_as_framework_array(A, framework), method="eigh")


def _as_framework_array(A, framework):
    if framework == "torch":
        import torch
        return torch.as_tensor(A)
    return A


def test_inaccurate_eigenpairs_become_nan_and_accurate_ones_stay(xp, backend):
    """The device-side convergence check the CuPy backend applies to cuSOLVER's eigh."""
    from asgo_core import _xp

    rng = np.random.default_rng(6)
    A = np.stack([spd_matrix(rng, 8, 1e3) for _ in range(3)])
    w, Q = np.linalg.eigh(A)
    w[1, [0, 7]] = w[1, [7, 0]]  # matrix 1: eigenvalues paired with the wrong vectors
    checked_w, checked_Q = _xp.nan_where_eigh_inaccurate(
        backend.asarray(A, "float64"), backend.asarray(w, "float64"), backend.asarray(Q, "float64"), xp)
    checked_w, checked_Q = backend.to_numpy(checked_w), backend.to_numpy(checked_Q)
    assert np.all(np.isnan(checked_w[1])) and np.all(np.isnan(checked_Q[1]))
    assert np.array_equal(checked_w[[0, 2]], w[[0, 2]]) and np.array_equal(checked_Q[[0, 2]], Q[[0, 2]])
