"""ASGO and DASGO as Keras 3 optimizers, for the JAX and PyTorch Keras backends.

    from asgo_core.adapters.keras import ASGO
    model.compile(optimizer=ASGO(learning_rate=1e-2), loss="sparse_categorical_crossentropy")

Names follow Keras (keras.optimizers.AdamW and Muon): learning_rate, beta_1, beta_2, epsilon,
weight_decay for the matrix algorithm; adam_beta_1, adam_beta_2, adam_epsilon,
adam_weight_decay and adam_lr_ratio for the built-in AdamW; exclude_layers and
exclude_embeddings as Muon's. They map one to one onto the core's options (the torch names lr,
betas, eps, adamw_*), with the same defaults; the other options (precondition_frequency,
update_rms, side, num_heads, ...) keep the core's names. The base keyword arguments (clipnorm,
clipvalue, global_clipnorm, use_ema, loss_scale_factor, gradient_accumulation_steps) and
keras.optimizers.schedules work as for any Keras optimizer.

Which variables are matrices. Variables with two or more dims get the matrix algorithm; the
others, variables whose path contains "embedding" (exclude_embeddings=True) and those whose
path matches a regex of exclude_layers go to the built-in AdamW (torch.optim.AdamW's
arithmetic, as in the other adapters). A Keras kernel keeps its outputs on the last axis
(Dense: (in, out); Conv2D: (kh, kw, in, out)), so its matrix is (out, rest) after moving that
axis first: the same matrix as the torch (out, in) weight of the same layer, hence the same
preconditioned side. batch_dims={path regex: k} marks the first k dims of the matching
variables as indexing independent matrices (stacked experts or layers).

Batching and state. Matrices with the same (m, n) view, dtype and weight-decay setting are
stacked and stepped by one asgo_core.step call. The state lives in Keras variables, one set per
model variable (the core's momentum, Gram and root blocks, counters), so model.save /
keras.models.load_model restore it; the step count is the optimizer's `iterations`.

Weight decay is part of the core's update (weight_decay·W, none for a matrix skipped for a
non-finite gradient); exclude_from_weight_decay(...) is honoured. Non-finite gradients of
AdamW variables skip that variable's step too, counted in its `skipped` variable.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass

import array_api_compat
import keras
from keras import ops

from asgo_core import ASGOConfig, DASGOConfig, check_batch_dims, init_state, matrix_stack_shape, statistics_dtype
from asgo_core import step as core_step
from asgo_core.config import check_non_negative, fail
from asgo_core.layout import PermutedStack
from asgo_core.options import check_group_options, group_config
from asgo_core.precision import rounding_seed, stochastic_round

__all__ = ["ASGO", "DASGO"]

SUPPORTED_BACKENDS = ("jax", "torch")

# The shared option names (asgo_core.options, the torch adapter's) → this adapter's names, for
# error messages.
_KERAS_NAMES = {"lr": "learning_rate", "betas": "(beta_1, beta_2)", "beta1": "beta_1",
                "beta2": "beta_2", "eps": "epsilon", "adamw_betas": "(adam_beta_1, adam_beta_2)",
                "adamw_eps": "adam_epsilon", "adamw_weight_decay": "adam_weight_decay"}
_SHARED_NAME = re.compile(r"\b(" + "|".join(_KERAS_NAMES) + r")=")
_RENAMED_OPTIONS = ("learning_rate", "beta_1", "beta_2", "epsilon", "adam_beta_1", "adam_beta_2",
                    "adam_epsilon", "adam_weight_decay")


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise RuntimeError(f"asgo_core.adapters.keras needs the 'jax' or 'torch' Keras backend; the "
                           f"backend is {backend!r}. Set KERAS_BACKEND=jax or KERAS_BACKEND=torch "
                           "before importing keras.")


def _check_learning_rate(name: str, value) -> None:
    """A number >= 0, or a schedule / callable (Keras checks those)."""
    if not callable(value):
        check_non_negative(name, value)


def _core_config(options: dict, matrix_algorithm: str):
    """Check the options with the shared checks (asgo_core.options, under the torch names) and
    build the core config; errors name the options as this adapter does."""
    renamed = dict(lr=options["learning_rate"], betas=(options["beta_1"], options["beta_2"]),
                   eps=options["epsilon"], adamw_betas=(options["adam_beta_1"], options["adam_beta_2"]),
                   adamw_eps=options["adam_epsilon"], adamw_weight_decay=options["adam_weight_decay"],
                   adamw_lr=None, maximize=False, algorithm=None)
    group = {name: value for name, value in options.items() if name not in _RENAMED_OPTIONS} | renamed
    try:
        check_group_options(group, check_lr=_check_learning_rate)
        return group_config(group, matrix_algorithm)
    except ValueError as error:
        raise ValueError(_SHARED_NAME.sub(lambda m: _KERAS_NAMES[m.group(1)] + "=", str(error))) from None


def _check_patterns(name: str, patterns, accepted: str) -> None:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        fail(name, patterns, accepted)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            fail(name, pattern, f"{accepted} (regex error: {error})")


def _check_batch_dims_option(batch_dims) -> None:
    accepted = "None or a dict {variable-path regex: integer >= 0}"
    if batch_dims is None:
        return
    if not isinstance(batch_dims, dict):
        fail("batch_dims", batch_dims, accepted)
    _check_patterns("batch_dims", list(batch_dims), accepted)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in batch_dims.values()):
        fail("batch_dims", batch_dims, accepted)


# ---- variables as stacks of matrices ----------------------------------------------------

def _matrix_view(shape: tuple, batch_dims: int) -> PermutedStack:
    check_batch_dims(shape, batch_dims)
    last = len(shape) - 1
    permutation = (*range(batch_dims), last, *range(batch_dims, last))
    permuted = tuple(shape[axis] for axis in permutation)
    return PermutedStack(permutation, permuted, matrix_stack_shape(permuted, batch_dims))


def _state_layout(state) -> tuple:
    """(field, number of arrays, or None for a single array) of a core state, count left out:
    the optimizer's `iterations` is the step count."""
    return tuple((name, len(value) if isinstance(value, tuple) else None)
                 for name, value in zip(state._fields, state) if name != "count")


