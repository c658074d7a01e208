"""PyTorch fast paths: batched eigh, fused alpha/beta GEMMs, root-method choice, sync-free run_if.

Every k×k product of the coupled iteration and the Gram EMA is one batched GEMM whose
alpha/beta carry the scalars (SPEC §7), so no extra element-wise pass touches the matrices.
fp32 matmuls on CUDA follow torch's global precision setting
(`torch.backends.cuda.matmul.allow_tf32 = True` enables TF32 for the iteration).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

# Measured on a 2-core AMD EPYC (torch 2.13, float32, medians): one matrix at a time on the two
# workers beats LAPACK's batched eigh from k = 64 up (k=64, 24 matrices: 6.1 ms vs 9.4 ms;
# k=128, 8: 6.4 vs 8.5 ms; k=384, 6: 49 vs 62 ms) and ties it at k = 32 (1.1 vs 1.2 ms).
_CPU_LOOP_EIGH_MIN_K = 64

# How torch.linalg.eigh reports a matrix it cannot decompose (non-convergence); CUDA errors
# and out-of-memory are other types and propagate.
EIGH_ERRORS = (torch.linalg.LinAlgError,)

# root_method="auto" on CUDA: eigh up to k = 32, where torch's eigh is batched Jacobi; above,
# the faster of eigh and polar_express at the measured size nearest to k (on a log scale) in
# CUDA_ROOT_TIMINGS_MS, benchmarks/gpu_check.py's "auto_table": median ms of one float32
# inverse root of a batch (k 384 × 6, 100 × 500, 1024 × 2, 4096 × 1), measured on an NVIDIA H100
# 80GB HBM3 (torch 2.11.0+cu130, driver 580.159.04). Above k = 32 torch's eigh is one syevd call
# per matrix, hence 973 ms for the 500 matrices of 100 × 100; the iteration is batched GEMMs.
CUDA_ROOT_TIMINGS_MS: dict[int, dict[str, float]] = {
    100: {"eigh": 972.754, "polar_express": 3.568},
    384: {"eigh": 69.836, "polar_express": 4.805},
    1024: {"eigh": 21.922, "polar_express": 4.61},
    4096: {"eigh": 94.854, "polar_express": 111.569},
}
_CUDA_ITERATION_MIN_K = 33


def eigh(A):
    """torch.linalg.eigh; on CPU large matrices go one at a time (faster there, see above),
    spread over torch's intra-op threads: each thread decomposes its share of the stack with a
    single-threaded LAPACK call, which uses the cores better than one multi-threaded call
    (LAPACK's tridiagonal reduction scales poorly across threads at these sizes). The results
    are written straight into the output stack."""
    one_at_a_time = (A.device.type == "cpu" and A.ndim == 3 and A.shape[0] > 1
                     and A.shape[-1] >= _CPU_LOOP_EIGH_MIN_K and not torch.compiler.is_compiling())
    if not one_at_a_time:
        return torch.linalg.eigh(A)
    values, vectors = A.new_empty(A.shape[:-1]), torch.empty_like(A, memory_format=torch.contiguous_format)

    def decompose(indices):
        for index in indices:
            torch.linalg.eigh(A[index], out=(values[index], vectors[index]))

    intra_op_threads = torch.get_num_threads()
    threads = min(intra_op_threads, A.shape[0])
    shares = [range(first, A.shape[0], threads) for first in range(threads)]
    if threads == 1:
        decompose(shares[0])
        return values, vectors
    torch.set_num_threads(1)  # one LAPACK thread per worker: no oversubscription
    try:
        list(_eigh_pool(threads).map(decompose, shares))
    finally:
        torch.set_num_threads(intra_op_threads)
    return values, vectors


@functools.cache
def _eigh_pool(threads: int) -> ThreadPoolExecutor:
    # OpenMP's thread count is per calling thread: without the initializer each worker's LAPACK
    # call would open its own team of all cores (measured: k=128, 8 matrices, 14.0 → 7.0 ms).
    return ThreadPoolExecutor(threads, thread_name_prefix="asgo-eigh",
                              initializer=torch.set_num_threads, initargs=(1,))


def _gemm(C, A, B, beta: float, alpha: float):
    """beta·C + alpha·A·B as one batched GEMM (C, A, B broadcastable (..., k, k) stacks)."""
    shape = torch.broadcast_shapes(C.shape, A.shape[:-2] + (A.shape[-2], B.shape[-1]))
    to_3d = lambda x: x.expand(shape[:-2] + x.shape[-2:]).reshape(-1, *x.shape[-2:])  # noqa: E731
    result = torch.baddbmm(to_3d(C), to_3d(A), to_3d(B), beta=beta, alpha=alpha)
    return result.reshape(shape)


def coupled_step(Y, Z, a, b, c):
    """T = Z·Y; B = b·T + c·T·T; Y ← a·Y + Y·B; Z ← a·Z + B·Z: four fused GEMMs."""
    T = torch.matmul(Z, Y)
    B = _gemm(T, T, T, beta=b, alpha=c) if c != 0.0 else b * T
    return _gemm(Y, Y, B, beta=a, alpha=1.0), _gemm(Z, B, Z, beta=a, alpha=1.0)


def gram_update(V, G, decay, weight):
    """decay·V + weight·G·Gᵀ in one baddbmm; a lower-precision G (matmul_dtype) gets its own
    GEMM, accumulated and returned in V's dtype (as JAX's preferred_element_type does), whose
    result is added to V."""
    if G.dtype != V.dtype:
        return torch.add(V * decay, wide_gram(G, V.dtype), alpha=weight)
    return _gemm(V, G, G.mT, beta=decay, alpha=weight)


def wide_gram(G, dtype):
    """G·Gᵀ of a low-precision G, summed and returned in `dtype`. On CUDA a float32 result is
    the GEMM's own output type (out_dtype: bf16 tensor cores, float32 accumulation); elsewhere
    G is widened first, which gives the same exact products of bf16 values, summed in `dtype`."""
    if G.device.type == "cuda" and dtype == torch.float32:
        flat = G.reshape(-1, *G.shape[-2:])
        return torch.bmm(flat, flat.mT, out_dtype=dtype).reshape(*G.shape[:-1], G.shape[-2])
    wide = G.to(dtype)
    return torch.matmul(wide, wide.mT)


def choose_root_method(k, dtype, device):
    if getattr(device, "type", str(device)) != "cuda" or k < _CUDA_ITERATION_MIN_K:
        return "eigh"
    if CUDA_ROOT_TIMINGS_MS:
        return fastest_root_method(k, CUDA_ROOT_TIMINGS_MS)
    return "polar_express"


def fastest_root_method(k: int, timings: dict[int, dict[str, float]]) -> str:
    """The method with the smallest time at the measured size nearest to k (log scale; the
    smaller size on a tie)."""
    nearest = min(timings, key=lambda size: (abs(math.log(size / k)), size))
    return min(timings[nearest], key=timings[nearest].get)


def run_if(predicate, compute, otherwise):
    """compute() if predicate else otherwise(), for the core's fallback chain.

    Eager: a Python branch. On CPU reading the predicate is no device sync. On CUDA it is one
    host read per fallback level and bucket, on root-refresh steps only; the alternative,
    compute-and-select, would run the eigh fallback on every refresh, and torch's CUDA eigh
    syncs itself to check cuSOLVER's status, so it would cost a sync *and* an eigh.
    Under torch.compile (where a host read breaks the graph) both branches run and torch.where
    selects, which gives the same values. CUDA-graph capture of a step is not supported: the
    eigh that a refresh can reach synchronises, which capture forbids.
    """
    if not torch.compiler.is_compiling():
        return compute() if bool(predicate) else otherwise()
    computed, kept = compute(), otherwise()
    if isinstance(computed, tuple):
        return tuple(torch.where(predicate, new, old) for new, old in zip(computed, kept))
    return torch.where(predicate, computed, kept)


def _mask_is_free_to_read(mask) -> bool:
    """Whether Python may branch on mask's values: on CPU that is no device sync, and outside
    torch.compile it does not break the graph."""
    return mask.device.type == "cpu" and not torch.compiler.is_compiling()


def select(mask, if_true, if_false):
    """torch.where; where the mask is free to read, a uniform mask (the usual case: every
    gradient finite, every root accepted) returns one side without a pass."""
    if _mask_is_free_to_read(mask):
        if bool(mask.all()):
            return if_true
        if not bool(mask.any()):
            return if_false
    return torch.where(mask, if_true, if_false)


def masked_ema(mask, old, new, beta, overwrite):
    """where(mask, lerp(old, new, 1 − beta), old); overwrite=True lerps into old in place.

    Where the mask is free to read, the usual all-true case is one lerp. Elsewhere (CUDA, under
    torch.compile) masked matrices lerp towards themselves, which leaves them exactly as they
    were: one where pass picks the target, one lerp writes. The where cannot go: a skipped
    matrix's gradient may hold inf/NaN, and a zero lerp weight would still carry NaN in."""
    if _mask_is_free_to_read(mask) and bool(mask.all()):
        target = new
    else:
        target = torch.where(mask, new, old)
    return old.lerp_(target, 1.0 - beta) if overwrite else torch.lerp(old, target, 1.0 - beta)
