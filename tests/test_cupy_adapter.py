"""asgo_core.adapters.cupy on NumPy (CI) and CuPy (GPU-marked): parity with the core, the AdamW
route, state round trips through numpy.savez, params structures, errors, non-finite gradients."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from asgo_core import ASGOConfig, DASGOConfig, init_state, step
from asgo_core.adapters.cupy import ASGO, DASGO
from helpers.gpu import gpu_available
from helpers.numerics import relative_error, tolerance

SHAPES = {"a": (6, 10), "b": (6, 10), "conv": (4, 2, 3, 3), "tall": (12, 5), "bias": (10,)}


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def make_grads(step_index, shapes=SHAPES):
    rng = np.random.default_rng(1000 + step_index)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def copy_params(params):
    return {name: array.copy() for name, array in params.items()}


def flatten(tree, prefix=""):
    """Nested dicts/lists → {"a/b/0": leaf}, the form numpy.savez stores."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, dict) or (isinstance(value, list) and path.endswith("param_groups")):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    tree["param_groups"] = [tree["param_groups"][str(i)] for i in range(len(tree["param_groups"]))]
    return tree


# ---- parity with the core ------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(precondition_frequency=3, root_method="eigh"),
    dict(root_method="polar_express", weight_decay=0.0, update_rms=None, lr=1e-3),
])
def test_asgo_matches_core_over_ten_float64_steps(options):
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    params = make_params()
    opt = ASGO(params, lr=lr, **options)
    config = ASGOConfig(**options)
    stacks = {("a", "b"): np.stack([params["a"], params["b"]]),
              ("conv",): params["conv"].reshape(1, 4, 18).copy(), ("tall",): params["tall"][None].copy()}
    states = {names: init_state(stack, config) for names, stack in stacks.items()}
    for t in range(10):
        grads = make_grads(t)
        opt.step(grads)
        for names, stack in stacks.items():
            G = np.stack([grads[n].reshape(stack.shape[1:]) for n in names])
            update, states[names] = step(G, states[names], stack, config)
            stacks[names] = stack - lr * update
    for names, stack in stacks.items():
        for index, name in enumerate(names):
            assert relative_error(params[name].reshape(stack.shape[1:]), stack[index]) <= tolerance("float64")
    saved = opt.state_dict()["state"]
    assert relative_error(saved["b"]["momentum"], states[("a", "b")].momentum[1]) <= tolerance("float64")
    assert relative_error(saved["b"]["gram_0"], states[("a", "b")].gram[0][1:2]) <= tolerance("float64")
    assert relative_error(saved["tall"]["root_0"], states[("tall",)].root[0]) <= tolerance("float64")
    assert int(saved["a"]["count"]) == 10


def test_dasgo_matches_core():
    params = make_params()
    opt = DASGO(params, lr=3e-3)
    config = DASGOConfig()
    W = params["tall"][None].copy()
    state = init_state(W, config)
    for t in range(10):
        grads = make_grads(t)
        opt.step(grads)
        update, state = step(grads["tall"][None], state, W, config)
        W = W - 3e-3 * update
    assert relative_error(params["tall"], W[0]) <= tolerance("float64")
    assert relative_error(opt.state_dict()["state"]["tall"]["second_moment"], state.second_moment[0]) \
        <= tolerance("float64")


# ---- AdamW route ---------------------------------------------------------------------------
def reference_adamw(param, grads, *, lr, betas, eps, weight_decay):
    """AdamW as torch.optim.AdamW documents it, written out in float64."""
    beta1, beta2 = betas
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    for t, g in enumerate(grads, start=1):
        param = param * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        param = param - lr * m_hat / (np.sqrt(v_hat) + eps * 1.0)
    return param, m, v


def test_adamw_route_matches_float64_rederivation():
    # torch divides sqrt(v) by sqrt(bias correction) before adding eps: eps is not bias-corrected,
    # so the textbook m̂/(√v̂ + eps) above is the same formula.
    params = make_params()
    start = params["bias"].copy()
    opt = ASGO(params, lr=1e-2, adamw_lr=3e-2, adamw_betas=(0.8, 0.9), adamw_eps=1e-3, adamw_weight_decay=0.05)
    grads = [make_grads(t)["bias"] for t in range(10)]
    for t in range(10):
        opt.step(make_grads(t))
    expected, m, v = reference_adamw(start, grads, lr=3e-2, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)
    assert relative_error(params["bias"], expected) <= tolerance("float64")
    saved = opt.state_dict()["state"]["bias"]
    assert relative_error(saved["exp_avg"], m) <= tolerance("float64")
    assert relative_error(saved["exp_avg_sq"], v) <= tolerance("float64")


