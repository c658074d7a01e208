"""Run one seeded gradient sequence through the core and every adapter, same hyperparameters.

Every runner returns (params, state): params {name: numpy array} after the steps, state
{name: {key: numpy array}} in the portable-checkpoint layout (asgo_core.checkpoint), so that
any two runs compare array by array. Parameters use the torch layout (out, in, ...); JAX
leaves get dimension numbers that read it (reduction axes 1.., output axis 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from asgo_core import ASGOConfig, DASGOConfig, init_state, needs_root_refresh, step
from asgo_core.checkpoint import stacked_state_entries
from asgo_core.layout import matrix_view_shape
from helpers.layouts import torch_layout_dimension_numbers

STEPS = 20
SHAPES = {"wide": (6, 10), "tall": (10, 6), "conv": (4, 2, 3, 3)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: core options (core names), the algorithm, a schedule, the shapes."""
    options: tuple = ()
    algorithm: str = "asgo"
    schedule: bool = False
    shapes: tuple = tuple(SHAPES.items())
    nan_at: int | None = None  # a step whose first matrix's gradient holds a NaN

    @property
    def raises(self) -> bool:
        return dict(self.options).get("nonfinite") == "raise"

    @property
    def config(self):
        config_type = ASGOConfig if self.algorithm == "asgo" else DASGOConfig
        return config_type(**dict(self.options))

    def learning_rates(self) -> list:
        """A warmup-then-decay schedule, or a constant; Python floats, the same everywhere."""
        if not self.schedule:
            return [0.02] * STEPS
        return [0.02 * min(1.0, (t + 1) / 5) * (1 - t / (2 * STEPS)) for t in range(STEPS)]


def problem(case: Case, dtype: str, seed: int = 0):
    """Initial params and the gradient sequence, drawn once in NumPy."""
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(dtype) for name, shape in case.shapes}
    grads = [{name: (rng.standard_normal(shape) * 10.0 ** rng.uniform(-1, 1)).astype(dtype)
              for name, shape in case.shapes} for _ in range(STEPS)]
    if case.nan_at is not None:
        first = case.shapes[0][0]
        grads[case.nan_at][first].flat[0] = np.nan
    return params, grads


def step_or_refused(case: Case, take_step) -> None:
    """take_step(); under nonfinite="raise" a step that raises FloatingPointError is refused as
    a whole, and the run goes on with the next gradients."""
    if not case.raises:
        return take_step()
    try:
        take_step()
    except FloatingPointError:
        pass


def adapter_options(case: Case) -> dict:
    """The case's options under the torch / CuPy-NumPy adapters' names (betas pair)."""
    options = dataclasses.asdict(case.config)
    options["betas"] = (options.pop("beta1"), options.pop("beta2"))
    return options


def _state_arrays(portable: dict) -> dict:
    return {entry["name"]: entry["arrays"] for entry in portable["params"]}


# ----------------------------------------------------------------------------- the core

def run_core(case: Case, dtype: str, xp=None):
    """asgo_core.step directly, one parameter at a time (NumPy unless xp is given)."""
    import array_api_compat.numpy as np_xp
    xp = xp or np_xp
    params, grads = problem(case, dtype)
    config = case.config
    weights = {name: xp.asarray(value.reshape(1, *matrix_view_shape(value.shape))) for name, value in params.items()}
    states = {name: init_state(W, config) for name, W in weights.items()}
    taken = 0
    for lr, grad in zip(case.learning_rates(), grads):
        refresh = case.algorithm == "asgo" and needs_root_refresh(taken, config)
        try:  # every matrix first, then the writes: a refused step changes nothing
            results = {name: step(xp.asarray(grad[name].reshape(W.shape)), states[name], W, config,
                                  refresh_root=refresh) for name, W in weights.items()}
        except FloatingPointError:
            if not case.raises:
                raise
            continue
        for name, (update, states[name]) in results.items():
            weights[name] = weights[name] - lr * update
        taken += 1
    to_numpy = lambda x: np.asarray(x.astype("float32") if str(x.dtype) == "bfloat16" else x)  # noqa: E731
    out_params = {name: to_numpy(W).reshape(params[name].shape) for name, W in weights.items()}
    out_state = {name: stacked_state_entries(state, [1], to_numpy)[0] for name, state in states.items()}
    return out_params, out_state