def _state_arrays(state) -> list:
    """The arrays of a core state in _state_layout order, each with the matrices first."""
    arrays = []
    for name, value in zip(state._fields, state):
        if name != "count":
            arrays.extend(value if isinstance(value, tuple) else (value,))
    return arrays


def _core_state(state_type, layout: tuple, arrays: list, count):
    values, remaining = {"count": count}, iter(arrays)
    for name, length in layout:
        values[name] = next(remaining) if length is None else tuple(next(remaining) for _ in range(length))
    return state_type(**values)


@dataclass(frozen=True)
class _MatrixSlot:
    """The optimizer variables of one matrix variable, in _state_layout order."""
    view: PermutedStack
    state_type: type
    layout: tuple
    variables: tuple


@dataclass(frozen=True)
class _AdamWSlot:
    """The optimizer variables of one AdamW variable (torch.optim.AdamW's state + a counter)."""
    exp_avg: object
    exp_avg_sq: object
    skipped: object


class _MatrixOptimizer(keras.optimizers.Optimizer):
    """Shared machinery of ASGO and DASGO; subclasses set the matrix algorithm."""

    matrix_algorithm: str

    def __init__(self, options: dict, *, exclude_layers, exclude_embeddings, batch_dims,
                 adam_lr_ratio, learning_rate, weight_decay, **base_options):
        _check_backend()
        options = dict(options, weight_decay=weight_decay)
        config = _core_config(dict(options, learning_rate=learning_rate), self.matrix_algorithm)
        check_non_negative("adam_lr_ratio", adam_lr_ratio)
        _check_patterns("exclude_layers", exclude_layers or [], "a list of variable-path regexes")
        if not isinstance(exclude_embeddings, bool):
            fail("exclude_embeddings", exclude_embeddings, "True | False")
        _check_batch_dims_option(batch_dims)
        if config.nonfinite == "raise" and keras.backend.backend() == "jax":
            fail("nonfinite", "raise", "'skip' under the JAX backend ('raise' reads the gradients' "
                 "finiteness on the host, which a jitted train step cannot)")
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **base_options)
        self._options = options
        self._config = config
        self._config_without_decay = dataclasses.replace(config, weight_decay=0.0)
        self.adam_lr_ratio = adam_lr_ratio
        self.exclude_layers = list(exclude_layers or [])
        self.exclude_embeddings = exclude_embeddings
        self.batch_dims = dict(batch_dims) if batch_dims else None

    # ---- which variables are matrices -----------------------------------------------------
    def uses_adamw(self, variable) -> bool:
        """Whether a model variable is stepped by the built-in AdamW instead of the matrix algorithm."""
        if len(variable.shape) < 2:
            return True
        if self.exclude_embeddings and "embedding" in variable.path.lower():
            return True
        return any(re.search(pattern, variable.path) for pattern in self.exclude_layers)

    def _batch_dims_of(self, variable) -> int:
        for pattern, dims in (self.batch_dims or {}).items():
            if re.search(pattern, variable.path):
                return dims
        return 0

    # ---- building the state ---------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        plans = [self._plan(variable) for variable in var_list]  # all checks before any variable
        super().build(var_list)
        self._slots = [self._add_slot(variable, plan) for variable, plan in zip(var_list, plans)]

    def _plan(self, variable):
        """None (no state), "adamw", or (view, the zero core state of its stack)."""
        if self._overwrite_variable_with_gradient(variable):
            return None
        if self.uses_adamw(variable):
            return "adamw"
        try:
            view = _matrix_view(tuple(variable.shape), self._batch_dims_of(variable))
            return view, init_state(ops.zeros(view.stack_shape, variable.dtype), self._config)
        except ValueError as error:
            raise ValueError(f"variable {variable.path!r}: {error}") from None

    def _add_slot(self, variable, plan):
        if plan is None:
            return None
        path = variable.path.replace("/", "_")
        if plan == "adamw":
            dtype = keras.backend.result_type(variable.dtype, "float32")
            return _AdamWSlot(*(self.add_variable(variable.shape, dtype=dtype, name=f"{path}_{name}")
                                for name in ("exp_avg", "exp_avg_sq")),
                              self.add_variable((), dtype="int32", name=f"{path}_skipped"))
        view, state = plan
        layout = _state_layout(state)
        names = [name if length is None else f"{name}_{i}"
                 for name, length in layout for i in range(length or 1)]
        variables = tuple(self.add_variable(tuple(array.shape), name=f"{path}_{name}",
                                            dtype=keras.backend.standardize_dtype(array.dtype))
                          for name, array in zip(names, _state_arrays(state)))
        return _MatrixSlot(view, type(state), layout, variables)

    # ---- one step -------------------------------------------------------------------------
    def _apply_weight_decay(self, variables):
        """Nothing here: the decay is part of each step's update (see the module docstring)."""

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        lr = ops.convert_to_tensor(learning_rate)
        buckets, writes = {}, []
        for grad, variable in zip(grads, trainable_variables):
            slot = self._slots[self._get_variable_index(variable)]
            if isinstance(slot, _AdamWSlot):
                writes += self._adamw_step(grad, variable, slot, lr)
            else:
                key = (slot.view.stack_shape[1:], variable.dtype, self._use_weight_decay(variable))
                buckets.setdefault(key, []).append((grad, variable, slot))
        for (_, _, decays), members in buckets.items():
            config = self._config if decays else self._config_without_decay
            writes += self._matrix_step(members, lr, config)
        for target, value in writes:  # every value is computed before anything is written
            target.assign(value)

    def _matrix_step(self, members: list, lr, config) -> list:
        """One core step on the stack of same-shaped matrices; returns (variable, new value) pairs."""
        _, _, first = members[0]
        grads = _concat([slot.view.to_stack(grad, ops) for grad, _, slot in members])
        params = _concat([slot.view.to_stack(variable.value, ops) for _, variable, slot in members])
        per_member = [[v.value for v in slot.variables] for _, _, slot in members]
        arrays = [_concat(list(parts)) for parts in zip(*per_member)]
        state = _core_state(first.state_type, first.layout, arrays, ops.cast(self.iterations, "int32"))
        rounds = self._rounds(params.dtype)
        update_dtype = statistics_dtype(params.dtype, array_api_compat.array_namespace(params)) if rounds else None

        def run(refresh_root: bool):
            with warnings.catch_warnings():  # the core probes for float64, which JAX may lack
                warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
                update, new_state = core_step(grads, state, params, config, refresh_root=refresh_root,
                                              update_dtype=update_dtype)
            return update, _state_arrays(new_state)

        frequency = getattr(config, "precondition_frequency", 1)
        if frequency == 1:
            update, new_arrays = run(True)
        else:
            update, new_arrays = ops.cond(ops.equal(ops.mod(self.iterations, frequency), 0),
                                          lambda: run(True), lambda: run(False))
        new_params = ops.cast(params, update.dtype) - ops.cast(lr, update.dtype) * update
        if rounds:
            stream = self._get_variable_index(members[0][1])
            new_params = self._stochastically_rounded(new_params, params.dtype, stream)
        return self._split_writes(members, new_params, new_arrays)

    def _rounds(self, dtype) -> bool:
        """Whether writes to variables of this dtype are rounded stochastically."""
        return self._options["param_rounding"] == "stochastic" and keras.backend.standardize_dtype(dtype) \
            in ("bfloat16", "float16")

    def _stochastically_rounded(self, value, dtype, stream: int):
        """value rounded stochastically to dtype with uniform numbers of a stateless seed made of
        the stream and the step count (the `iterations` variable, saved with the optimizer):
        JAX key data under jit, an int under the torch backend (which steps eagerly and takes
        only ints or SeedGenerators)."""
        if keras.backend.backend() == "jax":
            seed = ops.cast(ops.stack([ops.convert_to_tensor(stream, "int32"),
                                       ops.cast(self.iterations, "int32")]), "uint32")
        else:
            seed = rounding_seed(int(self.iterations), stream)
        uniform = keras.random.uniform(ops.shape(value), dtype=value.dtype, seed=seed)
        return stochastic_round(value, dtype, uniform, array_api_compat.array_namespace(value))

    @staticmethod
    def _split_writes(members: list, new_params, new_arrays: list) -> list:
        """Each member's rows of the stepped stack and state (state arrays hold a whole number
        of rows per matrix: one, or the matrix's Gram/root blocks)."""
        writes, start = [], 0
        for _, variable, slot in members:
            count = slot.view.stack_shape[0]
            value = slot.view.from_stack(new_params[start:start + count], ops)
            writes.append((variable, ops.cast(value, variable.dtype)))
            for target, array in zip(slot.variables, new_arrays):
                rows = target.shape[0] // count
                writes.append((target, array[start * rows:(start + count) * rows]))
            start += count
        return writes

    def _adamw_step(self, grad, variable, slot: _AdamWSlot, lr) -> list:
        """torch.optim.AdamW's step; a non-finite gradient leaves the variable and its state as
        they were and is counted."""
        dtype = slot.exp_avg.dtype
        lr = ops.cast(lr, dtype) * self.adam_lr_ratio
        beta_1, beta_2 = self._options["adam_beta_1"], self._options["adam_beta_2"]
        decay = self._options["adam_weight_decay"] if self._use_weight_decay(variable) else 0.0
        step = ops.cast(self.iterations + 1, dtype)
        g = ops.cast(grad, dtype)
        finite = ops.all(ops.isfinite(g))
        g = ops.where(finite, g, ops.zeros_like(g))
        exp_avg = beta_1 * slot.exp_avg.value + (1 - beta_1) * g
        exp_avg_sq = beta_2 * slot.exp_avg_sq.value + (1 - beta_2) * (g * g)
        denom = ops.sqrt(exp_avg_sq) / ops.sqrt(1 - ops.power(beta_2, step)) + self._options["adam_epsilon"]
        param = ops.cast(variable.value, dtype)
        new_param = param * (1 - lr * decay) - lr / (1 - ops.power(beta_1, step)) * (exp_avg / denom)
        new_param = ops.where(finite, new_param, param)
        if self._rounds(variable.dtype):
            stream = self._get_variable_index(variable)
            new_param = self._stochastically_rounded(new_param, variable.value.dtype, stream)
        return [(variable, ops.cast(new_param, variable.dtype)),
                (slot.exp_avg, ops.where(finite, exp_avg, slot.exp_avg.value)),
                (slot.exp_avg_sq, ops.where(finite, exp_avg_sq, slot.exp_avg_sq.value)),
                (slot.skipped, slot.skipped.value + ops.cast(ops.logical_not(finite), "int32"))]

    # ---- serialization --------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(self._options, adam_lr_ratio=self.adam_lr_ratio, exclude_layers=self.exclude_layers,
                      exclude_embeddings=self.exclude_embeddings, batch_dims=self.batch_dims)
        return config


