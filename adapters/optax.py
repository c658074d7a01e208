"""ASGO and DASGO as optax gradient transformations; the user guide is docs/optax.md.

optax's own here: the transformations (scale_by_asgo / scale_by_dasgo, and asgo / dasgo, which
partition a tree between them and optax.adamw) and their public signatures; the state types,
whose fields are trees shaped like the parameters; the prefix-tree options (weight_decay_mask,
weight_dimension_numbers); explicit sharding; the tree walks of numerics_counters, the portable
functions and apply_updates_stochastic. The options, buckets, matrix views, state codec, step
and checkpoint format are asgo_core's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

import asgo_core
from asgo_core.buckets import Bucket, Member, plan_buckets
from asgo_core.checkpoint import (ParamIdentity, arrays_from_entry, common_step, export_portable,
                                  import_entries, stacked_state_entries, stacked_state_from_entries)
from asgo_core.config import ASGOConfig, fail
from asgo_core.layout import PermutedStack
from asgo_core.options import (bound_options, check_rate_or_schedule, check_traceable, checked_group,
                               checkpoint_config, defaults, group_from, signature, static_args)
from asgo_core.precision import rounded_sum
from asgo_core.state_codec import member_named, state_from_member_named
from asgo_core.step import traced_root_refresh

__all__ = ["ADAMW_DEFAULTS", "ASGO_STATIC_ARGS", "DASGO_STATIC_ARGS", "STATIC_ARGS", "MuonDimensionNumbers",
           "ScaleByASGOState", "ScaleByDASGOState", "apply_updates_stochastic", "asgo", "dasgo",
           "numerics_counters", "portable_state", "scale_by_asgo", "scale_by_dasgo", "state_from_portable"]

# The AdamW of non-matrix leaves (the options table's adam_* defaults): what the portable functions
# assume unless given `adamw`.
ADAMW_DEFAULTS = checkpoint_config(group_from({}, "optax", "asgo"), "adamw")

# The options that select leaves (prefix trees or callables), which the options table does not hold
_LEAF_SELECTIONS = ("weight_decay_mask", "weight_dimension_numbers")
# The options of the AdamW leaves, and the ones optax.inject_hyperparams may inject as arrays
_ADAMW_ARGS = ("learning_rate", "adam_b1", "adam_b2", "adam_eps", "adam_weight_decay", "adam_learning_rate")
_INJECTABLE = _ADAMW_ARGS + ("weight_decay",)


# optax.inject_hyperparams(asgo, static_args=ASGO_STATIC_ARGS)(learning_rate=...), and the same with
# dasgo and DASGO_STATIC_ARGS (STATIC_ARGS is asgo's): what it must not inject (it injects every number
# and calls every callable as a schedule), the options that shape the traced program and the leaf
# selections. The learning rates, weight_decay and adam_* may be injected.
ASGO_STATIC_ARGS = static_args("asgo", "optax") + _LEAF_SELECTIONS
DASGO_STATIC_ARGS = static_args("dasgo", "optax") + _LEAF_SELECTIONS
STATIC_ARGS = ASGO_STATIC_ARGS


class ScaleByASGOState(NamedTuple):
    """count: steps taken (int32). The other fields are trees shaped like the parameters, one
    array per matrix leaf (their shapes: docs/optax.md); remainder_* hold the remainder blocks."""
    count: Any
    momentum: Any
    gram: Any
    root: Any
    remainder_gram: Any
    remainder_root: Any
    skipped: Any
    fallbacks: Any


class ScaleByDASGOState(NamedTuple):
    """count: steps taken (int32); the other fields as in ScaleByASGOState."""
    count: Any
    momentum: Any
    second_moment: Any
    skipped: Any


# The per-leaf state fields that hold a core state's named arrays (asgo_core.state_codec) of
# another name: the two block groups (full-size blocks, remainder blocks).
_NAMED = {"gram": "gram/0", "root": "root/0", "remainder_gram": "gram/1", "remainder_root": "root/1"}


_CORE_TYPES = {ScaleByASGOState: asgo_core.ASGOState, ScaleByDASGOState: asgo_core.DASGOState}


def _leaf_states(state, treedef) -> list:
    """Each leaf's named arrays (asgo_core.state_codec) from the state's per-leaf trees."""
    fields = {field: _state_per_leaf(treedef, getattr(state, field), field) for field in state._fields[1:]}
    return [{_NAMED.get(field, field): values[i] for field, values in fields.items() if values[i] is not None}
            for i in range(treedef.num_leaves)]


def _state_of(state_type, leaf_states: list, treedef, count):
    """The inverse of _leaf_states."""
    return state_type(count=count, **{
        field: jax.tree.unflatten(treedef, [named.get(_NAMED.get(field, field)) for named in leaf_states])
        for field in state_type._fields[1:]})


# ----------------------------------------------------------------------------- matrix views
def _matrix_view(path: str, shape, dimension_numbers: MuonDimensionNumbers) -> PermutedStack:
    """The leaf at `path` as a stack of matrices; errors name the leaf and the way out."""
    try:
        return PermutedStack.from_axes(shape, dimension_numbers.reduction_axis, dimension_numbers.output_axis)
    except ValueError as error:
        raise ValueError(f"leaf {path} with weight_dimension_numbers={dimension_numbers}: {error}; "
                         "or give it weight_dimension_numbers=None so that asgo()/dasgo() route it to "
                         "AdamW") from None


# ----------------------------------------------------------------------------- per-leaf options
def _per_leaf(prefix, tree, is_value, default) -> list:
    """The value `prefix` (a prefix tree of `tree`, or a callable returning one) assigns to each
    leaf of `tree`, in jax.tree.leaves order; default(leaf) for each where prefix is None.
    is_value(x): whether x is a value (None and MuonDimensionNumbers are pytrees to JAX)."""
    if prefix is None:
        return [default(leaf) for leaf in jax.tree.leaves(tree)]
    if callable(prefix):
        prefix = prefix(tree)
    values, structure = jax.tree.flatten(prefix, is_leaf=is_value)
    return [value for value, subtree in zip(values, structure.flatten_up_to(tree))
            for _ in jax.tree.leaves(subtree)]


def _dimension_numbers_per_leaf(weight_dimension_numbers, tree) -> list:
    """MuonDimensionNumbers or None per leaf; by default 2-D leaves are (in, out) matrices."""
    is_value = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    return _per_leaf(weight_dimension_numbers, tree, is_value,
                     lambda leaf: MuonDimensionNumbers() if jnp.ndim(leaf) == 2 else None)


# ----------------------------------------------------------------------------- stacking plan
def _leaf_paths(tree) -> list:
    """Each leaf's path as jax.tree_util.keystr writes it (e.g. "['layer']['w']"), in leaves order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _plan(tree, kind: str, weight_dimension_numbers, transformation: str) -> tuple:
    """(leaves, buckets): asgo_core.buckets of the leaves, by index, whose matrices share (m, n)
    and dtype. Errors name the leaf: `kind` ("parameter", "gradient") and its path."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, tree)
    members = []
    for index, ((path, leaf), leaf_numbers) in enumerate(zip(paths_and_leaves, numbers)):
        where = f"{kind} {jax.tree_util.keystr(path)}"
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"{where} has dtype {jnp.dtype(leaf.dtype)}; accepted: a real floating-point "
                             "dtype (complex: the Gram would need conjugation)")
        if leaf_numbers is None:
            raise ValueError(f"{transformation} got {where} of shape {tuple(leaf.shape)} with no matrix "
                             "view; use asgo()/dasgo(), which route it to AdamW, or give it "
                             "weight_dimension_numbers")
        members.append(Member(index, _matrix_view(jax.tree_util.keystr(path), leaf.shape, leaf_numbers)))
    leaves = [leaf for _, leaf in paths_and_leaves]
    return leaves, plan_buckets(members, lambda member: (jnp.dtype(leaves[member.handle].dtype),))


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
def _core_config(algorithm: str, arguments: dict):
    """The core config of scale_by_*()'s or asgo()/dasgo()'s options, checked by the options
    table's checks (errors in optax's names). An array is an injected hyperparameter
    (optax.inject_hyperparams): unchecked where one may be injected, refused elsewhere."""
    options = {}
    for name, value in arguments.items():
        if not (hasattr(value, "shape") and not isinstance(value, (int, float))):
            options[name] = value
        elif name not in _INJECTABLE:
            fail(name, value, "a Python value (it shapes the traced program). With optax.inject_hyperparams "
                 f"pass static_args=asgo_core.adapters.optax.{algorithm.upper()}_STATIC_ARGS")
    return checked_group(options, "optax", algorithm, check_lr=check_rate_or_schedule)[1]


def _scale_by_core(algorithm: str, arguments: dict) -> optax.GradientTransformation:
    """`arguments`: scale_by_asgo()'s / scale_by_dasgo()'s, by name."""
    weight_decay_mask, weight_dimension_numbers = (arguments.pop(key) for key in _LEAF_SELECTIONS)
    weight_decay = arguments["weight_decay"]
    # the decay is applied here (a mask, an injected weight_decay), not by the core
    config = dataclasses.replace(_core_config(algorithm, arguments), weight_decay=0.0)
    check_traceable(config)
    state_type = ScaleByASGOState if algorithm == "asgo" else ScaleByDASGOState
    core_type = _CORE_TYPES[state_type]

    def plan_for(tree, kind: str):
        return _plan(tree, kind, weight_dimension_numbers, f"scale_by_{algorithm}")

    def init_fn(params):
        leaves, plan = plan_for(params, "parameter")
        stacks = [((sum(bucket.counts), *bucket.matrix_shape), leaves[bucket.handles[0]].dtype)
                  for bucket in plan]
        # Built under jit, so the arrays are placed like optax's own state (not committed to a
        # device); a committed/uncommitted mix would make the first jitted step compile twice.
        core_states = jax.jit(lambda: [asgo_core.init_state(jnp.zeros(shape, dtype), config)
                                       for shape, dtype in stacks])()
        states = [None] * len(leaves)
        for bucket, core_state in zip(plan, core_states):
            for i, named in zip(bucket.handles, member_named(core_state, bucket.views, jnp)):
                # momentum like optax's own zeros_like(params): placed and sharded as the leaf
                states[i] = dict(named, momentum=jnp.zeros_like(leaves[i], dtype=named["momentum"].dtype))
        return _state_of(state_type, states, jax.tree.structure(params), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is not None and jax.tree.structure(params) == jax.tree.structure(updates):
            _check_shapes_match(updates, params)
        leaves, plan = plan_for(updates, "gradient")
        treedef = jax.tree.structure(updates)
        old = _leaf_states(state, treedef)
        _check_state_matches(plan, old, leaves, _leaf_paths(updates))
        grads = [_gathered(g) for g in leaves]
        gathered = [{name: _gathered(value) for name, value in named.items()} for named in old]
        decay_tree = updates if params is None else params
        decay_mask = [bool(value) for value in _per_leaf(weight_decay_mask, decay_tree,
                                                         lambda x: isinstance(x, bool), lambda leaf: True)]

        def step(buckets, refresh_root: bool):
            """(update per leaf, new state per leaf): one core call per bucket."""
            out, new = [None] * len(leaves), [None] * len(leaves)
            for bucket in buckets:
                before = state_from_member_named(core_type, [gathered[i] for i in bucket.handles],
                                                 bucket.views, state.count, jnp)
                grad = bucket.gather([grads[i] for i in bucket.handles], jnp)
                direction, after = asgo_core.step(grad, before, None, config, refresh_root=refresh_root)
                update = _with_weight_decay(direction, bucket, params, weight_decay, decay_mask)
                skipped_now = (after.skipped - before.skipped)[:, None, None] > 0
                for i, leaf_update, named in zip(bucket.handles,
                                                 bucket.scatter(jnp.where(skipped_now, 0.0, update), jnp),
                                                 member_named(after, bucket.views, jnp)):
                    out[i], new[i] = leaf_update, named
            return out, new

        # Stacking pays where the roots are refreshed (batched solves); elsewhere each leaf's own
        # core call spares copying its statistics into and out of a stack.
        singles = [Bucket(bucket.key, [member]) for bucket in plan for member in bucket.members]
        out, new = traced_root_refresh(config, state.count, jax.lax.cond, lambda: step(plan, True),
                                       lambda: step(singles, False))
        out = [_sharded_like(update, grad) for update, grad in zip(out, leaves)]
        new = [{name: _sharded_like(value, before[name]) for name, value in named.items()}
               for named, before in zip(new, old)]
        return (jax.tree.unflatten(treedef, out),
                _state_of(state_type, new, treedef, optax.safe_increment(state.count)))

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


def _check_state_matches(plan, leaf_states, leaves, paths) -> None:
    """Trace time: each gradient has the shape the state was initialised for."""
    for member in [member for bucket in plan for member in bucket.members]:
        grad_shape = jnp.shape(leaves[member.handle])
        state_shape = jnp.shape(leaf_states[member.handle]["momentum"])
        if grad_shape != state_shape:
            raise ValueError(f"gradient {paths[member.handle]} of shape {grad_shape} stacks to (matrices, "
                             f"outputs, inputs) = {member.view.stack_shape}; the state was initialised for "
                             f"shape {state_shape} (a gradient shaped unlike its parameter?)")


def _with_weight_decay(direction, bucket: Bucket, params, weight_decay, decay_mask):
    """direction + weight_decay·W on the matrices whose leaf the mask selects."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
        return direction
    if not any(decay_mask[i] for i in bucket.handles):
        return direction
    if params is None:
        raise ValueError("params are required by tx.update when weight_decay != 0 "
                         "(the update carries weight_decay·W)")
    leaves = jax.tree.leaves(params)
    weights = bucket.gather([_gathered(leaves[i]) for i in bucket.handles], jnp)
    per_matrix = np.repeat([1.0 if decay_mask[i] else 0.0 for i in bucket.handles], bucket.counts)
    wide = jnp.promote_types(direction.dtype, jnp.float32)  # as the core: decay in float32 or wider
    decay = jnp.asarray(weight_decay, wide) * jnp.asarray(per_matrix, jnp.float32).astype(wide)
    return (direction.astype(wide) + decay[:, None, None] * weights.astype(wide)).astype(direction.dtype)


