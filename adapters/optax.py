"""ASGO and DASGO as optax gradient transformations.

    from asgo_core.adapters.optax import asgo
    tx = asgo(learning_rate=1e-2)            # a drop-in for optax.adamw / optax.contrib.muon

`scale_by_asgo` / `scale_by_dasgo` turn the gradients of matrix leaves into the core's
update U + weight_decay·W; `asgo` / `dasgo` partition a parameter tree the way
optax.contrib.muon does: matrix leaves go through scale_by_asgo and the learning rate, every
other leaf through optax.adamw with the `adam_*` settings.

Matrix view of a leaf. `weight_dimension_numbers` uses optax.contrib.MuonDimensionNumbers
(reduction axes = inputs, output axes = outputs, all other axes are batch axes, each batch
element its own matrix), so one tree of dimension numbers serves muon and asgo alike. The
core sees each matrix as (outputs × inputs), the torch (out, in) convention, so `side`,
`num_heads` (head blocks split the outputs) and DASGO's per-column statistics mean the same in
every adapter. A 2-D leaf with default dimension numbers is an `x @ W` weight of shape
(in, out). `None` for a leaf sends it to AdamW (in `asgo`/`dasgo`).

Batching. Leaves whose matrix view has the same (m, n) and dtype are stacked and stepped by one
core call, so the state holds one core ASGOState/DASGOState per such stack, not per leaf.

Weight decay and skipped steps. The decay is applied inside scale_by_asgo (not by a later
optax.add_decayed_weights) so that a matrix whose gradient is not finite is skipped entirely,
as in the core and the other adapters: zero update, no decay, state untouched, counted in
`skipped` (read with `numerics_counters`). scale_by_asgo's own weight_decay defaults to 0 (an
optax scale_by_* gives the direction only); asgo/dasgo default to the core's 0.1.

Checks. init refuses a matrix leaf that is not real floating point (complex included) or whose
matrix stack has a zero-size dimension; update refuses, at trace time, a gradient whose dtype is
not real floating point or whose shape differs from its parameter's (or from the shapes the
state was initialised for when params are not passed). Each error names the leaf's path.

jit. The root refresh every `precondition_frequency` steps is a `lax.cond` on the step count,
so a training loop compiles once. `nonfinite="raise"` needs a host read and is refused. The
ASGO options other than learning rates, `weight_decay` and the `adam_*` numbers are static
Python values: with optax.inject_hyperparams pass `static_args=STATIC_ARGS`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

import asgo_core
from asgo_core.config import ASGOConfig, DASGOConfig
from asgo_core.layout import PermutedStack
from asgo_core.precision import stochastic_round

__all__ = [
    "STATIC_ARGS",
    "MuonDimensionNumbers",
    "ScaleByASGOState",
    "ScaleByDASGOState",
    "apply_updates_stochastic",
    "asgo",
    "dasgo",
    "numerics_counters",
    "scale_by_asgo",
    "scale_by_dasgo",
]

# Options that must be Python values, not arrays: optax.inject_hyperparams injects every numeric
# argument unless it is named in static_args, so use
# optax.inject_hyperparams(asgo, static_args=STATIC_ARGS)(learning_rate=...). The learning rates,
# weight_decay and the adam_* numbers may be injected.
STATIC_ARGS = ("b1", "b2", "eps", "precondition_frequency", "update_rms", "root_steps",
               "root_tolerance", "residual_tolerance", "max_precond_dim", "num_heads", "matmul_dtype",
               "mu_dtype", "precond_dtype")

# optax's names for the core's options, where they differ.
_OPTAX_NAMES = {"beta1": "b1", "beta2": "b2"}


class ScaleByASGOState(NamedTuple):
    """count: steps taken (int32). stacks: one core ASGOState per stack of same-shaped matrices."""
    count: Any
    stacks: tuple


class ScaleByDASGOState(NamedTuple):
    """count: steps taken (int32). stacks: one core DASGOState per stack of same-shaped matrices."""
    count: Any
    stacks: tuple


# ----------------------------------------------------------------------------- matrix views

def _as_axes(axes, ndim: int) -> tuple:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(axis % ndim for axis in axes)


_TO_ADAMW = "give it weight_dimension_numbers=None so that asgo()/dasgo() route it to AdamW"


def _matrix_view(path: str, shape, dimension_numbers: MuonDimensionNumbers) -> PermutedStack:
    """The leaf at `path` as a stack; errors name the leaf."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"leaf {path} of shape {tuple(shape)} cannot be a matrix; {_TO_ADAMW}")
    inputs = _as_axes(dimension_numbers.reduction_axis, ndim)
    outputs = _as_axes(dimension_numbers.output_axis, ndim)
    if set(inputs) & set(outputs) or not inputs or not outputs:
        raise ValueError(f"weight_dimension_numbers={dimension_numbers} is invalid for leaf {path} of "
                         f"shape {tuple(shape)}; accepted: disjoint, non-empty reduction and output axes")
    batch = tuple(axis for axis in range(ndim) if axis not in inputs + outputs)
    permutation = batch + outputs + inputs
    size = lambda axes: math.prod(shape[axis] for axis in axes)  # noqa: E731
    stack_shape = (size(batch), size(outputs), size(inputs))
    if 0 in stack_shape:
        raise ValueError(f"leaf {path} of shape {tuple(shape)} has a zero-size matrix stack {stack_shape} "
                         f"(matrices, outputs, inputs); ASGO/DASGO need each >= 1; {_TO_ADAMW}")
    return PermutedStack(permutation, tuple(shape[axis] for axis in permutation), stack_shape)


