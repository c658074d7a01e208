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

from asgo_core.adapters.optax import MuonDimensionNumbers, asgo, dasgo
from helpers.numerics import jax_x64, relative_error, tolerance
from helpers.torch_reference import LAYOUT_SENSITIVE_CASES, torch_steps

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
    tx = asgo(learning_rate=0.05, precondition_frequency=2)
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


def attention_dimension_numbers(params):
    """weight_dimension_numbers for nnx.MultiHeadAttention: Q/K/V kernels (in, heads, head_dim)
    and the output kernel (heads, head_dim, out) are matrices; the (heads, head_dim) Q/K/V
    biases, like every bias, go to AdamW."""
    def numbers(path, leaf):
        module, name = (key.key for key in path if isinstance(key, jax.tree_util.DictKey))
        if name != "kernel":
            return None
        if module == "out":
            return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
        return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    return jax.tree_util.tree_map_with_path(numbers, params)


def head_labels(params):
    """optax.partition labels: the Q and K kernels get head-wise blocks, everything else not."""
    def label(path, leaf):
        module, name = (key.key for key in path if isinstance(key, jax.tree_util.DictKey))
        return "heads" if module in ("query", "key") and name == "kernel" else "other"
    return jax.tree_util.tree_map_with_path(label, params)


HEADS, HEAD_DIM, WIDTH, OUT = 2, 4, 6, 5
# The torch (out, in) weights of the same projections: (heads·head_dim, in) and (out, heads·head_dim).
AS_TORCH = {"query": lambda kernel: kernel.reshape(WIDTH, HEADS * HEAD_DIM).T,
            "out": lambda kernel: kernel.reshape(HEADS * HEAD_DIM, OUT).T}


def train_attention(tx, steps=3):
    """(initial, trained, per-step gradients) of the query and output kernels, float64."""
    rng = np.random.default_rng(3)
    with jax_x64():
        model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, qkv_features=HEADS * HEAD_DIM,
                                       out_features=OUT, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        initial = {name: np.asarray(getattr(model, name).kernel[...]) for name in AS_TORCH}
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)
            return {name: grads[name]["kernel"][...] for name in AS_TORCH}

        kernel_grads = {name: [] for name in AS_TORCH}
        for _ in range(steps):
            x, y = rng.standard_normal((4, 3, WIDTH)), rng.standard_normal((4, 3, OUT))
            for name, grad in train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y)).items():
                kernel_grads[name].append(np.asarray(grad))
        trained = {name: np.asarray(getattr(model, name).kernel[...]) for name in AS_TORCH}
    return initial, trained, kernel_grads


def assert_steps_like_torch(name, run, **torch_options):
    initial, trained, kernel_grads = run
    to_torch = AS_TORCH[name]
    expected = torch_steps(to_torch(initial[name]), [to_torch(g) for g in kernel_grads[name]], "asgo", LR,
                           **torch_options)
    assert relative_error(to_torch(trained[name]), expected) < tolerance("float64"), name


def test_multi_head_attention_kernels_step_like_the_torch_weights():
    tx = asgo(learning_rate=LR, side="left", weight_dimension_numbers=attention_dimension_numbers)
    run = train_attention(tx)
    assert_steps_like_torch("query", run, side="left")
    assert_steps_like_torch("out", run, side="left")


def test_head_wise_query_and_key_through_optax_partition():
    tx = optax.partition({
        "heads": asgo(learning_rate=LR, num_heads=HEADS, weight_dimension_numbers=attention_dimension_numbers),
        "other": asgo(learning_rate=LR, weight_dimension_numbers=attention_dimension_numbers),
    }, head_labels)
    run = train_attention(tx)
    assert_steps_like_torch("query", run, num_heads=HEADS)
    assert_steps_like_torch("out", run)