def _taking_options(algorithm: str, with_adamw: bool):
    """Makes function(options) take the options table's optax options positionally, in the
    table's order (asgo_core.options): asgo()/dasgo() with learning_rate required, scale_by_*()
    without learning_rate and adam_* and with weight_decay 0; weight_decay_mask follows
    weight_decay, weight_dimension_numbers comes last."""
    table = {name: default for name, default in defaults(algorithm, "optax").items()
             if with_adamw or name not in _ADAMW_ARGS}
    names = [*table, "weight_dimension_numbers"]
    names.insert(names.index("weight_decay") + 1, "weight_decay_mask")
    accepted = signature(names, {**table, "weight_decay_mask": None, "weight_dimension_numbers": None,
                                 **({"learning_rate": inspect.Parameter.empty} if with_adamw else
                                    {"weight_decay": 0.0})})

    def decorate(function):
        def with_options(*args, **kwargs):
            return function(bound_options(accepted, function.__name__, args, kwargs))
        with_options.__signature__ = accepted
        return functools.update_wrapper(with_options, function)
    return decorate


@_taking_options("asgo", with_adamw=False)
def scale_by_asgo(options: dict) -> optax.GradientTransformation:
    """ASGO's update U (+ weight_decay·W) for every leaf of the tree, each seen as a matrix.

    Options: asgo_core.ASGOConfig's (b1, b2: beta1, beta2; weight_decay 0 here), and the
    prefix trees weight_decay_mask and weight_dimension_numbers (docs/optax.md).
    """
    return _scale_by_core("asgo", options)