def test_adamw_lr_defaults_to_lr_and_algorithm_forces_adamw():
    params = {"emb": np.random.default_rng(0).standard_normal((5, 3))}
    start = params["emb"].copy()
    opt = ASGO([{"params": params, "algorithm": "adamw"}], lr=2e-2)
    grads = [make_grads(t, {"emb": (5, 3)})["emb"] for t in range(3)]
    for g in grads:
        opt.step({"emb": g})
    expected, _, _ = reference_adamw(start, grads, lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    assert relative_error(params["emb"], expected) <= tolerance("float64")


# ---- state round trip ----------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [ASGO, DASGO])
def test_state_round_trip_through_savez_resumes_bitwise(optimizer, tmp_path):
    straight = make_params()
    opt = optimizer(straight, lr=1e-2, **({"precondition_frequency": 2, "root_steps": None}
                                           if optimizer is ASGO else {}))
    for t in range(5):
        opt.step(make_grads(t))
    np.savez(tmp_path / "state.npz", **flatten(opt.state_dict()))
    resumed = copy_params(straight)
    restored = optimizer(resumed, lr=0.5, **({"precondition_frequency": 2} if optimizer is ASGO else {}))
    with np.load(tmp_path / "state.npz") as stored:
        restored.load_state_dict(unflatten(dict(stored)))
    assert restored.param_groups[0]["lr"] == 1e-2 and restored.param_groups[0]["betas"] == opt.defaults["betas"]
    for t in range(5, 10):
        opt.step(make_grads(t))
        restored.step(make_grads(t))
    for name in straight:
        assert np.array_equal(straight[name], resumed[name]), name
    for name, entry in opt.state_dict()["state"].items():
        for field, value in entry.items():
            assert np.array_equal(value, restored.state_dict()["state"][name][field]), (name, field)


def test_load_state_dict_rejects_mismatch_without_changes():
    opt = ASGO(make_params())
    opt.step(make_grads(0))
    saved = opt.state_dict()
    saved["state"]["a"]["momentum"] = np.zeros((3, 3))
    before = opt.state_dict()
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(saved)
    assert all(np.array_equal(before["state"]["a"][f], v) for f, v in opt.state_dict()["state"]["a"].items())


# ---- params structures, groups, lr changes ---------------------------------------------------
def test_list_params_match_dict_params():
    as_dict = make_params()
    as_list = [array.copy() for array in as_dict.values()]
    dict_opt, list_opt = ASGO(as_dict), ASGO(as_list)
    for t in range(3):
        grads = make_grads(t)
        dict_opt.step(grads)
        list_opt.step(list(grads.values()))
    for expected, actual in zip(as_dict.values(), as_list):
        assert np.array_equal(expected, actual)
    assert list(list_opt.state_dict()["state"]) == [str(i) for i in range(len(SHAPES))]


def test_param_groups_and_lr_changes_match_separate_optimizers():
    grouped, fast, slow = make_params(), make_params(), make_params()
    names_fast, names_slow = ("a", "bias"), ("b", "conv", "tall")
    opt = ASGO([{"params": {n: grouped[n] for n in names_fast}, "lr": 3e-2},
                {"params": {n: grouped[n] for n in names_slow}, "weight_decay": 0.0}], lr=1e-2)
    opt_fast = ASGO({n: fast[n] for n in names_fast}, lr=3e-2)
    opt_slow = ASGO({n: slow[n] for n in names_slow}, lr=1e-2, weight_decay=0.0)
    for t in range(4):
        lr_scale = 1.0 / (t + 1)                              # a schedule: set lr before each step
        opt.param_groups[0]["lr"] = 3e-2 * lr_scale
        opt_fast.param_groups[0]["lr"] = 3e-2 * lr_scale
        grads = make_grads(t)
        opt.step(grads)
        opt_fast.step({n: grads[n] for n in names_fast})
        opt_slow.step({n: grads[n] for n in names_slow})
    for n in names_fast:
        assert np.array_equal(grouped[n], fast[n]), n
    for n in names_slow:
        assert np.array_equal(grouped[n], slow[n]), n


def test_maximize_ascends():
    up, down = make_params(), make_params()
    ASGO(up, maximize=True).step({k: -g for k, g in make_grads(0).items()})
    ASGO(down).step(make_grads(0))
    for name in up:
        assert np.array_equal(up[name], down[name])


def test_same_shaped_matrices_share_one_bucket():
    opt = ASGO(make_params())
    assert [bucket.handles for bucket in opt._buckets] == [["a", "b"], ["conv"], ["tall"]]


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"), (dict(betas=(1.5, 0.9)), "betas"),
    (dict(betas=0.9), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=math.inf), "weight_decay"),
    (dict(root_method="cholesky"), "root_method"), (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(side="up"), "side"), (dict(num_heads=4), "num_heads"), (dict(adamw_lr=-1.0), "adamw_lr"),
    (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"), (dict(adamw_eps=-1e-8), "adamw_eps"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(maximize=1), "maximize"),
    (dict(algorithm="sgd"), "algorithm"),
])
def test_bad_options_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ASGO(make_params(), **kwargs)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="params"):
        ASGO([])
    with pytest.raises(ValueError, match="params"):
        ASGO({"w": np.ones((2, 2), dtype=np.int64)})
    shared = np.ones((2, 2))
    with pytest.raises(ValueError, match="params"):
        ASGO([shared, shared])
    with pytest.raises(ValueError, match="params"):
        ASGO([{"lr": 1e-3}])
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr"):
        ASGO([{"params": [np.ones((2, 2))]}, {"params": [np.ones((2, 3))], "lr": -1.0}])
    with pytest.raises(ValueError, match="algorithm"):
        ASGO([{"params": [np.ones(3)], "algorithm": "asgo"}])


