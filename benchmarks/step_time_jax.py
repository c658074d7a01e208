"""Jitted optimizer step time on GPT-2-style parameters: optax.adamw, optax.contrib.muon, ASGO, DASGO.

The parameter tree is a GPT-2 "small-ish" model with d_model 384 and 6 layers, stored the JAX
way (x @ W, so W is (in, out)): per layer qkv 384×1152, attention projection 384×384, MLP fc
384×1536, MLP projection 1536×384, two LayerNorms (gain and bias) and the biases; plus a token
embedding (vocab × 384; vocab 8192 by default instead of GPT-2's 50304 to keep the run short
on a small CPU — it goes to AdamW in every optimizer, so it weighs the same in all), learned
positions (256 × 384) and a final LayerNorm. Embeddings and positions go to AdamW for muon,
ASGO and DASGO alike (the reference recipe), via weight_dimension_numbers None.

Each optimizer's `update + apply_updates` is one jitted function; after two compile/warm-up
calls, --reps rounds each time --steps calls of every optimizer in turn (block_until_ready
each), and the median of all is reported. Ratios are to muon. --baseline MODULE adds MODULE's
asgo/dasgo (e.g. a copy of an earlier adapters/optax.py) to the same rounds, interleaved, with
the ratio of this adapter's time to it.

    python benchmarks/step_time_jax.py [--steps 20] [--reps 1] [--vocab 8192] [--d-model 384]
                                       [--layers 6] [--baseline MODULE] [--json PATH]
"""

from __future__ import annotations

import os

# jaxlib's CPU eigh calls LAPACK in scipy's OpenBLAS; XLA runs independent eigh calls in parallel,
# and each one's own OpenBLAS threads then oversubscribe the cores (measured on this 2-core
# machine: 4 concurrent batched eighs went from 0.24 s to over 60 s). One BLAS thread per call.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import harness  # noqa: E402  (benchmarks/, the script's own directory)
from asgo_core.adapters import optax as asgo_optax  # noqa: E402
from asgo_core.adapters.optax import MuonDimensionNumbers  # noqa: E402

D_MODEL, LAYERS, CONTEXT = 384, 6, 256


def gpt2_params(vocab: int, key, d_model: int = D_MODEL, layers: int = LAYERS) -> dict:
    shapes = {"token_embedding": (vocab, d_model), "position_embedding": (CONTEXT, d_model),
              "final_norm": {"gain": (d_model,), "bias": (d_model,)}}
    for layer in range(layers):
        shapes[f"layer{layer}"] = {
            "norm1": {"gain": (d_model,), "bias": (d_model,)},
            "qkv": {"w": (d_model, 3 * d_model), "b": (3 * d_model,)},
            "attn_proj": {"w": (d_model, d_model), "b": (d_model,)},
            "norm2": {"gain": (d_model,), "bias": (d_model,)},
            "fc": {"w": (d_model, 4 * d_model), "b": (4 * d_model,)},
            "mlp_proj": {"w": (4 * d_model, d_model), "b": (d_model,)},
        }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    arrays = [0.02 * jax.random.normal(k, shape, jnp.float32) for k, shape in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, arrays)


def matrix_dimension_numbers(params) -> dict:
    """Hidden 2-D weights are matrices; embeddings and every 1-D leaf go to AdamW (None)."""
    def spec(path, leaf):
        name = jax.tree_util.keystr(path)
        return MuonDimensionNumbers() if leaf.ndim == 2 and "embedding" not in name else None
    return jax.tree_util.tree_map_with_path(spec, params)


def asgo_optimizers(module, dimension_numbers, suffix="") -> dict:
    """ASGO at τ = 1 and 10 and DASGO from `module` (this adapter, or a --baseline)."""
    lr, numbers = 1e-3, dimension_numbers
    return {f"asgo_tau1{suffix}": module.asgo(lr, precondition_frequency=1, weight_dimension_numbers=numbers),
            f"asgo_tau10{suffix}": module.asgo(lr, precondition_frequency=10,
                                               weight_dimension_numbers=numbers),
            f"dasgo{suffix}": module.dasgo(lr, weight_dimension_numbers=numbers)}