@_taking_options("dasgo", with_adamw=False)
def scale_by_dasgo(options: dict) -> optax.GradientTransformation:
    """DASGO's update (diagonal statistics over each matrix's inputs); see scale_by_asgo."""
    return _scale_by_core("dasgo", options)


# ----------------------------------------------------------------------------- full optimizers
def _with_adamw(algorithm: str, arguments: dict) -> optax.GradientTransformation:
    """Partition: matrix leaves → scale_by_*(the matrix arguments) then the learning rate; the
    others → AdamW. `arguments`: asgo()/dasgo()'s, by name."""
    options = {name: arguments.pop(name) for name in _ADAMW_ARGS}
    _core_config(algorithm, options)  # the learning rates and adam_* through the table's checks
    learning_rate, adam_learning_rate = options["learning_rate"], options["adam_learning_rate"]
    weight_dimension_numbers = arguments["weight_dimension_numbers"]

    def labels(params):
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, params)
        names = ["matrix" if n is not None else "adamw" for n in numbers]
        return jax.tree.unflatten(jax.tree.structure(params), names)

    adamw = optax.adamw(learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
                        b1=options["adam_b1"], b2=options["adam_b2"], eps=options["adam_eps"],
                        weight_decay=options["adam_weight_decay"])
    scale_by = scale_by_asgo if algorithm == "asgo" else scale_by_dasgo
    matrices = optax.chain(scale_by(**arguments), optax.scale_by_learning_rate(learning_rate))
    return optax.partition({"matrix": matrices, "adamw": adamw}, labels)