def _concat(arrays: list):
    return arrays[0] if len(arrays) == 1 else ops.concatenate(arrays, axis=0)


@keras.saving.register_keras_serializable(package="asgo")
class ASGO(_MatrixOptimizer):
    """ASGO (asgo_core.ASGOConfig) for matrix variables, AdamW for the others.

    learning_rate: a float, a keras.optimizers.schedules.LearningRateSchedule or a callable.
    beta_1, beta_2, epsilon, weight_decay: the core's beta1, beta2, eps, weight_decay.
    precondition_frequency, update_rms, damping, accumulate, side, root_method, root_steps,
    root_tolerance, residual_tolerance, max_precond_dim, num_heads, nonfinite, matmul_dtype:
    as in ASGOConfig. adam_beta_1, adam_beta_2, adam_epsilon, adam_weight_decay: the built-in
    AdamW's (the other adapters' adamw_betas, adamw_eps, adamw_weight_decay); its learning rate
    is learning_rate × adam_lr_ratio. exclude_layers, exclude_embeddings: as
    keras.optimizers.Muon's. batch_dims: {variable-path regex: leading dims that index
    matrices}. The Keras base options (clipnorm, gradient_accumulation_steps, use_ema, ...) too.
    """

    matrix_algorithm = "asgo"

    def __init__(self, learning_rate=0.01, beta_1=ASGOConfig.beta1, beta_2=ASGOConfig.beta2,
                 epsilon=ASGOConfig.eps, weight_decay=ASGOConfig.weight_decay,
                 precondition_frequency=ASGOConfig.precondition_frequency, update_rms=ASGOConfig.update_rms,
                 damping=ASGOConfig.damping, accumulate=ASGOConfig.accumulate, side=ASGOConfig.side,
                 root_method=ASGOConfig.root_method, root_steps=ASGOConfig.root_steps,
                 root_tolerance=ASGOConfig.root_tolerance, residual_tolerance=ASGOConfig.residual_tolerance,
                 max_precond_dim=ASGOConfig.max_precond_dim, num_heads=ASGOConfig.num_heads,
                 nonfinite=ASGOConfig.nonfinite, matmul_dtype=ASGOConfig.matmul_dtype,
                 mu_dtype=ASGOConfig.mu_dtype, precond_dtype=ASGOConfig.precond_dtype,
                 param_rounding="nearest", adam_beta_1=0.9, adam_beta_2=0.95, adam_epsilon=1e-8, adam_weight_decay=0.0,
                 adam_lr_ratio=1.0, exclude_layers=None, exclude_embeddings=True, batch_dims=None,
                 **base_options):
        super().__init__(
            dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                 precondition_frequency=precondition_frequency, update_rms=update_rms, damping=damping,
                 accumulate=accumulate, side=side, root_method=root_method, root_steps=root_steps,
                 root_tolerance=root_tolerance, residual_tolerance=residual_tolerance,
                 max_precond_dim=max_precond_dim, num_heads=num_heads, nonfinite=nonfinite,
                 matmul_dtype=matmul_dtype, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
                 param_rounding=param_rounding, adam_beta_1=adam_beta_1, adam_beta_2=adam_beta_2,
                 adam_epsilon=adam_epsilon, adam_weight_decay=adam_weight_decay),
            learning_rate=learning_rate, weight_decay=weight_decay, adam_lr_ratio=adam_lr_ratio,
            exclude_layers=exclude_layers, exclude_embeddings=exclude_embeddings, batch_dims=batch_dims,
            **base_options)


