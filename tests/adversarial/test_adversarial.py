"""The adversarial suite (issue 14): one table of cases, each run on every adapter it applies to
(torch ASGO and DASGO, optax, the NumPy adapter; drivers.py hides their differences).

The contract every adapter holds: bad input raises a clear error that names the offending option,
parameter or field, before any parameter or state has changed (checked bitwise: a snapshot of
params and state before the call equals one after it); valid but unusual input (zero, rank-1,
huge or tiny gradients, 16-bit and 64-bit dtypes, odd shapes) steps to finite values.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from typing import Callable

import numpy as np
import pytest
from drivers import DRIVERS, OptaxDriver, SHAPES, standard_grads, standard_params
from helpers import keras_backend
from helpers.checkpoints import assert_same_state, loads_with_one_bit_flipped

from asgo_core import CheckpointError, load_state, save_state

ALL = ("torch", "torch-dasgo", "optax", "numpy", "keras")
ASGO_ONLY = ("torch", "optax", "numpy", "keras")  # options DASGO does not have
WITH_GROUPS = ("torch", "torch-dasgo", "numpy")  # param groups, maximize, algorithm=
TORCH = ("torch", "torch-dasgo")
STATEFUL = ("torch", "torch-dasgo", "numpy")  # state_dict() / load_state_dict()
MATRICES = [name for name, shape in SHAPES.items() if len(shape) >= 2]
# nonfinite="raise" reads the gradients on the host: the Keras adapter refuses it under JAX
RAISES = ("torch", "torch-dasgo", "numpy") + (("keras",) if keras_backend.backend() == "torch" else ())


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable  # run(driver) or run(driver, tmp_path): builds, acts and asserts
    drivers: tuple = ALL


def expect_error(driver, action, error, *patterns, snapshot=None):
    """action() raises `error` whose message matches every regex pattern, and changes nothing."""
    before = snapshot() if snapshot else driver.snapshot()
    with pytest.raises(error) as info:
        action()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not named in: {message}"
    after = snapshot() if snapshot else driver.snapshot()
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"changed by the failed call: {changed}"


def built(driver, options=None, params=None, steps=0, **build):
    """The driver built on (a copy of) the standard problem, stepped `steps` times on finite
    gradients."""
    params = standard_params() if params is None else params
    driver.build({key: value.copy() for key, value in params.items()}, options, **build)
    for seed in range(steps):
        driver.step(standard_grads(driver.params(), seed=seed + 10))
    return driver


def another(driver):
    """A fresh driver of the same adapter (a second optimizer to compare with or load into)."""
    return DRIVERS[driver.name]()


def input_snapshot(params):
    return lambda: {name: value.tobytes() for name, value in params.items()}


# ----------------------------------------------------------------------------- hyperparameters

def bad_option(option, value, drivers=ALL):
    def run(driver):
        params = standard_params()
        expect_error(driver, lambda: driver.build(params, {option: value}), ValueError,
                     rf"\b{re.escape(driver.field(option))}\b", snapshot=input_snapshot(params))
    return Case(f"option-{option}={value!r}", run, drivers)


BAD_OPTIONS = [
    bad_option("lr", True), bad_option("lr", -1.0), bad_option("lr", math.nan), bad_option("lr", "fast"),
    bad_option("beta1", True), bad_option("beta1", 1.0), bad_option("beta1", -0.1),
    bad_option("beta2", math.nan), bad_option("beta2", 1.5), bad_option("beta2", "0.9"),
    bad_option("eps", True), bad_option("eps", -1e-8), bad_option("eps", math.inf),
    bad_option("weight_decay", True), bad_option("weight_decay", math.nan), bad_option("weight_decay", -0.1),
    bad_option("update_rms", True), bad_option("update_rms", 0.0), bad_option("update_rms", math.inf),
    bad_option("accumulate", "max"), bad_option("nonfinite", "ignore"),
    bad_option("adamw_eps", -1.0), bad_option("adamw_beta2", 1.0), bad_option("adamw_weight_decay", True),
    bad_option("adamw_lr", math.nan),
    bad_option("precondition_frequency", True, ASGO_ONLY), bad_option("precondition_frequency", 0, ASGO_ONLY),
    bad_option("precondition_frequency", 2.5, ASGO_ONLY),
    bad_option("residual_tolerance", True, ASGO_ONLY), bad_option("residual_tolerance", math.nan, ASGO_ONLY),
    bad_option("residual_tolerance", -1.0, ASGO_ONLY),
    bad_option("root_steps", 0, ASGO_ONLY), bad_option("root_tolerance", -1.0, ASGO_ONLY),
    bad_option("max_precond_dim", True, ASGO_ONLY), bad_option("max_precond_dim", 0, ASGO_ONLY),
    bad_option("num_heads", 0, ASGO_ONLY), bad_option("side", "top", ASGO_ONLY),
    bad_option("root_method", "cholesky", ASGO_ONLY), bad_option("damping", "none", ASGO_ONLY),
    bad_option("matmul_dtype", "float16", ASGO_ONLY),
    bad_option("maximize", 1, WITH_GROUPS), bad_option("algorithm", "sgd", WITH_GROUPS),
]


# ----------------------------------------------------------------------------- parameters

def bad_param(label, key, array, *patterns, drivers=ALL, options=None):
    """Construction (optax: init) refuses a parameter, naming it."""
    def run(driver):
        params = {**standard_params(), key: array}
        expect_error(driver, lambda: driver.build(params, options), ValueError,
                     driver.param_pattern(key, params), *patterns, snapshot=input_snapshot(params))
    return Case(f"param-{label}", run, drivers)


BAD_PARAMS = [
    bad_param("int64", "w2", np.ones((5, 7), np.int64), "int64|floating"),
    bad_param("complex64", "w2", np.ones((5, 7), np.complex64), "complex"),
    bad_param("zero-rows", "w2", np.ones((0, 7), np.float32), r"zero-size|\b0\b"),
    bad_param("zero-columns", "w2", np.ones((5, 0), np.float32), r"zero-size|\b0\b"),
    bad_param("num_heads-does-not-divide", "w2", np.ones((5, 7), np.float32), "num_heads",
              drivers=("torch", "numpy", "keras"), options={"num_heads": 2}),
]


# ----------------------------------------------------------------------------- bad gradients

def bad_grad(label, key, make_grad, error, *patterns, drivers=ALL, options=None, steps=1):
    """A step with one bad gradient raises before anything changes (after `steps` good steps,
    so that momentum and statistics are not zero)."""
    def run(driver):
        built(driver, options, steps=steps)
        grads = standard_grads(driver.params(), seed=3)
        grads[key] = make_grad(grads[key])
        expect_error(driver, lambda: driver.step(grads), error, driver.param_pattern(key), *patterns)
    return Case(f"grad-{label}", run, drivers)


def with_nan(grad):
    grad = grad.copy()
    grad.flat[3] = np.nan
    return grad


def sparse(grad):
    import torch
    return torch.from_numpy(grad).to_sparse()


BAD_GRADS = [
    bad_grad("nan-raise", "w2", with_nan, FloatingPointError, "non-finite",
             drivers=RAISES, options={"nonfinite": "raise"}),
    bad_grad("inf-in-bias-raise", "bias", lambda g: g * np.inf, FloatingPointError, "non-finite",
             drivers=RAISES, options={"nonfinite": "raise"}),
    bad_grad("complex", "w2", lambda g: g.astype(np.complex64), ValueError, "complex",
             drivers=("optax", "numpy", "keras")),
    bad_grad("integer", "w2", lambda g: g.astype(np.int32), ValueError, "int32|floating",
             drivers=("optax", "numpy", "keras")),
    bad_grad("transposed", "w2", lambda g: g.T.copy(), ValueError, r"\(7, 5\)", r"\(5, 7\)",
             drivers=("optax", "numpy", "keras")),
    bad_grad("sparse", "w2", sparse, (RuntimeError, ValueError), "sparse", drivers=TORCH),
]


def sparse_in_a_later_group(driver):
    """torch: a sparse gradient in group 1 must not let group 0's AdamW move the bias first."""
    built(driver, groups=[(["w1", "bias"], {}), (["w2", "conv"], {})], steps=1)
    grads = standard_grads(driver.params(), seed=3)
    grads["w2"] = sparse(grads["w2"])
    expect_error(driver, lambda: driver.step(grads), (RuntimeError, ValueError), "sparse",
                 driver.param_pattern("w2"))