# ----------------------------------------------------------------------------- per-leaf options

class _Box:
    """An unregistered (hence leaf) holder, so None and NamedTuples survive tree mapping."""
    def __init__(self, value):
        self.value = value


def _per_leaf(prefix, tree, is_value) -> list:
    """The value `prefix` (a prefix tree of `tree`, or a callable returning one) assigns to each
    leaf of `tree`, in jax.tree.leaves order."""
    if callable(prefix):
        prefix = prefix(tree)
    boxed = jax.tree.map(lambda value, subtree: jax.tree.map(lambda _: _Box(value), subtree),
                         prefix, tree, is_leaf=is_value)
    return [box.value for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]


def _is_dimension_numbers(x) -> bool:
    return x is None or isinstance(x, MuonDimensionNumbers)


def _dimension_numbers_per_leaf(weight_dimension_numbers, tree) -> list:
    """MuonDimensionNumbers or None per leaf; by default 2-D leaves are (in, out) matrices."""
    if weight_dimension_numbers is None:
        return [MuonDimensionNumbers() if jnp.ndim(leaf) == 2 else None
                for leaf in jax.tree.leaves(tree)]
    return _per_leaf(weight_dimension_numbers, tree, _is_dimension_numbers)


def _decay_mask_per_leaf(weight_decay_mask, tree) -> list:
    if weight_decay_mask is None:
        return [True] * len(jax.tree.leaves(tree))
    return [bool(value) for value in _per_leaf(weight_decay_mask, tree, lambda x: isinstance(x, bool))]


# ----------------------------------------------------------------------------- stacking plan