@_taking_options("asgo", with_adamw=True)
def asgo(options: dict) -> optax.GradientTransformation:
    """ASGO for matrix leaves, AdamW for the rest: W ← W − lr·(U + weight_decay·W).

    learning_rate: a number or an optax schedule; ASGO options as scale_by_asgo's, weight_decay
    0.1 (the core's); adam_*: the AdamW of the other leaves (docs/optax.md).
    """
    return _with_adamw("asgo", options)


@_taking_options("dasgo", with_adamw=True)
def dasgo(options: dict) -> optax.GradientTransformation:
    """DASGO for matrix leaves, AdamW for the rest; options as asgo and scale_by_dasgo."""
    return _with_adamw("dasgo", options)


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


# ----------------------------------------------------------------------------- portable checkpoints
def portable_state(opt_state, params, config, *, adamw=None, names=None,
                   weight_dimension_numbers=None) -> dict:
    """The state of an asgo()/dasgo()/scale_by_*() optimizer as a portable dict (for
    asgo_core.save_state; the arguments: docs/optax.md). A host read of every state array."""
    layout = _Layout(params, config, adamw, weight_dimension_numbers)
    matrix_state = _only(opt_state, (ScaleByASGOState, ScaleByDASGOState))
    adam_state = _only(opt_state, (optax.ScaleByAdamState,), required=bool(layout.adamw_indices))
    arrays = [None] * len(layout.views)
    if matrix_state is not None:
        for index, core_state in layout.core_states(matrix_state):
            count = layout.views[index].stack_shape[0]
            arrays[index], = stacked_state_entries(core_state, [count], np.asarray)
    if adam_state is not None:
        for index, mu, nu in zip(layout.adamw_indices, jax.tree.leaves(adam_state.mu),
                                 jax.tree.leaves(adam_state.nu)):
            arrays[index] = {"exp_avg": mu, "exp_avg_sq": nu}
    step = (matrix_state if matrix_state is not None else adam_state).count
    return export_portable(layout.identities, arrays, int(step), names, per="leaf")


