"""Portable checkpoints (asgo_core.checkpoint) for the optax adapter.

    from asgo_core import ASGOConfig, load_state, save_state
    from asgo_core.adapters.optax import asgo, portable_state, state_from_portable

    tx = asgo(learning_rate=1e-2, b2=0.9)
    config = ASGOConfig(beta2=0.9)                   # the same options, core names
    save_state("run.npz", portable_state(opt_state, params, config))
    opt_state = state_from_portable(load_state("run.npz"), params, tx, config)

An optax transformation keeps its options in closures, so both functions take the core config
the transformation was built with (`ASGOConfig` / `DASGOConfig`, core option names, the
weight_decay given to asgo()/dasgo()) and, for the AdamW leaves, `adamw` = {"betas", "eps",
"weight_decay"} (asgo()'s adam_* defaults unless given). weight_dimension_numbers: as given to
the transformation.

Entries are per pytree leaf, in jax.tree.leaves order, named by the leaf's key path joined by
"." ({"fc": {"w": ...}} → "fc.w") unless `names` lists one name per leaf. Loading matches
entries by name. An entry's batch_dims is the number of the leaf's batch axes (neither
reduction nor output axes); a leaf whose matrix view holds b > 1 matrices keeps a leading axis
b on its per-matrix arrays (asgo_core.checkpoint, "Stacked matrices"). Shapes are the leaves'
own: to move a run to or from PyTorch, whose weights are (out, in), give the JAX leaves the
same layout (or transpose them) and weight_dimension_numbers that read it, the batch axes
first: MuonDimensionNumbers(reduction_axis=1, output_axis=0) for an (out, in) weight,
MuonDimensionNumbers(reduction_axis=2, output_axis=1) for an (E, out, in) expert stack that
torch steps with batch_dims=1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgo_core.checkpoint import (FORMAT, VERSION, CheckpointError, check_entry_matches, common_step, entries_in_order,
                                  stacked_state_entries, stacked_state_from_entries)
from asgo_core.config import ASGOConfig

from .optax import (ScaleByASGOState, ScaleByDASGOState, _as_axes, _core_state, _dimension_numbers_per_leaf,
                    _leaf_paths, _per_leaf_fields, _plan)

__all__ = ["ADAMW_DEFAULTS", "portable_state", "state_from_portable"]

ADAMW_DEFAULTS = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


def portable_state(opt_state, params, config, *, adamw=None, names=None,
                   weight_dimension_numbers=None) -> dict:
    """The state of an asgo()/dasgo()/scale_by_asgo()/scale_by_dasgo() optimizer as a portable
    dict (for asgo_core.save_state). A host read of every state array."""
    layout = _Layout(params, config, adamw, weight_dimension_numbers)
    matrix_state = _only(opt_state, (ScaleByASGOState, ScaleByDASGOState))
    adam_state = _only(opt_state, (optax.ScaleByAdamState,), required=bool(layout.adamw_indices))
    arrays = {}
    if matrix_state is not None:
        fields = layout.matrix_fields(matrix_state)
        for stack in layout.plan:
            core_state = _core_state({field: stack.gather(values, viewed=field == "momentum")
                                      for field, values in fields.items()}, matrix_state.count)
            per_leaf = stacked_state_entries(core_state, layout.matrices_per_leaf(stack), np.asarray)
            arrays.update(zip(layout.stack_leaf_indices(stack), per_leaf))
    if adam_state is not None:
        for index, mu, nu in zip(layout.adamw_indices, jax.tree.leaves(adam_state.mu),
                                 jax.tree.leaves(adam_state.nu)):
            arrays[index] = {"exp_avg": np.asarray(mu), "exp_avg_sq": np.asarray(nu)}
    step = int((matrix_state if matrix_state is not None else adam_state).count)
    entries = [{"name": name, "algorithm": algorithm, "shape": list(np.shape(leaf)), "step": step,
                "batch_dims": batch_dims, "config": entry_config, "arrays": arrays[index]}
               for index, (leaf, name, (algorithm, entry_config), batch_dims)
               in enumerate(zip(layout.leaves, layout.names(names), layout.identities, layout.batch_dims))]
    return {"format": FORMAT, "version": VERSION, "params": entries}


def state_from_portable(portable, params, tx, config, *, adamw=None, names=None,
                        weight_dimension_numbers=None):
    """tx's state for `params`, filled from a portable dict (asgo_core.load_state). Every entry
    is checked before the state is built; a mismatch raises asgo_core.CheckpointError. Arrays
    take the dtypes of tx.init(params) (float32 unless JAX x64 is enabled)."""
    layout = _Layout(params, config, adamw, weight_dimension_numbers)
    entries = entries_in_order(portable, layout.names(names))
    for leaf, entry, (algorithm, entry_config), batch_dims in zip(layout.leaves, entries, layout.identities,
                                                                  layout.batch_dims):
        check_entry_matches(entry, name=entry["name"], algorithm=algorithm, shape=np.shape(leaf),
                            config=entry_config, batch_dims=batch_dims)
    template = tx.init(params)
    step = jnp.asarray(common_step(entries), jnp.int32)
    replacements = {}
    matrix_state = _only(template, (ScaleByASGOState, ScaleByDASGOState))
    if matrix_state is not None:
        fields = layout.matrix_fields(matrix_state)
        filled = {field: list(values) for field, values in fields.items()}
        for stack in layout.plan:
            template_core = _core_state({field: stack.gather(values, viewed=field == "momentum")
                                         for field, values in fields.items()}, matrix_state.count)
            core_state = stacked_state_from_entries(
                template_core, [entries[i] for i in layout.stack_leaf_indices(stack)],
                layout.matrices_per_leaf(stack), _jax_like)
            for field, value in _per_leaf_fields(core_state).items():
                stack.scatter(value, filled[field], viewed=field == "momentum")
        replacements[type(matrix_state)] = matrix_state._replace(
            **{field: jax.tree.unflatten(layout.matrix_treedef, values) for field, values in filled.items()})
    adam_state = _only(template, (optax.ScaleByAdamState,), required=bool(layout.adamw_indices))
    if adam_state is not None:
        adamw_entries = [entries[i] for i in layout.adamw_indices]
        replacements[optax.ScaleByAdamState] = adam_state._replace(
            mu=_filled_like(adam_state.mu, adamw_entries, "exp_avg"),
            nu=_filled_like(adam_state.nu, adamw_entries, "exp_avg_sq"))
    is_replaced = lambda node: type(node) in replacements  # noqa: E731
    state = jax.tree.map(lambda node: replacements.get(type(node), node), template, is_leaf=is_replaced)
    return optax.tree_utils.tree_set(state, count=step)  # every step counter, schedules' included


class _Layout:
    """Which leaves are matrices (and in which core stack) and which are AdamW's."""

    def __init__(self, params, config, adamw, weight_dimension_numbers):
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        self.paths = [path for path, _ in paths_and_leaves]
        self.leaves = [leaf for _, leaf in paths_and_leaves]
        numbers = _dimension_numbers_per_leaf(weight_dimension_numbers, params)
        self.matrix_indices = [i for i, n in enumerate(numbers) if n is not None]
        self.adamw_indices = [i for i, n in enumerate(numbers) if n is None]
        # the matrix transformation's trees: asgo()/dasgo() mask the AdamW leaves (optax.partition)
        self.matrix_treedef = jax.tree.structure(jax.tree.unflatten(
            treedef, [leaf if n is not None else optax.MaskedNode() for leaf, n in zip(self.leaves, numbers)]))
        self.batch_dims = [0 if n is None else _batch_axes(leaf, n) for leaf, n in zip(self.leaves, numbers)]
        paths = _leaf_paths(params)
        self.plan = _plan([paths[i] for i in self.matrix_indices], [self.leaves[i] for i in self.matrix_indices],
                          [numbers[i] for i in self.matrix_indices], "portable_state")
        algorithm = "asgo" if isinstance(config, ASGOConfig) else "dasgo"
        adamw_config = {key: list(value) if key == "betas" else value
                        for key, value in {**ADAMW_DEFAULTS, **(adamw or {})}.items()}
        matrix_identity = (algorithm, dataclasses.asdict(config))
        self.identities = [matrix_identity if n is not None else ("adamw", adamw_config) for n in numbers]

    def matrix_fields(self, matrix_state) -> dict:
        """The state's per-leaf arrays, field by field, in the order of the matrix leaves."""
        return {field: self.matrix_treedef.flatten_up_to(getattr(matrix_state, field))
                for field in matrix_state._fields[1:]}

    def stack_leaf_indices(self, stack) -> list:
        """Positions in the full leaf list of one stack's leaves."""
        return [self.matrix_indices[i] for i in stack.leaf_indices]

    def matrices_per_leaf(self, stack) -> list:
        return [view.stack_shape[0] for view in stack.views]

    def names(self, names) -> list:
        if names is None:
            return [".".join(_key_name(key) for key in path) for path in self.paths]
        names = [str(name) for name in names]
        if len(names) != len(self.leaves):
            raise ValueError(f"names: {len(names)} names is invalid; accepted: one per leaf ({len(self.leaves)})")
        return names


def _batch_axes(leaf, dimension_numbers) -> int:
    """How many axes of the leaf index matrices: those neither reduction nor output axes."""
    ndim = np.ndim(leaf)
    matrix_axes = (set(_as_axes(dimension_numbers.reduction_axis, ndim))
                   | set(_as_axes(dimension_numbers.output_axis, ndim)))
    return ndim - len(matrix_axes)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


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


def _filled_like(tree, entries, key: str):
    """tree (with MaskedNode for the matrix leaves) with its array leaves from the entries."""
    leaves, treedef = jax.tree.flatten(tree)
    filled = []
    for like, entry in zip(leaves, entries):
        value = np.asarray(entry["arrays"][key])
        if value.shape != like.shape:
            raise CheckpointError(f"checkpoint parameter {entry['name']!r}: {key} has shape "
                                  f"{value.shape}, expected {like.shape}")
        filled.append(_jax_like(value, like))
    return jax.tree.unflatten(treedef, filled)