# ----------------------------------------------------------------------------- valid gradients

def moved(before, after, key):
    return not np.array_equal(before[key], after[key])


def nan_in_one_matrix_at_step_two(value):
    """With nonfinite="skip" a non-finite gradient skips that matrix: its param and state stay
    as after step 1 (momentum nonzero, so "untouched" is not "zero"), the others step, counted."""
    def run(driver):
        built(driver, steps=1)
        params_before, state_before = driver.params(), _matrix_state(driver)
        grads = standard_grads(params_before, seed=3)
        grads["w2"] = grads["w2"].copy()
        grads["w2"].flat[3] = value
        driver.step(grads)
        params_after, state_after = driver.params(), _matrix_state(driver)
        assert np.array_equal(params_after["w2"], params_before["w2"])
        assert all(np.array_equal(a, b) for a, b in zip(state_after["w2"], state_before["w2"]))
        assert any(np.any(a != 0) for a in state_before["w2"])
        assert all(moved(params_before, params_after, key) for key in ("w1", "conv", "bias"))
        assert driver.counters()["skipped"] == 1
    return run


def _matrix_state(driver) -> dict:
    """Per parameter, its portable arrays other than the counters, in key order."""
    return {entry["name"]: [np.array(v) for k, v in sorted(entry["arrays"].items())
                            if k not in ("skipped", "fallbacks")]
            for entry in driver.portable()["params"]}


