"""The Keras adapter's tests for ONE Keras backend, the one KERAS_BACKEND names (the backend
is fixed when keras is imported). tests/test_keras_adapter.py runs this file once per backend
in a subprocess:

    KERAS_BACKEND=jax python -m pytest -q tests/keras_cases.py
    KERAS_BACKEND=torch python -m pytest -q tests/keras_cases.py

References are independent of the adapter: asgo_core.step on NumPy arrays, one variable at a
time (so the adapter's stacking is checked too), torch.optim.AdamW's arithmetic for AdamW
variables, and the torch adapter for the Dense ↔ nn.Linear orientation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import numpy as np
import pytest

import keras

import asgo_core
from asgo_core.adapters.keras import ASGO, DASGO

BACKEND = keras.backend.backend()
assert BACKEND == os.environ.get("KERAS_BACKEND"), "run with KERAS_BACKEND=jax or torch"

# float32 on values of order one after a few steps: the core's eigh/GEMMs on NumPy and on the
# Keras backend round differently, by a few float32 ulps per step.
ATOL = 1e-5
RTOL = 1e-5
ADAMW = dict(betas=(0.9, 0.95), eps=1e-8)

# name → (shape, batch_dims); "token_embedding" goes to AdamW by exclude_embeddings, "head" by
# exclude_layers, "bias" by having one dim.
SHAPES = {"k1": ((6, 4), 0), "k2": ((6, 4), 0), "k3": ((4, 3), 0), "experts": ((2, 5, 3), 1),
          "bias": ((4,), 0), "token_embedding": ((7, 4), 0), "head": ((4, 5), 0)}
ADAMW_NAMES = ("bias", "token_embedding", "head")
STEPS = 5


# ---- references -------------------------------------------------------------------------------
def to_stack(x, batch_dims):
    """A Keras-layout array (..., out last) as the core's (matrices, out, rest) stack."""
    moved = np.moveaxis(x, -1, batch_dims)
    count = math.prod(moved.shape[:batch_dims])
    return moved.reshape(count, moved.shape[batch_dims], -1)


def from_stack(stack, shape, batch_dims):
    moved_shape = (*shape[:batch_dims], shape[-1], *shape[batch_dims:-1])
    return np.moveaxis(stack.reshape(moved_shape), batch_dims, -1)


def core_reference(name, initial, grads, lrs, config):
    """One variable stepped alone by asgo_core.step on NumPy: (params per step, final state)."""
    shape, batch_dims = SHAPES[name]
    param = to_stack(initial, batch_dims)
    state = asgo_core.init_state(param, config)
    frequency = getattr(config, "precondition_frequency", 1)
    history = []
    for t, (grad, lr) in enumerate(zip(grads, lrs)):
        update, state = asgo_core.step(to_stack(grad, batch_dims), state, param, config,
                                       refresh_root=t % frequency == 0)
        param = param - np.float32(lr) * update
        history.append(from_stack(param, shape, batch_dims))
    return history, state


def adamw_reference(initial, grads, lrs, weight_decay=0.0):
    """torch.optim.AdamW with the adapters' AdamW defaults; params per step."""
    import torch
    param = torch.nn.Parameter(torch.tensor(initial))
    optimizer = torch.optim.AdamW([param], lr=lrs[0], weight_decay=weight_decay, **ADAMW)
    history = []
    for grad, lr in zip(grads, lrs):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(grad)
        optimizer.step()
        history.append(param.detach().numpy().copy())
    return history


# ---- running the adapter --------------------------------------------------------------------------
def make_variables(rng):
    return {name: keras.Variable(rng.standard_normal(shape).astype("float32"), name=name)
            for name, (shape, _) in SHAPES.items()}


def make_grads(rng, steps, scale=1.0):
    return [{name: (scale * (1 + t) * rng.standard_normal(shape)).astype("float32")
             for name, (shape, _) in SHAPES.items()} for t in range(steps)]


def apply_steps(optimizer, variables: dict, grads: list) -> list:
    """Apply each step's grads; returns the NumPy values of every variable after each step.
    JAX: through jax.jit(optimizer.stateless_apply), the path of a jitted train step (the
    eager path runs the same code, op by op); torch: optimizer.apply, as its train step."""
    compiled = BACKEND == "jax"
    names = list(variables)
    model_variables = [variables[name] for name in names]
    optimizer.build(model_variables)
    if compiled:
        import jax
        stateless = jax.jit(optimizer.stateless_apply)
    history = []
    for step_grads in grads:
        tensors = [keras.ops.convert_to_tensor(step_grads[name]) for name in names]
        if compiled:
            new_values, new_state = stateless([v.value for v in optimizer.variables], tensors,
                                              [v.value for v in model_variables])
            for variable, value in zip(model_variables + optimizer.variables, new_values + new_state):
                variable.assign(value)
        else:
            optimizer.apply(tensors, model_variables)
        history.append({name: keras.ops.convert_to_numpy(variables[name]) for name in names})
    return history