def state_from_portable(portable, params, tx, config, *, adamw=None, names=None,
                        weight_dimension_numbers=None):
    """tx's state for `params`, filled from a portable dict (asgo_core.load_state). Every entry
    is checked before the state is built; a mismatch raises asgo_core.CheckpointError. Arrays
    take the dtypes of tx.init(params) (float32 unless JAX x64 is enabled)."""
    layout = _Layout(params, config, adamw, weight_dimension_numbers)
    entries = import_entries(portable, layout.identities, names, per="leaf")
    template = tx.init(params)
    replacements = {}
    matrix_state = _only(template, (ScaleByASGOState, ScaleByDASGOState))
    if matrix_state is not None:
        filled = []
        for index, like in layout.core_states(matrix_state):
            view = layout.views[index]
            core_state = stacked_state_from_entries(like, [entries[index]], [view.stack_shape[0]], _jax_like)
            filled += member_named(core_state, [view], jnp)
        replacements[type(matrix_state)] = _state_of(type(matrix_state), filled, layout.matrix_treedef,
                                                     matrix_state.count)
    adam_state = _only(template, (optax.ScaleByAdamState,), required=bool(layout.adamw_indices))
    if adam_state is not None:
        moments = [arrays_from_entry(entries[index], {"exp_avg": mu, "exp_avg_sq": nu}, _jax_like)
                   for index, mu, nu in zip(layout.adamw_indices, jax.tree.leaves(adam_state.mu),
                                            jax.tree.leaves(adam_state.nu))]
        treedef = jax.tree.structure(adam_state.mu)  # MaskedNode where the matrix leaves are
        replacements[optax.ScaleByAdamState] = adam_state._replace(
            mu=jax.tree.unflatten(treedef, [moment["exp_avg"] for moment in moments]),
            nu=jax.tree.unflatten(treedef, [moment["exp_avg_sq"] for moment in moments]))
    is_replaced = lambda node: type(node) in replacements  # noqa: E731
    state = jax.tree.map(lambda node: replacements.get(type(node), node), template, is_leaf=is_replaced)
    step = jnp.asarray(common_step(entries), jnp.int32)
    return optax.tree_utils.tree_set(state, count=step)  # every step counter, schedules' included


