"""Flax NNX driving ASGO: nnx.Optimizer(model, asgo(...), wrt=nnx.Param).

Flax stores a Dense kernel as (in, out), the transpose of torch's (out, in) weight. The optax
adapter's default matrix view of a 2-D leaf is exactly that (in, out) layout, so a Flax model
needs no weight_dimension_numbers: the tests check that the kernel gets the side, head blocks
and per-input statistics the torch adapter gives the (out, in) weight of the same layer, and
that nnx.Optimizer takes the same steps as the bare optax loop on the same parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from asgo_core.adapters.optax import asgo, dasgo
from tests.conftest import jax_x64, relative_error, tolerance
from tests.integrations.torch_reference import LAYOUT_SENSITIVE_CASES, torch_steps

LR = 0.05


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.hidden = nnx.Linear(8, 12, param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(12, 5, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def batches(count, seed=0):
    """Inputs and the outputs of a fixed linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((8, 5))
    inputs = [rng.standard_normal((16, 8)) for _ in range(count)]
    return [(jnp.asarray(x, jnp.float32), jnp.asarray(x @ teacher, jnp.float32)) for x in inputs]


def test_nnx_optimizer_equals_the_bare_optax_loop():
    model = MLP(nnx.Rngs(0))
    graphdef, initial = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)  # a twin: nnx updates model in place
    tx = asgo(learning_rate=LR, precondition_frequency=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def optax_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = initial, tx.init(initial)
    losses = []
    for x, y in batches(8):
        losses.append(float(nnx_step(model, optimizer, x, y)))
        params, opt_state = optax_step(params, opt_state, x, y)

    assert losses[-1] < 0.9 * losses[0]
    trained = nnx.state(model, nnx.Param)
    for path, value in jax.tree_util.tree_leaves_with_path(trained):
        expected = dict(jax.tree_util.tree_leaves_with_path(params))[path]
        assert np.array_equal(value, expected), path
    assert int(optimizer.step[...]) == 8


@pytest.mark.parametrize("algorithm, options", LAYOUT_SENSITIVE_CASES)
def test_flax_kernel_is_preconditioned_like_the_torch_weight_of_the_same_layer(algorithm, options):
    rng = np.random.default_rng(1)
    with jax_x64():
        model = nnx.Linear(8, 12, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        kernel = np.asarray(model.kernel[...])
        assert kernel.shape == (8, 12)  # (in, out)
        grads = [rng.standard_normal(kernel.shape) for _ in range(4)]
        make = asgo if algorithm == "asgo" else dasgo
        optimizer = nnx.Optimizer(model, make(learning_rate=LR, **options), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, grad):  # a loss whose kernel gradient is `grad`
            optimizer.update(model, nnx.grad(lambda m: jnp.sum(m.kernel[...] * grad))(model))

        for grad in grads:
            train_step(model, optimizer, jnp.asarray(grad))
        flax_kernel = np.asarray(model.kernel[...])

    torch_weight = torch_steps(kernel.T, [g.T for g in grads], algorithm, LR, **options)
    assert relative_error(flax_kernel.T, torch_weight) < tolerance("float64")
    # A side or head split taken along the wrong axis would not agree with torch:
    transposed = torch_steps(kernel, grads, algorithm, LR, **options).T
    assert relative_error(transposed, torch_weight) > 1e-3