def nan_in_a_bias(driver):
    """A decision, stated: a NaN in an AdamW-route gradient (a bias) follows the framework's own
    AdamW in torch (torch.optim.AdamW) and optax (optax.adamw): the NaN reaches that parameter,
    and only it. The NumPy adapter, whose AdamW is its own, skips that parameter (counted in its
    state's "skipped"), as it skips a matrix; so does the Keras adapter's."""
    built(driver, steps=1)
    before = driver.params()
    grads = standard_grads(before, seed=3)
    grads["bias"] = grads["bias"].copy()
    grads["bias"][0] = np.nan
    driver.step(grads)
    after = driver.params()
    assert all(moved(before, after, key) and np.all(np.isfinite(after[key])) for key in MATRICES)
    if driver.name in ("numpy", "keras"):
        assert np.array_equal(after["bias"], before["bias"])
        bias = next(entry for entry in driver.portable()["params"] if entry["name"] == "bias")
        assert int(bias["arrays"]["skipped"]) == 1
    else:
        assert np.isnan(after["bias"][0]) and np.all(np.isfinite(after["bias"][1:]))


def zero_gradient_decays(driver):
    """The rule (asgo_core.step): a zero gradient gives a zero direction, and decoupled weight
    decay still applies (W ← W·(1 − lr·weight_decay)), as torch.optim.AdamW decays a parameter
    whose gradient is zero. Default options: lr 1e-2, weight_decay 0.1."""
    built(driver)
    before = driver.params()
    driver.step({key: np.zeros_like(value) for key, value in before.items()})
    after = driver.params()
    for key in MATRICES:
        np.testing.assert_allclose(after[key], before[key] * (1 - 1e-2 * 0.1), rtol=1e-6)
        assert not np.array_equal(after[key], before[key])
    assert driver.counters()["skipped"] == 0


