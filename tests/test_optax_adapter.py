"""The optax adapter against the core, optax itself, jit, wrappers, dtypes and real data."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asgo_core import ASGOConfig, DASGOConfig, init_state, load_state, step
from asgo_core.adapters.optax import (
    ASGO_STATIC_ARGS,
    DASGO_STATIC_ARGS,
    MuonDimensionNumbers,
    asgo,
    dasgo,
    numerics_counters,
    scale_by_asgo,
    scale_by_dasgo,
    state_from_portable,
)
from helpers.numerics import jax_x64, relative_error, tolerance

LR = 0.05


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """jaxlib's CPU eigh runs LAPACK in OpenBLAS; XLA runs independent eighs concurrently and
    their OpenBLAS threads oversubscribe a small CPU (see benchmarks/step_time_jax.py)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield


def _tree(rng, dtype="float32") -> dict:
    """Two same-shaped (in, out) matrices (one stack), a tall one, a batched 3-D one, a bias."""
    shapes = {"a": (12, 8), "b": (12, 8), "tall": (20, 6), "heads": (3, 5, 7), "bias": (8,)}
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


# (in, out) 2-D leaves default; "heads" has batch axis 0, inputs axis 1, outputs axis 2.
DIMENSION_NUMBERS = {"a": MuonDimensionNumbers(), "b": MuonDimensionNumbers(),
                     "tall": MuonDimensionNumbers(), "bias": None,
                     "heads": MuonDimensionNumbers(reduction_axis=1, output_axis=2)}


def _core_view(name, x):
    """The (batch, out, in) stack the core sees for each matrix leaf, and back."""
    return np.swapaxes(x, -1, -2) if name == "heads" else x.T[None]


def _core_unview(name, stack):
    return np.swapaxes(stack, -1, -2) if name == "heads" else stack[0].T


def _apply_jitted(tx, params, grad_sequence, state=None):
    state = tx.init(params) if state is None else state
    train_step = _train_step(tx)
    for grads in grad_sequence:
        params, state = train_step(params, state, grads)
    return params, state


_TRAIN_STEPS = {}


def _train_step(tx):
    """One jitted update + apply per transformation (reused, so results are bit-comparable)."""
    if id(tx) not in _TRAIN_STEPS:
        @jax.jit
        def train_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        _TRAIN_STEPS[id(tx)] = (tx, train_step)
    return _TRAIN_STEPS[id(tx)][1]


@pytest.mark.parametrize("method", ["asgo", "dasgo"])
def test_parity_with_the_core_over_ten_float64_steps(method):
    rng = np.random.default_rng(0)
    params = _tree(rng, "float64")
    grad_sequence = [_tree(rng, "float64") for _ in range(10)]
    decayed = {"a": True, "b": False, "tall": True, "heads": True, "bias": False}
    if method == "asgo":
        tau = 3
        tx = asgo(LR, precondition_frequency=tau, weight_decay=0.1, weight_decay_mask=decayed,
                  weight_dimension_numbers=DIMENSION_NUMBERS)
        config = ASGOConfig(precondition_frequency=tau, weight_decay=0.1)
    else:
        tau = 1
        tx = dasgo(LR, weight_decay=0.1, weight_decay_mask=decayed,
                   weight_dimension_numbers=DIMENSION_NUMBERS)
        config = DASGOConfig(weight_decay=0.1)

    with jax_x64():
        jax_params, _ = _apply_jitted(tx, jax.tree.map(jnp.asarray, params),
                                      [jax.tree.map(jnp.asarray, g) for g in grad_sequence])
        jax_params = jax.tree.map(np.asarray, jax_params)

    for name in ("a", "b", "tall", "heads"):
        leaf_config = config if decayed[name] else type(config)(
            **{**config.__dict__, "weight_decay": 0.0})
        W = _core_view(name, params[name])
        state = init_state(W, leaf_config)
        for t, grads in enumerate(grad_sequence):
            update, state = step(_core_view(name, grads[name]), state, W, leaf_config,
                                 refresh_root=t % tau == 0)
            W = W - LR * update
        assert jax_params[name].dtype == np.float64
        assert relative_error(jax_params[name], _core_unview(name, W)) < tolerance("float64"), name