def optimizer_variable(optimizer, path):
    matches = [v for v in optimizer.variables if v.path.endswith("/" + path)]
    assert len(matches) == 1, [v.path for v in optimizer.variables]
    return keras.ops.convert_to_numpy(matches[0])


def assert_matches_references(history, initial, grads, lrs, configs) -> float:
    """Every variable after every step against its reference; configs: name → core config.
    Returns the largest absolute difference."""
    largest = 0.0
    for name in SHAPES:
        per_step = [g[name] for g in grads]
        if name in ADAMW_NAMES:
            expected = adamw_reference(initial[name], per_step, lrs)
        else:
            expected, _ = core_reference(name, initial[name], per_step, lrs, configs[name])
        for t, value in enumerate(expected):
            np.testing.assert_allclose(history[t][name], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} after step {t + 1}")
            largest = max(largest, float(np.max(np.abs(history[t][name] - value))))
    return largest


# ---- parity with the core -----------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["asgo", "dasgo"])
def test_steps_equal_the_core(algorithm):
    """Batched steps (k1, k2 share a stack; experts with batch_dims) equal the core stepping each
    variable alone; a NaN gradient skips that matrix only; exclude_from_weight_decay holds."""
    rng = np.random.default_rng(0)
    variables = make_variables(rng)
    initial = {name: keras.ops.convert_to_numpy(v) for name, v in variables.items()}
    grads = make_grads(rng, STEPS)
    grads[2]["k1"][0, 0] = np.nan
    lr = 0.05
    if algorithm == "asgo":
        optimizer = ASGO(learning_rate=lr, precondition_frequency=2, exclude_layers=["head"],
                         batch_dims={"experts": 1})
        config = asgo_core.ASGOConfig(precondition_frequency=2)
    else:
        optimizer = DASGO(learning_rate=lr, exclude_layers=["head"], batch_dims={"experts": 1})
        config = asgo_core.DASGOConfig()
    optimizer.exclude_from_weight_decay(var_names=["k3"])
    history = apply_steps(optimizer, variables, grads)
    configs = {name: config for name in SHAPES}
    configs["k3"] = dataclasses.replace(config, weight_decay=0.0)
    gap = assert_matches_references(history, initial, grads, [lr] * STEPS, configs)
    print(f"{algorithm} vs core ({BACKEND}, {STEPS} steps): max |difference| {gap:.2e}")
    np.testing.assert_array_equal(history[2]["k1"], history[1]["k1"])  # the NaN step moved nothing
    assert optimizer_variable(optimizer, "k1_skipped").tolist() == [1]
    _, state = core_reference("experts", initial["experts"], [g["experts"] for g in grads],
                              [lr] * STEPS, config)
    np.testing.assert_allclose(optimizer_variable(optimizer, "experts_momentum"), state.momentum,
                               rtol=RTOL, atol=ATOL)


def test_adamw_variables_excluded_from_weight_decay_are_not_decayed():
    """adam_weight_decay decays the AdamW variables except those exclude_from_weight_decay names."""
    rng = np.random.default_rng(6)
    variables = make_variables(rng)
    initial = {name: keras.ops.convert_to_numpy(v) for name, v in variables.items()}
    grads = make_grads(rng, 3)
    optimizer = ASGO(learning_rate=0.05, adam_weight_decay=0.1, exclude_layers=["head"],
                     batch_dims={"experts": 1})
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    history = apply_steps(optimizer, variables, grads)
    for name, decay in (("bias", 0.0), ("token_embedding", 0.1), ("head", 0.1)):
        expected = adamw_reference(initial[name], [g[name] for g in grads], [0.05] * 3, weight_decay=decay)
        for t, value in enumerate(expected):
            np.testing.assert_allclose(history[t][name], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} step {t + 1}")