def rank_one_gradient_has_the_target_rms(driver):
    """A rank-1 gradient (a singular Gram): finite, and the update without its decay term has
    RMS update_rms = 0.2. Default options: lr 1e-2, weight_decay 0.1."""
    built(driver)
    before = driver.params()
    rng = np.random.default_rng(4)
    grads = {key: np.outer(rng.standard_normal(value.shape[0]),
                           rng.standard_normal(value[0].size)).reshape(value.shape).astype(value.dtype)
             if key in MATRICES else np.ones_like(value) for key, value in before.items()}
    driver.step(grads)
    after = driver.params()
    for key in MATRICES:
        W0, W1 = before[key].astype(np.float64), after[key].astype(np.float64)
        direction = (W0 - W1) / 1e-2 - 0.1 * W0
        assert float(np.sqrt(np.mean(direction ** 2))) == pytest.approx(0.2, rel=1e-2), key


def scaled_gradients_step_finitely(scale):
    def run(driver):
        built(driver)
        before = driver.params()
        driver.step(standard_grads(before, seed=3, scale=scale))
        after = driver.params()
        assert all(np.all(np.isfinite(value)) for value in after.values())
        assert all(moved(before, after, key) for key in MATRICES)
    return run


def overflowing_squares_are_skipped(driver):
    """float32 entries of 1e20 are finite, their squares are not: the Gram (ASGO) or column
    energies (DASGO) overflow, and the matrix is skipped as a non-finite one, counted."""
    built(driver)
    before = driver.params()
    grads = standard_grads(before, seed=3)
    grads["w2"] = grads["w2"] * np.float32(1e20)
    driver.step(grads)
    after = driver.params()
    assert np.array_equal(after["w2"], before["w2"])
    assert moved(before, after, "w1") and driver.counters()["skipped"] == 1


def steps_in_dtype(dtype):
    def run(driver):
        params = standard_params(dtype) if dtype != "bfloat16" else _bf16_params()
        built(driver, params=params, steps=2)
        after = driver.params()
        assert all(str(value.dtype) == dtype for value in after.values())
        assert all(np.all(np.isfinite(value.astype(np.float64))) for value in after.values())
        assert all(moved(params, after, key) for key in MATRICES)
    return run


def _bf16_params():
    import ml_dtypes
    return {key: value.astype(ml_dtypes.bfloat16) for key, value in standard_params().items()}


def steps_shapes(shapes):
    def run(driver):
        params = standard_params(shapes=shapes)
        built(driver, params=params, steps=2)
        after = driver.params()
        assert all(np.all(np.isfinite(value)) for value in after.values())
        assert all(moved(params, after, key) for key in shapes if len(shapes[key]) >= 2)
    return run


def other_memory_layouts_step_as_contiguous_ones(driver):
    """Valid input in other layouts: torch's conv weight and gradient in channels_last and a
    transposed-view matrix gradient; the NumPy adapter's Fortran-ordered arrays. The params
    equal those of the contiguous run."""
    contiguous = built(another(driver))
    if driver.name == "numpy":
        driver.build({key: np.asfortranarray(value) for key, value in standard_params().items()})
        layout = np.asfortranarray
    else:
        import torch
        built(driver)
        conv = driver.tensors["conv"]
        conv.data = conv.data.contiguous(memory_format=torch.channels_last)
        layout = _strided_tensor
    for seed in (40, 41):
        grads = standard_grads(standard_params(), seed=seed)
        contiguous.step(grads)
        driver.step({key: layout(value) for key, value in grads.items()})
    for key, value in contiguous.params().items():
        np.testing.assert_allclose(driver.params()[key], value, rtol=1e-6, atol=1e-7)


def _strided_tensor(array):
    """A tensor with array's values in a non-default layout: a transposed view (2-D) or
    channels_last (4-D)."""
    import torch
    if array.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(array.T)).T
    if array.ndim == 4:
        return torch.from_numpy(array).contiguous(memory_format=torch.channels_last)
    return torch.from_numpy(array)