def test_adamw_route_equals_optax_adamw():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grad_sequence = [jax.tree.map(jnp.asarray, _tree(rng)) for _ in range(5)]
    tx = asgo(LR, adam_learning_rate=0.01, adam_weight_decay=0.02,
              weight_dimension_numbers=DIMENSION_NUMBERS)
    reference = optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.02)
    ours, _ = _apply_jitted(tx, params, grad_sequence)
    expected, _ = _apply_jitted(reference, {"bias": params["bias"]},
                                [{"bias": g["bias"]} for g in grad_sequence])
    np.testing.assert_allclose(ours["bias"], expected["bias"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours["a"], params["a"])  # the matrices moved too, by ASGO


def _digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    return jnp.asarray(data.data / 16.0, jnp.float32), jnp.asarray(data.target)


def _mlp_loss(params, x, y):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("make", [lambda: asgo(0.02), lambda: dasgo(0.02)], ids=["asgo", "dasgo"])
def test_mlp_on_digits_trains(make):
    x, y = _digits()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (64, 64)) / 8.0, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 10)) / 8.0, "b2": jnp.zeros(10)}
    tx = make()
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    accuracy = float(jnp.mean(jnp.argmax(jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"]
                                         + params["b2"], axis=-1) == y))
    assert accuracy > 0.9


@pytest.mark.parametrize("make, static_args, options", [
    (asgo, ASGO_STATIC_ARGS, dict(precondition_frequency=2, b2=0.9, max_precond_dim=4)),
    (dasgo, DASGO_STATIC_ARGS, dict(b2=0.9, eps=1e-6, update_rms=None)),
], ids=["asgo", "dasgo"])
def test_inject_hyperparams_matches_and_controls_the_learning_rate(make, static_args, options):
    """Each algorithm's static arguments; weight_dimension_numbers a callable (not a schedule)."""
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grad_sequence = [jax.tree.map(jnp.asarray, _tree(rng)) for _ in range(4)]
    tx_kwargs = dict(weight_dimension_numbers=lambda tree: DIMENSION_NUMBERS, **options)
    plain, _ = _apply_jitted(make(LR, **tx_kwargs), params, grad_sequence)
    injected_tx = optax.inject_hyperparams(make, static_args=static_args)(learning_rate=LR, **tx_kwargs)
    injected, state = _apply_jitted(injected_tx, params, grad_sequence)
    for name in params:
        np.testing.assert_allclose(injected[name], plain[name], rtol=1e-6, atol=1e-7)

    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = injected_tx.update(grad_sequence[0], state, injected)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