def test_schedule_and_clipnorm_equal_the_core_on_clipped_grads():
    rng = np.random.default_rng(1)
    variables = make_variables(rng)
    initial = {name: keras.ops.convert_to_numpy(v) for name, v in variables.items()}
    grads = make_grads(rng, STEPS, scale=0.3)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    optimizer = ASGO(learning_rate=schedule, clipnorm=1.0, precondition_frequency=2,
                     exclude_layers=["head"], batch_dims={"experts": 1})
    history = apply_steps(optimizer, variables, grads)
    clipped = [{name: g * min(1.0, 1.0 / np.linalg.norm(g)) for name, g in step.items()} for step in grads]
    assert any(np.linalg.norm(g) > 1.5 for step in grads for g in step.values())  # clipping acts
    lrs = [0.05 * 0.5 ** t for t in range(STEPS)]
    config = asgo_core.ASGOConfig(precondition_frequency=2)
    assert_matches_references(history, initial, clipped, lrs, {name: config for name in SHAPES})


def test_gradient_accumulation_steps_equal_the_core_on_mean_grads():
    rng = np.random.default_rng(2)
    variables = make_variables(rng)
    initial = {name: keras.ops.convert_to_numpy(v) for name, v in variables.items()}
    micro_grads = make_grads(rng, 2 * 3)
    optimizer = ASGO(learning_rate=0.05, gradient_accumulation_steps=2, precondition_frequency=2,
                     exclude_layers=["head"], batch_dims={"experts": 1})
    history = apply_steps(optimizer, variables, micro_grads)[1::2]
    mean_grads = [{name: (a[name] + b[name]) / 2 for name in SHAPES}
                  for a, b in zip(micro_grads[::2], micro_grads[1::2])]
    config = asgo_core.ASGOConfig(precondition_frequency=2)
    assert_matches_references(history, initial, mean_grads, [0.05] * 3, {name: config for name in SHAPES})


# Keras layer, its input shape, the torch module of the same layer, and the axes that turn the
# Keras kernel into the torch weight.
TWIN_LAYERS = {
    "dense": (lambda: keras.layers.Dense(3), (None, 8), lambda torch: torch.nn.Linear(8, 3), (1, 0)),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3), (None, 5, 5, 2), lambda torch: torch.nn.Conv2d(2, 4, 3),
               (3, 2, 0, 1)),
}