def eigh_float64_fallback_is_counted(driver):
    """The fallback chain's third level: residual_tolerance=1e-30 rejects every Newton–Schulz
    root, the float32 eigh fallback is made to fail (NaN), and the float64 eigh takes over and
    is counted; the step then equals a plain eigh run's to float32 rounding."""
    core_step = importlib.import_module("asgo_core.step")  # the package exports a function `step`
    real_eigh_root = core_step.eigh_root

    def eigh_root_failing_below_float64(V, delta, xp):
        root = real_eigh_root(V, delta, xp)
        return root if V.dtype == xp.float64 else root * xp.nan

    grads = [standard_grads(standard_params(), seed=seed) for seed in (10, 11)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core_step, "eigh_root", eigh_root_failing_below_float64)
        built(driver, {"residual_tolerance": 1e-30, "root_method": "newton_schulz"})
        for step_grads in grads:
            driver.step(step_grads)
    counters = driver.counters()
    assert counters["eigh"] == counters["eigh_float64"] == 2 * len(MATRICES)  # 2 refreshes
    assert counters["kept_previous_root"] == 0
    reference = another(driver)
    built(reference, {"root_method": "eigh"})
    for step_grads in grads:
        reference.step(step_grads)
    start = standard_params()
    for key in MATRICES:
        moved_by, expected = driver.params()[key] - start[key], reference.params()[key] - start[key]
        assert np.linalg.norm(moved_by - expected) <= 1e-3 * np.linalg.norm(expected), key


def maximize_on_the_adamw_route_equals_adamw_maximize(driver):
    import torch
    params = standard_params()
    built(driver, {"maximize": True, "adamw_weight_decay": 0.01}, params=params)
    grads_per_step = [standard_grads(params, seed=s) for s in range(3)]
    bias = torch.nn.Parameter(torch.from_numpy(params["bias"].copy()))
    reference = torch.optim.AdamW([bias], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, maximize=True)
    for grads in grads_per_step:
        driver.step(grads)
        bias.grad = torch.from_numpy(grads["bias"])
        reference.step()
    assert np.array_equal(driver.params()["bias"], bias.detach().numpy())


VALID = [
    Case("nan-at-step-2-skips-that-matrix", nan_in_one_matrix_at_step_two(np.nan)),
    Case("inf-at-step-2-skips-that-matrix", nan_in_one_matrix_at_step_two(-np.inf)),
    Case("nan-in-a-bias", nan_in_a_bias),
    Case("zero-gradient-is-decayed", zero_gradient_decays),
    Case("rank-1-gradient", rank_one_gradient_has_the_target_rms),
    Case("gradient-scale-1e-30", scaled_gradients_step_finitely(1e-30)),
    Case("gradient-scale-1e15", scaled_gradients_step_finitely(1e15)),
    Case("overflowing-squares-skip", overflowing_squares_are_skipped),
    Case("float64", steps_in_dtype("float64")),
    Case("float16", steps_in_dtype("float16"), ("torch", "torch-dasgo", "optax", "keras")),
    Case("bfloat16", steps_in_dtype("bfloat16"), ("torch", "torch-dasgo", "optax", "keras")),
    Case("shapes-1xn-nx1-3d-4d-empty-bias", steps_shapes({"row": (1, 7), "column": (7, 1), "stack": (3, 4, 5),
                                                        "conv": (4, 3, 3, 3), "bias": (4,), "empty": (0,)})),
    Case("shapes-very-wide-and-tall", steps_shapes({"wide": (2, 6000), "tall": (3000, 3)})),
    # optax runs the same core chain; under x64 its Newton–Schulz compile alone takes ~15 s here.
    Case("eigh-float64-fallback", eigh_float64_fallback_is_counted, ("torch", "numpy")),
    Case("other-memory-layouts", other_memory_layouts_step_as_contiguous_ones, STATEFUL),
    Case("maximize-adamw-route", maximize_on_the_adamw_route_equals_adamw_maximize, WITH_GROUPS),
    Case("grad-sparse-in-a-later-group", sparse_in_a_later_group, TORCH),
]


# ----------------------------------------------------------------------------- loads



def other_shapes():
    return {**standard_params(), "w2": standard_params(shapes={"w2": (7, 5)})["w2"]}


def load_state_for_other_shapes(driver):
    saved = built(another(driver), steps=1).state_dict()
    built(driver, params=other_shapes(), steps=1)
    expect_error(driver, lambda: driver.load_state_dict(saved), ValueError,
                 driver.param_pattern("w2"), "shape|momentum")