def test_multisteps_equals_one_step_on_the_mean_gradient():
    rng = np.random.default_rng(3)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    g1, g2 = (jax.tree.map(jnp.asarray, _tree(rng)) for _ in range(2))
    accumulated, _ = _apply_jitted(optax.MultiSteps(asgo(LR, weight_dimension_numbers=DIMENSION_NUMBERS),
                                                    every_k_schedule=2), params, [g1, g2])
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    direct, _ = _apply_jitted(asgo(LR, weight_dimension_numbers=DIMENSION_NUMBERS), params, [mean])
    for name in params:
        np.testing.assert_allclose(accumulated[name], direct[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("make", [scale_by_asgo, scale_by_dasgo], ids=["asgo", "dasgo"])
def test_dtype_and_state_layout_are_preserved(dtype, make):
    rng = np.random.default_rng(4)
    params = {name: jnp.asarray(value, dtype) for name, value in _tree(rng).items() if name != "bias"}
    dimension_numbers = {k: v for k, v in DIMENSION_NUMBERS.items() if k != "bias"}
    tx = optax.chain(make(weight_decay=0.1, weight_dimension_numbers=dimension_numbers), optax.scale(-LR))
    state = tx.init(params)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update_fn = jax.jit(tx.update)
    for _ in range(3):
        grads = {name: jnp.asarray(value, dtype) for name, value in _tree(rng).items() if name != "bias"}
        updates, state = update_fn(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
    momentum_dtypes = {leaf.dtype for leaf in jax.tree.leaves(optax.tree_utils.tree_get(state, "momentum"))}
    assert momentum_dtypes == {jnp.dtype(jnp.float32)}  # statistics in float32 for bf16 too


def test_nan_gradient_is_skipped_without_decay_and_counted():
    rng = np.random.default_rng(5)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grads = jax.tree.map(jnp.asarray, _tree(rng))
    grads["a"] = grads["a"].at[0, 0].set(jnp.nan)
    new_params, state = _apply_jitted(asgo(LR, weight_decay=0.1, weight_dimension_numbers=DIMENSION_NUMBERS),
                                      params, [grads])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(new_params))
    np.testing.assert_array_equal(new_params["a"], params["a"])   # no step, no decay
    assert not np.allclose(new_params["b"], params["b"])          # same stack, still stepped
    assert numerics_counters(state)["skipped"] == 1


# Options the adapters share are refused by tests/adversarial (optax driver: asgo()); these are
# optax's own refusal and DASGO's options under their optax names.
@pytest.mark.parametrize("make, kwargs, name", [
    (asgo, {"nonfinite": "raise"}, "nonfinite"),
    (dasgo, {"b2": 1.0}, "b2"),
    (dasgo, {"accumulate": "max"}, "accumulate"),
])
def test_bad_arguments_raise_at_construction_naming_the_argument(make, kwargs, name):
    kwargs = {"learning_rate": 1e-2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}="):
        make(**kwargs)


def test_one_compilation_for_one_hundred_steps():
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    rng = np.random.default_rng(6)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grads = jax.tree.map(jnp.asarray, _tree(rng))
    tx = asgo(optax.cosine_decay_schedule(LR, 100), precondition_frequency=10,
              weight_dimension_numbers=DIMENSION_NUMBERS)
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        params, state = train_step(params, state)
        first = len(compiles)
        for _ in range(99):
            params, state = train_step(params, state)
        jax.block_until_ready(params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1 and len(compiles) == first
    assert train_step._cache_size() == 1


def test_state_round_trips_through_numpy():
    rng = np.random.default_rng(7)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    grad_sequence = [jax.tree.map(jnp.asarray, _tree(rng)) for _ in range(4)]
    tx = asgo(LR, precondition_frequency=2, weight_dimension_numbers=DIMENSION_NUMBERS)
    straight, _ = _apply_jitted(tx, params, grad_sequence)

    halfway, state = _apply_jitted(tx, params, grad_sequence[:2])
    leaves, treedef = jax.tree.flatten(state)
    saved = [np.array(leaf) for leaf in leaves]                  # e.g. what np.savez would store
    restored = jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in saved])
    halfway, _ = _apply_jitted(tx, halfway, grad_sequence[2:], state=restored)
    for name in params:
        np.testing.assert_array_equal(halfway[name], straight[name])


def test_jax_backend_fast_paths_match_the_generic_code():
    from asgo_core import inverse_root
    from asgo_core.backends import jax as jax_backend

    rng = np.random.default_rng(8)
    G = rng.standard_normal((2, 16, 40))
    A = jnp.asarray(G @ np.swapaxes(G, -1, -2), jnp.float32)
    expected = inverse_root(np.asarray(A, np.float64), method="eigh")
    for method in ("eigh", "polar_express"):
        root = inverse_root(A, method=method)
        assert relative_error(root, expected) < 1e-3, method
    assert jax_backend.choose_root_method(384, jnp.float32, jax.devices("cpu")[0]) == "eigh"
    V = jnp.zeros((2, 16, 16))
    np.testing.assert_allclose(jax_backend.gram_update(V + 1.0, jnp.asarray(G, jnp.float32), 0.5, 2.0),
                               0.5 + 2.0 * (G @ np.swapaxes(G, -1, -2)), rtol=1e-5)


# Parameter trees as JAX code has them: a bare matrix, matrices with vectors, None entries.
PARAMETER_TREES = {
    "matrix": lambda: jnp.ones((8, 6)),
    "w": lambda: {"w": jnp.ones((8, 6))},
    "w,b": lambda: {"w": jnp.ones((8, 6)), "b": jnp.ones(6)},
    "nested with None": lambda: {"layer": {"w": jnp.ones((8, 6)), "b": jnp.ones(6), "scale": None},
                                 "out": (jnp.ones((6, 3)), None)},
}


@pytest.mark.parametrize("tree", PARAMETER_TREES)
@pytest.mark.parametrize("make", [lambda: asgo(LR, max_precond_dim=5), lambda: dasgo(LR)], ids=["asgo", "dasgo"])
def test_map_params_reaches_the_per_leaf_state(make, tree):
    """optax.tree.map_params maps every subtree shaped like the parameters, so the momentum
    (in each leaf's own shape) is reached there, as optax.adamw's mu is."""
    params = PARAMETER_TREES[tree]()
    tx = make()
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(lambda p: p + 1.0, params), state, params)
    mapped = optax.tree.map_params(tx, lambda x: jnp.full(jnp.shape(x), 7, x.dtype), state)

    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    momentum = optax.tree_utils.tree_get(mapped, "momentum")
    matrices = [leaf for leaf in jax.tree.leaves(momentum) if jnp.ndim(leaf) == 2]
    assert [m.shape for m in matrices] == [p.shape for p in jax.tree.leaves(params) if p.ndim == 2]
    assert all(bool(jnp.all(m == 7)) for m in matrices)
    ours = [s for s in jax.tree.leaves(mapped, is_leaf=lambda x: hasattr(x, "momentum")) if hasattr(s, "momentum")]
    assert len(ours) == 1 and int(ours[0].count) == 1  # not shaped like the parameters: kept


