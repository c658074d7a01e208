"""Low precision: stochastic rounding of the parameter write (param_rounding) and bfloat16 state
(mu_dtype, precond_dtype) in the torch and NumPy adapters and the core; Keras runs
tests/keras_low_precision_cases.py per backend; the conformance table (tests/conformance) runs
every adapter against the core with these options.

Unbiasedness is checked on N identical copies of one matrix stepped together (batch_dims=1):
each copy gets the same float32 result and its own uniform numbers, so the mean of the N
rounded writes must equal a float32 twin's result within its standard error.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from asgo_core import load_state, save_state
from asgo_core.adapters.cupy import ASGO as ArrayASGO
from asgo_core.adapters.cupy import DASGO as ArrayDASGO
from asgo_core.adapters.torch import ASGO, DASGO
from asgo_core.precision import rounded_sum, stochastic_round

COPIES = 4000
Z = 5.0  # standard errors a mean may miss by (a false alarm about once in 3·10^6 per element)


def _namespaces():
    import array_api_compat.numpy as np_xp
    import array_api_compat.torch as torch_xp
    import jax.numpy as jnp
    return [("torch-bfloat16", torch_xp, torch.bfloat16, torch.tensor),
            ("torch-float16", torch_xp, torch.float16, torch.tensor),
            ("numpy-bfloat16", np_xp, ml_dtypes.bfloat16, np.asarray),
            ("numpy-float16", np_xp, np.float16, np.asarray),
            ("jax-bfloat16", jnp, jnp.bfloat16, jnp.asarray)]


def _within_standard_error(rounded_mean, exact, low, high, copies) -> np.ndarray:
    """Per element: |mean − exact| ≤ Z standard errors of a two-point draw between low and high."""
    probability = np.where(high != low, (exact - low) / np.where(high != low, high - low, 1), 0)
    error = np.abs(high - low) * np.sqrt(probability * (1 - probability) / copies)
    return np.abs(rounded_mean - exact) <= Z * error + 1e-12 * np.abs(exact)


def _neighbours(exact, dtype_name: str):
    """The two representable neighbours (low ≤ exact ≤ high) of float64 values in a 16-bit dtype."""
    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float16
    nearest = exact.astype(np.float32).astype(dtype)
    up = np.nextafter(nearest, np.array(np.inf, dtype)).astype(np.float64)
    down = np.nextafter(nearest, np.array(-np.inf, dtype)).astype(np.float64)
    near = nearest.astype(np.float64)
    return np.where(near <= exact, near, down), np.where(near <= exact, up, near)


@pytest.mark.parametrize("name, xp, dtype, asarray", _namespaces(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_stochastic_round_is_unbiased_and_nearest_is_not(name, xp, dtype, asarray):
    rng = np.random.default_rng(0)
    exact = (rng.standard_normal(64) * 10.0 ** rng.uniform(-3, 3, 64)).astype(np.float32)
    uniform = rng.random((COPIES, 64), dtype=np.float32)
    values = np.broadcast_to(exact, (COPIES, 64)).copy()
    rounded = stochastic_round(asarray(values), dtype, asarray(uniform), xp)
    rounded = np.asarray(xp.astype(rounded, xp.float32)).astype(np.float64)
    low, high = _neighbours(exact.astype(np.float64), name.split("-")[1])
    assert np.all((rounded == low) | (rounded == high)), "a result that is not a neighbour"
    assert np.all(_within_standard_error(rounded.mean(axis=0), exact, low, high, COPIES))
    nearest = np.asarray(xp.astype(xp.astype(asarray(exact), dtype), xp.float32)).astype(np.float64)
    assert not np.all(_within_standard_error(nearest, exact, low, high, COPIES)), "the check has no power"


def test_stochastic_round_keeps_exact_and_special_values():
    import array_api_compat.torch as torch_xp
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**127, float("inf"), -float("inf"), 2.0**-130])
    for uniform in (torch.zeros(8), torch.full((8,), 0.999999)):
        result = stochastic_round(values, torch.bfloat16, uniform, torch_xp)
        expected = values.to(torch.bfloat16)
        assert torch.equal(result, expected)
    nan = torch.tensor([float("nan")])
    assert torch.isnan(stochastic_round(nan, torch.bfloat16, torch.zeros(1), torch_xp)).all()


def test_rounded_sum_rounds_only_a_narrow_parameter_and_with_the_given_draws():
    import array_api_compat.numpy as np_xp
    param = np.ones(3, ml_dtypes.bfloat16)
    update = np.full(3, 2.0**-10, np.float32)  # a quarter of bfloat16's spacing above 1
    above_one = float(np.nextafter(param[0], np.array(np.inf, ml_dtypes.bfloat16)))
    low_draws = lambda shape: np.zeros(shape, np.float32)  # noqa: E731
    high_draws = lambda shape: np.full(shape, 0.99, np.float32)  # noqa: E731
    assert np.all(rounded_sum(param, update, low_draws, np_xp).astype(np.float64) == above_one)
    assert np.all(rounded_sum(param, update, high_draws, np_xp).astype(np.float64) == 1.0)
    wide = rounded_sum(np.ones(3, np.float32), update, None, np_xp)  # no draws for a float32 parameter
    assert wide.dtype == np.float32 and np.all(wide == np.float32(1 + 2.0**-10))


# ---- the adapters' writes ----------------------------------------------------------------

def _torch_copies(dtype, algorithm: str):
    """COPIES identical (6, 5) matrices (or 8-vectors on AdamW) and their identical gradients."""
    rng = np.random.default_rng(1)
    shape = (6, 5) if algorithm != "adamw" else (8,)
    start = torch.tensor(rng.standard_normal(shape), dtype=torch.float32).to(torch.bfloat16)
    grad = torch.tensor(rng.standard_normal(shape), dtype=torch.float32).to(torch.bfloat16)
    repeat = lambda t: t.to(dtype).expand(COPIES, *shape).clone()  # noqa: E731
    return repeat(start), repeat(grad)


@pytest.mark.parametrize("algorithm", ["asgo", "dasgo", "adamw"])
def test_torch_rounded_writes_average_to_the_float32_result(algorithm):
    results = {}
    for dtype, rounding in ((torch.float32, "nearest"), (torch.bfloat16, "stochastic")):
        start, grad = _torch_copies(dtype, algorithm)
        param = torch.nn.Parameter(start)
        group = {"params": [param], "batch_dims": 1} if algorithm != "adamw" else {"params": [param]}
        make = DASGO if algorithm == "dasgo" else ASGO
        optimizer = make([group], lr=3e-3, param_rounding=rounding, adamw_weight_decay=0.1,
                         algorithm="adamw" if algorithm == "adamw" else None)
        param.grad = grad.clone()
        optimizer.step()
        results[rounding] = param.detach().double().numpy()
    exact = results["nearest"][0]
    low, high = _neighbours(exact, "bfloat16")
    rounded = results["stochastic"]
    assert np.all((rounded == low) | (rounded == high))
    assert np.all(_within_standard_error(rounded.mean(axis=0), exact, low, high, COPIES))


@pytest.mark.parametrize("algorithm", ["asgo", "dasgo", "adamw"])
def test_numpy_rounded_writes_average_to_the_float32_result(algorithm):
    results = {}
    for dtype, rounding in ((np.float32, "nearest"), (np.float16, "stochastic")):
        start, grad = (t.numpy().astype(dtype) for t in _torch_copies(torch.float32, algorithm))
        group = {"params": {"w": start}} | ({"batch_dims": 1} if algorithm != "adamw" else {})
        make = ArrayDASGO if algorithm == "dasgo" else ArrayASGO
        optimizer = make([group], lr=3e-3, param_rounding=rounding, adamw_weight_decay=0.1,
                         algorithm="adamw" if algorithm == "adamw" else None)
        optimizer.step({"w": grad})
        results[rounding] = start.astype(np.float64)
    exact = results["nearest"][0]
    low, high = _neighbours(exact, "float16")
    rounded = results["stochastic"]
    assert np.all((rounded == low) | (rounded == high))
    assert np.all(_within_standard_error(rounded.mean(axis=0), exact, low, high, COPIES))


# ---- bfloat16 parameters keep learning ----------------------------------------------------

def _weights_moved(make, rounding: str, dtype=torch.bfloat16) -> int:
    """A new user's run: nn.Linear(10, 5), lr 1e-3 with LinearLR, 20 steps; how many of the 50
    weights changed."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 5).to(dtype)
    start = layer.weight.detach().clone()
    optimizer = make(layer.parameters(), lr=1e-3, param_rounding=rounding)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer)
    inputs, targets = torch.randn(64, 10, dtype=dtype), torch.randn(64, 5, dtype=dtype)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(layer(inputs), targets).backward()
        optimizer.step()
        schedule.step()
    return int((layer.weight != start).sum())


