"""The Keras adapter's low-precision cases for ONE Keras backend (KERAS_BACKEND), run per
backend in a subprocess by tests/test_low_precision.py: stochastic rounding of bfloat16
variables (matrices and the built-in AdamW), reproducible and resumable from the optimizer's
variables; bfloat16 state."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import keras

from asgo_core.adapters.keras import ASGO, DASGO

COPIES = 2000


LOW_STATE = dict(mu_dtype="bfloat16", precond_dtype="bfloat16")


def _variables(dtype: str):
    rng = np.random.default_rng(0)
    matrix = rng.uniform(-0.32, 0.32, (5, 10)).astype("float32")  # nn.Linear(10, 5)'s initial range
    return [keras.Variable(matrix, dtype=dtype, name="kernel"),
            keras.Variable(matrix[0], dtype=dtype, name="bias")]


def _values(variables) -> list:
    return [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(v.value, "float32"))) for v in variables]


def _gradients(variables, steps: int, dtype: str) -> list:
    rng = np.random.default_rng(1)
    return [[keras.ops.convert_to_tensor(rng.standard_normal(v.shape).astype("float32"), dtype=dtype)
             for v in variables] for _ in range(steps)]


def _run(make, rounding: str, dtype: str = "bfloat16", steps: int = 20, **options):
    variables = _variables(dtype)
    optimizer = make(learning_rate=1e-3, param_rounding=rounding, **options)
    for grads in _gradients(variables, steps, dtype):
        optimizer.apply(grads, variables)
    return _values(variables)


def test_bfloat16_variables_keep_moving_with_stochastic_rounding():
    start = _values(_variables("bfloat16"))[0]
    moved = {rounding: int(np.sum(_run(DASGO, rounding)[0] != start)) for rounding in ("nearest", "stochastic")}
    assert moved["stochastic"] >= moved["nearest"] + 12, moved


def test_stochastic_writes_average_to_the_float32_result():
    rng = np.random.default_rng(2)
    # values exact in bfloat16, so both runs start from the same parameters and gradients
    start, grad = (np.broadcast_to(rng.standard_normal((1, 4, 3)), (COPIES, 4, 3)).astype(ml_dtypes.bfloat16)
                   .astype("float32") for _ in range(2))
    results = {}
    for dtype, rounding in (("float32", "nearest"), ("bfloat16", "stochastic")):
        variable = keras.Variable(start.astype("float32"), dtype=dtype, name="experts")
        optimizer = ASGO(learning_rate=3e-3, param_rounding=rounding, batch_dims={"experts": 1})
        optimizer.apply([keras.ops.convert_to_tensor(grad, dtype=dtype)], [variable])
        results[rounding] = _values([variable])[0].astype(np.float64)
    exact = results["nearest"][0]
    mean = results["stochastic"].mean(axis=0)
    spacing = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)
    assert np.all(np.abs(mean - exact) <= 5 * 0.5 * spacing / np.sqrt(COPIES))
    assert not np.all(results["stochastic"] == results["stochastic"][0]), "every copy rounded alike"


def test_runs_are_reproducible_and_resume_from_the_optimizer_variables():
    full = _run(ASGO, "stochastic", steps=6, **LOW_STATE)
    assert all(np.array_equal(a, b) for a, b in zip(full, _run(ASGO, "stochastic", steps=6, **LOW_STATE)))
    variables = _variables("bfloat16")
    optimizer = ASGO(learning_rate=1e-3, param_rounding="stochastic", **LOW_STATE)
    grads = _gradients(variables, 6, "bfloat16")
    for step_grads in grads[:3]:
        optimizer.apply(step_grads, variables)
    resumed_variables = [keras.Variable(v.value, dtype="bfloat16", name=v.name) for v in variables]
    resumed = ASGO(learning_rate=1e-3, param_rounding="stochastic", **LOW_STATE)
    resumed.build(resumed_variables)
    for target, source in zip(resumed.variables, optimizer.variables):
        target.assign(source.value)
    for step_grads in grads[3:]:
        resumed.apply(step_grads, resumed_variables)
    assert all(np.array_equal(a, b) for a, b in zip(full, _values(resumed_variables)))
    assert any(keras.backend.standardize_dtype(v.dtype) == "bfloat16" for v in resumed.variables)


def test_bad_param_rounding_is_refused():
    with pytest.raises(ValueError, match="param_rounding='up' is invalid"):
        ASGO(param_rounding="up")