# ----------------------------------------------------------------------------- adapters

def run_torch(case: Case, dtype: str, device: str = "cpu"):
    import torch
    from asgo_core.adapters.torch import ASGO, DASGO

    params, grads = problem(case, dtype)
    tensors = {name: torch.nn.Parameter(torch.tensor(value, device=device)) for name, value in params.items()}
    optimizer_type = ASGO if case.algorithm == "asgo" else DASGO
    optimizer = optimizer_type(list(tensors.values()), lr=0.0, **adapter_options(case))
    for lr, grad in zip(case.learning_rates(), grads):
        optimizer.param_groups[0]["lr"] = lr
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grad[name], device=device)
        step_or_refused(case, optimizer.step)
    out_params = {name: tensor.detach().cpu().numpy() for name, tensor in tensors.items()}
    return out_params, _state_arrays(optimizer.portable_state(names=list(tensors)))


def run_array_adapter(case: Case, dtype: str, module=np):
    """The CuPy/NumPy adapter on `module`'s arrays (numpy, or cupy on a GPU)."""
    from asgo_core.adapters.cupy import ASGO, DASGO

    params, grads = problem(case, dtype)
    arrays = {name: module.asarray(value) for name, value in params.items()}
    optimizer_type = ASGO if case.algorithm == "asgo" else DASGO
    optimizer = optimizer_type(arrays, lr=0.0, **adapter_options(case))
    for lr, grad in zip(case.learning_rates(), grads):
        optimizer.param_groups[0]["lr"] = lr
        step_or_refused(case, lambda: optimizer.step({name: module.asarray(value) for name, value in grad.items()}))
    out_params = {name: np.asarray(value.get() if hasattr(value, "get") else value) for name, value in arrays.items()}
    return out_params, _state_arrays(optimizer.portable_state())


def optax_options(case: Case) -> dict:
    """The case's options under optax's names (b1, b2)."""
    options = dataclasses.asdict(case.config)
    options["b1"], options["b2"] = options.pop("beta1"), options.pop("beta2")
    return options


def run_optax(case: Case, dtype: str, device=None):
    """The optax adapter (asgo()/dasgo()), eagerly; float64 needs JAX x64 (the caller's)."""
    import jax
    import jax.numpy as jnp
    import optax
    from asgo_core.adapters.optax import asgo, dasgo, portable_state

    params, grads = problem(case, dtype)
    lrs = case.learning_rates()
    schedule = lambda count: jnp.asarray(lrs, dtype)[count]  # noqa: E731  (a table: exact values)
    numbers = torch_layout_dimension_numbers(params)
    make = asgo if case.algorithm == "asgo" else dasgo
    options = optax_options(case)
    tx = make(schedule, weight_dimension_numbers=numbers, **options)
    put = lambda value: jax.device_put(jnp.asarray(value), device)  # noqa: E731
    leaves = {name: put(value) for name, value in params.items()}
    state = tx.init(leaves)

    @jax.jit  # one compilation per case; eager lax.cond (tau > 1) would compile every step
    def train_step(leaves, state, grad):
        updates, state = tx.update(grad, state, leaves)
        return optax.apply_updates(leaves, updates), state

    for grad in grads:
        leaves, state = train_step(leaves, state, {name: put(value) for name, value in grad.items()})
    portable = portable_state(state, leaves, case.config, weight_dimension_numbers=numbers)
    return {name: np.asarray(value) for name, value in leaves.items()}, _state_arrays(portable)


def keras_options(case: Case) -> dict:
    """The case's options under Keras' names (asgo_core.options)."""
    from asgo_core.options import option
    return {option(name).spelling("keras"): value for name, value in dataclasses.asdict(case.config).items()}