@dataclasses.dataclass(frozen=True)
class _Stack:
    """Leaves (by index) whose matrix views share (m, n) and dtype, stepped by one core call."""
    leaf_indices: tuple
    views: tuple

    @property
    def shape(self) -> tuple:
        """(matrices, m, n) of the stacked leaves."""
        return (sum(view.stack_shape[0] for view in self.views), *self.views[0].stack_shape[1:])

    def gather(self, leaves):
        parts = [view.to_stack(leaves[i], jnp) for i, view in zip(self.leaf_indices, self.views)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    def scatter(self, stack, out: list) -> None:
        offsets = [0]
        for view in self.views:
            offsets.append(offsets[-1] + view.stack_shape[0])
        for i, view, start, stop in zip(self.leaf_indices, self.views, offsets, offsets[1:]):
            out[i] = view.from_stack(stack[start:stop], jnp)

    def per_matrix(self, per_leaf_values):
        """A (matrices,) array repeating each leaf's value over its batch."""
        return jnp.concatenate([jnp.full((view.stack_shape[0],), per_leaf_values[i], jnp.float32)
                                for i, view in zip(self.leaf_indices, self.views)])


def _leaf_paths(tree) -> list:
    """Each leaf's path as jax.tree_util.keystr writes it (e.g. "['layer']['w']"), in leaves order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_real_floating(kind: str, path: str, leaf) -> None:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{kind} {path} has dtype {jnp.dtype(leaf.dtype)}; accepted: a real "
                         "floating-point dtype (complex: the Gram would need conjugation)")


def _plan(paths, leaves, dimension_numbers, transformation: str) -> tuple:
    stacks: dict = {}
    for index, (path, leaf, numbers) in enumerate(zip(paths, leaves, dimension_numbers)):
        if numbers is None:
            raise ValueError(f"{transformation} got leaf {path} of shape {tuple(leaf.shape)} with no "
                             "matrix view; use asgo()/dasgo(), which route it to AdamW, or give it "
                             "weight_dimension_numbers")
        view = _matrix_view(path, leaf.shape, numbers)
        key = (view.stack_shape[1:], jnp.dtype(leaf.dtype))
        stacks.setdefault(key, []).append((index, view))
    return tuple(_Stack(tuple(i for i, _ in members), tuple(v for _, v in members))
                 for members in stacks.values())


# ----------------------------------------------------------------------------- the transformation

def _core_config(config_type, options: dict):
    """Build the core config, reporting a bad option under its optax name."""
    for name, value in options.items():
        if hasattr(value, "shape"):
            raise ValueError(f"{name}={value!r} is invalid; accepted: a Python value (it shapes the "
                             "traced program). With optax.inject_hyperparams pass "
                             "static_args=asgo_core.adapters.optax.STATIC_ARGS")
    core_options = {("beta1" if k == "b1" else "beta2" if k == "b2" else k): v for k, v in options.items()}
    try:
        return config_type(weight_decay=0.0, **core_options)
    except ValueError as error:
        message = str(error)
        for core_name, optax_name in _OPTAX_NAMES.items():
            message = message.replace(f"{core_name}=", f"{optax_name}=")
        raise ValueError(message) from None


def _check_number(name: str, value, *, below_one: bool = False) -> None:
    """Numbers are checked here; arrays (optax.inject_hyperparams) and schedules pass."""
    if hasattr(value, "shape") and not isinstance(value, (int, float)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is invalid; accepted: a number")
    upper_ok = value < 1.0 if below_one else math.isfinite(value)
    if not (value >= 0.0 and upper_ok):
        raise ValueError(f"{name}={value!r} is invalid; accepted: "
                         + ("a number in [0, 1)" if below_one else "a finite number >= 0"))


def _scale_by_core(config, state_type, name: str, weight_decay, weight_decay_mask,
                   weight_dimension_numbers) -> optax.GradientTransformation:
    if config.nonfinite != "skip":
        raise ValueError(f"nonfinite={config.nonfinite!r} is invalid here; accepted: 'skip' "
                         "('raise' needs a host read, which jax.jit does not allow)")
    _check_number("weight_decay", weight_decay)
    has_root = isinstance(config, ASGOConfig)
    refresh_every = config.precondition_frequency if has_root else 1

    def plan_for(tree, kind: str):
        leaves, paths = jax.tree.leaves(tree), _leaf_paths(tree)
        for path, leaf in zip(paths, leaves):
            _check_real_floating(kind, path, leaf)
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, tree)
        return leaves, _plan(paths, leaves, numbers, name)

    def init_fn(params):
        leaves, plan = plan_for(params, "parameter")
        stack_shapes = [(stack.shape, leaves[stack.leaf_indices[0]].dtype) for stack in plan]
        # Built under jit, so the arrays are placed like optax's own state (not committed to a
        # device); a committed/uncommitted mix would make the first jitted step compile twice.
        stacks = jax.jit(lambda: tuple(asgo_core.init_state(jnp.zeros(shape, dtype), config)
                                       for shape, dtype in stack_shapes))()
        return state_type(count=jnp.zeros((), jnp.int32), stacks=stacks)

    def core_steps(grads, stack_states, refresh_root: bool):
        with warnings.catch_warnings():  # the core probes for float64, which JAX may lack
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            results = [asgo_core.step(g, s, None, config, refresh_root=refresh_root)
                       for g, s in zip(grads, stack_states)]
        return tuple(r[0] for r in results), tuple(r[1] for r in results)

    def update_fn(updates, state, params=None):
        if params is not None and jax.tree.structure(params) == jax.tree.structure(updates):
            _check_shapes_match(updates, params)
        leaves, plan = plan_for(updates, "gradient")
        _check_plan_matches_state(plan, state.stacks, _leaf_paths(updates))
        grads = [stack.gather(leaves) for stack in plan]
        if refresh_every == 1:
            directions, stacks = core_steps(grads, state.stacks, True)
        else:
            directions, stacks = jax.lax.cond(
                state.count % refresh_every == 0,
                lambda: core_steps(grads, state.stacks, True),
                lambda: core_steps(grads, state.stacks, False))
        decay_mask = _decay_mask_per_leaf(weight_decay_mask, updates if params is None else params)
        out = [None] * len(leaves)
        for stack, direction, old, new in zip(plan, directions, state.stacks, stacks):
            update = _with_weight_decay(direction, stack, params, weight_decay, decay_mask)
            skipped_now = (new.skipped - old.skipped)[:, None, None] > 0
            stack.scatter(jnp.where(skipped_now, jnp.zeros_like(update), update), out)
        new_updates = jax.tree.unflatten(jax.tree.structure(updates), out)
        return new_updates, state_type(count=optax.safe_increment(state.count), stacks=stacks)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_shapes_match(updates, params) -> None:
    """Trace time: every gradient has its parameter's shape (else an XLA shape error follows)."""
    for path, grad, param in zip(_leaf_paths(updates), jax.tree.leaves(updates), jax.tree.leaves(params)):
        if jnp.shape(grad) != jnp.shape(param):
            raise ValueError(f"gradient {path} has shape {jnp.shape(grad)}; accepted: its parameter's "
                             f"shape {jnp.shape(param)}")


def _check_plan_matches_state(plan, stack_states, paths) -> None:
    """Trace time: the gradients stack into the matrices the state was initialised for."""
    expected = [tuple(state.momentum.shape) for state in stack_states]
    got = [stack.shape for stack in plan]
    if got == expected:
        return
    for stack, shape in zip(plan, got):
        if shape not in expected:
            leaves = ", ".join(paths[i] for i in stack.leaf_indices)
            raise ValueError(f"gradient {leaves} stacks to (matrices, outputs, inputs) = {shape}; the state "
                             f"was initialised for {expected} (a gradient of another shape than its parameter?)")
    raise ValueError(f"the gradients stack to {got}; the state was initialised for {expected}")


def _with_weight_decay(direction, stack: _Stack, params, weight_decay, decay_mask):
    """direction + weight_decay·W on the matrices whose leaf the mask selects."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
        return direction
    if not any(decay_mask[i] for i in stack.leaf_indices):
        return direction
    if params is None:
        raise ValueError("params are required by tx.update when weight_decay != 0 "
                         "(the update carries weight_decay·W)")
    weights = stack.gather(jax.tree.leaves(params))
    per_matrix = stack.per_matrix([1.0 if selected else 0.0 for selected in decay_mask])
    wide = jnp.promote_types(direction.dtype, jnp.float32)  # as the core: decay in float32 or wider
    decay = jnp.asarray(weight_decay, wide) * per_matrix.astype(wide)
    return (direction.astype(wide) + decay[:, None, None] * weights.astype(wide)).astype(direction.dtype)


def scale_by_asgo(b1: float = 0.9, b2: float = 0.8, eps: float = 1e-6, damping: str = "relative",
                  precondition_frequency: int = 1, update_rms: Optional[float] = 0.2,
                  accumulate: str = "ema", side: str = "auto", root_method: str = "auto",
                  root_steps: Optional[int] = None, root_tolerance: Optional[float] = None,
                  residual_tolerance: float = 0.1, max_precond_dim: Optional[int] = None,
                  num_heads: Optional[int] = None, nonfinite: str = "skip",
                  matmul_dtype: Optional[str] = None, mu_dtype: Optional[str] = None,
                  precond_dtype: Optional[str] = None,
                  weight_decay: float = 0.0, weight_decay_mask: Any = None,
                  weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """ASGO's update U (+ weight_decay·W) for every leaf of the tree, each seen as a matrix.

    Options mean what asgo_core.ASGOConfig's do (b1, b2 = beta1, beta2), with the same
    defaults, except weight_decay (0 here; see the module docstring). weight_decay_mask: a
    prefix tree of bools (or a callable returning one), True where the decay applies.
    weight_dimension_numbers: a MuonDimensionNumbers prefix tree or callable; None treats every
    leaf as a 2-D (in, out) matrix. Bad options raise ValueError here, naming the option.
    """
    config = _core_config(ASGOConfig, dict(
        b1=b1, b2=b2, eps=eps, damping=damping, precondition_frequency=precondition_frequency,
        update_rms=update_rms, accumulate=accumulate, side=side, root_method=root_method,
        root_steps=root_steps, root_tolerance=root_tolerance, residual_tolerance=residual_tolerance,
        max_precond_dim=max_precond_dim, num_heads=num_heads, nonfinite=nonfinite,
        matmul_dtype=matmul_dtype, mu_dtype=mu_dtype, precond_dtype=precond_dtype))
    return _scale_by_core(config, ScaleByASGOState, "scale_by_asgo", weight_decay,
                          weight_decay_mask, weight_dimension_numbers)


def scale_by_dasgo(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   update_rms: Optional[float] = 0.2, accumulate: str = "ema",
                   nonfinite: str = "skip", mu_dtype: Optional[str] = None,
                   weight_decay: float = 0.0, weight_decay_mask: Any = None,
                   weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """DASGO's update (diagonal statistics over each matrix's inputs); see scale_by_asgo."""
    config = _core_config(DASGOConfig, dict(b1=b1, b2=b2, eps=eps, update_rms=update_rms,
                                            accumulate=accumulate, nonfinite=nonfinite, mu_dtype=mu_dtype))
    return _scale_by_core(config, ScaleByDASGOState, "scale_by_dasgo", weight_decay,
                          weight_decay_mask, weight_dimension_numbers)


# ----------------------------------------------------------------------------- full optimizers

def _with_adamw(matrix_transform, learning_rate, weight_dimension_numbers, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, adam_learning_rate) -> optax.GradientTransformation:
    """Partition: matrix leaves → matrix_transform then the learning rate; others → AdamW."""
    for name, rate in (("learning_rate", learning_rate), ("adam_learning_rate", adam_learning_rate)):
        if not callable(rate) and not (name == "adam_learning_rate" and rate is None):
            _check_number(name, rate)
    _check_number("adam_b1", adam_b1, below_one=True)
    _check_number("adam_b2", adam_b2, below_one=True)
    _check_number("adam_eps", adam_eps)
    _check_number("adam_weight_decay", adam_weight_decay)

    def labels(params):
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, params)
        names = ["matrix" if n is not None else "adamw" for n in numbers]
        return jax.tree.unflatten(jax.tree.structure(params), names)

    adamw = optax.adamw(learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
                        b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_weight_decay)
    matrices = optax.chain(matrix_transform, optax.scale_by_learning_rate(learning_rate))
    return optax.partition({"matrix": matrices, "adamw": adamw}, labels)


def asgo(learning_rate, b1: float = 0.9, b2: float = 0.8, eps: float = 1e-6,
         damping: str = "relative", precondition_frequency: int = 1,
         update_rms: Optional[float] = 0.2, accumulate: str = "ema", side: str = "auto",
         root_method: str = "auto", root_steps: Optional[int] = None,
         root_tolerance: Optional[float] = None, residual_tolerance: float = 0.1,
         max_precond_dim: Optional[int] = None, num_heads: Optional[int] = None,
         nonfinite: str = "skip", matmul_dtype: Optional[str] = None,
         mu_dtype: Optional[str] = None, precond_dtype: Optional[str] = None,
         weight_decay: float = 0.1, weight_decay_mask: Any = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8,
         adam_weight_decay: float = 0.0, adam_learning_rate: Any = None,
         weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """ASGO for matrix leaves, AdamW for the rest: W ← W − lr·(U + weight_decay·W).

    learning_rate: a number or an optax schedule. ASGO options as scale_by_asgo (defaults are
    the core's, weight_decay 0.1 included). adam_*: the AdamW of non-matrix leaves (defaults:
    the reference recipe's betas (0.9, 0.95), eps 1e-8, no decay; adam_learning_rate=None uses
    learning_rate). weight_dimension_numbers: as optax.contrib.muon's; None makes 2-D leaves
    matrices and sends the rest to AdamW, a None entry sends that leaf to AdamW.
    """
    matrix_transform = scale_by_asgo(
        b1=b1, b2=b2, eps=eps, damping=damping, precondition_frequency=precondition_frequency,
        update_rms=update_rms, accumulate=accumulate, side=side, root_method=root_method,
        root_steps=root_steps, root_tolerance=root_tolerance, residual_tolerance=residual_tolerance,
        max_precond_dim=max_precond_dim, num_heads=num_heads, nonfinite=nonfinite,
        matmul_dtype=matmul_dtype, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        weight_dimension_numbers=weight_dimension_numbers)
    return _with_adamw(matrix_transform, learning_rate, weight_dimension_numbers, adam_b1, adam_b2,
                       adam_eps, adam_weight_decay, adam_learning_rate)


def dasgo(learning_rate, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          update_rms: Optional[float] = 0.2, accumulate: str = "ema", nonfinite: str = "skip",
          mu_dtype: Optional[str] = None, weight_decay: float = 0.1, weight_decay_mask: Any = None,
          adam_b1: float = 0.9,
          adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
          adam_learning_rate: Any = None,
          weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """DASGO for matrix leaves, AdamW for the rest; options as asgo and scale_by_dasgo."""
    matrix_transform = scale_by_dasgo(
        b1=b1, b2=b2, eps=eps, update_rms=update_rms, accumulate=accumulate, nonfinite=nonfinite,
        mu_dtype=mu_dtype, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        weight_dimension_numbers=weight_dimension_numbers)
    return _with_adamw(matrix_transform, learning_rate, weight_dimension_numbers, adam_b1, adam_b2,
                       adam_eps, adam_weight_decay, adam_learning_rate)


# ----------------------------------------------------------------------------- numerics health

def numerics_counters(opt_state) -> dict:
    """Totals over every ASGO/DASGO state inside opt_state (any wrapping): matrices skipped for
    a non-finite gradient, and root fallbacks per asgo_core.FALLBACK_LEVELS. A host read."""
    is_state = lambda x: isinstance(x, (ScaleByASGOState, ScaleByDASGOState))  # noqa: E731
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    stacks = [stack for state in states for stack in state.stacks]
    fallbacks = [int(sum(jnp.sum(s.fallbacks[..., level]) for s in stacks if hasattr(s, "fallbacks")))
                 for level in range(len(asgo_core.FALLBACK_LEVELS))]
    return {"skipped": int(sum(jnp.sum(s.skipped) for s in stacks)),
            "fallbacks": dict(zip(asgo_core.FALLBACK_LEVELS, fallbacks))}
def apply_updates_stochastic(params, updates, key):
    """optax.apply_updates with the sum rounded stochastically into 16-bit (bfloat16, float16)
    parameters: each param + update is computed in float32 and rounded up with probability
    equal to its fractional distance to the upper neighbour (asgo_core.precision), so small
    updates are kept in expectation instead of being rounded away. Wider parameters and None
    leaves are treated as optax.apply_updates treats them. key: a jax.random key, a new one each
    step (e.g. jax.random.fold_in(key, step)) so a resumed run draws the same numbers.

        updates, opt_state = tx.update(grads, opt_state, params)
        params = apply_updates_stochastic(params, updates, jax.random.fold_in(key, step))
    """
    leaves, structure = jax.tree.flatten(params, is_leaf=lambda x: x is None)
    keys = jax.random.split(key, len(leaves))
    update_leaves = structure.flatten_up_to(updates)
    summed = [_rounded_sum(p, u, k) for p, u, k in zip(leaves, update_leaves, keys)]
    return jax.tree.unflatten(structure, summed)


def _rounded_sum(param, update, key):
    if param is None or update is None:
        return param
    if jnp.finfo(param.dtype).bits >= 32:
        return jnp.asarray(param + update).astype(param.dtype)
    value = param.astype(jnp.float32) + update.astype(jnp.float32)
    uniform = jax.random.uniform(key, value.shape, jnp.float32)
    return stochastic_round(value, param.dtype, uniform, jnp)


from .optax_portable import portable_state, state_from_portable  # noqa: E402,F401  (portable checkpoints)
