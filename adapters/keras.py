"""ASGO and DASGO as Keras 3 optimizers (JAX and torch backends); the user guide is docs/keras.md.

Keras' own here: the keras.optimizers.Optimizer subclass (build, _backend_update_step, which
writes every variable only after all new values are computed, and get_config), the state as
Keras variables (a _Slot per model variable, one variable per state_codec name), the choice of
matrix variables by path (exclude_layers, exclude_embeddings, batch_dims), the backend checks and
the rounding seeds. The options, buckets, state codec, AdamW, gradient checks and portable format
are asgo_core's.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from array_api_compat import array_namespace
from keras import ops

from asgo_core import adamw, init_state, statistics_dtype
from asgo_core import step as core_step
from asgo_core.buckets import Member, plan_buckets
from asgo_core.checkpoint import (PortableCheckpoint, arrays_from_entry, common_step, identity_from_group,
                                  stacked_state_entries, stacked_state_from_entries)
from asgo_core.config import fail
from asgo_core.gradients import check_gradient
from asgo_core.layout import PermutedStack
from asgo_core.options import (OptionsSignature, batch_dims_for_path, check_rate_or_schedule, check_traceable,
                                checked_group, checkpoint_config, defaults, group_config, matches_path)
from asgo_core.precision import rounding_seed, rounds_stochastically, stochastic_round
from asgo_core.state_codec import concat_named, flat_spec, named_arrays, split_named, state_from_named
from asgo_core.step import traced_root_refresh

__all__ = ["ASGO", "DASGO"]

SUPPORTED_BACKENDS = ("jax", "torch")


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise RuntimeError(f"asgo_core.adapters.keras needs the 'jax' or 'torch' Keras backend; the "
                           f"backend is {backend!r}. Set KERAS_BACKEND=jax or KERAS_BACKEND=torch "
                           "before importing keras.")


@dataclass(frozen=True)
class _Slot:
    """The optimizer variables of one model variable, by state_codec name: a matrix's core state
    (view: its stack), or AdamW's (view None; torch.optim.AdamW's state and a counter)."""
    view: PermutedStack | None
    state_type: type              # the core state's, or dict
    variables: dict

    def values(self) -> dict:
        return {name: variable.value for name, variable in self.variables.items()}


class _MatrixOptimizer(PortableCheckpoint, OptionsSignature, keras.optimizers.Optimizer):
    """Shared machinery of ASGO and DASGO; subclasses set the matrix algorithm."""

    matrix_algorithm: str
    positional_options = ("learning_rate",)
    options_framework = "keras"
    portable_entry = "variable with optimizer state"

    def __init__(self, learning_rate=defaults("asgo", "keras")["learning_rate"], **options):
        _check_backend()
        table = defaults(self.matrix_algorithm, "keras")
        ours = {name: options.pop(name, default) for name, default in table.items()}
        ours["learning_rate"] = learning_rate
        group, config = checked_group(ours, "keras", self.matrix_algorithm, check_lr=check_rate_or_schedule)
        if keras.backend.backend() == "jax":
            check_traceable(config, "under the JAX backend ")
        super().__init__(learning_rate=learning_rate, weight_decay=group["weight_decay"], **options)
        self._options = {name: ours[name] for name in table if name != "learning_rate"}
        self._group = group
        self._config = config
        self.adam_lr_ratio = group["adamw_lr_ratio"]
        self.exclude_layers = group["exclude_layers"]
        self.exclude_embeddings = group["exclude_embeddings"]
        self.batch_dims = group["batch_dims_by_path"]

    # ---- which variables are matrices -----------------------------------------------------
    def uses_adamw(self, variable) -> bool:
        """Whether a model variable is stepped by the built-in AdamW instead of the matrix algorithm."""
        if len(variable.shape) < 2:
            return True
        if self.exclude_embeddings and "embedding" in variable.path.lower():
            return True
        return matches_path(self.exclude_layers, variable.path)

    def _group_of(self, variable) -> dict:
        """The variable's options as a torch-named group (asgo_core.options): its batch_dims, and
        no weight decay where exclude_from_weight_decay excludes it."""
        group = dict(self._group, batch_dims=batch_dims_for_path(self.batch_dims, variable.path))
        if not self._use_weight_decay(variable):
            group.update(weight_decay=0.0, adamw_weight_decay=0.0)
        return group

    # ---- building the state ---------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        plans = [self._plan(variable) for variable in var_list]  # all checks before any variable
        super().build(var_list)
        self._slots = [self._add_slot(variable, plan) for variable, plan in zip(var_list, plans)]

    def _plan(self, variable):
        """None (no state), or (view, the zero state of its stack); AdamW's state has no view."""
        if self._overwrite_variable_with_gradient(variable):
            return None
        if not keras.backend.is_float_dtype(variable.dtype):
            fail(f"variable {variable.path!r}", variable.dtype, "a real floating-point dtype")
        if self.uses_adamw(variable):
            zeros = ops.zeros(variable.shape, variable.dtype)
            return None, adamw.zero_state(zeros, array_namespace(zeros))
        try:
            view = PermutedStack.outputs_last(tuple(variable.shape), self._group_of(variable)["batch_dims"])
            return view, init_state(ops.zeros(view.stack_shape, variable.dtype), self._config)
        except ValueError as error:
            raise ValueError(f"variable {variable.path!r}: {error}") from None

    def _add_slot(self, variable, plan):
        if plan is None:
            return None
        view, state = plan
        path = variable.path.replace("/", "_")
        variables = {name: self.add_variable(shape, dtype=keras.backend.standardize_dtype(dtype),
                                             name=f"{path}_{name.replace('/', '_')}")
                     for name, shape, dtype in flat_spec(state)}
        return _Slot(view, type(state), variables)

    # ---- one step -------------------------------------------------------------------------
    def _apply_weight_decay(self, variables):
        """Nothing here: the decay is part of each step's update (weight_decay·W; none for a
        matrix skipped for a non-finite gradient)."""

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        lr = ops.convert_to_tensor(learning_rate)
        members, writes = [], []
        for grad, variable in zip(grads, trainable_variables):
            where = f"gradient of variable {variable.path!r}"
            check_gradient(where, grad, variable.shape, self._config.nonfinite)
        for grad, variable in zip(grads, trainable_variables):
            slot = self._slots[self._get_variable_index(variable)]
            if slot.view is None:
                writes += self._adamw_step(grad, variable, slot, lr)
            else:
                members.append(Member((variable, slot, grad), slot.view))
        buckets = plan_buckets(members, lambda member: (member.handle[0].dtype, self._use_weight_decay(
            member.handle[0])))
        for bucket in buckets:
            writes += self._matrix_step(bucket, lr)
        for target, value in writes:  # every value is computed before anything is written
            target.assign(value)

    def _matrix_step(self, bucket, lr) -> list:
        """One core step on a bucket of (variable, slot, gradient) handles → (variable, value) pairs."""
        variables, slots, grads = zip(*bucket.handles)
        config = group_config(self._group_of(variables[0]), self.matrix_algorithm)
        params = bucket.gather([variable.value for variable in variables], ops)
        named = concat_named([slot.values() for slot in slots], ops)
        state = state_from_named(slots[0].state_type, named, ops.cast(self.iterations, "int32"))
        stacked_grads = bucket.gather(grads, ops)
        rounds = self._rounds(params)
        update_dtype = statistics_dtype(params.dtype, array_namespace(params)) if rounds else None

        def run(refresh_root: bool):
            update, new_state = core_step(stacked_grads, state, params, config, refresh_root=refresh_root,
                                          update_dtype=update_dtype)
            return update, named_arrays(new_state)

        update, new_named = traced_root_refresh(config, self.iterations, ops.cond, lambda: run(True),
                                                lambda: run(False))
        new_params = ops.cast(params, update.dtype) - ops.cast(lr, update.dtype) * update
        if rounds:
            uniform = self._uniform(new_params, self._get_variable_index(variables[0]))
            new_params = stochastic_round(new_params, params.dtype, uniform, array_namespace(new_params))
        new_params = bucket.scatter(new_params, ops)
        writes = [(variable, ops.cast(value, variable.dtype))
                  for variable, value in zip(variables, new_params)]
        for slot, part in zip(slots, split_named(new_named, bucket.counts)):
            writes += [(slot.variables[name], value) for name, value in part.items()]
        return writes

    def _adamw_step(self, grad, variable, slot: _Slot, lr) -> list:
        """torch.optim.AdamW's step (asgo_core.adamw); a non-finite gradient leaves the variable
        and its state as they were and is counted."""
        state = slot.variables
        dtype = state["exp_avg"].dtype
        hyper = adamw.hyperparameters(lr=ops.cast(lr, dtype) * self.adam_lr_ratio,
                                      step=ops.cast(self.iterations + 1, dtype),
                                      **checkpoint_config(self._group_of(variable), "adamw"))
        xp = array_namespace(variable.value)
        stream = self._get_variable_index(variable)
        uniform = self._uniform(state["exp_avg"], stream) if self._rounds(variable.value) else None
        new_param, new_state = adamw.adamw_step(variable.value, grad, slot.values(), xp, uniform=uniform,
                                                **hyper)
        return [(variable, new_param), *((state[name], value) for name, value in new_state.items())]

    def _rounds(self, like) -> bool:
        """Whether writes to variables of like's dtype are rounded stochastically."""
        return rounds_stochastically(self._group["param_rounding"], like.dtype, array_namespace(like))

    def _uniform(self, like, stream: int):
        """Uniform numbers in [0, 1) shaped and typed like `like`, from a stateless seed made of
        the stream and the step count (the `iterations` variable, saved with the optimizer): JAX
        key data under jit, an int under the torch backend (eager; it takes ints or SeedGenerators)."""
        if keras.backend.backend() == "jax":
            seed = ops.cast(ops.stack([ops.convert_to_tensor(stream, "int32"),
                                       ops.cast(self.iterations, "int32")]), "uint32")
        else:
            seed = rounding_seed(int(self.iterations), stream)
        return keras.random.uniform(tuple(like.shape), dtype=like.dtype, seed=seed)

    # ---- portable checkpoints (asgo_core.checkpoint.PortableCheckpoint) ----------------------
    def _portable_arrays(self) -> tuple:
        arrays = [self._slot_arrays(slot) for _, slot in self._stateful()]
        return arrays, int(ops.convert_to_numpy(self.iterations))

    def _load_entries(self, entries: list) -> None:
        writes = [(self.iterations, common_step(entries))]
        for (_, slot), entry in zip(self._stateful(), entries):
            writes += self._slot_writes(slot, entry)
        for target, value in writes:
            target.assign(value)

    @staticmethod
    def _slot_arrays(slot) -> dict:
        if slot.view is None:
            return {name: ops.convert_to_numpy(value) for name, value in slot.values().items()}
        state = state_from_named(slot.state_type, slot.values(), 0)
        return stacked_state_entries(state, [slot.view.stack_shape[0]], ops.convert_to_numpy)[0]

    @staticmethod
    def _slot_writes(slot, entry) -> list:
        if slot.view is None:
            arrays = arrays_from_entry(entry, slot.variables, _converted, optional=("skipped",))
        else:
            template = state_from_named(slot.state_type, slot.values(), np.zeros((), np.int32))
            state = stacked_state_from_entries(template, [entry], [slot.view.stack_shape[0]], _converted)
            arrays = named_arrays(state)
        return [(slot.variables[name], value) for name, value in arrays.items()]

    def _stateful(self) -> list:
        return [(v, slot) for v, slot in zip(self._trainable_variables, self._slots) if slot is not None]

    def _identities(self) -> list:
        """Each variable with optimizer state (in build order) as its checkpoint entry records it,
        named by its path: a matrix in the torch layout (outputs first)."""
        if not self.built:
            fail("optimizer", "an optimizer that is not built",
                 "a built optimizer: call optimizer.build(model.trainable_variables) first")
        return [identity_from_group(variable.path, self._group_of(variable),
                                    "adamw" if slot.view is None else self.matrix_algorithm,
                                    variable.shape if slot.view is None else slot.view.permuted_shape)
                for variable, slot in self._stateful()]

    # ---- serialization --------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(self._options)
        return config


def _converted(array, like):
    """A checkpoint array (its shape checked by asgo_core.checkpoint) as a tensor of like's dtype."""
    return ops.convert_to_tensor(np.asarray(array), dtype=like.dtype)


@keras.saving.register_keras_serializable(package="asgo")
class ASGO(_MatrixOptimizer):
    """ASGO (asgo_core.ASGOConfig) for matrix variables, AdamW for the others.

    learning_rate: a float, a keras.optimizers.schedules.LearningRateSchedule or a callable.
    The other options: the core's under Keras' names (inspect.signature(ASGO); their meanings
    and torch names: docs/keras.md) and the Keras base options (clipnorm, use_ema, ...).
    """

    matrix_algorithm = "asgo"


@keras.saving.register_keras_serializable(package="asgo")
class DASGO(_MatrixOptimizer):
    """DASGO, the diagonal variant (asgo_core.DASGOConfig); options as ASGO's that DASGO has."""

    matrix_algorithm = "dasgo"