def run_keras(case: Case, dtype: str):
    """The Keras adapter on the backend keras runs on, through jax.jit(stateless_apply) under
    JAX (a jitted train step's path) and optimizer.apply under torch. Variables take the Keras
    layout (outputs last), which the adapter reads back as the torch layout of the others."""
    import keras
    from asgo_core.adapters.keras import ASGO, DASGO

    params, grads = problem(case, dtype)
    keras_layout = lambda value: np.moveaxis(value, 0, -1)  # noqa: E731
    variables = [keras.Variable(keras_layout(value), name=name, dtype=dtype)
                 for name, value in params.items()]
    make = ASGO if case.algorithm == "asgo" else DASGO
    optimizer = make(learning_rate=_keras_schedule(case.learning_rates(), dtype), **keras_options(case))
    optimizer.build(variables)
    apply = _keras_apply(optimizer, variables)
    for grad in grads:
        tensors = [keras.ops.convert_to_tensor(keras_layout(grad[name]), dtype=dtype) for name in params]
        step_or_refused(case, lambda: apply(tensors))
    out_params = {name: np.moveaxis(keras.ops.convert_to_numpy(variable), -1, 0)
                  for name, variable in zip(params, variables)}
    return out_params, _state_arrays(optimizer.portable_state(names=list(params)))


def _keras_schedule(values, dtype):
    """The learning rates as a Keras schedule in the case's dtype (a float learning rate would
    live in a float32 variable)."""
    import keras

    class Table(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return keras.ops.take(keras.ops.convert_to_tensor(values, dtype=dtype), step)
    return Table()


def _keras_apply(optimizer, variables):
    import keras
    if keras.backend.backend() != "jax":
        return lambda grads: optimizer.apply(grads, variables)
    import jax
    stateless = jax.jit(optimizer.stateless_apply)

    def apply(grads):
        new_values, new_state = stateless([v.value for v in optimizer.variables], grads,
                                          [v.value for v in variables])
        for variable, value in zip(variables + optimizer.variables, new_values + new_state):
            variable.assign(value)
    return apply


# ----------------------------------------------------------------------------- comparison

def worst_relative_difference(run_a, run_b) -> tuple[float, str]:
    """The largest norm-wise relative difference over params and float state arrays, and where;
    integer counters (skipped, fallbacks) must be equal (infinite difference otherwise)."""
    (params_a, state_a), (params_b, state_b) = run_a, run_b
    worst, where = 0.0, ""
    pairs = [(f"param {name}", params_a[name], params_b[name]) for name in params_a]
    pairs += [(f"{name}/{key}", state_a[name][key], state_b[name][key])
              for name in state_a for key in state_a[name]]
    for label, a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return float("inf"), f"{label}: shape {a.shape} vs {b.shape}"
        if np.issubdtype(a.dtype, np.integer):
            difference = 0.0 if np.array_equal(a, b) else float("inf")
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            difference = float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-300))
        if difference > worst:
            worst, where = difference, label
    return worst, where


# ----------------------------------------------------------------------------- 16-bit params

ROUNDING_SHAPES = {"wide": (48, 64), "tall": (64, 48)}
ROUNDING_LR = 1e-3


def rounding_problem(algorithm: str):
    """Start values 1 + j/64 with random signs (exact in bfloat16 and float16, where an update
    of lr·0.2 = 2e-4 is below half the spacing) and float32 gradients."""
    rng = np.random.default_rng(3)
    start = {name: (rng.choice([-1.0, 1.0], shape) * (1 + rng.integers(0, 64, shape) / 64)).astype("float32")
             for name, shape in ROUNDING_SHAPES.items()}
    grads = [{name: rng.standard_normal(shape).astype("float32") for name, shape in ROUNDING_SHAPES.items()}
             for _ in range(STEPS)]
    return start, grads


def run_rounding_reference(algorithm: str) -> dict:
    """The float32 core's displacement of each parameter after STEPS steps at ROUNDING_LR."""
    case = Case(algorithm=algorithm, shapes=tuple(ROUNDING_SHAPES.items()))
    start, grads = rounding_problem(algorithm)
    weights = {name: value[None] for name, value in start.items()}
    states = {name: init_state(W, case.config) for name, W in weights.items()}
    for grad in grads:
        for name, W in weights.items():
            update, states[name] = step(grad[name][None], states[name], W, case.config)
            weights[name] = W - ROUNDING_LR * update
    return {name: (weights[name][0] - start[name]).astype(np.float64) for name in start}


