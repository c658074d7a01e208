"""JAX fast paths: XLA eigh, full-precision batched matmuls, and `lax.cond` for the fallbacks.

Every matmul here asks for `Precision.HIGHEST`: on TPUs and on GPUs with TF32 the default
precision rounds float32 operands to bf16/tf32, which the inverse-root iteration and the
Gram statistics cannot afford (SPEC §6). On CPUs HIGHEST is what XLA does anyway.
`run_if` is `lax.cond`, so the fallback chain of `asgo_core.step.robust_root` traces into one
program: no host synchronisation and no recompilation when a fallback fires.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# On accelerators the coupled iteration (pure GEMMs) beats the eigendecomposition once the
# matrix is this large; below it launch overhead dominates and eigh is exact. Not measured on
# a GPU in this project yet (no GPU was available): revisit with benchmarks/inverse_root.py.
_ITERATION_MIN_SIZE_ON_ACCELERATORS = 256


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def eigh(A):
    """One LAPACK call per matrix (lax.map over the batch), never one batched call: jaxlib's
    batched CPU eigh fans the batch out to XLA's intra-op thread pool and blocks on it, and two
    such calls running at once deadlocked on this 2-core machine (jax 0.10.2)."""
    batch_shape = A.shape[:-2]
    flat = jnp.reshape(A, (-1, *A.shape[-2:]))
    eigenvalues, eigenvectors = jax.lax.map(lambda a: jnp.linalg.eigh(a, symmetrize_input=False), flat)
    return (jnp.reshape(eigenvalues, (*batch_shape, A.shape[-1])),
            jnp.reshape(eigenvectors, A.shape))


def coupled_step(Y, Z, a, b, c):
    """One coupled step: T = Z·Y; B = b·T + c·T²; Y ← a·Y + Y·B; Z ← a·Z + B·Z."""
    T = _matmul(Z, Y)
    B = b * T + c * _matmul(T, T) if c != 0.0 else b * T
    return a * Y + _matmul(Y, B), a * Z + _matmul(B, Z)


def gram_update(V, G, decay, weight):
    """decay·V + weight·G·Gᵀ for a (..., k, other) stack G."""
    gram = jnp.einsum("...ij,...kj->...ik", G, G, precision=_HIGHEST, preferred_element_type=V.dtype)
    return decay * V + weight * gram


def choose_root_method(k, dtype, device):
    """LAPACK eigh on CPUs (cheaper than ten iteration steps for k ≤ ~1024, SPEC §7);
    PolarExpress iteration on accelerators for large k. Under jit the device is unknown
    (None): the default backend's platform decides."""
    platform = device.platform if device is not None else jax.default_backend()
    if platform == "cpu" or k < _ITERATION_MIN_SIZE_ON_ACCELERATORS:
        return "eigh"
    return "polar_express"


def run_if(predicate, compute, otherwise):
    """compute() where the 0-d bool `predicate` holds, otherwise(): one traced program."""
    return jax.lax.cond(predicate, compute, otherwise)