@pytest.mark.parametrize("make", [ASGO, DASGO])
def test_bfloat16_weights_keep_moving_at_lr_1e_3_with_stochastic_rounding(make):
    moved_in_float32 = _weights_moved(make, "nearest", torch.float32)
    nearest, stochastic = _weights_moved(make, "nearest"), _weights_moved(make, "stochastic")
    assert moved_in_float32 == 50
    assert nearest <= 15, f"nearest rounding was expected to freeze most weights; {nearest} of 50 moved"
    assert stochastic >= 40, f"{stochastic} of 50 weights moved with stochastic rounding"


# ---- resume is bitwise ----------------------------------------------------------------------

TORCH_OPTIONS = dict(lr=3e-3, param_rounding="stochastic", mu_dtype="bfloat16", adamw_weight_decay=0.1)


def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(torch.bfloat16)


def _torch_steps(model, optimizer, steps, first_step: int) -> None:
    for index in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(index)
        inputs = torch.randn(16, 8, generator=generator).bfloat16()
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("make, options", [(ASGO, dict(precond_dtype="bfloat16", precondition_frequency=2)),
                                           (DASGO, {})], ids=["asgo", "dasgo"])
@pytest.mark.parametrize("route", ["state_dict", "portable"])
def test_torch_resume_is_bitwise(make, options, route, tmp_path):
    model = _torch_model()
    optimizer = make(model.parameters(), **TORCH_OPTIONS, **options)
    _torch_steps(model, optimizer, 3, 0)
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model.parameters(), **TORCH_OPTIONS, **options)
    if route == "state_dict":
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    else:
        save_state(tmp_path / "state.npz", optimizer)
        resumed.load_portable_state(load_state(tmp_path / "state.npz"))
    _torch_steps(model, optimizer, 3, 3)
    _torch_steps(resumed_model, resumed, 3, 3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed.state[resumed_model[0].weight]["momentum"].dtype == torch.bfloat16


@pytest.mark.parametrize("route", ["state_dict", "portable"])
def test_numpy_resume_is_bitwise(route, tmp_path):
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((6, 4)), "b": rng.standard_normal(4)}
    start = {key: value.astype(np.float16) for key, value in start.items()}
    grads = [{key: rng.standard_normal(value.shape).astype(np.float16) for key, value in start.items()}
             for _ in range(6)]
    options = dict(lr=3e-3, param_rounding="stochastic", mu_dtype="bfloat16", precond_dtype="bfloat16",
                   precondition_frequency=2)
    params = {key: value.copy() for key, value in start.items()}
    optimizer = ArrayASGO(params, **options)
    for grad in grads[:3]:
        optimizer.step(grad)
    resumed_params = {key: value.copy() for key, value in params.items()}
    resumed = ArrayASGO(resumed_params, **options)
    if route == "state_dict":
        resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    else:
        save_state(tmp_path / "state.npz", optimizer)
        resumed.load_portable_state(load_state(tmp_path / "state.npz"))
    for grad in grads[3:]:
        optimizer.step(grad)
        resumed.step(grad)
    for key in params:
        assert np.array_equal(params[key], resumed_params[key])
    assert resumed._buckets[0].state.gram[0].dtype == ml_dtypes.bfloat16


