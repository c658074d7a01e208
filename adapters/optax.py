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

State. As in optax's own transformations, the state follows the parameter tree: every field but
`count` is a tree shaped like the parameters with one array per matrix leaf (None where the leaf
has none), so optax.tree.map_params and sharding rules written for the parameters apply to it.
Inside `update` (under jit) the leaves whose matrix view has the same (m, n) and dtype are
stacked and stepped by one core call, so their roots are computed in one batch.

Sharding. Under automatic sharding XLA places the stacked step. Under an explicit-sharding mesh
(jax.sharding.AxisType.Explicit) the step gathers each leaf it stacks (the Gram contracts the
axes a parameter is sharded on) and gives every state array and update back its own sharding,
so the state's types stay the same across updates and a lax.scan loop runs.

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
Python values: with optax.inject_hyperparams pass `static_args=ASGO_STATIC_ARGS` for asgo and
`static_args=DASGO_STATIC_ARGS` for dasgo.
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
from asgo_core.options import static_options

__all__ = [
    "ASGO_STATIC_ARGS",
    "DASGO_STATIC_ARGS",
    "STATIC_ARGS",
    "MuonDimensionNumbers",
    "ScaleByASGOState",
    "ScaleByDASGOState",
    "asgo",
    "dasgo",
    "numerics_counters",
    "scale_by_asgo",
    "scale_by_dasgo",
]

# optax's names for the core's options, where they differ.
_OPTAX_NAMES = {"beta1": "b1", "beta2": "b2"}


def _static_args(config_type) -> tuple:
    """What optax.inject_hyperparams must not inject (it injects every number and calls every
    callable as a schedule): the core options that shape the traced program, and the leaf
    selections, which may be callables. The learning rates, weight_decay and adam_* may be."""
    return (tuple(_OPTAX_NAMES.get(name, name) for name in static_options(config_type))
            + ("weight_decay_mask", "weight_dimension_numbers"))


# optax.inject_hyperparams(asgo, static_args=ASGO_STATIC_ARGS)(learning_rate=...), and the same
# with dasgo and DASGO_STATIC_ARGS; STATIC_ARGS is asgo's.
ASGO_STATIC_ARGS = _static_args(ASGOConfig)
DASGO_STATIC_ARGS = _static_args(DASGOConfig)
STATIC_ARGS = ASGO_STATIC_ARGS


class ScaleByASGOState(NamedTuple):
    """count: steps taken (int32). The other fields are trees shaped like the parameters, per
    matrix leaf: momentum, in the leaf's shape; gram and root, (matrices·blocks, size, size), the
    statistics and inverse roots of the leaf's full-size blocks (asgo_core.layout), and
    remainder_gram and remainder_root those of its remainder blocks (None when max_precond_dim
    leaves none); skipped, (matrices,); fallbacks, (matrices, 4)."""
    count: Any
    momentum: Any
    gram: Any
    root: Any
    remainder_gram: Any
    remainder_root: Any
    skipped: Any
    fallbacks: Any


class ScaleByDASGOState(NamedTuple):
    """count: steps taken (int32). Trees shaped like the parameters, per matrix leaf: momentum,
    in the leaf's shape; second_moment, (matrices, inputs); skipped, (matrices,)."""
    count: Any
    momentum: Any
    second_moment: Any
    skipped: Any


def _per_leaf_fields(core_state) -> dict:
    """A core ASGOState / DASGOState of a stack as the per-leaf state fields (momentum stacked)."""
    if isinstance(core_state, asgo_core.DASGOState):
        return {"momentum": core_state.momentum, "second_moment": core_state.second_moment,
                "skipped": core_state.skipped}
    remainder = len(core_state.gram) > 1
    return {"momentum": core_state.momentum, "gram": core_state.gram[0], "root": core_state.root[0],
            "remainder_gram": core_state.gram[1] if remainder else None,
            "remainder_root": core_state.root[1] if remainder else None,
            "skipped": core_state.skipped, "fallbacks": core_state.fallbacks}