def test_immutable_jax_arrays_are_rejected():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match="params"):
        ASGO([jnp.ones((2, 2))])


def test_bad_grads_and_options_raise_before_any_change():
    params = make_params()
    opt = ASGO(params)
    before = copy_params(params)
    grads = make_grads(0)
    bad_inputs = [
        ({**grads, "a": np.ones((3, 3))}, "grads"),
        ({k: v for k, v in grads.items() if k != "conv"}, "grads"),
        (list(grads.values())[:-1], "grads"),
        ({**grads, "extra": np.ones(2)}, "grads"),
        ({**grads, "tall": np.ones((12, 5), dtype=np.int32)}, "grads"),
    ]
    for bad, name in bad_inputs:
        with pytest.raises(ValueError, match=name):
            opt.step(bad)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(grads)
    opt.param_groups[0]["lr"] = 1e-2
    opt.param_groups[0]["side"] = "left"
    with pytest.raises(ValueError, match="side"):
        opt.step(grads)
    for name in params:
        assert np.array_equal(params[name], before[name])
    assert opt.state_dict()["step"] == 0 and not np.any(opt.state_dict()["state"]["a"]["momentum"])


# ---- non-finite gradients ------------------------------------------------------------------
def test_nan_gradient_skips_only_that_array_and_counts():
    params = make_params()
    before = copy_params(params)
    opt = ASGO(params)
    grads = make_grads(0)
    grads["b"] = grads["b"].copy()
    grads["b"][0, 0] = np.nan
    grads["bias"] = np.full(10, np.inf)
    opt.step(grads)
    assert np.array_equal(params["b"], before["b"]) and np.array_equal(params["bias"], before["bias"])
    assert not np.array_equal(params["a"], before["a"])
    state = opt.state_dict()["state"]
    assert int(state["b"]["skipped"]) == 1 and int(state["a"]["skipped"]) == 0
    assert int(state["bias"]["skipped"]) == 1
    for entry in state.values():
        assert all(np.all(np.isfinite(value)) for value in entry.values())
    assert all(np.all(np.isfinite(p)) for p in params.values())


def test_nonfinite_raise_changes_nothing():
    params = make_params()
    before = copy_params(params)
    opt = ASGO(params, nonfinite="raise")
    grads = make_grads(0)
    grads["tall"] = np.full((12, 5), np.nan)                   # the last bucket: earlier ones planned
    with pytest.raises(FloatingPointError):
        opt.step(grads)
    grads = make_grads(0)
    grads["bias"] = np.full(10, np.nan)
    with pytest.raises(FloatingPointError, match="bias"):
        opt.step(grads)
    for name in params:
        assert np.array_equal(params[name], before[name])


# ---- import without CuPy, and CuPy on a GPU --------------------------------------------------
def test_adapter_imports_and_steps_where_cupy_cannot_be_imported():
    script = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np\n"
        "from asgo_core.adapters.cupy import ASGO\n"
        "p = [np.ones((3, 4)), np.ones(4)]\n"
        "ASGO(p).step([np.full((3, 4), 0.5), np.ones(4)])\n"
        "assert sys.modules['cupy'] is None and np.all(np.isfinite(p[0]))\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", [ASGO, DASGO])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cupy_matches_numpy(optimizer, dtype):
    if not gpu_available("cupy"):
        pytest.skip("cupy: no GPU on this machine")
    import cupy
    host = {name: array.astype(dtype) for name, array in make_params().items()}
    device = {name: cupy.asarray(array) for name, array in host.items()}
    host_opt, device_opt = optimizer(host), optimizer(device)
    for t in range(10):
        grads = {name: g.astype(dtype) for name, g in make_grads(t).items()}
        if t == 3:
            grads["a"][0, 0] = np.nan
        host_opt.step(grads)
        device_opt.step({name: cupy.asarray(g) for name, g in grads.items()})
    for name in host:
        assert relative_error(device[name].get(), host[name]) <= 10 * tolerance(dtype), name
    device_state = device_opt.state_dict()["state"]
    for name, entry in host_opt.state_dict()["state"].items():
        for field, value in entry.items():
            assert relative_error(device_state[name][field].get(), value) <= 10 * tolerance(dtype), (name, field)