def test_portable_checkpoint_moves_bfloat16_state_between_torch_and_numpy(tmp_path):
    model = _torch_model()
    optimizer = ASGO(model.parameters(), **TORCH_OPTIONS)
    _torch_steps(model, optimizer, 2, 0)
    save_state(tmp_path / "state.npz", optimizer)
    arrays = [p.detach().float().numpy() for p in model.parameters()]
    other = ArrayASGO(arrays, **TORCH_OPTIONS)
    other.load_portable_state(load_state(tmp_path / "state.npz"), names=[f"0.{i}" for i in range(4)])
    momentum = optimizer.state[model[0].weight]["momentum"].float().numpy()
    assert np.array_equal(other._buckets[0].state.momentum[0].astype(np.float32), momentum)


# ---- stored state -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [ASGO, DASGO])
def test_bfloat16_state_is_the_float32_state_rounded_to_nearest(make):
    """One step from zero state: every stored array is the float32 run's, rounded to nearest."""
    states = {}
    for low in (False, True):
        model = _torch_model().float()
        options = dict(mu_dtype="bfloat16") | (dict(precond_dtype="bfloat16") if make is ASGO else {})
        optimizer = make(model.parameters(), **(options if low else {}))
        _torch_steps_float(model, optimizer)
        states[low] = optimizer.state[model[0].weight]
    for key in ("momentum", "gram", "root"):
        if key in states[True]:
            low, wide = states[True][key], states[False][key]
            low, wide = (low, wide) if key == "momentum" else (low[0], wide[0])
            assert low.dtype == torch.bfloat16 and torch.equal(low, wide.to(torch.bfloat16)), key