class _Layout:
    """Which leaves are matrices (and their matrix views) and which are AdamW's, and the
    identity (asgo_core.checkpoint.ParamIdentity) of each leaf."""

    def __init__(self, params, config, adamw, weight_dimension_numbers):
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [leaf for _, leaf in paths_and_leaves]
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, params)
        self.views = [None if n is None else _matrix_view(jax.tree_util.keystr(path), np.shape(leaf), n)
                      for (path, leaf), n in zip(paths_and_leaves, numbers)]
        self.adamw_indices = [i for i, view in enumerate(self.views) if view is None]
        # the matrix transformation's trees: asgo()/dasgo() mask the AdamW leaves (optax.partition)
        masked = [optax.MaskedNode() if view is None else leaf for leaf, view in zip(leaves, self.views)]
        self.matrix_treedef = jax.tree.structure(jax.tree.unflatten(treedef, masked))
        algorithm = "asgo" if isinstance(config, ASGOConfig) else "dasgo"
        adamw_config = {key: list(value) if key == "betas" else value
                        for key, value in {**ADAMW_DEFAULTS, **(adamw or {})}.items()}
        self.identities = []
        for (path, leaf), view in zip(paths_and_leaves, self.views):
            name, shape = jax.tree_util.keystr(path, simple=True, separator="."), tuple(np.shape(leaf))
            self.identities.append(ParamIdentity(name, "adamw", shape, adamw_config) if view is None else
                                   ParamIdentity(name, algorithm, shape, dataclasses.asdict(config),
                                                 view.batch_dims))

    def core_states(self, matrix_state) -> list:
        """(leaf index, the core state of the leaf's matrices) for every matrix leaf."""
        indices = [i for i, view in enumerate(self.views) if view is not None]
        leaf_states = _leaf_states(matrix_state, self.matrix_treedef)
        core_type = _CORE_TYPES[type(matrix_state)]
        return [(i, state_from_member_named(core_type, [named], [self.views[i]], matrix_state.count, jnp))
                for i, named in zip(indices, leaf_states)]


def _only(opt_state, types, *, required=False):
    """The one state of the given types inside opt_state (None when absent and not required)."""
    is_wanted = lambda node: isinstance(node, types)  # noqa: E731
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=is_wanted) if is_wanted(node)]
    if len(found) > 1 or (required and not found):
        raise ValueError(f"opt_state holds {len(found)} {' / '.join(t.__name__ for t in types)}; "
                         "accepted: the state of one asgo()/dasgo()/scale_by_* optimizer")
    return found[0] if found else None


def _jax_like(array, like):
    return jnp.asarray(array, dtype=like.dtype)


def apply_updates_stochastic(params, updates, key):
    """optax.apply_updates with the sum rounded stochastically into bfloat16/float16 parameters
    (asgo_core.precision; docs/optax.md). key: a jax.random key, a new one each step (e.g.
    jax.random.fold_in(key, step)) so a resumed run draws the same numbers."""
    leaves, structure = jax.tree.flatten(params, is_leaf=lambda x: x is None)
    keys = jax.random.split(key, len(leaves))
    update_leaves = structure.flatten_up_to(updates)
    summed = [_rounded_sum(p, u, k) for p, u, k in zip(leaves, update_leaves, keys)]
    return jax.tree.unflatten(structure, summed)


def _rounded_sum(param, update, key):
    if param is None or update is None:
        return param
    return rounded_sum(param, update, lambda shape: jax.random.uniform(key, shape, jnp.float32), jnp)
