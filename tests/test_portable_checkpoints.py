"""Moving a run between frameworks through asgo_core.save_state / load_state: 10 steps in one
adapter, 10 in another, equal to 20 in one; mismatches and damaged files change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asgo_core import ASGOConfig, CheckpointError, load_state, save_state
from asgo_core.adapters.cupy import ASGO as ArrayASGO
from asgo_core.adapters.torch import ASGO as TorchASGO
from helpers.layouts import torch_layout_dimension_numbers
from helpers.numerics import jax_x64, relative_error

OPTIONS = dict(precondition_frequency=3, max_precond_dim=4, weight_decay=0.05)
SHAPES = {"fc1.weight": (10, 6), "fc1.bias": (10,), "conv.weight": (4, 2, 3, 3)}
LRS = [0.02 * (1 - t / 40) for t in range(20)]  # a schedule: lr is not part of the match


def _problem():
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    grads = [{name: rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(20)]
    return params, grads


def _torch_steps(params, grads, lrs, portable=None):
    tensors = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    optimizer = TorchASGO(list(tensors.values()), lr=0.0, **OPTIONS)
    if portable is not None:
        optimizer.load_portable_state(portable, names=list(tensors))
    for lr, grad in zip(lrs, grads):
        optimizer.param_groups[0]["lr"] = lr
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grad[name])
        optimizer.step()
    return {name: t.detach().numpy() for name, t in tensors.items()}, optimizer


def _array_steps(params, grads, lrs, portable=None):
    arrays = {name: np.array(value) for name, value in params.items()}
    optimizer = ArrayASGO(arrays, lr=0.0, **OPTIONS)
    if portable is not None:
        optimizer.load_portable_state(portable)
    for lr, grad in zip(lrs, grads):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step(grad)
    return arrays, optimizer


def _assert_same(actual: dict, expected: dict) -> None:
    for name in expected:
        assert relative_error(actual[name], expected[name]) <= 1e-12, name


def test_torch_to_jax_resume_matches_twenty_torch_steps(tmp_path):
    import jax.numpy as jnp
    import optax
    from asgo_core.adapters.optax import asgo, state_from_portable

    params, grads = _problem()
    expected, _ = _torch_steps(params, grads, LRS)
    halfway, optimizer = _torch_steps(params, grads[:10], LRS[:10])
    save_state(tmp_path / "run.npz", optimizer.portable_state(names=list(SHAPES)))

    numbers = torch_layout_dimension_numbers(params)
    with jax_x64():
        tx = asgo(lambda count: jnp.asarray(LRS)[count], weight_dimension_numbers=numbers, **OPTIONS)
        leaves = {name: jnp.asarray(value) for name, value in halfway.items()}
        state = state_from_portable(load_state(tmp_path / "run.npz"), leaves, tx, ASGOConfig(**OPTIONS),
                                    weight_dimension_numbers=numbers)
        for grad in grads[10:]:
            updates, state = tx.update({n: jnp.asarray(g) for n, g in grad.items()}, state, leaves)
            leaves = optax.apply_updates(leaves, updates)
        _assert_same({name: np.asarray(value) for name, value in leaves.items()}, expected)


@pytest.mark.parametrize("first, second", [(_array_steps, _torch_steps), (_torch_steps, _array_steps)],
                         ids=["numpy-to-torch", "torch-to-numpy"])
def test_numpy_adapter_and_torch_resume_each_other(tmp_path, first, second):
    params, grads = _problem()
    expected, _ = _torch_steps(params, grads, LRS)
    halfway, optimizer = first(params, grads[:10], LRS[:10])
    save_state(tmp_path / "run.npz", optimizer.portable_state(names=list(SHAPES)))
    resumed, _ = second(halfway, grads[10:], LRS[10:], load_state(tmp_path / "run.npz"))
    _assert_same(resumed, expected)


def _trained_torch_optimizer():
    params, grads = _problem()
    return _torch_steps(params, grads[:3], LRS[:3])[1]


@pytest.mark.parametrize("change, message", [
    (lambda p: p["params"][0].update(shape=[6, 10]), "shape"),
    (lambda p: p["params"][0]["config"].update(beta2=0.5), "beta2"),
    (lambda p: p["params"][1]["config"].update(eps=1e-3), "eps"),
    (lambda p: p["params"][2]["arrays"].update(momentum=np.zeros((3, 3))), "momentum"),
    (lambda p: p["params"].pop(), "no entry"),
])
def test_a_mismatched_checkpoint_raises_and_changes_nothing(change, message):
    source = _trained_torch_optimizer()
    portable = source.portable_state()
    change(portable)
    params, grads = _problem()
    for resume in (_torch_steps, _array_steps):
        _, target = resume(params, grads[:1], LRS[:1])
        before = target.portable_state()
        with pytest.raises(CheckpointError, match=message):
            target.load_portable_state(portable, names=[f"0.{i}" for i in range(3)]
                                       if resume is _array_steps else None)
        after = target.portable_state()
        for old, new in zip(before["params"], after["params"]):
            assert old["step"] == new["step"]
            for key, value in old["arrays"].items():
                assert np.array_equal(new["arrays"][key], value), (old["name"], key)


def test_a_truncated_checkpoint_never_reaches_the_optimizer(tmp_path):
    path = tmp_path / "run.npz"
    save_state(path, _trained_torch_optimizer())
    path.write_bytes(path.read_bytes()[:-100])
    target = _trained_torch_optimizer()
    before = target.state_dict()
    with pytest.raises(CheckpointError):
        target.load_portable_state(load_state(path))
    assert target.state_dict()["state"].keys() == before["state"].keys()
    assert all(torch.equal(target.state_dict()["state"][i]["momentum"], before["state"][i]["momentum"])
               for i in (0, 2))
