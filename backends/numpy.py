"""NumPy fast paths: LAPACK eigh with a measured precision rule, in-place coupled-iteration steps.

eigh precision (measured on a 2-core CPU, one BLAS thread, rank-deficient Gram matrices G·Gᵀ):
numpy.linalg.eigh always runs LAPACK in float64, also for float32 input (it casts and rounds
the result back). For k ≤ 64 that costs nothing extra (k=64, 8 matrices: 1.6 ms vs 1.1 ms
with float32 LAPACK) and the root built from it is about 10× closer to the exact root
(relative error 2e-8 vs 2e-7), so small float32 blocks keep the float64 solve. For k > 64
float32 LAPACK (ssyevd) is 2–4× faster (k=256: 2 ms vs 9 ms; k=1024: 112 ms vs 228 ms), so
float32 blocks above the threshold use it, through SciPy when SciPy is installed. float64 input
— float64 parameters, or the core's "eigh_float64" fallback level — is always solved in float64.
"""

from __future__ import annotations

import numpy as np

# How np.linalg.eigh and scipy.linalg.eigh report a matrix they cannot decompose.
EIGH_ERRORS = (np.linalg.LinAlgError,)

# Largest float32 block that is still solved by float64 LAPACK (see the module docstring).
FLOAT64_EIGH_MAX_DIM = 64


def eigh(A):
    if A.dtype != np.float32 or A.shape[-1] <= FLOAT64_EIGH_MAX_DIM:
        return np.linalg.eigh(A)
    single_precision_eigh = _scipy_single_precision_eigh()
    if single_precision_eigh is None:
        return np.linalg.eigh(A)
    return single_precision_eigh(A)


def _scipy_single_precision_eigh():
    """A batched float32 eigh on LAPACK ssyevd, or None when SciPy is not installed."""
    try:
        from scipy.linalg import eigh as scipy_eigh
    except ImportError:
        return None

    def batched(A):
        flat = A.reshape(-1, *A.shape[-2:])
        pairs = [scipy_eigh(block, driver="evd", check_finite=False) for block in flat]
        eigenvalues = np.stack([w for w, _ in pairs]).reshape(A.shape[:-1])
        eigenvectors = np.stack([q for _, q in pairs]).reshape(A.shape)
        return eigenvalues, eigenvectors

    return batched


def coupled_step(Y, Z, a, b, c):
    """One coupled step with two temporaries instead of the generic code's six."""
    T = np.matmul(Z, Y)
    B = np.matmul(T, T) if c != 0.0 else np.zeros_like(T)
    B *= c
    B += b * T
    Y_next = np.matmul(Y, B)
    Y_next += a * Y
    Z_next = np.matmul(B, Z)
    Z_next += a * Z
    return Y_next, Z_next


def gram_update(V, G, decay, weight):
    gram = np.matmul(G, np.swapaxes(G, -1, -2))
    gram *= weight
    gram += decay * V
    return gram


def select(mask, if_true, if_false):
    """np.where, or one side as it is when the mask is uniform (the usual case)."""
    if mask.all():
        return if_true
    if not mask.any():
        return if_false
    return np.where(mask, if_true, if_false)


def masked_ema(mask, old, new, beta, overwrite):
    """where(mask, beta·old + (1 − beta)·new, old), with no where pass when every mask entry
    holds (the usual case) and, with overwrite=True, no new array."""
    if not mask.all():
        return np.where(mask, beta * old + (1.0 - beta) * new, old)
    result = old if overwrite else old.copy()
    result *= beta
    result += (1.0 - beta) * new
    return result