def _core_state(fields: dict, count):
    """The inverse of _per_leaf_fields."""
    if "second_moment" in fields:
        return asgo_core.DASGOState(fields["momentum"], fields["second_moment"], count, fields["skipped"])
    groups = [("gram", "root")] + ([("remainder_gram", "remainder_root")]
                                   if fields["remainder_gram"] is not None else [])
    return asgo_core.ASGOState(fields["momentum"], tuple(fields[gram] for gram, _ in groups),
                               tuple(fields[root] for _, root in groups), count, fields["skipped"],
                               fields["fallbacks"])


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

    def gather(self, per_leaf: list, viewed: bool):
        """One array of the stack's leaves' arrays, in leaf order; viewed: through the matrix
        views (gradients, momentum), else rows as they are (statistics). None stays None."""
        parts = [per_leaf[i] for i in self.leaf_indices]
        if parts[0] is None:
            return None
        if viewed:
            parts = [view.to_stack(part, jnp) for view, part in zip(self.views, parts)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    def scatter(self, stacked, out: list, viewed: bool) -> None:
        """The inverse of gather: each leaf's rows of `stacked` into out[leaf index]."""
        if stacked is None:
            return
        rows = stacked.shape[0] // self.shape[0]
        start = 0
        for i, view in zip(self.leaf_indices, self.views):
            stop = start + rows * view.stack_shape[0]
            out[i] = view.from_stack(stacked[start:stop], jnp) if viewed else stacked[start:stop]
            start = stop

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


# ----------------------------------------------------------------------------- explicit sharding

def _explicit_spec(x):
    """x's PartitionSpec when it lives on an explicit-sharding mesh, else None."""
    if x is None or not hasattr(jax, "typeof"):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    return sharding.spec if sharding is not None and getattr(sharding.mesh, "explicit_axes", ()) else None


def _gathered(x):
    """x replicated when it is explicitly sharded: stacking reshapes a leaf's axes and the Gram
    contracts them, which explicit sharding has no rule for while an axis is sharded."""
    return x if _explicit_spec(x) is None else jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _sharded_like(x, like):
    """x with like's explicit sharding (a no-op otherwise), so a state keeps its types."""
    spec = _explicit_spec(like)
    return x if spec is None else jax.sharding.reshard(x, spec)


# ----------------------------------------------------------------------------- the transformation

def _core_config(config_type, options: dict):
    """Build the core config, reporting a bad option under its optax name."""
    for name, value in options.items():
        if hasattr(value, "shape"):
            raise ValueError(f"{name}={value!r} is invalid; accepted: a Python value (it shapes the "
                             "traced program). With optax.inject_hyperparams pass static_args="
                             f"asgo_core.adapters.optax.{config_type.__name__[:-len('Config')].upper()}_STATIC_ARGS")
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
    fields = state_type._fields[1:]

    def plan_for(tree, kind: str):
        leaves, paths = jax.tree.leaves(tree), _leaf_paths(tree)
        for path, leaf in zip(paths, leaves):
            _check_real_floating(kind, path, leaf)
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, tree)
        return leaves, _plan(paths, leaves, numbers, name)

    def init_fn(params):
        leaves, plan = plan_for(params, "parameter")
        stacks = [(stack, leaves[stack.leaf_indices[0]].dtype) for stack in plan]
        # Built under jit, so the arrays are placed like optax's own state (not committed to a
        # device); a committed/uncommitted mix would make the first jitted step compile twice.
        core_states = jax.jit(lambda: [asgo_core.init_state(jnp.zeros(stack.shape, dtype), config)
                                       for stack, dtype in stacks])()
        per_leaf = {field: [None] * len(leaves) for field in fields}
        for stack, core_state in zip(plan, core_states):
            for field, value in _per_leaf_fields(core_state).items():
                stack.scatter(value, per_leaf[field], viewed=False)
        # momentum like optax's own zeros_like(params): placed and sharded as the leaf
        per_leaf["momentum"] = [jnp.zeros_like(leaf, dtype=asgo_core.statistics_dtype(leaf.dtype, jnp))
                                for leaf in leaves]
        treedef = jax.tree.structure(params)
        return state_type(count=jnp.zeros((), jnp.int32),
                          **{field: jax.tree.unflatten(treedef, values) for field, values in per_leaf.items()})

    def core_steps(grads, core_states, refresh_root: bool):
        with warnings.catch_warnings():  # the core probes for float64, which JAX may lack
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            results = [asgo_core.step(g, s, None, config, refresh_root=refresh_root)
                       for g, s in zip(grads, core_states)]
        return tuple(r[0] for r in results), tuple(r[1] for r in results)

    def update_fn(updates, state, params=None):
        if params is not None and jax.tree.structure(params) == jax.tree.structure(updates):
            _check_shapes_match(updates, params)
        leaves, plan = plan_for(updates, "gradient")
        treedef = jax.tree.structure(updates)
        old = {field: _state_per_leaf(treedef, getattr(state, field), field) for field in fields}
        _check_state_matches(plan, old["momentum"], leaves, _leaf_paths(updates))
        grads = [stack.gather([_gathered(g) for g in leaves], viewed=True) for stack in plan]
        gathered = {field: [_gathered(value) for value in values] for field, values in old.items()}
        core_states = tuple(_core_state({field: stack.gather(values, viewed=field == "momentum")
                                         for field, values in gathered.items()}, state.count)
                            for stack in plan)
        if refresh_every == 1:
            directions, new_states = core_steps(grads, core_states, True)
        else:
            directions, new_states = jax.lax.cond(
                state.count % refresh_every == 0,
                lambda: core_steps(grads, core_states, True),
                lambda: core_steps(grads, core_states, False))
        decay_mask = _decay_mask_per_leaf(weight_decay_mask, updates if params is None else params)
        out = [None] * len(leaves)
        new = {field: [None] * len(leaves) for field in fields}
        for stack, direction, old_core, new_core in zip(plan, directions, core_states, new_states):
            update = _with_weight_decay(direction, stack, params, weight_decay, decay_mask)
            skipped_now = (new_core.skipped - old_core.skipped)[:, None, None] > 0
            stack.scatter(jnp.where(skipped_now, jnp.zeros_like(update), update), out, viewed=True)
            for field, value in _per_leaf_fields(new_core).items():
                stack.scatter(value, new[field], viewed=field == "momentum")
        out = [_sharded_like(update, grad) for update, grad in zip(out, leaves)]
        new_state = {field: jax.tree.unflatten(treedef, [_sharded_like(value, before) for value, before
                                                         in zip(new[field], old[field])])
                     for field in fields}
        return (jax.tree.unflatten(treedef, out),
                state_type(count=optax.safe_increment(state.count), **new_state))

    return optax.GradientTransformation(init_fn, update_fn)