@keras.saving.register_keras_serializable(package="asgo")
class DASGO(_MatrixOptimizer):
    """DASGO, the diagonal variant (asgo_core.DASGOConfig); options as ASGO's that DASGO has."""

    matrix_algorithm = "dasgo"

    def __init__(self, learning_rate=0.01, beta_1=DASGOConfig.beta1, beta_2=DASGOConfig.beta2,
                 epsilon=DASGOConfig.eps, weight_decay=DASGOConfig.weight_decay,
                 update_rms=DASGOConfig.update_rms, accumulate=DASGOConfig.accumulate,
                 nonfinite=DASGOConfig.nonfinite, mu_dtype=DASGOConfig.mu_dtype, param_rounding="nearest",
                 adam_beta_1=0.9, adam_beta_2=0.95, adam_epsilon=1e-8, adam_weight_decay=0.0, adam_lr_ratio=1.0, exclude_layers=None, exclude_embeddings=True,
                 batch_dims=None, **base_options):
        super().__init__(
            dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, update_rms=update_rms, accumulate=accumulate,
                 nonfinite=nonfinite, mu_dtype=mu_dtype, param_rounding=param_rounding, adam_beta_1=adam_beta_1, adam_beta_2=adam_beta_2,
                 adam_epsilon=adam_epsilon, adam_weight_decay=adam_weight_decay),
            learning_rate=learning_rate, weight_decay=weight_decay, adam_lr_ratio=adam_lr_ratio,
            exclude_layers=exclude_layers, exclude_embeddings=exclude_embeddings, batch_dims=batch_dims,
            **base_options)
