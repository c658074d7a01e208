"""Run by tests/test_optax_adapter.py in a subprocess with 2 forced host devices: 5 asgo() and
dasgo() steps in a jitted lax.scan, parameters sharded over an explicit-sharding mesh
(AxisType.Explicit) vs. unsharded. Prints one JSON line per algorithm's result."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from asgo_core.adapters.optax import asgo, dasgo

SPECS = {"w_in": P(None, "x"), "b_in": P("x"), "w_out": P(None, "x")}


def loss(params, x):
    hidden = jnp.tanh(x @ params["w_in"] + params["b_in"])
    if jax.typeof(hidden).sharding.mesh.explicit_axes:  # the model's own contraction over x
        hidden = jax.sharding.reshard(hidden, P())
    return jnp.mean((hidden @ params["w_out"]) ** 2)


def train(tx, params, batches):
    """(params, state after init, state after the scan)."""
    def step(carry, x):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params, x), state, params)
        return (optax.apply_updates(params, updates), state), None

    state = tx.init(params)
    (params, trained), _ = jax.jit(lambda p, s, xs: jax.lax.scan(step, (p, s), xs))(params, state, batches)
    return params, state, trained


def main() -> None:
    rng = np.random.default_rng(0)
    initial = {"w_in": rng.standard_normal((8, 16)), "b_in": np.zeros(16), "w_out": rng.standard_normal((16, 8))}
    initial = {name: value.astype(np.float32) for name, value in initial.items()}
    batches = rng.standard_normal((5, 4, 8)).astype(np.float32)
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,))
    # max_precond_dim=6: ASGO's 8-row side splits into a full block and a remainder block
    for name, make in (("asgo", lambda: asgo(0.05, max_precond_dim=6)), ("dasgo", lambda: dasgo(0.05))):
        plain, _, _ = train(make(), jax.tree.map(jnp.asarray, initial), batches)
        with jax.set_mesh(mesh):
            params = {key: jax.device_put(value, SPECS[key]) for key, value in initial.items()}
            sharded, state, trained = train(make(), params, batches)
            types = [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(state)]
            trained_types = [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(trained)]
            param_types = {key: str(jax.typeof(value)) for key, value in sharded.items()}
        momentum = optax.tree_utils.tree_get(trained, "momentum")
        print(json.dumps({
            "algorithm": name, "devices": len(jax.devices()), "state_types": types,
            "trained_state_types": trained_types, "param_types": param_types,
            "momentum_types": {key: str(jax.typeof(momentum[key])) for key in ("w_in", "w_out")},
            "moved": max(float(jnp.max(jnp.abs(plain[k] - initial[k]))) for k in initial),
            "difference": max(float(jnp.max(jnp.abs(plain[k] - sharded[k]))) for k in initial)}))


if __name__ == "__main__":
    main()
