"""JAX fast paths: XLA eigh, full-precision batched matmuls, and `lax.cond` for the fallbacks.

Every matmul here asks for `Precision.HIGHEST`: on TPUs and on GPUs with TF32 the default
precision rounds float32 operands to bf16/tf32, which the inverse-root iteration and the
Gram statistics cannot afford (SPEC §6). On CPUs HIGHEST is what XLA does anyway.
`run_if` is `lax.cond`, so the fallback chain of `asgo_core.step.robust_root` traces into one
program: no host synchronisation and no recompilation when a fallback fires.
"""

from __future__ import annotations

import array_api_compat
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# On accelerators the coupled iteration (pure GEMMs) beats the eigendecomposition from this
# size on: on an NVIDIA H100 (benchmarks/gpu_check.py, float32, jax 0.11.2) k = 256 took
# 0.37 ms against 2.28 ms for eigh (one matrix) and 1.01 against 3.08 (16); k = 1024, 2.58
# against 11.3. Below 256 nothing was measured, and eigh is exact.
_ITERATION_MIN_SIZE_ON_ACCELERATORS = 256


# jnp.linalg.eigh reports a matrix it cannot decompose with NaN output, never an exception.
EIGH_ERRORS = ()


def matmul(a, b):
    """a @ b at full precision (float32 stays float32; bf16 inputs, as matmul_dtype asks, stay bf16)."""
    return jnp.matmul(a, b, precision=_HIGHEST)


def _platform(device) -> str:
    """The platform of `device`: a Device, or the Sharding that an array spread over several
    devices reports as its device (they share one platform); under jit (None) the default
    backend's."""
    if device is None:
        return jax.default_backend()
    if isinstance(device, jax.sharding.Sharding):
        device = next(iter(device.device_set))
    return device.platform


def eigh(A):
    """One batched eigh on accelerators; on CPU one LAPACK call per matrix (lax.map over the
    batch): jaxlib's batched CPU eigh fans the batch out to XLA's intra-op thread pool and blocks
    on it, and two such calls running at once deadlocked on a 2-core machine (jax 0.10.2)."""
    if _platform(array_api_compat.device(A)) != "cpu":
        return jnp.linalg.eigh(A, symmetrize_input=False)
    batch_shape = A.shape[:-2]
    flat = jnp.reshape(A, (-1, *A.shape[-2:]))
    eigenvalues, eigenvectors = jax.lax.map(lambda a: jnp.linalg.eigh(a, symmetrize_input=False), flat)
    return (jnp.reshape(eigenvalues, (*batch_shape, A.shape[-1])),
            jnp.reshape(eigenvectors, A.shape))


def coupled_step(Y, Z, a, b, c):
    """One coupled step: T = Z·Y; B = b·T + c·T²; Y ← a·Y + Y·B; Z ← a·Z + B·Z."""
    T = matmul(Z, Y)
    B = b * T + c * matmul(T, T) if c != 0.0 else b * T
    return a * Y + matmul(Y, B), a * Z + matmul(B, Z)


def gram_update(V, G, decay, weight):
    """decay·V + weight·G·Gᵀ for a (..., k, other) stack G."""
    gram = jnp.einsum("...ij,...kj->...ik", G, G, precision=_HIGHEST, preferred_element_type=V.dtype)
    return decay * V + weight * gram


def choose_root_method(k, dtype, device):
    """LAPACK eigh on CPUs (cheaper than ten iteration steps for k ≤ ~1024, SPEC §7);
    PolarExpress iteration on accelerators for large k. Under jit the device is unknown
    (None): the default backend's platform decides."""
    if _platform(device) == "cpu" or k < _ITERATION_MIN_SIZE_ON_ACCELERATORS:
        return "eigh"
    return "polar_express"


def run_if(predicate, compute, otherwise):
    """compute() where the 0-d bool `predicate` holds, otherwise(): one traced program."""
    return jax.lax.cond(predicate, compute, otherwise)
