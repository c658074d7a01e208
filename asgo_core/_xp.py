"""Small array-API helpers shared by the core: namespace lookup, batched eye, norms."""

from __future__ import annotations

import math
import warnings

import array_api_compat

from asgo_core.backends import backend_for


def namespace(*arrays):
    return array_api_compat.array_namespace(*arrays)


def backend_function(xp, name: str):
    """The backend's fast version of `name` for namespace `xp`, or None (use the generic one)."""
    backend = backend_for(xp)
    return getattr(backend, name, None) if backend is not None else None


def matmul(a, b, xp):
    """a @ b through the backend's `matmul` when it has one (JAX asks for full float32
    precision there, where its default would round float32 operands to TF32/bf16 on GPUs)."""
    fused = backend_function(xp, "matmul")
    return fused(a, b) if fused is not None else xp.matmul(a, b)


def device(x):
    return array_api_compat.device(x)


def eye_like(x, xp):
    """Identity matrices broadcastable against the (..., k, k) array x."""
    k = x.shape[-1]
    return xp.eye(k, dtype=x.dtype, device=device(x))


def transpose(x, xp):
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else xp.permute_dims(
        x, (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2))


def frobenius_norm(x, xp):
    """‖x‖_F over the last two axes, keeping them as size-1 axes for broadcasting."""
    return xp.sqrt(xp.sum(x * x, axis=(-2, -1), keepdims=True))


def safe_frobenius_norm(x, xp):
    """‖x‖_F computed as max|x|·‖x/max|x|‖_F, so squaring can neither underflow nor overflow."""
    largest = xp.max(xp.abs(x), axis=(-2, -1), keepdims=True)
    divisor = xp.where(largest > 0, largest, xp.ones_like(largest))
    return largest * frobenius_norm(x / divisor, xp)


def all_finite(x, xp, axes):
    """True where every element along `axes` is finite (no NaN, no inf).

    Read from the sum, one pass instead of isfinite's several: a NaN or inf anywhere makes the
    sum non-finite. Conservative: finite entries whose sum overflows also count as non-finite.
    """
    return xp.isfinite(xp.sum(x, axis=axes))


def nan_where_eigh_inaccurate(A, eigenvalues, eigenvectors, xp, tolerance_factor: float = 100.0):
    """The eigenpairs of the (..., k, k) stack A, NaN for each matrix whose eigenpairs miss
    ‖A·Q − Q·diag(w)‖_F ≤ tolerance_factor·k·eps·‖A‖_F: a check on the device (one GEMM per
    matrix) for solvers that do not report convergence without a host read (cuSOLVER)."""
    residual = safe_frobenius_norm(matmul(A, eigenvectors, xp) - eigenvectors * eigenvalues[..., None, :], xp)
    bound = tolerance_factor * A.shape[-1] * float(xp.finfo(A.dtype).eps) * safe_frobenius_norm(A, xp)
    accurate = residual <= bound  # False for a NaN residual too
    nan = xp.full_like(eigenvectors, math.nan)
    return (xp.where(accurate[..., 0], eigenvalues, nan[..., 0]), xp.where(accurate, eigenvectors, nan))


def smallest_normal(x, xp) -> float:
    return float(xp.finfo(x.dtype).smallest_normal)


def supports_float64(xp, x) -> bool:
    """Whether casting x to float64 really gives float64 (JAX without x64 does not, and warns:
    the warning is silenced, the answer is the probe's dtype)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            probe = xp.astype(x[..., :1, :1], xp.float64)
    except Exception:
        return False
    return probe.dtype == xp.float64