def _state_per_leaf(treedef, tree, field: str) -> list:
    """The state field's entry for each gradient leaf; a clear error for a state of another tree."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(f"the state's {field} does not follow the gradients' tree (a state "
                         f"initialised for other parameters?): {error}") from None


def _check_shapes_match(updates, params) -> None:
    """Trace time: every gradient has its parameter's shape (else an XLA shape error follows)."""
    for path, grad, param in zip(_leaf_paths(updates), jax.tree.leaves(updates), jax.tree.leaves(params)):
        if jnp.shape(grad) != jnp.shape(param):
            raise ValueError(f"gradient {path} has shape {jnp.shape(grad)}; accepted: its parameter's "
                             f"shape {jnp.shape(param)}")


def _check_state_matches(plan, momentum, leaves, paths) -> None:
    """Trace time: each gradient has the shape the state was initialised for."""
    for stack in plan:
        for i, view in zip(stack.leaf_indices, stack.views):
            if jnp.shape(momentum[i]) != jnp.shape(leaves[i]):
                raise ValueError(f"gradient {paths[i]} of shape {jnp.shape(leaves[i])} stacks to (matrices, "
                                 f"outputs, inputs) = {view.stack_shape}; the state was initialised for "
                                 f"shape {jnp.shape(momentum[i])} (a gradient of another shape than its parameter?)")