def optax_state_for_other_shapes(driver):
    """optax's "load" is handing update a state: one initialised for other shapes is refused
    at trace time, naming the leaf."""
    other = built(OptaxDriver(), params=other_shapes(), steps=1)
    built(driver, steps=1)
    driver.state = other.state
    expect_error(driver, lambda: driver.step(standard_grads(driver.params(), seed=3)), ValueError,
                 driver.param_pattern("w2"), r"\(1, 5, 7\)")


def load_torch_adamw_state_dict(driver):
    import torch
    built(driver, steps=1)
    tensors = [torch.nn.Parameter(t.detach().clone()) for t in driver.tensors.values()]
    adamw = torch.optim.AdamW(tensors)
    for tensor in tensors:
        tensor.grad = torch.ones_like(tensor)
    adamw.step()
    expect_error(driver, lambda: driver.load_state_dict(adamw.state_dict()), ValueError,
                 driver.param_pattern("w1"))


def load_other_algorithm_state(driver):
    """DASGO's state into ASGO (and ASGO's into DASGO for torch-dasgo)."""
    from asgo_core.adapters.cupy import DASGO as NumpyDASGO
    from drivers import TorchDriver
    if driver.name == "numpy":
        other = NumpyDASGO(standard_params())
        other.step(standard_grads(standard_params(), seed=3))
        saved = other.state_dict()
    else:
        saved = built(TorchDriver("dasgo" if driver.name == "torch" else "asgo"), steps=1).state_dict()
    built(driver, steps=1)
    # the NumPy adapter refuses the group first: DASGO's saved group lacks ASGO's options
    expect_error(driver, lambda: driver.load_state_dict(saved), ValueError,
                 driver.param_pattern("w1") + "|damping")


def load_group_with_precondition_frequency_zero(driver):
    built(driver, steps=1)
    saved = driver.state_dict()
    saved["param_groups"][0]["precondition_frequency"] = 0
    expect_error(driver, lambda: driver.load_state_dict(saved), ValueError, "precondition_frequency")


def load_old_int_adamw_step(driver):
    """An older state dict whose AdamW-route "step" is a Python int (torch.optim.AdamW loads
    those) resumes as the float-step one does."""
    built(driver, steps=1)
    saved = driver.state_dict()
    resumed = built(another(driver), params=driver.params(), steps=0)
    index = driver.keys.index("bias")
    saved["state"][index]["step"] = int(saved["state"][index]["step"])
    resumed.load_state_dict(saved)
    grads = standard_grads(driver.params(), seed=5)
    driver.step(grads)
    resumed.step(grads)
    assert np.array_equal(resumed.params()["bias"], driver.params()["bias"])


def portable_mismatch(label, change, *patterns):
    """A portable state that does not fit is refused (CheckpointError) naming the parameter."""
    def run(driver):
        built(driver, steps=1)
        portable = driver.portable()
        entry = next(e for e in portable["params"] if "w2" in e["name"])
        change(portable, entry, driver)
        expect_error(driver, lambda: driver.load_portable(portable), CheckpointError, "w2", *patterns)
    return Case(f"portable-{label}", run)


def _complex_momentum(portable, entry, driver):
    entry["arrays"] = {**entry["arrays"], "momentum": entry["arrays"]["momentum"] * (1 + 1j)}


def load_state_field_of_another_kind(driver):
    """A state_dict whose momentum is complex: refused, not cast (which drops the imaginary part)."""
    import torch
    built(driver, steps=1)
    saved = driver.state_dict()
    key = driver.keys.index("w2") if driver.name.startswith("torch") else "w2"
    momentum = saved["state"][key]["momentum"]
    saved["state"][key]["momentum"] = (momentum.to(torch.complex64) if isinstance(momentum, torch.Tensor)
                                       else momentum.astype(np.complex64))
    expect_error(driver, lambda: driver.load_state_dict(saved), ValueError, driver.param_pattern("w2"),
                 "momentum")