def optimizers(dimension_numbers) -> dict:
    return {
        "adamw": optax.adamw(1e-3, b1=0.9, b2=0.95),
        "muon": optax.contrib.muon(1e-3, muon_weight_dimension_numbers=dimension_numbers),
        **asgo_optimizers(asgo_optax, dimension_numbers),
    }


class Run:
    """One optimizer's jitted update + apply, compiled and warmed up."""

    def __init__(self, tx, params, grads):
        @jax.jit
        def train_step(params, state, grads):  # grads as an argument: not folded in as constants
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.train_step, self.grads = train_step, grads
        self.params, self.state = params, tx.init(params)
        for _ in range(2):  # compile, then one more warm-up call
            self.step()

    def step(self) -> None:
        self.params, self.state = jax.block_until_ready(self.train_step(self.params, self.state, self.grads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per optimizer (τ = 10 needs ≥ 10 to average its refreshes)")
    parser.add_argument("--vocab", type=int, default=8192, help="token-embedding rows (GPT-2: 50304)")
    parser.add_argument("--d-model", type=int, default=D_MODEL, help="model width (smaller: a quicker run)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="transformer layers")
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds of --steps per optimizer")
    parser.add_argument("--baseline", type=str, default=None,
                        help="a module with asgo/dasgo to time against this adapter, interleaved")
    parser.add_argument("--json", type=str, default=None, help="write the results to this path")
    args = parser.parse_args()

    params = gpt2_params(args.vocab, jax.random.PRNGKey(0), args.d_model, args.layers)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
    numbers = matrix_dimension_numbers(params)
    candidates = optimizers(numbers)
    if args.baseline:
        candidates.update(asgo_optimizers(importlib.import_module(args.baseline), numbers, " (baseline)"))
    runs = {name: Run(tx, params, grads) for name, tx in candidates.items()}
    taken = harness.interleaved({name: run.step for name, run in runs.items()}, args.reps,
                                per_turn=args.steps)
    medians = {name: harness.median_wall(samples) for name, samples in taken.items()}

    print(f"jax {jax.__version__} optax {optax.__version__} on {jax.devices()[0].device_kind} "
          f"({harness.cpu_model()}), d_model {args.d_model}, {args.layers} layers, "
          f"vocab {args.vocab}, median of {args.reps} x {args.steps} jitted steps, "
          f"load average {harness.load_average()[0]:.1f}")
    print(f"{'optimizer':<22}{'ms/step':>10}{'× muon':>9}{'× adamw':>9}")
    for name, seconds in medians.items():
        baseline = medians.get(f"{name} (baseline)")
        versus = f"{seconds / baseline:>9.3f} × baseline" if baseline else ""
        print(f"{name:<22}{1e3 * seconds:>10.1f}{seconds / medians['muon']:>9.2f}"
              f"{seconds / medians['adamw']:>9.2f}{versus}")
    targets = {"asgo_tau10 <= 0.5 x muon": medians["asgo_tau10"] <= 0.5 * medians["muon"],
               "asgo_tau1 <= 1.25 x muon": medians["asgo_tau1"] <= 1.25 * medians["muon"]}
    for target, met in targets.items():
        print(f"target {target}: {'met' if met else 'MISSED'}")
    if args.json:
        harness.write_json(args.json, {
            "jax": jax.__version__, "optax": optax.__version__,
            "device": jax.devices()[0].device_kind, "vocab": args.vocab,
            "steps": args.steps, "reps": args.reps, "baseline": args.baseline,
            "median_seconds": medians,
            "median_cpu_seconds": {name: harness.median_cpu(samples) for name, samples in taken.items()},
            "ratio_to_muon": {k: v / medians["muon"] for k, v in medians.items()},
            "targets_met": targets, "machine": harness.machine("jax", "jaxlib", "optax")}, indent=2)


if __name__ == "__main__":
    main()