def displacement_ratio(displacement: dict, reference: dict) -> float:
    """<displacement, reference> / <reference, reference> over every parameter."""
    dot = sum(float(np.sum(displacement[name] * reference[name])) for name in reference)
    return dot / sum(float(np.sum(reference[name] ** 2)) for name in reference)


def run_rounded(adapter: str, algorithm: str, rounding: str) -> dict:
    """An adapter's displacement of 16-bit parameters (bfloat16; float16 for NumPy)."""
    start, grads = rounding_problem(algorithm)
    final = ROUNDING_RUNNERS[adapter](algorithm, rounding, start, grads)
    return {name: final[name].astype(np.float64) - start[name] for name in start}


def _rounded_torch(algorithm, rounding, start, grads):
    import torch
    from asgo_core.adapters.torch import ASGO, DASGO

    tensors = {name: torch.nn.Parameter(torch.tensor(value).bfloat16()) for name, value in start.items()}
    optimizer = (ASGO if algorithm == "asgo" else DASGO)(list(tensors.values()), lr=ROUNDING_LR,
                                                         param_rounding=rounding)
    for grad in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grad[name]).bfloat16()
        optimizer.step()
    return {name: tensor.detach().float().numpy() for name, tensor in tensors.items()}


def _rounded_numpy(algorithm, rounding, start, grads):
    from asgo_core.adapters.cupy import ASGO, DASGO

    arrays = {name: value.astype(np.float16) for name, value in start.items()}
    optimizer = (ASGO if algorithm == "asgo" else DASGO)(arrays, lr=ROUNDING_LR, param_rounding=rounding)
    for grad in grads:
        optimizer.step({name: value.astype(np.float16) for name, value in grad.items()})
    return arrays


def _rounded_optax(algorithm, rounding, start, grads):
    import jax
    import jax.numpy as jnp
    import optax
    from asgo_core.adapters.optax import apply_updates_stochastic, asgo, dasgo

    leaves = {name: jnp.asarray(value, jnp.bfloat16) for name, value in start.items()}
    tx = (asgo if algorithm == "asgo" else dasgo)(ROUNDING_LR, weight_dimension_numbers=
                                                  torch_layout_dimension_numbers(start))
    state = tx.init(leaves)
    key = jax.random.key(0)

    @jax.jit  # one compilation, not one per eager operation and step
    def train_step(leaves, state, grad, count):
        updates, state = tx.update(grad, state, leaves)
        if rounding == "stochastic":
            return apply_updates_stochastic(leaves, updates, jax.random.fold_in(key, count)), state
        return optax.apply_updates(leaves, updates), state

    for count, grad in enumerate(grads):
        grad = {name: jnp.asarray(value, jnp.bfloat16) for name, value in grad.items()}
        leaves, state = train_step(leaves, state, grad, count)
    return {name: np.asarray(value.astype(jnp.float32)) for name, value in leaves.items()}


def _rounded_keras(algorithm, rounding, start, grads):
    import keras
    from asgo_core.adapters.keras import ASGO, DASGO

    variables = {name: keras.Variable(value.T, name=name, dtype="bfloat16") for name, value in start.items()}
    optimizer = (ASGO if algorithm == "asgo" else DASGO)(learning_rate=ROUNDING_LR, param_rounding=rounding)
    for grad in grads:
        optimizer.apply([keras.ops.convert_to_tensor(grad[name].T, dtype="bfloat16") for name in variables],
                        list(variables.values()))
    return {name: keras.ops.convert_to_numpy(keras.ops.cast(variable.value, "float32")).T
            for name, variable in variables.items()}


ROUNDING_RUNNERS = {"torch": _rounded_torch, "numpy-adapter": _rounded_numpy, "optax": _rounded_optax,
                    "keras": _rounded_keras}