def load_other_group_count(driver):
    built(driver, groups=[(["w1", "bias"], {}), (["w2", "conv"], {})], steps=1)
    saved = driver.state_dict()
    built(driver, steps=1)
    expect_error(driver, lambda: driver.load_state_dict(saved), ValueError, "param_groups|groups")


def _other_algorithm(portable, entry, driver):
    entry["algorithm"] = "asgo" if driver.algorithm == "dasgo" else "dasgo"


def _changed_beta2(portable, entry, driver):
    entry["config"] = {**entry["config"], "beta2": 0.5}


LOADS = [
    Case("load-state-for-other-shapes", load_state_for_other_shapes, STATEFUL),
    Case("load-state-for-other-shapes", optax_state_for_other_shapes, ("optax",)),
    Case("load-torch-adamw-state-dict", load_torch_adamw_state_dict, TORCH),
    Case("load-other-algorithm-state", load_other_algorithm_state, STATEFUL),
    Case("load-group-precondition_frequency=0", load_group_with_precondition_frequency_zero, ("torch", "numpy")),
    Case("load-old-int-adamw-step", load_old_int_adamw_step, TORCH),
    portable_mismatch("other-shape", lambda p, e, d: e.update(shape=[7, 5]), "shape"),
    portable_mismatch("other-algorithm", _other_algorithm, "algorithm|lacks arrays"),
    portable_mismatch("other-config", _changed_beta2, "beta2"),
    portable_mismatch("missing-entry", lambda p, e, d: p["params"].remove(e)),
    portable_mismatch("complex-momentum", _complex_momentum, "momentum", "dtype"),
    Case("load-state-field-of-another-kind", load_state_field_of_another_kind, STATEFUL),
    Case("load-other-group-count", load_other_group_count, STATEFUL),
]


# ----------------------------------------------------------------------------- portable files

def saved_file(driver, tmp_path):
    built(driver, steps=1)
    path = tmp_path / "state.npz"
    save_state(path, driver.portable())
    return path


def bit_flips_are_caught(driver, tmp_path):
    """Every 101st bit of an adapter's file flipped in turn (tests/test_checkpoint.py flips every
    bit of a small one): CheckpointError, or the very same state where the format does not care."""
    path = saved_file(driver, tmp_path)
    original = load_state(path)
    for loaded in loads_with_one_bit_flipped(path, range(0, 8 * path.stat().st_size, 101)):
        if loaded is not None:
            assert_same_state(loaded, original)


def truncations_are_caught(driver, tmp_path):
    path = saved_file(driver, tmp_path)
    content = path.read_bytes()
    for length in np.linspace(0, len(content) - 1, 12).astype(int):
        path.write_bytes(content[:length])
        with pytest.raises(CheckpointError):
            load_state(path)


def interrupted_save_keeps_the_previous_file(driver, tmp_path):
    path = saved_file(driver, tmp_path)
    previous = path.read_bytes()
    driver.step(standard_grads(driver.params(), seed=4))

    def disk_full(handle, **arrays):
        handle.write(b"PK\x03\x04")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(np, "savez", disk_full)
        with pytest.raises(OSError):
            save_state(path, driver.portable())
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def file_round_trip_resumes_bitwise(driver, tmp_path):
    path = saved_file(driver, tmp_path)
    resumed = built(another(driver), params=driver.params())
    resumed.load_portable(load_state(path))
    grads = standard_grads(driver.params(), seed=6)
    driver.step(grads)
    resumed.step(grads)
    assert all(np.array_equal(a, b) for a, b in zip(driver.params().values(), resumed.params().values()))


FILES = [Case("file-bit-flips", bit_flips_are_caught), Case("file-truncation", truncations_are_caught),
         Case("file-interrupted-save", interrupted_save_keeps_the_previous_file),
         Case("file-round-trip", file_round_trip_resumes_bitwise)]


# ----------------------------------------------------------------------------- torch training loops

