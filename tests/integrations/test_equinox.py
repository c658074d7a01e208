"""Equinox + optax driving ASGO: a jitted step on eqx.filter-ed parameters.

An eqx.nn.Linear weight is (out, in), as in torch, while the optax adapter's default view of
a 2-D leaf is (in, out) (the Flax/optax convention). OUT_IN tells the adapter so; with it the
weight gets exactly the torch adapter's step, without it a layout-sensitive option
(side, num_heads, DASGO) acts on the wrong dimension.
"""

from __future__ import annotations

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asgo_core.adapters.optax import MuonDimensionNumbers, asgo, dasgo
from helpers.numerics import jax_x64, relative_error, tolerance
from helpers.torch_reference import LAYOUT_SENSITIVE_CASES, torch_steps


def out_in_weights(params):
    """weight_dimension_numbers for Equinox: 2-D leaves are (out, in) matrices, the rest AdamW."""
    return jax.tree.map(
        lambda leaf: MuonDimensionNumbers(reduction_axis=1, output_axis=0) if leaf.ndim == 2 else None,
        params)


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@contextlib.contextmanager
def counting_compilations():
    """A list that grows by one entry per XLA compilation inside the block."""
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_filter_jit_step_trains_and_compiles_once():
    model = eqx.nn.MLP(8, 5, 12, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    tx = asgo(learning_rate=optax.cosine_decay_schedule(0.1, 20), precondition_frequency=3,
              weight_dimension_numbers=out_in_weights)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((8, 5))
    inputs = [jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(20)]
    losses = []
    with counting_compilations() as compiles:
        for step, x in enumerate(inputs):
            model, opt_state, loss = train_step(model, opt_state, x, x @ teacher)
            losses.append(float(loss))
            if step == 0:
                first = len(compiles)
    assert first >= 1 and len(compiles) == first  # root refreshes and the schedule: no recompiles
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("algorithm, options", LAYOUT_SENSITIVE_CASES)
def test_equinox_weight_is_preconditioned_like_the_torch_weight(algorithm, options):
    rng = np.random.default_rng(2)
    with jax_x64():
        layer = eqx.nn.Linear(8, 12, dtype=jnp.float64, key=jax.random.key(0))
        weight = np.asarray(layer.weight)
        assert weight.shape == (12, 8)  # (out, in)
        grads = [rng.standard_normal(weight.shape) for _ in range(4)]
        make = asgo if algorithm == "asgo" else dasgo

        def equinox_steps(weight_dimension_numbers):
            tx = make(learning_rate=0.05, weight_dimension_numbers=weight_dimension_numbers, **options)

            @eqx.filter_jit
            def train_step(params, opt_state, grad):
                grad_tree = eqx.tree_at(lambda m: (m.weight, m.bias), params, (grad, jnp.zeros(12)))
                updates, opt_state = tx.update(grad_tree, opt_state, params)
                return eqx.apply_updates(params, updates), opt_state

            params = eqx.filter(layer, eqx.is_array)
            opt_state = tx.init(params)
            for grad in grads:
                params, opt_state = train_step(params, opt_state, jnp.asarray(grad))
            return np.asarray(params.weight)

        with_recipe, default_view = equinox_steps(out_in_weights), equinox_steps(None)

    torch_weight = torch_steps(weight, grads, algorithm, 0.05, **options)
    assert relative_error(with_recipe, torch_weight) < tolerance("float64")
    assert relative_error(default_view, torch_weight) > 1e-3