@pytest.mark.parametrize("side", ["auto", "left", "right"])
@pytest.mark.parametrize("layer_name", list(TWIN_LAYERS))
def test_a_kernel_gets_the_side_of_the_torch_weight(layer_name, side):
    """A Keras kernel (Dense (in, out), Conv2D (kh, kw, in, out)) steps as the torch adapter
    steps the same layer's torch weight ((out, in), (out, in, kh, kw)); the bias through both
    adapters' AdamW (adam_lr_ratio and adam_weight_decay against the torch adapter's adamw_lr
    and adamw_weight_decay)."""
    import torch
    from asgo_core.adapters.torch import ASGO as TorchASGO

    make_layer, input_shape, make_module, to_torch = TWIN_LAYERS[layer_name]
    layer = make_layer()
    layer.build(input_shape)
    module = make_module(torch)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(keras.ops.convert_to_numpy(layer.kernel).transpose(to_torch)))
        module.bias.copy_(torch.tensor(keras.ops.convert_to_numpy(layer.bias)))
    keras_optimizer = ASGO(learning_rate=0.05, side=side, adam_lr_ratio=0.5, adam_weight_decay=0.1)
    torch_optimizer = TorchASGO(module.parameters(), lr=0.05, side=side, adamw_lr=0.025,
                                adamw_weight_decay=0.1)
    rng = np.random.default_rng(3)
    grads = [{"kernel": rng.standard_normal(tuple(layer.kernel.shape)).astype("float32"),
              "bias": rng.standard_normal(tuple(layer.bias.shape)).astype("float32")} for _ in range(3)]
    history = apply_steps(keras_optimizer, {"kernel": layer.kernel, "bias": layer.bias}, grads)
    for step_grads in grads:
        module.weight.grad = torch.tensor(step_grads["kernel"].transpose(to_torch).copy())
        module.bias.grad = torch.tensor(step_grads["bias"])
        torch_optimizer.step()
    gram = optimizer_variable(keras_optimizer, layer.kernel.path.replace("/", "_") + "_gram_0")
    assert gram.shape == torch_optimizer.state[module.weight]["gram"][0].shape
    np.testing.assert_allclose(history[-1]["kernel"].transpose(to_torch), module.weight.detach().numpy(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(history[-1]["bias"], module.bias.detach().numpy(), rtol=RTOL, atol=ATOL)


# ---- portable checkpoints ------------------------------------------------------------------------
RESUME_OPTIONS = dict(precondition_frequency=3, max_precond_dim=4, weight_decay=0.05)


def torch_linear_steps(start, grads, portable=None):
    """An nn.Linear(8, 6) stepped by the torch adapter: its (weight, bias) and optimizer."""
    import torch
    from asgo_core.adapters.torch import ASGO as TorchASGO
    tensors = [torch.nn.Parameter(torch.tensor(value)) for value in start]
    optimizer = TorchASGO(tensors, lr=0.05, **RESUME_OPTIONS)
    if portable is not None:
        optimizer.load_portable_state(portable, names=["fc.weight", "fc.bias"])
    for weight_grad, bias_grad in grads:
        tensors[0].grad, tensors[1].grad = torch.tensor(weight_grad), torch.tensor(bias_grad)
        optimizer.step()
    return [t.detach().numpy().copy() for t in tensors], optimizer


def keras_dense_steps(start, grads, portable=None):
    """The Dense twin (kernel = weight transposed) stepped by this adapter; results in the torch layout."""
    variables = {"kernel": keras.Variable(start[0].T.copy(), name="kernel"),
                 "bias": keras.Variable(start[1], name="bias")}
    optimizer = ASGO(learning_rate=0.05, **RESUME_OPTIONS)
    optimizer.build(list(variables.values()))
    if portable is not None:
        optimizer.load_portable_state(portable, names=["fc.weight", "fc.bias"])
    history = apply_steps(optimizer, variables, [{"kernel": w.T.copy(), "bias": b} for w, b in grads])
    return [history[-1]["kernel"].T, history[-1]["bias"]], optimizer


def test_a_run_moves_between_keras_and_torch_through_a_portable_file(tmp_path):
    """10 steps in one adapter, saved, 10 in the other = 20 in torch (Dense kernel ↔ nn.Linear weight)."""
    rng = np.random.default_rng(7)
    start = [rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32")]
    grads = [(rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32"))
             for _ in range(20)]
    expected, _ = torch_linear_steps(start, grads)
    halfway, torch_optimizer = torch_linear_steps(start, grads[:10])
    names = ["fc.weight", "fc.bias"]
    asgo_core.save_state(tmp_path / "torch.npz", torch_optimizer.portable_state(names=names))
    from_torch, _ = keras_dense_steps(halfway, grads[10:], asgo_core.load_state(tmp_path / "torch.npz"))
    halfway, keras_optimizer = keras_dense_steps(start, grads[:10])
    asgo_core.save_state(tmp_path / "keras.npz", keras_optimizer.portable_state(names=names))
    from_keras, _ = torch_linear_steps(halfway, grads[10:], asgo_core.load_state(tmp_path / "keras.npz"))
    fresh, _ = keras_dense_steps(halfway, grads[10:])  # without the state: far off
    for resumed in (from_torch, from_keras):
        for value, reference in zip(resumed, expected):
            np.testing.assert_allclose(value, reference, rtol=RTOL, atol=ATOL)
    assert np.max(np.abs(fresh[0] - expected[0])) > 100 * ATOL


def test_load_portable_state_checks_everything_before_any_variable_changes():
    rng = np.random.default_rng(8)
    start = [rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32")]
    grads = [(rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32"))] * 2
    _, optimizer = keras_dense_steps(start, grads)
    portable = optimizer.portable_state(names=["fc.weight", "fc.bias"])
    before = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
    broken = copy.deepcopy(portable)
    broken["params"][1]["arrays"]["exp_avg"] = np.zeros(5, np.float32)
    with pytest.raises(asgo_core.CheckpointError, match="shape"):
        optimizer.load_portable_state(broken, names=["fc.weight", "fc.bias"])
    other = copy.deepcopy(portable)
    other["params"][0]["config"]["beta2"] = 0.5
    with pytest.raises(asgo_core.CheckpointError, match="beta2"):
        optimizer.load_portable_state(other, names=["fc.weight", "fc.bias"])
    with pytest.raises(ValueError, match="build"):
        ASGO().load_portable_state(portable)
    with pytest.raises(ValueError, match="build"):
        ASGO().portable_state()
    for old, new in zip(before, [keras.ops.convert_to_numpy(v) for v in optimizer.variables]):
        np.testing.assert_array_equal(old, new)


# ---- training a model ---------------------------------------------------------------------------------
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype("float32"), y[order]


def mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    return model


def compile_model(model, optimizer):
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def test_save_load_resumes_as_if_uninterrupted(tmp_path):
    """Train, save, train on (A); load the saved model, train the same batches (B): A = B. A
    fresh optimizer on the saved weights (C) differs, so the test sees the optimizer's state."""
    x, y = digits()
    x, y = x[:256], y[:256]
    fit = dict(epochs=2, batch_size=64, shuffle=False, verbose=0)
    options = dict(precondition_frequency=2, learning_rate=0.02)
    model = compile_model(mlp(), ASGO(**options))
    model.fit(x, y, **fit)
    path = str(tmp_path / "model.keras")
    model.save(path)
    model.fit(x, y, **fit)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, ASGO)
    assert int(restored.optimizer.iterations) == 8
    restored.fit(x, y, **fit)
    fresh = compile_model(keras.models.load_model(path, compile=False), ASGO(**options))
    fresh.fit(x, y, **fit)
    uninterrupted = [keras.ops.convert_to_numpy(w) for w in model.weights]
    resumed = [keras.ops.convert_to_numpy(w) for w in restored.weights]
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(uninterrupted, resumed))
    fresh_gap = max(float(np.max(np.abs(a - keras.ops.convert_to_numpy(b))))
                    for a, b in zip(uninterrupted, fresh.weights))
    print(f"save/load resume ({BACKEND}): max |uninterrupted − resumed| = {gap:.2e}; "
          f"with a fresh optimizer {fresh_gap:.2e}")
    assert gap <= ATOL
    assert fresh_gap > 100 * ATOL


def python_block(path: str, heading: str) -> str:
    """The first ```python block under a markdown heading."""
    with open(path) as file:
        text = file.read()
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def run_block(path: str, heading: str) -> dict:
    """Execute a documentation code block (from a seed); its namespace."""
    code = python_block(os.path.join(os.path.dirname(__file__), "..", path), heading)
    keras.utils.set_random_seed(0)
    namespace = {}
    exec(compile(code, f"{path} ({heading})", "exec"), namespace)
    return namespace


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_block("README.md", "## Keras")
    accuracy = namespace["history"].history["val_accuracy"]
    print(f"digits quick start ({BACKEND}): validation accuracy by epoch {[round(a, 3) for a in accuracy]}")
    assert accuracy[-1] > 0.85


def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves digits.keras
    namespace = run_block("docs/keras.md", "## A fuller example")
    assert namespace["history"].history["val_accuracy"][-1] > 0.85
    steps_per_epoch = math.ceil(0.8 * len(namespace["x"]) / 64)
    assert int(namespace["restored"].optimizer.iterations) == 5 * steps_per_epoch  # 3 saved + 2 resumed


# ---- configuration ----------------------------------------------------------------------------------
def test_defaults_are_the_torch_adapters():
    import inspect
    from asgo_core.adapters.torch import ASGO as TorchASGO
    from asgo_core.adapters.torch import DASGO as TorchDASGO

    renamed = {"learning_rate": "lr", "epsilon": "eps", "adam_epsilon": "adamw_eps",
               "adam_weight_decay": "adamw_weight_decay"}
    for keras_class, torch_class in ((ASGO, TorchASGO), (DASGO, TorchDASGO)):
        ours = {renamed.get(k, k): p.default for k, p in inspect.signature(keras_class).parameters.items()}
        theirs = {k: p.default for k, p in inspect.signature(torch_class).parameters.items()}
        assert (ours.pop("beta_1"), ours.pop("beta_2")) == theirs.pop("betas")
        assert (ours.pop("adam_beta_1"), ours.pop("adam_beta_2")) == theirs.pop("adamw_betas")
        shared = set(ours) & set(theirs) - {"batch_dims"}  # a dict by variable path here
        assert shared >= {"lr", "eps", "weight_decay", "update_rms", "adamw_eps", "adamw_weight_decay"}
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_a_subclass_with_its_own_init_shows_its_own_signature():
    import inspect

    class Scaled(ASGO):
        def __init__(self, scale=2.0, **kwargs):
            super().__init__(learning_rate=0.1 * scale, **kwargs)

    assert list(inspect.signature(Scaled).parameters) == ["scale", "kwargs"]
    assert list(inspect.signature(ASGO).parameters)[:2] == ["learning_rate", "beta_1"]


@pytest.mark.parametrize("optimizer_class", [ASGO, DASGO])
def test_get_config_round_trip(optimizer_class):
    schedule = keras.optimizers.schedules.CosineDecay(0.03, decay_steps=100)
    options = dict(learning_rate=schedule, beta_1=0.8, beta_2=0.9, epsilon=1e-5, weight_decay=0.05,
                   adam_beta_1=0.85, adam_epsilon=1e-7, adam_weight_decay=0.01, adam_lr_ratio=0.5,
                   exclude_layers=["head"], exclude_embeddings=False, batch_dims={"experts": 1},
                   clipnorm=1.0, gradient_accumulation_steps=2)
    if optimizer_class is ASGO:
        options.update(precondition_frequency=3, max_precond_dim=64, root_method="eigh")
    optimizer = optimizer_class(**options)
    config = optimizer.get_config()
    rebuilt = optimizer_class.from_config(copy.deepcopy(config))  # from_config edits its argument
    assert rebuilt.get_config() == config
    for name, value in options.items():
        if name != "learning_rate":
            assert config[name] == value, name
    assert config["learning_rate"]["class_name"] == "CosineDecay"
    assert float(rebuilt.learning_rate) == pytest.approx(0.03)
    deserialized = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(deserialized) is optimizer_class and deserialized.get_config() == config


@pytest.mark.parametrize("options, named", [
    (dict(beta_1=1.5), "(beta_1, beta_2)="), (dict(beta_2=-0.1), "(beta_1, beta_2)="),
    (dict(beta_2=1.0), "beta_2="), (dict(epsilon=-1.0), "epsilon="),
    (dict(learning_rate=-0.1), "learning_rate="), (dict(adam_beta_2=1.0), "(adam_beta_1, adam_beta_2)="),
    (dict(adam_epsilon=-1.0), "adam_epsilon="), (dict(adam_weight_decay=-1.0), "adam_weight_decay="),
    (dict(adam_lr_ratio=-1.0), "adam_lr_ratio="), (dict(side="top"), "side="),
    (dict(precondition_frequency=0), "precondition_frequency="),
    (dict(exclude_layers="head"), "exclude_layers="), (dict(exclude_embeddings="yes"), "exclude_embeddings="),
    (dict(batch_dims={"experts": -1}), "batch_dims="),
    (dict(batch_dims=1), "batch_dims="),
])
def test_bad_options_raise_naming_the_option(options, named):
    with pytest.raises(ValueError) as error:
        ASGO(**options)
    assert named in str(error.value) and "accepted" in str(error.value)


@pytest.mark.parametrize("options, named", [(dict(num_heads=3), "num_heads=3"),
                                            (dict(batch_dims={"k1": 1}), "batch_dims=1")])
def test_a_layout_error_names_the_variable_before_any_state_exists(options, named):
    variables = make_variables(np.random.default_rng(4))
    optimizer = ASGO(exclude_layers=["head"], **options)
    before = len(optimizer.variables)
    with pytest.raises(ValueError) as error:
        optimizer.build(list(variables.values()))
    assert "'k1'" in str(error.value) and named in str(error.value)
    assert len(optimizer.variables) == before and not optimizer.built


def test_nonfinite_raise_changes_nothing_or_is_refused_under_jax():
    """torch: a NaN gradient raises before any variable (model or optimizer) is written;
    JAX: nonfinite='raise' needs a host read inside the jitted step, so it is refused."""
    if BACKEND == "jax":
        with pytest.raises(ValueError, match="nonfinite='raise'.*accepted: 'skip'"):
            ASGO(nonfinite="raise")
        return
    rng = np.random.default_rng(5)
    variables = make_variables(rng)
    optimizer = ASGO(nonfinite="raise", exclude_layers=["head"], batch_dims={"experts": 1})
    apply_steps(optimizer, variables, make_grads(rng, 1))
    before = [keras.ops.convert_to_numpy(v) for v in list(variables.values()) + optimizer.variables]
    grads = make_grads(rng, 1)
    grads[0]["k3"][1, 1] = np.inf
    with pytest.raises(FloatingPointError):
        apply_steps(optimizer, variables, grads)
    after = [keras.ops.convert_to_numpy(v) for v in list(variables.values()) + optimizer.variables]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_refuses_the_tensorflow_backend(monkeypatch):
    """Without TensorFlow installed: the check reads keras.backend.backend() when an optimizer
    is made, so a patched answer takes the refusal path."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(RuntimeError, match="'jax' or 'torch'.*'tensorflow'"):
        ASGO()
    with pytest.raises(RuntimeError, match="KERAS_BACKEND"):
        DASGO()