def grad_scaler_skips_an_inf_step(driver):
    """torch.amp.GradScaler: an inf in one gradient makes scaler.step skip the optimizer step
    entirely (nothing changes) and halves the scale; the next finite step proceeds."""
    import torch
    built(driver, steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = sum((tensor.float() ** 2).sum() for tensor in driver.tensors.values())
    driver.optimizer.zero_grad()
    scaler.scale(loss).backward()
    driver.tensors["w2"].grad[0, 0] = float("inf")
    before = driver.snapshot()
    scaler.step(driver.optimizer)
    scaler.update()
    assert driver.snapshot() == before and scaler.get_scale() == 512.0


def scheduler_with_tensor_lr(driver):
    """A tensor lr driven by a scheduler steps as the same float lr does."""
    import torch
    tensor_lr = built(another(driver), {"lr": torch.tensor(0.02)})
    float_lr = built(driver, {"lr": 0.02})
    scheduler = torch.optim.lr_scheduler.LambdaLR(tensor_lr.optimizer, lambda step: 0.5 ** step)
    for step in range(3):
        grads = standard_grads(standard_params(), seed=20 + step)
        tensor_lr.step(grads)
        float_lr.optimizer.param_groups[0]["lr"] = 0.02 * 0.5 ** step
        float_lr.step(grads)
        scheduler.step()
    assert isinstance(tensor_lr.optimizer.param_groups[0]["lr"], torch.Tensor)
    for key, value in float_lr.params().items():
        np.testing.assert_allclose(tensor_lr.params()[key], value, rtol=1e-6, atol=1e-7)


def compiled_step_with_inductor(driver):
    """The one compile case here (the thorough test is the torch adapter's): torch.compile's
    default backend (inductor) on opt.step equals the eager step over 3 steps."""
    import torch
    params = standard_params(shapes={"w": (4, 6)})  # one small matrix: inductor compiles slowly
    eager = built(another(driver), params=params)
    built(driver, params=params)
    compiled_step = torch.compile(driver.optimizer.step)
    for step in range(3):
        grads = standard_grads(params, seed=30 + step)
        eager.step(grads)
        for key, tensor in driver.tensors.items():
            tensor.grad = torch.from_numpy(grads[key])
        compiled_step()
    for key, value in eager.params().items():
        np.testing.assert_allclose(driver.params()[key], value, rtol=1e-5, atol=1e-6)


TORCH_LOOPS = [Case("grad-scaler-inf", grad_scaler_skips_an_inf_step, TORCH),
               Case("scheduler-tensor-lr", scheduler_with_tensor_lr, TORCH),
               Case("compile-inductor", compiled_step_with_inductor, ("torch",))]


# ----------------------------------------------------------------------------- the table

CASES = BAD_OPTIONS + BAD_PARAMS + BAD_GRADS + VALID + LOADS + FILES + TORCH_LOOPS


def _params():
    for case in CASES:
        for name in case.drivers:
            yield pytest.param(case, name, id=f"{case.id}-{name}")


@pytest.mark.parametrize("case, driver_name", list(_params()))
def test_case(case, driver_name, tmp_path):
    driver = DRIVERS[driver_name]()
    if driver_name == "optax" and case.id in X64_CASES:
        driver = OptaxDriver(x64=True)
    if "tmp_path" in inspect.signature(case.run).parameters:
        case.run(driver, tmp_path)
    else:
        case.run(driver)


X64_CASES = {"float64"}
KERAS_OTHER_BACKEND_CASES = ("keras and (nan-at-step-2 or nan-in-a-bias or float64 or bfloat16 or file-round-trip "
                             "or grad-transposed) and not other_backend")


@pytest.mark.timeout(1200)
def test_keras_cases_on_the_other_backend():
    """The Keras cases whose path depends on the backend most (non-finite and transposed
    gradients, 16- and 64-bit dtypes, a file round trip; option and parameter checks run
    before any backend op) on the backend this process does not run, in a subprocess (keras'
    backend is fixed per process; eager JAX steps are slow, hence a selection)."""
    returncode, output = keras_backend.other_backend_run(__file__, KERAS_OTHER_BACKEND_CASES)
    assert returncode == 0, output
    assert " passed" in output and "skipped" not in output, output