def test_state_types_stay_the_same_in_a_scan_under_an_explicit_sharding_mesh():
    """asgo() and dasgo() in a jitted lax.scan loop (its carry must keep its types) with the
    parameters sharded over an AxisType.Explicit mesh, against the same loop unsharded."""
    script = Path(__file__).parent / "jax_explicit_mesh_worker.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [report["algorithm"] for report in reports] == ["asgo", "dasgo"]
    for report in reports:
        assert report["devices"] == 2
        assert report["trained_state_types"] == report["state_types"]
        assert report["momentum_types"] == {"w_in": "float32[8,16@x]", "w_out": "float32[16,8@x]"}
        assert report["param_types"]["w_in"] == "float32[8,16@x]"
        assert report["moved"] > 0.1 and report["difference"] < 1e-4, report


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_portable_checkpoint_of_the_stacked_state_layout_resumes():
    """optax_asgo_step3.npz was written by the adapter when its state held one stack per
    (m, n) (two leaves in one stack, a 3-D leaf, max_precond_dim remainder blocks, AdamW);
    optax_asgo_resume.npz holds that run's params, its next two gradients and the params
    that adapter reached after them."""
    recorded = np.load(FIXTURES / "optax_asgo_resume.npz")
    names = ("a", "b", "tall", "heads", "bias")
    numbers = {**DIMENSION_NUMBERS}
    options = dict(precondition_frequency=2, max_precond_dim=4, weight_decay=0.05)
    with jax_x64():
        params = {name: jnp.asarray(recorded[f"resume/{name}"]) for name in names}
        tx = asgo(0.05, weight_dimension_numbers=numbers, **options)
        state = state_from_portable(load_state(FIXTURES / "optax_asgo_step3.npz"), params, tx,
                                    ASGOConfig(**options), weight_dimension_numbers=numbers)
        for t in range(2):
            grads = {name: jnp.asarray(recorded[f"grad{t}/{name}"]) for name in names}
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        for name in names:
            assert relative_error(np.asarray(params[name]), recorded[f"expected/{name}"]) < 1e-12, name


def test_by_default_two_dimensional_leaves_are_in_out_matrices_and_the_rest_adamw():
    """No weight_dimension_numbers: every 2-D leaf, read as an x @ W weight (in, out), goes to
    ASGO; 0-D, 1-D and 3-D leaves go to AdamW."""
    params = {"w": jnp.ones((8, 6)), "v": jnp.ones((5, 3)), "b": jnp.ones(6), "s": jnp.ones(()),
              "stack": jnp.ones((2, 3, 4))}
    state = asgo(LR, side="left").init(params)
    gram = optax.tree_utils.tree_get(state, "gram")
    adam_mu = optax.tree_utils.tree_get(state, "mu")
    assert {name for name, leaf in gram.items() if isinstance(leaf, jax.Array)} == {"w", "v"}
    assert {name for name, leaf in adam_mu.items() if isinstance(leaf, jax.Array)} == {"b", "s", "stack"}
    # side="left" preconditions the outputs: the second axis of an (in, out) leaf
    assert gram["w"].shape == (1, 6, 6) and gram["v"].shape == (1, 3, 3)


@pytest.mark.parametrize("make, algorithm", [(asgo, "asgo"), (dasgo, "dasgo")])
def test_signature_defaults_are_the_options_tables(make, algorithm):
    from asgo_core.options import defaults
    table = defaults(algorithm, "optax")
    signature = {name: p.default for name, p in inspect.signature(make).parameters.items()}
    shared = (set(table) & set(signature)) - {"learning_rate"}  # asgo()/dasgo() require it
    assert {"b1", "b2", "eps", "weight_decay", "adam_b1", "adam_eps"} <= shared
    assert {name: signature[name] for name in shared} == {name: table[name] for name in shared}


def test_options_bind_positionally_in_the_documented_order():
    """optax's functions take every option positionally: a positional call reaches the option at
    its place in the docs (docs/optax.md), and an error names it."""
    names = list(inspect.signature(asgo).parameters)
    assert names[:5] == ["learning_rate", "b1", "b2", "eps", "damping"]
    assert names[names.index("weight_decay") + 1] == "weight_decay_mask"
    assert names[-1] == "weight_dimension_numbers"
    with pytest.raises(ValueError, match="damping"):
        scale_by_asgo(0.9, 0.8, 1e-6, "bogus")
    with pytest.raises(ValueError, match="update_rms"):
        dasgo(LR, 0.9, 0.95, 1e-8, -1.0)
    with pytest.raises(TypeError, match="scale_by_dasgo.*accepted: b1, b2"):
        scale_by_dasgo(learning_rate=LR)
    assert inspect.signature(asgo).parameters["learning_rate"].default is inspect.Parameter.empty
    assert inspect.signature(scale_by_asgo).parameters["weight_decay"].default == 0.0