def _torch_steps_float(model, optimizer) -> None:
    inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    model(inputs).square().mean().backward()
    optimizer.step()


# ---- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, accepted", [
    ("param_rounding", "up", "'nearest' | 'stochastic'"),
    ("mu_dtype", "float16", "None | 'bfloat16'"),
    ("precond_dtype", "float32", "None | 'bfloat16'")])
def test_bad_low_precision_options_are_refused_naming_them(option, value, accepted):
    layer = torch.nn.Linear(4, 3)
    for make in (lambda **o: ASGO(layer.parameters(), **o), lambda **o: ArrayASGO([np.ones((4, 3))], **o)):
        with pytest.raises(ValueError, match=rf"{option}={value!r} is invalid; accepted: {accepted}"):
            make(**{option: value})


def test_a_namespace_without_bfloat16_is_refused_at_construction():
    from asgo_core import ASGOConfig, init_state

    class NoBfloat16:  # array_api_compat.cupy stands in on machines without CuPy
        __name__ = "cupy"
    from asgo_core.precision import namespace_dtype
    with pytest.raises(ValueError, match="mu_dtype='bfloat16' is not supported by the cupy namespace"):
        namespace_dtype("bfloat16", NoBfloat16(), "mu_dtype")
    assert init_state(np.ones((2, 3, 3), np.float32), ASGOConfig(mu_dtype="bfloat16")).momentum.dtype \
        == ml_dtypes.bfloat16


def test_torch_param_rounding_survives_a_state_dict_round_trip():
    layer = torch.nn.Linear(4, 3)
    saved = ASGO(layer.parameters(), param_rounding="stochastic").state_dict()
    restored = ASGO(layer.parameters())
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["param_rounding"] == "stochastic"
    saved["param_groups"][0]["param_rounding"] = "sometimes"
    with pytest.raises(ValueError, match="param_rounding='sometimes'"):
        restored.load_state_dict(saved)


# ---- Keras ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_low_precision_cases(backend):
    cases = os.path.join(os.path.dirname(__file__), "keras_low_precision_cases.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", cases],
                            env=dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
