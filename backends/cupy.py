"""CuPy fast paths: cuSOLVER eigh, cuBLAS batched matmuls, fused element-wise kernels.

Imported by the backend registry only when CuPy arrays reach the core, so importing CuPy here
is safe. Nothing in this module copies a device value to the host, except `run_if` on
root-refresh steps (below).

What is fused and what is not:
- The core's "scalar·X + product" forms (Gram EMA, the coupled-iteration steps) become one
  cuBLAS batched matmul (cupy.matmul) plus one fused element-wise kernel. cupy.matmul has no
  alpha/beta for batched products, so the scaling cannot ride on the GEMM itself.
- The parameter write (W ← W − lr·update) and the whole built-in AdamW step are single
  ElementwiseKernels, called by asgo_core.adapters.cupy (`apply_update`, `adamw_update`).
- Momentum and the RMS normalisation stay in the core's generic array code: the core computes
  them as separate array expressions and exposes no hook for them, so fusing them would need a
  change to asgo_core.step.

Fallbacks: CuPy has no device-side branch, so `run_if` reads its one-element predicate — one
host read per fallback level and bucket, on root-refresh steps only (every τ steps), the same
policy as the torch backend on CUDA. The alternative, computing the fallback and selecting with
cupy.where, would run an eigh on every refresh and erase the iteration's advantage for large k.
"""

from __future__ import annotations

import array_api_compat.cupy
import cupy
import numpy

from asgo_core import _xp

_scale_add = cupy.ElementwiseKernel(
    "T x, T y, float64 alpha, float64 beta", "T z",
    "z = (T)alpha * x + (T)beta * y",
    "asgo_scale_add")

_subtract_scaled = cupy.ElementwiseKernel(
    "T update, float64 lr", "T param",
    "param = param - (T)lr * update",
    "asgo_subtract_scaled")

_adamw = cupy.ElementwiseKernel(
    "G grad, bool finite, float64 decay_factor, float64 beta1, float64 beta2, float64 eps, "
    "float64 step_size, float64 bias_correction2_sqrt",
    "P param, S exp_avg, S exp_avg_sq",
    """
    if (finite) {
        S g = (S)grad;
        exp_avg = (S)beta1 * exp_avg + (S)(1.0 - beta1) * g;
        exp_avg_sq = (S)beta2 * exp_avg_sq + (S)(1.0 - beta2) * (g * g);
        S denom = sqrt(exp_avg_sq) / (S)bias_correction2_sqrt + (S)eps;
        param = (P)((S)param * (S)decay_factor - (S)step_size * (exp_avg / denom));
    }
    """,
    "asgo_adamw")


# How cupy.linalg.eigh reports a failed decomposition, and only when the user turned cuSOLVER's
# status checks on (cupyx.seterr(linalg="raise"), a host read); by default nothing is raised,
# so `eigh` checks its result on the device instead.
EIGH_ERRORS = (numpy.linalg.LinAlgError,)


def eigh(A):
    """Symmetric eigendecomposition on cuSOLVER, one call: cupy.linalg.eigh runs batched Jacobi
    (syevjBatched) on a stack of any size — 500 matrices of 100×100 in 8.4 ms where torch's
    one-syevd-per-matrix loop took 914 ms (pytorch issue 174674) — and divide and conquer
    (syevd) on one matrix, which a stack of one is given as. Neither solver's convergence flag
    is read (that would be a host sync): a matrix whose eigenpairs fail the residual check of
    `nan_where_eigh_inaccurate` comes back NaN, which the core's fallback chain counts and
    retries."""
    k = A.shape[-1]
    one_matrix = A.size == k * k
    eigenvalues, eigenvectors = cupy.linalg.eigh(A.reshape(k, k) if one_matrix else A)
    eigenvalues, eigenvectors = eigenvalues.reshape(A.shape[:-1]), eigenvectors.reshape(A.shape)
    return _xp.nan_where_eigh_inaccurate(A, eigenvalues, eigenvectors, array_api_compat.cupy)


def coupled_step(Y, Z, a, b, c):
    """T = Z·Y; B = b·T + c·T·T; Y ← a·Y + Y·B; Z ← a·Z + B·Z: four batched GEMMs, three fused adds."""
    T = cupy.matmul(Z, Y)
    B = _scale_add(T, cupy.matmul(T, T), b, c) if c != 0.0 else T * b
    Y_next = _scale_add(Y, cupy.matmul(Y, B), a, 1.0)
    Z_next = _scale_add(Z, cupy.matmul(B, Z), a, 1.0)
    return Y_next, Z_next


def gram_update(V, G, decay, weight):
    """decay·V + weight·G·Gᵀ: one batched GEMM and one fused element-wise pass."""
    return _scale_add(V, cupy.matmul(G, cupy.swapaxes(G, -1, -2)), decay, weight)


# The iteration is matmul-bound while batched Jacobi's cost grows faster with k. On an NVIDIA
# H100 (benchmarks/gpu_check.py, float32, CuPy 14.2) PolarExpress was the faster at every
# measured size: 256 × 16 matrices 2.5 ms against 17.4 ms for this eigh, 1024 × 8 17.4 against
# 174, and at 100 × 500 this eigh took 8.9 ms, PolarExpress through torch 3.6; below k = 100
# nothing was measured.
_ITERATION_MIN_K = 100


def choose_root_method(k, dtype, device):
    return "polar_express" if k >= _ITERATION_MIN_K else "eigh"


def run_if(predicate, compute, otherwise):
    """compute() if the 0-d bool predicate holds, else otherwise(): one host read (see above)."""
    return compute() if bool(predicate) else otherwise()


def apply_update(param, update, lr):
    """param ← param − lr·update in place, one kernel (used by asgo_core.adapters.cupy)."""
    _subtract_scaled(update, lr, param)


def adamw_update(param, grad, state, *, lr, beta1, beta2, eps, weight_decay, step_size,
                 bias_correction2_sqrt):
    """torch.optim.AdamW's step in one kernel, in place on param and state; a non-finite grad
    leaves them untouched (decided on the device) and is counted in state["skipped"]."""
    finite = cupy.all(cupy.isfinite(grad))
    _adamw(grad, finite, 1.0 - lr * weight_decay, beta1, beta2, eps, step_size,
           bias_correction2_sqrt, param, state["exp_avg"], state["exp_avg_sq"])
    state["skipped"] = state["skipped"] + (~finite).astype(cupy.int32)
