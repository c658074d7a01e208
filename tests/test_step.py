"""The core step against the independent re-derivation, its limits, and the numerics contract."""

from __future__ import annotations

import functools
import itertools
import threading

import numpy as np
import pytest

from asgo_core import ASGOConfig, DASGOConfig, FALLBACK_LEVELS, RowShards, init_state, step, step_terms
from helpers.numerics import relative_error, tolerance
from helpers.reference import reference_asgo, reference_dasgo

LR = 0.05


def gradient_sequence(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def run_core(backend, W0, grads, config, dtype="float64"):
    """Apply `step` to the (stack of) matrices W0 for every gradient; returns (W, state) as NumPy."""
    W = backend.asarray(W0, dtype)
    state = init_state(W, config)
    for G in grads:
        update, state = step(backend.asarray(G, dtype), state, W, config)
        W = W - LR * update
    return backend.to_numpy(W), state


STEP_OPTIONS = list(itertools.product(
    [(6, 10), (10, 6), (8, 8)],          # left side, right side, square (right)
    [1, 3],                              # precondition_frequency
    [0.2, None],                         # update_rms
    ["ema", "sum"],                      # accumulate
))


@pytest.mark.parametrize("shape, tau, rho, accumulate", STEP_OPTIONS)
def test_ten_steps_match_the_reference_float64(shape, tau, rho, accumulate):
    check_against_reference(BackendNumpy, shape, tau, rho, accumulate)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_every_backend_matches_the_reference_float64(backend, shape):
    check_against_reference(backend, shape, tau=3, rho=0.2, accumulate="ema")


def check_against_reference(backend, shape, tau, rho, accumulate):
    grads = gradient_sequence(shape, 10)
    W0 = np.random.default_rng(9).standard_normal(shape)
    config = ASGOConfig(precondition_frequency=tau, update_rms=rho, accumulate=accumulate,
                        beta2=0.8 if accumulate == "ema" else 0.9)
    W, state = run_core(backend, W0, grads, config)
    W_ref, M_ref, V_ref, R_ref = reference_asgo(
        W0, grads, lr=LR, beta2=config.beta2, tau=tau, update_rms=rho, accumulate=accumulate)
    assert relative_error(W, W_ref) < tolerance("float64")
    assert relative_error(backend.to_numpy(state.momentum), M_ref) < tolerance("float64")
    assert relative_error(backend.to_numpy(state.gram[0])[0], V_ref) < tolerance("float64")
    assert relative_error(backend.to_numpy(state.root[0])[0], R_ref) < 1e-8


@pytest.mark.parametrize("side", ["left", "right"])
def test_explicit_side_and_absolute_damping_match_the_reference(side):
    grads = gradient_sequence((7, 9), 10, seed=1)
    W0 = np.random.default_rng(2).standard_normal((7, 9))
    config = ASGOConfig(side=side, damping="absolute", eps=1e-3, weight_decay=0.0)
    W, _ = run_core(BackendNumpy, W0, grads, config)
    W_ref, *_ = reference_asgo(W0, grads, lr=LR, side=side, damping="absolute", eps=1e-3, weight_decay=0.0)
    assert relative_error(W, W_ref) < tolerance("float64")


def test_float32_stays_close_to_the_float64_reference(backend):
    grads = gradient_sequence((12, 20), 10, seed=3)
    W0 = np.random.default_rng(4).standard_normal((12, 20))
    config = ASGOConfig(eps=1e-4)
    W, state = run_core(backend, W0, grads, config, dtype="float32")
    assert str(state.gram[0].dtype).endswith("float32")
    W_ref, *_ = reference_asgo(W0, grads, lr=LR, eps=1e-4)
    assert relative_error(W, W_ref) < tolerance("float32")


@pytest.mark.parametrize("root_method", ["eigh", "newton_schulz", "polar_express", "coupled_newton"])
def test_stack_of_matrices_matches_each_matrix_alone(root_method):
    grads = gradient_sequence((3, 5, 16), 4, seed=5)
    W0 = np.random.default_rng(6).standard_normal((3, 5, 16))
    config = ASGOConfig(root_method=root_method)
    W_stack, _ = run_core(BackendNumpy, W0, grads, config)
    for i in range(3):
        W_ref, *_ = reference_asgo(W0[i], [G[i] for G in grads], lr=LR)
        assert relative_error(W_stack[i], W_ref) < 1e-8


def test_muon_limit_gives_the_scaled_polar_factor():
    """β1 = β2 = 0 and no damping: V^{-1/2}·G = U·Vᵀ for G = U·Σ·Vᵀ, rescaled to RMS ρ."""
    G = np.random.default_rng(7).standard_normal((6, 15))
    config = ASGOConfig(beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, update_rms=0.3)
    update, _ = step(G, init_state(G, config), G, config)
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    polar = U @ Vt
    expected = polar * 0.3 * np.sqrt(G.size) / np.linalg.norm(polar)
    assert relative_error(update, expected) < 1e-10


def test_dasgo_without_memory_normalises_columns():
    G = np.random.default_rng(8).standard_normal((9, 5))
    config = DASGOConfig(beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, update_rms=None)
    update, _ = step(G, init_state(G, config), G, config)
    assert relative_error(update, G / np.linalg.norm(G, axis=0)) < 1e-12


@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_dasgo_matches_the_reference(accumulate, backend):
    grads = gradient_sequence((6, 11), 10, seed=10)
    W0 = np.random.default_rng(11).standard_normal((6, 11))
    config = DASGOConfig(accumulate=accumulate)
    W, state = run_core(backend, W0, grads, config)
    W_ref, M_ref, v_ref = reference_dasgo(W0, grads, lr=LR, accumulate=accumulate)
    assert relative_error(W, W_ref) < tolerance("float64")
    assert relative_error(backend.to_numpy(state.second_moment), v_ref) < tolerance("float64")


@pytest.mark.parametrize("rho", [0.2, None])
def test_rank_one_gradient_gives_a_finite_bounded_update(rho):
    rng = np.random.default_rng(12)
    G = np.outer(rng.standard_normal(16), rng.standard_normal(40))
    config = ASGOConfig(weight_decay=0.0, update_rms=rho)
    update, state = step(G, init_state(G, config), G, config)
    assert np.all(np.isfinite(update))
    # Along G's single direction the damped root is exact; the update is G's unit direction scaled.
    rms = np.sqrt(np.mean(update**2))
    assert rms == pytest.approx(0.2) if rho else rms < 10.0 / np.sqrt(G.size)
    assert int(np.sum(state.fallbacks)) == 0


def test_zero_gradient_gives_zero_update():
    G = np.zeros((2, 4, 7))
    for config in (ASGOConfig(weight_decay=0.0), DASGOConfig(weight_decay=0.0)):
        update, state = step(G, init_state(G, config), G, config)
        assert np.array_equal(update, np.zeros_like(G))
        assert int(np.sum(state.skipped)) == 0


@pytest.mark.parametrize("config", [ASGOConfig(), ASGOConfig(max_precond_dim=3), DASGOConfig()],
                         ids=["asgo", "asgo-blocked", "dasgo"])
def test_nan_gradient_skips_only_that_matrix(config, backend):
    rng = np.random.default_rng(13)
    W = backend.asarray(rng.standard_normal((3, 5, 8)), "float64")
    state = init_state(W, config)
    _, state = step(backend.asarray(rng.standard_normal((3, 5, 8)), "float64"), state, W, config)
    bad = rng.standard_normal((3, 5, 8))
    bad[1, 2, 3] = np.nan
    bad[2, 0, 0] = np.inf
    update, new_state = step(backend.asarray(bad, "float64"), state, W, config)
    update = backend.to_numpy(update)
    assert np.all(np.isfinite(update))
    assert np.array_equal(update[1:], np.zeros_like(update[1:]))
    assert np.any(update[0] != 0)
    assert backend.to_numpy(new_state.skipped).tolist() == [0, 1, 1]
    for old, new in zip(_flat_arrays(state), _flat_arrays(new_state)):
        old, new = backend.to_numpy(old), backend.to_numpy(new)
        if old.ndim >= 3 and old.shape[0] == 3:  # per-matrix leaves: matrices 1, 2 untouched
            assert np.array_equal(old[1:], new[1:])


def test_nonfinite_raise_policy_raises():
    config = ASGOConfig(nonfinite="raise")
    G = np.full((4, 6), np.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        step(G, init_state(G, config), G, config)


def test_root_is_recomputed_every_tau_steps():
    grads = gradient_sequence((5, 9), 7, seed=14)
    config = ASGOConfig(precondition_frequency=3)
    W = np.zeros((5, 9))
    state = init_state(W, config)
    roots = []
    for G in grads:
        _, state = step(G, state, W, config)
        roots.append(state.root[0].copy())
    changed = [not np.array_equal(roots[i], roots[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]


def test_failed_iterative_root_falls_back_to_eigh_and_counts_it():
    grads = gradient_sequence((6, 30), 1, seed=15)
    iterative = ASGOConfig(root_method="newton_schulz", root_steps=1, weight_decay=0.0)  # cannot converge
    exact = ASGOConfig(root_method="eigh", weight_decay=0.0)
    _, state = step(grads[0], init_state(grads[0], iterative), None, iterative)
    _, exact_state = step(grads[0], init_state(grads[0], exact), None, exact)
    assert state.fallbacks.tolist() == [1, 0, 0, 0]
    assert relative_error(state.root[0], exact_state.root[0]) < 1e-12


def test_unsolvable_root_keeps_the_previous_one_and_counts_it():
    """No damping and V = 0: every solver yields inf; the previous root is kept, never the identity."""
    config = ASGOConfig(eps=0.0, root_method="polar_express", weight_decay=0.0)
    G = np.random.default_rng(16).standard_normal((4, 10))
    _, state = step(G, init_state(G, config), None, config)
    good_root = state.root[0].copy()
    tiny_state = state._replace(gram=(np.zeros_like(state.gram[0]),))
    update, state = step(np.zeros_like(G), tiny_state, None, config)
    assert np.array_equal(state.root[0], good_root)
    # polar_express failed, eigh failed; float64 input has no wider retry; the old root was kept;
    # the momentum is nonzero while V = 0, so the statistics count as underflowed too
    assert state.fallbacks.tolist() == [1, 0, 1, 1]
    assert np.all(np.isfinite(update))
    assert list(FALLBACK_LEVELS) == ["eigh", "eigh_float64", "kept_previous_root", "statistics_underflow"]


@pytest.mark.parametrize("max_precond_dim", [4, 5, 12])
def test_blocks_equal_running_each_block_alone(max_precond_dim):
    """Left side, 12 rows in blocks: each block's update is that row slice's own ASGO step."""
    grads = gradient_sequence((12, 30), 5, seed=17)
    config = ASGOConfig(max_precond_dim=max_precond_dim, update_rms=None, weight_decay=0.0)
    W_blocked, _ = run_core(BackendNumpy, np.zeros((12, 30)), grads, config)
    alone = ASGOConfig(update_rms=None, weight_decay=0.0, side="left")
    for start in range(0, 12, max_precond_dim):
        rows = slice(start, start + max_precond_dim)
        W_alone, _ = run_core(BackendNumpy, np.zeros((12, 30))[rows], [G[rows] for G in grads], alone)
        assert relative_error(W_blocked[rows], W_alone) < 1e-10


def test_heads_equal_running_each_head_alone():
    """A (h·d_h) × d Q/K weight with num_heads: each head's rows get their own left root."""
    grads = gradient_sequence((4, 16, 16), 5, seed=18)  # a stack of 4 square 16×16 (4 heads of 4)
    config = ASGOConfig(num_heads=4, update_rms=None, weight_decay=0.0)
    W_heads, state = run_core(BackendNumpy, np.zeros((4, 16, 16)), grads, config)
    assert state.root[0].shape == (16, 4, 4)
    alone = ASGOConfig(update_rms=None, weight_decay=0.0, side="left")
    for head in range(4):
        rows = slice(4 * head, 4 * head + 4)
        W_alone, _ = run_core(BackendNumpy, np.zeros((4, 16, 16))[:, rows], [G[:, rows] for G in grads], alone)
        assert relative_error(W_heads[:, rows], W_alone) < 1e-10


def test_num_heads_must_divide_the_rows():
    with pytest.raises(ValueError, match="num_heads"):
        init_state(np.zeros((10, 8)), ASGOConfig(num_heads=3))


def test_bfloat16_parameters_get_float32_statistics_and_bfloat16_updates():
    import torch
    W = torch.ones(4, 6, dtype=torch.bfloat16)
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    config = ASGOConfig()
    update, state = step(G, init_state(W, config), W, config)
    assert state.momentum.dtype == torch.float32 and state.gram[0].dtype == torch.float32
    assert update.dtype == torch.bfloat16 and bool(torch.isfinite(update).all())


class _NumpyOnly:
    name = "numpy"

    @staticmethod
    def asarray(array, dtype):
        return np.asarray(array, dtype=dtype)

    @staticmethod
    def to_numpy(x):
        return np.asarray(x)


BackendNumpy = _NumpyOnly()


def _flat_arrays(state):
    for leaf in state:
        if isinstance(leaf, tuple):
            yield from leaf
        else:
            yield leaf


def test_bfloat16_matmul_inputs_stay_close_to_full_precision():
    import torch
    rng = np.random.default_rng(19)
    W0, grads = rng.standard_normal((2, 24, 40)), gradient_sequence((2, 24, 40), 5, seed=20)
    results = {}
    for matmul_dtype in (None, "bfloat16"):
        config = ASGOConfig(matmul_dtype=matmul_dtype)
        W = torch.tensor(W0, dtype=torch.float32)
        state = init_state(W, config)
        for G in grads:
            update, state = step(torch.tensor(G, dtype=torch.float32), state, W, config)
            W = W - LR * update
        assert state.gram[0].dtype == torch.float32 and W.dtype == torch.float32
        results[matmul_dtype] = W.numpy() - W0
    difference = relative_error(results["bfloat16"], results[None])
    assert 1e-6 < difference < 2e-2  # really rounded, yet close


def test_bfloat16_matmul_on_a_namespace_without_bfloat16_raises():
    config = ASGOConfig(matmul_dtype="bfloat16")
    G = np.ones((3, 5))
    with pytest.raises(ValueError, match="matmul_dtype"):
        step(G, init_state(G, config), G, config)


@pytest.mark.parametrize("config", [ASGOConfig(), DASGOConfig()], ids=["asgo", "dasgo"])
def test_overwrite_state_gives_the_same_step_and_the_default_leaves_the_state_alone(backend, config):
    """overwrite_state=True may reuse the old state's arrays (the torch adapter's in-place
    momentum); it must not change any value, and without it the old state stays intact."""
    rng = np.random.default_rng(3)
    W = backend.asarray(rng.standard_normal((2, 6, 10)), "float64")
    state = init_state(W, config)
    for _ in range(2):  # a non-zero momentum first
        _, state = step(backend.asarray(rng.standard_normal((2, 6, 10)), "float64"), state, W, config)
    G = backend.asarray(rng.standard_normal((2, 6, 10)), "float64")
    momentum_before = backend.to_numpy(state.momentum).copy()
    update, new_state = step(G, state, W, config)
    assert np.array_equal(backend.to_numpy(state.momentum), momentum_before)
    update_overwriting, overwritten_state = step(G, state, W, config, overwrite_state=True)
    assert np.array_equal(backend.to_numpy(update_overwriting), backend.to_numpy(update))
    assert np.array_equal(backend.to_numpy(overwritten_state.momentum),
                          backend.to_numpy(new_state.momentum))


def _underflow_count(state) -> int:
    return int(state.fallbacks[FALLBACK_LEVELS.index("statistics_underflow")])


@pytest.mark.parametrize("config", [ASGOConfig(), ASGOConfig(damping="absolute", eps=1e-10),
                                    ASGOConfig(root_method="polar_express")])
def test_float32_gradient_below_the_gram_range_is_counted(config):
    """G·1e-30 in float32: G·Gᵀ underflows to 0, the root degenerates to a multiple of I and the
    step to normalised momentum. Not scale-invariant there, so every refresh counts it."""
    G = np.random.default_rng(30).standard_normal((8, 24)).astype(np.float32)
    counts = []
    for scale in (1.0, 1e-30):
        state = init_state(G, config)
        for _ in range(2):
            _, state = step(G * np.float32(scale), state, G, config)
        counts.append(_underflow_count(state))
    assert counts == [0, 2]


def test_zero_gradient_is_not_counted_as_underflow():
    G = np.zeros((8, 24), dtype=np.float32)
    config = ASGOConfig()
    _, state = step(G, init_state(G, config), G, config)
    assert _underflow_count(state) == 0


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_step_is_scale_invariant_inside_the_float32_range(scale):
    """Relative damping and the RMS normalisation make the step of c·G equal that of G while
    the statistics stay in float32's normal range; nothing is counted there."""
    grads = [G.astype(np.float32) for G in gradient_sequence((8, 24), 3, seed=31)]
    config = ASGOConfig(weight_decay=0.0)
    updates = []
    for c in (1.0, scale):
        state = init_state(grads[0], config)
        for G in grads:
            update, state = step(G * np.float32(c), state, None, config)
        updates.append(update)
        assert _underflow_count(state) == 0
    assert relative_error(updates[1], updates[0]) < 1e-4


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (cond branches, scan bodies) included."""
    from jax.extend.core import jaxprs_in_params
    for equation in jaxpr.eqns:
        yield equation
        for inner in jaxprs_in_params(equation.params):
            yield from _equations(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("root_method", ["eigh", "polar_express", "coupled_newton"])
def test_every_jax_matmul_of_a_step_asks_for_full_precision(root_method):
    """JAX's default precision runs float32 matmuls in TF32 on Ampere/Hopper GPUs: each product
    of the step (Gram, root, fallback eigh root, root × momentum) must request HIGHEST."""
    import jax
    import jax.numpy as jnp

    config = ASGOConfig(root_method=root_method, max_precond_dim=8)
    G = jnp.asarray(np.random.default_rng(32).standard_normal((2, 12, 20)), dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(lambda G, state: step(G, state, G, config, refresh_root=True))(
        G, init_state(G, config))
    products = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(products) >= 3
    assert [e.params["precision"] for e in products if e.params["precision"] != (
        jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)] == []


@pytest.mark.parametrize("platform, maps_one_at_a_time", [("cpu", True), ("gpu", False)])
def test_jax_eigh_goes_one_matrix_at_a_time_on_cpu_only(platform, maps_one_at_a_time, monkeypatch):
    """lax.map avoids a CPU thread-pool deadlock; on a GPU it would serialise the batch."""
    import jax
    import jax.numpy as jnp
    from asgo_core.backends import jax as jax_backend

    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    A = jnp.eye(4, dtype=jnp.float32)[None].repeat(3, axis=0)
    # a new function each time, so no cached trace is reused; traced, the device is unknown
    # and the default platform decides
    jaxpr = jax.make_jaxpr(lambda A: jax_backend.eigh(A))(A)
    names = {e.primitive.name for e in _equations(jaxpr.jaxpr)}
    assert "eigh" in names
    assert ("scan" in names) == maps_one_at_a_time


@pytest.mark.parametrize("overwrite", [True, False])
def test_torch_masked_ema_on_the_cuda_path_honours_overwrite(overwrite, monkeypatch):
    """The path taken where reading the mask would sync (CUDA): a matrix whose gradient holds
    NaN keeps its old value exactly, the others get the EMA, and overwrite=True writes into old."""
    import torch
    from asgo_core.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "_mask_is_free_to_read", lambda mask: False)
    rng = np.random.default_rng(33)
    old_values, new_values = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    new_values[1, 2, 3] = np.nan
    old, new = torch.tensor(old_values), torch.tensor(new_values)  # copies: old may be written
    mask = torch.tensor([True, False, True])[:, None, None]
    result = torch_backend.masked_ema(mask, old, new, 0.9, overwrite)
    expected = np.where([[[True]], [[False]], [[True]]], 0.9 * old_values + 0.1 * new_values, old_values)
    assert np.allclose(result.numpy(), expected, rtol=1e-14, atol=0)
    assert (result.data_ptr() == old.data_ptr()) == overwrite
    if not overwrite:
        assert np.array_equal(old.numpy(), old_values)


class ThreadGroup:
    """All-reduces among threads, each thread standing for one process of a sharded run."""

    def __init__(self, size: int):
        self.barrier, self.values = threading.Barrier(size, timeout=60), [None] * size

    def reduce(self, rank: int, value, combine):
        self.values[rank] = value
        self.barrier.wait()
        result = functools.reduce(combine, self.values)
        self.barrier.wait()  # every rank has read the values before any writes the next ones
        return result


def split_roots(rank: int, group: ThreadGroup, solved: list):
    """RowShards.roots for two threads: thread r solves the roots of matrices r, r + 2, ...,
    and a sum of zero-filled stacks gives both threads all of them."""
    def roots(solve, grams, previous_roots, moving):
        mine = np.arange(rank, grams.shape[0], 2)
        root, flags = solve(grams[mine], previous_roots[mine], moving[mine])
        solved[rank] += len(mine)
        all_roots = np.zeros_like(grams)
        all_flags = np.zeros((grams.shape[0], flags.shape[1]), flags.dtype)
        all_roots[mine], all_flags[mine] = root, flags
        return group.reduce(rank, all_roots, np.add), group.reduce(rank, all_flags, np.add)
    return roots


@pytest.mark.parametrize("share_roots", [False, True], ids=["every root", "roots split"])
def test_row_shards_with_their_reductions_step_like_the_whole_matrices(share_roots):
    """Rows 0–3 and 4–9 of a stack of three 10×6 matrices (the third with a zero gradient on
    the second shard only), stepped by two threads whose RowShards sum and any over both (and
    split the roots between them, or each solve all): each shard's update equals its rows of
    the unsharded step, and both count what it counts."""
    config = ASGOConfig(update_rms=0.2, precondition_frequency=2, side="right")  # as for 10×6, not 4×6
    grads = gradient_sequence((3, 10, 6), 3)
    for grad in grads:
        grad[2, 4:] = 0.0
    bounds, group = [(0, 4), (4, 10)], ThreadGroup(2)
    results, solved = [[] for _ in bounds], [0, 0]

    def run_shard(rank):
        first, last = bounds[rank]
        roots = {"roots": split_roots(rank, group, solved)} if share_roots else {}
        shards = RowShards(rows=10, sum=lambda x: group.reduce(rank, x, np.add),
                           any=lambda flags: group.reduce(rank, flags, np.logical_or), **roots)
        state = init_state(np.zeros((3, last - first, 6)), config)
        for grad in grads:
            direction, scale, state = step_terms(grad[:, first:last], state, config, row_shards=shards)
            results[rank].append((direction * scale, state))

    threads = [threading.Thread(target=run_shard, args=(rank,)) for rank in range(len(bounds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = init_state(np.zeros((3, 10, 6)), config)
    for index, grad in enumerate(grads):
        direction, scale, state = step_terms(grad, state, config)
        for (first, last), shard_results in zip(bounds, results):
            shard_update, shard_state = shard_results[index]
            np.testing.assert_allclose(shard_update, (direction * scale)[:, first:last], rtol=1e-12,
                                       atol=1e-14)
            np.testing.assert_allclose(shard_state.gram[0], state.gram[0], rtol=1e-12)
            np.testing.assert_array_equal(shard_state.fallbacks, state.fallbacks)
    assert solved == ([2 * 2, 1 * 2] if share_roots else [0, 0])  # 2 refreshes: steps 0 and 2


@pytest.mark.parametrize("config", [ASGOConfig(side="left"), ASGOConfig(num_heads=2), DASGOConfig()],
                         ids=["rows preconditioned", "head blocks", "dasgo"])
def test_row_shards_are_refused_where_the_gram_is_not_a_sum_over_rows(config):
    shards = RowShards(rows=8, sum=lambda x: x, any=lambda flags: flags)
    grad = np.ones((1, 8, 4))
    with pytest.raises(ValueError, match="row_shards"):
        step_terms(grad, init_state(grad, config), config, row_shards=shards)


def test_traced_root_refresh_picks_the_refresh_steps():
    from asgo_core.step import traced_root_refresh

    def cond(predicate, if_true, if_false):
        return if_true() if predicate else if_false()

    def no_cond(*_):
        raise AssertionError("cond is only needed when precondition_frequency > 1")

    def picks(config, count, choose=cond):
        return traced_root_refresh(config, count, choose, lambda: "refreshed", lambda: "kept")

    every_third = ASGOConfig(precondition_frequency=3)
    expected = ["refreshed", "kept", "kept"] * 2 + ["refreshed"]
    assert [picks(every_third, count) for count in range(7)] == expected
    assert [picks(ASGOConfig(), count, no_cond) for count in range(3)] == ["refreshed"] * 3
    assert [picks(DASGOConfig(), count, no_cond) for count in range(3)] == ["kept"] * 3
