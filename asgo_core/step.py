"""One ASGO / DASGO step on a stack of same-shaped matrices: (grad, state, param) → (update, state).

The parameter rule is W ← W − lr·update, where update = U + weight_decay·W and U is the
preconditioned, RMS-normalised momentum (SPEC §2, §3). Pure functions: the state goes in and a
new state comes out, so the same code serves JAX (immutable) and the mutating adapters.

Numerics contract (SPEC §6): statistics in float32 or wider; a matrix whose gradient is not
finite is skipped (zero update, state untouched, counted); a failed root falls back
iterative → eigh → eigh in float64 → previous root, each level counted; statistics that
underflowed the dtype's normal range are counted too (FALLBACK_LEVELS); a zero gradient gives a
zero direction U, and the decoupled weight decay still applies (update = weight_decay·W, as
torch.optim.AdamW decays a parameter whose gradient is zero). No Python branch looks at array values except through the backend's `run_if`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from asgo_core import _xp
from asgo_core.config import ASGOConfig, DASGOConfig
from asgo_core.layout import block_layout
from asgo_core.precision import storage_dtype
from asgo_core.solvers import below_normal_range, damping_for_norm, eigh_root, resolve_method, solve_root

# What a root refresh counts per block: the three levels of the fallback chain, and
# "statistics_underflow": the block's momentum is nonzero but its Gram statistics lie below the
# dtype's normal range (see `solvers.below_normal_range`; e.g. float32 gradients of scale
# ≤ ~1e-17), so the root is dominated by the damping floor and the step degrades towards plain
# normalised momentum. Scaling the statistics back into range would need a per-matrix scale in
# the state to stay exact across steps whose gradient scales differ, so it is counted instead.
FALLBACK_LEVELS = ("eigh", "eigh_float64", "kept_previous_root", "statistics_underflow")


class ASGOState(NamedTuple):
    """State of one stack of matrices with leading shape L (a JAX pytree as it is).

    momentum: (*L, m, n). gram, root: one (blocks, size, size) array per block group.
    count: steps taken (0-d int). skipped: (*L,) steps skipped for a non-finite gradient.
    fallbacks: (*L, 4) blocks counted under each FALLBACK_LEVELS entry, summed over refreshes.
    """
    momentum: Any
    gram: tuple
    root: tuple
    count: Any
    skipped: Any
    fallbacks: Any


class DASGOState(NamedTuple):
    """momentum: (*L, m, n); second_moment: (*L, n); count, skipped as in ASGOState."""
    momentum: Any
    second_moment: Any
    count: Any
    skipped: Any


def every_root(solve, grams, previous_roots, moving):
    """This process computes the root of every matrix (`RowShards.roots`' default)."""
    return solve(grams, previous_roots, moving)


class RowShards(NamedTuple):
    """Says that the matrices `step_terms` sees are row shards: each process holds some rows of
    every matrix (FSDP2's dim-0 sharding) and the preconditioned side is the columns (side
    "right", one block), so the column Gram GᵀG is the sum of the shards' Grams. The caller
    supplies the reductions over the processes; each returns the reduced array (it may reduce
    its argument in place and return it):

    rows: rows of the whole matrix (the √(m·n) of the RMS normalisation).
    sum: of the partial column Grams (B, n, n) and of the squared Frobenius norms (B,).
    any: of (B,) bool flags, whether a matrix's momentum is nonzero on some process.
    roots: roots(solve, grams, previous_roots, moving) → (roots (B, n, n), fallback flags
        (B, 4)) of all B matrices at a root refresh, where solve(grams, previous_roots, moving)
        (`robust_root`) gives those of the matrices it is passed. The Grams are the same on
        every process, so the processes may split the matrices between them and share what
        each solved; the default, `every_root`, solves all of them here.
    """
    rows: int
    sum: Callable
    any: Callable
    roots: Callable = every_root


def statistics_dtype(dtype, xp):
    """float32 for 16-bit parameters, the parameter's own dtype when it is wider."""
    return xp.result_type(dtype, xp.float32)


def init_state(param, config):
    """Zero state for a parameter stack of shape (..., m, n) under an ASGO or DASGO config."""
    xp = _xp.namespace(param)
    dtype = statistics_dtype(param.dtype, xp)
    device = _xp.device(param)
    lead = tuple(param.shape[:-2])
    zeros = lambda shape, dt=dtype: xp.zeros(shape, dtype=dt, device=device)  # noqa: E731
    momentum = zeros(param.shape, storage_dtype(config.mu_dtype, dtype, xp, "mu_dtype"))
    count = zeros((), xp.int32)
    skipped = zeros(lead, xp.int32)
    if isinstance(config, DASGOConfig):
        return DASGOState(momentum, zeros(lead + (param.shape[-1],)), count, skipped)
    _check_config(config)
    layout = block_layout(param.shape, config)
    blocks = [(layout.num_matrices * c, s) for c, s in zip(layout.group_counts, layout.group_sizes)]
    stored = storage_dtype(config.precond_dtype, dtype, xp, "precond_dtype")
    gram = tuple(zeros((count_, size, size), stored) for count_, size in blocks)
    root = tuple(zeros((count_, size, size), stored) for count_, size in blocks)
    return ASGOState(momentum, gram, root, count, skipped, zeros(lead + (len(FALLBACK_LEVELS),), xp.int32))


def needs_root_refresh(step_count: int, config: ASGOConfig) -> bool:
    """Whether step number `step_count` (0-based) recomputes the root: every τ-th step."""
    return step_count % config.precondition_frequency == 0


def traced_root_refresh(config, count, cond, refreshed, kept):
    """A step under a traced step count (a jitted step): refreshed() when step number `count`
    recomputes ASGO's root (as needs_root_refresh), kept() on the other steps and for DASGO,
    which has no root; cond(predicate, refreshed, kept) (jax.lax.cond, keras.ops.cond) picks
    between them when precondition_frequency > 1."""
    frequency = getattr(config, "precondition_frequency", None)
    if frequency is None:
        return kept()
    if frequency == 1:
        return refreshed()
    return cond(count % frequency == 0, refreshed, kept)


def step(grad, state, param, config, *, refresh_root: bool | None = None,
         overwrite_state: bool = False, update_dtype=None):
    """One optimizer step for a stack of matrices; returns (update, new_state).

    grad, param: (..., m, n) arrays of one namespace (param may be None when
    weight_decay = 0). refresh_root: whether this step recomputes the ASGO root; None reads
    it from state.count (a host read: adapters on GPUs pass it explicitly). Ignored by DASGO,
    which has no root. The update has update_dtype, by default the parameter's dtype (the
    gradient's if param is None); an adapter that rounds the parameter write itself asks for
    the statistics dtype.
    overwrite_state: the caller drops the old state, so a backend may update its arrays in
    place instead of allocating new ones (the torch adapter does; the default leaves it intact).

    A gradient is non-finite when its Gram matrix (ASGO) or column energies (DASGO) are: that
    catches every NaN/inf entry without an extra pass over the gradient, and also treats a
    gradient whose squares overflow the statistics dtype as non-finite.
    """
    if param is None and config.weight_decay != 0.0:
        raise ValueError("param is required when weight_decay != 0 (the update carries weight_decay·W)")
    direction, scale, new_state = step_terms(grad, state, config, refresh_root=refresh_root,
                                             overwrite_state=overwrite_state)
    xp = _xp.namespace(direction)
    update = direction * scale
    if config.weight_decay != 0.0:
        stepped = xp.astype(scale != 0, update.dtype)  # a skipped matrix is not decayed either
        weights = _flatten_lead(xp.astype(param, update.dtype, copy=False), xp)
        update = update + weights * (config.weight_decay * stepped)
    out_dtype = update_dtype or (param if param is not None else grad).dtype
    return xp.astype(xp.reshape(update, grad.shape), out_dtype, copy=False), new_state


def step_terms(grad, state, config, *, refresh_root: bool | None = None,
               overwrite_state: bool = False, row_shards: RowShards | None = None):
    """The parts of `step`'s update, for adapters that fuse them into the parameter write:
    (direction (B, m, n), scale (B, 1, 1), new_state) with B the flattened leading dims and

        update = scale·direction + weight_decay·W   for matrices with scale != 0,
        update = 0                                  for skipped ones (scale = 0, not decayed).

    scale = ρ·√(mn)/‖direction‖_F (1 when ρ is None or the direction is 0, so a matrix whose
    gradients were all zero is still decayed). Arguments as in `step`; row_shards (ASGO only):
    grad and state.momentum hold this process's rows of each matrix (see RowShards), and the
    results are this process's rows of the whole matrices' results.
    """
    xp = _xp.namespace(grad, state.momentum)
    lead = tuple(grad.shape[:-2])
    dtype = xp.result_type(grad.dtype, state.momentum.dtype, xp.float32)  # momentum may be stored lower
    G = _flatten_lead(xp.astype(grad, dtype, copy=False), xp)
    if isinstance(config, DASGOConfig):
        if row_shards is not None:
            raise ValueError("row_shards needs an ASGOConfig (DASGO's row shards are not supported)")
        statistics = _dasgo_statistics(G, state, config, xp)
    else:
        statistics = _asgo_statistics(G, state, config, row_shards, xp)
    finite = statistics.finite
    if config.nonfinite == "raise" and not bool(xp.all(finite)):
        raise FloatingPointError("non-finite gradient (nonfinite='raise'); no state was changed")
    momentum = _masked_ema(finite, _flatten_lead(xp.astype(state.momentum, dtype, copy=False), xp), G,
                           config.beta1, overwrite_state, xp)
    if isinstance(config, DASGOConfig):
        direction, new_state = _dasgo_direction(momentum, statistics, state, config, xp)
    else:
        if refresh_root is None:
            refresh_root = needs_root_refresh(int(state.count), config)
        direction, new_state = _asgo_direction(momentum, statistics, state, config, refresh_root,
                                               row_shards, xp)
    new_state = new_state._replace(
        momentum=xp.reshape(xp.astype(momentum, state.momentum.dtype, copy=False), state.momentum.shape),
        count=state.count + 1,
        skipped=state.skipped + xp.reshape(xp.astype(~finite, xp.int32), lead))
    return direction, _scale(direction, finite, config, row_shards, xp), new_state


def _masked_ema(finite, old, new, beta: float, overwrite: bool, xp):
    """Per matrix: beta·old + (1 − beta)·new where the gradient is finite, old elsewhere.
    overwrite allows the backend to write the result into old."""
    fused = _xp.backend_function(xp, "masked_ema")
    if fused is not None:
        return fused(finite[:, None, None], old, new, beta, overwrite)
    return xp.where(finite[:, None, None], beta * old + (1.0 - beta) * new, old)


def _select(mask, if_true, if_false, xp):
    """where(mask, if_true, if_false) for same-shaped arrays; the backend's `select` may return
    one side as it is when the mask is uniform."""
    fused = _xp.backend_function(xp, "select")
    return fused(mask, if_true, if_false) if fused is not None else xp.where(mask, if_true, if_false)


def _check_config(config) -> None:
    if not isinstance(config, (ASGOConfig, DASGOConfig)):
        raise TypeError(f"config must be an ASGOConfig or DASGOConfig; got {type(config).__name__}")


def _flatten_lead(x, xp):
    return xp.reshape(x, (math.prod(x.shape[:-2]), *x.shape[-2:]))  # -1 fails for a 0-row shard


def _statistics_weights(config) -> tuple[float, float]:
    """(decay, weight) with statistics ← decay·old + weight·new: an EMA, or a beta2-decayed
    plain sum (Algorithm 1 at beta2 = 1)."""
    return config.beta2, 1.0 if config.accumulate == "sum" else 1.0 - config.beta2


class _Statistics(NamedTuple):
    """This step's candidate statistics, before non-finite matrices are masked out."""
    finite: Any       # (B,) bool: the matrix's gradient is finite
    values: Any       # ASGO: tuple of per-group Gram stacks; DASGO: (B, n) column energies EMA
    layout: Any       # ASGO: the BlockLayout; DASGO: None


def _gram_update(V, G_blocks, config, row_shards, xp):
    decay, weight = _statistics_weights(config)
    if row_shards is None:
        return _decayed_gram(V, G_blocks, decay, weight, xp)
    partial = _decayed_gram(xp.zeros_like(V), G_blocks, 0.0, 1.0, xp)  # this shard's Gram, in V's dtype
    return decay * V + weight * row_shards.sum(partial)


def _decayed_gram(V, G_blocks, decay: float, weight: float, xp):
    """decay·V + weight·G·Gᵀ in V's dtype."""
    fused = _xp.backend_function(xp, "gram_update")
    if fused is not None:
        return fused(V, G_blocks, decay, weight)
    gram = _xp.matmul(G_blocks, _xp.transpose(G_blocks, xp), xp)
    return decay * V + weight * xp.astype(gram, V.dtype, copy=False)


def _matmul_input(x, config, xp):
    """x rounded to config.matmul_dtype for a GEMM input (unchanged when it is None)."""
    if config.matmul_dtype is None:
        return x
    low = getattr(xp, config.matmul_dtype, None)
    if low is None:
        raise ValueError(f"matmul_dtype={config.matmul_dtype!r} is not supported by the "
                         f"{xp.__name__} namespace; accepted there: None")
    return xp.astype(x, low)


def _asgo_statistics(G, state, config, row_shards, xp) -> _Statistics:
    layout = block_layout(G.shape, config)
    if row_shards is not None and not (layout.side == "right" and layout.is_single_block):
        raise ValueError("row_shards needs the columns preconditioned as one block (side='right', "
                         "no num_heads or max_precond_dim blocks): only then is the Gram a sum over rows")
    G_blocks = layout.split(_matmul_input(G, config, xp), xp)
    grams = tuple(_gram_update(xp.astype(V, G.dtype, copy=False), G_b, config, row_shards, xp)
                  for V, G_b in zip(state.gram, G_blocks))
    nonfinite_blocks = xp.zeros((layout.num_matrices,), dtype=xp.int32, device=_xp.device(G))
    for index, V in enumerate(grams):
        trace = xp.sum(xp.linalg.diagonal(V), axis=-1)
        nonfinite_blocks = nonfinite_blocks + layout.per_matrix_sum(
            xp.astype(~xp.isfinite(trace), xp.int32), index, xp)
    return _Statistics(nonfinite_blocks == 0, grams, layout)


def _asgo_direction(momentum, statistics, state, config, refresh_root, row_shards, xp):
    layout = statistics.layout
    grams, roots, directions = [], [], []
    fallback_counts = xp.zeros((layout.num_matrices, len(FALLBACK_LEVELS)), dtype=xp.int32,
                               device=_xp.device(momentum))
    blocks = zip(state.gram, statistics.values, state.root,
                 layout.split(_matmul_input(momentum, config, xp), xp))
    share_roots = every_root if row_shards is None else row_shards.roots

    def solve(grams, previous_roots, moving):
        return robust_root(grams, previous_roots, config, xp, moving=moving)
    for index, (V_stored, V_new, R_stored, M_b) in enumerate(blocks):
        keep = ~layout.per_block(statistics.finite, index, xp)[:, None, None]
        V_old, R_old = (xp.astype(stored, V_new.dtype, copy=False) for stored in (V_stored, R_stored))
        V = _select(keep, V_old, V_new, xp)
        R = R_old
        if refresh_root:
            moving = xp.any(M_b != 0, axis=(-2, -1))
            if row_shards is not None:
                moving = row_shards.any(moving)
            R, failed_levels = share_roots(solve, V, R_old, moving)
            failed_levels = xp.where(keep[:, :, 0], xp.zeros_like(failed_levels), failed_levels)
            R = _select(keep, R_old, R, xp)
            fallback_counts = fallback_counts + xp.stack(
                [layout.per_matrix_sum(failed_levels[:, level], index, xp)
                 for level in range(len(FALLBACK_LEVELS))], axis=1)
        grams.append(xp.astype(V, V_stored.dtype, copy=False))
        roots.append(xp.astype(R, R_stored.dtype, copy=False))
        directions.append(_xp.matmul(xp.astype(R, M_b.dtype, copy=False), M_b, xp))
    lead = state.skipped.shape
    new_state = state._replace(
        gram=tuple(grams), root=tuple(roots),
        fallbacks=state.fallbacks + xp.reshape(fallback_counts, lead + (len(FALLBACK_LEVELS),)))
    return xp.astype(layout.merge(directions, xp), momentum.dtype, copy=False), new_state


def robust_root(V, previous_root, config: ASGOConfig, xp, moving=None):
    """(V + δI)^{-1/2} with the fallback chain; returns (root, per-block int flags (N, 4)).

    Flag column j is 1 where the block is counted under FALLBACK_LEVELS[j]. Each fallback level
    is computed only when some block of the batch still needs it (backend `run_if`).
    moving: (N,) bool, whether the block's momentum is nonzero, for "statistics_underflow"
    (None: V ≠ 0 stands in, which misses a Gram that underflowed to exactly 0).
    """
    norm = _xp.safe_frobenius_norm(V, xp)
    delta = damping_for_norm(norm, config.eps, config.damping, xp)
    if moving is None:
        moving = norm[:, 0, 0] > 0
    underflow = moving & below_normal_range(norm, config.eps, config.damping, xp)
    method = resolve_method(config.root_method, V, xp)
    root, residual = solve_root(V, delta, method, config.root_steps, config.root_tolerance, xp)
    ok = _acceptable(root, residual, config, xp)
    flags = []
    if method != "eigh":
        flags.append(~ok)
        root, ok = _retry_failed(root, ok, lambda: eigh_root(V, delta, xp), xp)
    else:
        flags.append(xp.zeros_like(ok))
    if V.dtype != xp.float64 and _xp.supports_float64(xp, V):
        flags.append(~ok)
        wide = lambda: xp.astype(eigh_root(xp.astype(V, xp.float64), xp.astype(delta, xp.float64), xp), V.dtype)  # noqa: E731
        root, ok = _retry_failed(root, ok, wide, xp)
    else:
        flags.append(xp.zeros_like(ok))
    flags.append(~ok)
    flags.append(underflow)
    root = _select(ok[:, None, None], root, previous_root, xp)
    return root, xp.astype(xp.stack(flags, axis=1), xp.int32)


def _acceptable(root, residual, config, xp):
    return _xp.all_finite(root, xp, axes=(-2, -1)) & (residual <= config.residual_tolerance)


def _retry_failed(root, ok, compute_fallback, xp):
    """Replace the failed blocks' roots by compute_fallback(), computed only if any failed."""
    def fallback():
        candidate = compute_fallback()
        accepted = _xp.all_finite(candidate, xp, axes=(-2, -1))
        use = (~ok & accepted)[:, None, None]
        return xp.where(use, candidate, root), ok | accepted

    run_if = _xp.backend_function(xp, "run_if") or _run_if_generic
    return run_if(xp.any(~ok), fallback, lambda: (root, ok))


def _run_if_generic(predicate, compute, otherwise):
    return compute() if bool(predicate) else otherwise()


def _dasgo_statistics(G, state, config, xp) -> _Statistics:
    decay, weight = _statistics_weights(config)
    old_v = xp.reshape(state.second_moment, (-1, G.shape[-1]))
    column_energy = xp.sum(G * G, axis=-2)
    finite = xp.all(xp.isfinite(column_energy), axis=-1)
    return _Statistics(finite, decay * old_v + weight * column_energy, None)


def _dasgo_direction(momentum, statistics, state, config, xp):
    lead = state.skipped.shape
    old_v = xp.reshape(state.second_moment, statistics.values.shape)
    v = xp.where(statistics.finite[:, None], statistics.values, old_v)
    direction = momentum / xp.sqrt(v + config.eps)[:, None, :]
    return direction, state._replace(second_moment=xp.reshape(v, lead + (v.shape[-1],)))


def _scale(direction, finite, config, row_shards, xp):
    """(B, 1, 1): ρ·√(mn)/‖D‖_F per matrix (1 when ρ is None or D = 0), 0 for skipped ones.
    D is finite here (skipped matrices carry their old momentum)."""
    mask = xp.astype(finite, direction.dtype)[:, None, None]
    if config.update_rms is None:
        return mask
    m, n = direction.shape[-2:]
    if row_shards is None:
        norm = xp.linalg.vector_norm(direction, axis=(-2, -1), keepdims=True)
    else:
        m = row_shards.rows
        norm = xp.sqrt(row_shards.sum(xp.sum(direction * direction, axis=(-2, -1))))[:, None, None]
    target = config.update_rms * math.sqrt(m * n)
    positive = norm > 0
    return mask * xp.where(positive, target / xp.where(positive, norm, xp.ones_like(norm)),
                           xp.ones_like(norm))