def _with_weight_decay(direction, stack: _Stack, params, weight_decay, decay_mask):
    """direction + weight_decay·W on the matrices whose leaf the mask selects."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
        return direction
    if not any(decay_mask[i] for i in stack.leaf_indices):
        return direction
    if params is None:
        raise ValueError("params are required by tx.update when weight_decay != 0 "
                         "(the update carries weight_decay·W)")
    weights = stack.gather([_gathered(w) for w in jax.tree.leaves(params)], viewed=True)
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
                  matmul_dtype: Optional[str] = None,
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
        matmul_dtype=matmul_dtype))
    return _scale_by_core(config, ScaleByASGOState, "scale_by_asgo", weight_decay,
                          weight_decay_mask, weight_dimension_numbers)


def scale_by_dasgo(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   update_rms: Optional[float] = 0.2, accumulate: str = "ema",
                   nonfinite: str = "skip", weight_decay: float = 0.0, weight_decay_mask: Any = None,
                   weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """DASGO's update (diagonal statistics over each matrix's inputs); see scale_by_asgo."""
    config = _core_config(DASGOConfig, dict(b1=b1, b2=b2, eps=eps, update_rms=update_rms,
                                            accumulate=accumulate, nonfinite=nonfinite))
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
        matmul_dtype=matmul_dtype, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        weight_dimension_numbers=weight_dimension_numbers)
    return _with_adamw(matrix_transform, learning_rate, weight_dimension_numbers, adam_b1, adam_b2,
                       adam_eps, adam_weight_decay, adam_learning_rate)


def dasgo(learning_rate, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          update_rms: Optional[float] = 0.2, accumulate: str = "ema", nonfinite: str = "skip",
          weight_decay: float = 0.1, weight_decay_mask: Any = None, adam_b1: float = 0.9,
          adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
          adam_learning_rate: Any = None,
          weight_dimension_numbers: Any = None) -> optax.GradientTransformation:
    """DASGO for matrix leaves, AdamW for the rest; options as asgo and scale_by_dasgo."""
    matrix_transform = scale_by_dasgo(
        b1=b1, b2=b2, eps=eps, update_rms=update_rms, accumulate=accumulate, nonfinite=nonfinite,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        weight_dimension_numbers=weight_dimension_numbers)
    return _with_adamw(matrix_transform, learning_rate, weight_dimension_numbers, adam_b1, adam_b2,
                       adam_eps, adam_weight_decay, adam_learning_rate)


# ----------------------------------------------------------------------------- numerics health

def numerics_counters(opt_state) -> dict:
    """Totals over every ASGO/DASGO state inside opt_state (any wrapping): matrices skipped for
    a non-finite gradient, and root fallbacks per asgo_core.FALLBACK_LEVELS. A host read."""
    is_state = lambda x: isinstance(x, (ScaleByASGOState, ScaleByDASGOState))  # noqa: E731
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    fallbacks = [leaf for s in states if hasattr(s, "fallbacks") for leaf in jax.tree.leaves(s.fallbacks)]
    return {"skipped": int(sum(jnp.sum(leaf) for s in states for leaf in jax.tree.leaves(s.skipped))),
            "fallbacks": {name: int(sum(jnp.sum(leaf[..., level]) for leaf in fallbacks))
                          for level, name in enumerate(asgo_core.FALLBACK_LEVELS)}}
from .optax_portable import portable_state, state_from_portable  # noqa: E402,F401  (portable checkpoints)
