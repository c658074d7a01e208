"""batch_dims (stacked / mixture-of-experts weights) in the torch and NumPy/CuPy adapters and in
portable checkpoints: an (E, m, n) array with batch_dims=1 steps exactly as E separate (m, n)
arrays, the E matrices share one bucket, a bad value is refused naming the parameter, a saved
state resumes, and a stack moves between NumPy, torch and optax."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from asgo_core import ASGOConfig, CheckpointError, load_state, save_state
from asgo_core.adapters import cupy as array_adapter
from asgo_core.adapters.cupy import ASGO, DASGO
from asgo_core.adapters.torch import ASGO as TorchASGO
from asgo_core.adapters.torch import DASGO as TorchDASGO
from asgo_core.adapters.torch import asgo_param_groups
from helpers.gpu import gpu_available
from helpers.numerics import jax_x64, relative_error, tolerance
from test_cupy_adapter import flatten, unflatten

PARITY = 1e-12  # float64: the stack and the separate arrays run the same arithmetic per matrix
STEPS = 6
LRS = [0.03 * (1 - t / 30) for t in range(20)]  # a schedule: lr is not part of a checkpoint


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _matrices(stack, batch_dims):
    """The independent matrices of a stack, row-major over its batch dims."""
    return [stack[index] for index in np.ndindex(*stack.shape[:batch_dims])]


# ---- parity: one stack == its matrices as separate arrays ----------------------------------
PARITY_CASES = [
    pytest.param(ASGO, dict(), (3, 6, 10), 1, id="asgo-auto-side"),
    pytest.param(ASGO, dict(side="right"), (3, 6, 10), 1, id="asgo-right"),
    pytest.param(ASGO, dict(max_precond_dim=4, precondition_frequency=3), (3, 10, 6), 1, id="asgo-blocks-tau3"),
    pytest.param(ASGO, dict(num_heads=2, max_precond_dim=2), (3, 6, 10), 1, id="asgo-heads-per-expert"),
    pytest.param(ASGO, dict(root_method="polar_express"), (2, 3, 4, 2, 3), 2, id="asgo-2-batch-dims-nd"),
    pytest.param(DASGO, dict(), (3, 6, 10), 1, id="dasgo"),
    pytest.param(DASGO, dict(accumulate="sum", betas=(0.9, 1.0)), (2, 2, 5, 3), 2, id="dasgo-2-batch-dims"),
]


def _run_stacked_and_separate(optimizer, options, shape, batch_dims, grads):
    """(stack after the steps, its optimizer, each matrix's array after the steps, their optimizers):
    the stack with batch_dims, each matrix in an optimizer of its own."""
    stack = _random(shape, 0)
    stacked = optimizer({"w": stack}, lr=0.0, batch_dims=batch_dims, **options)
    separate = [matrix.copy() for matrix in _matrices(stack, batch_dims)]
    alone = [optimizer({"w": array}, lr=0.0, **options) for array in separate]
    for lr, grad in zip(LRS, grads):
        stacked.param_groups[0]["lr"] = lr
        stacked.step({"w": grad})
        for opt, matrix_grad in zip(alone, _matrices(grad, batch_dims)):
            opt.param_groups[0]["lr"] = lr
            opt.step({"w": matrix_grad})
    return stack, stacked, separate, alone


@pytest.mark.parametrize("optimizer, options, shape, batch_dims", PARITY_CASES)
def test_a_stack_steps_as_its_matrices_alone(optimizer, options, shape, batch_dims):
    grads = [_random(shape, 100 + t) for t in range(STEPS)]
    stack, stacked, separate, alone = _run_stacked_and_separate(optimizer, options, shape, batch_dims, grads)
    for got, expected in zip(_matrices(stack, batch_dims), separate):
        assert relative_error(got, expected) <= PARITY
    stacked_state = stacked.state_dict()["state"]["w"]
    for index, opt in enumerate(alone):
        for field, expected in opt.state_dict()["state"]["w"].items():
            if field != "count":
                got = _matrix_part(stacked_state[field], field, index, len(alone))
                assert relative_error(got, expected) <= PARITY, (index, field)


def _matrix_part(stacked_array, field: str, index: int, count: int):
    """Matrix `index`'s part of a stacked state array (gram/root: its blocks, matrix-major)."""
    if field.startswith(("gram_", "root_")):
        blocks = stacked_array.shape[0] // count
        return stacked_array[index * blocks:(index + 1) * blocks]
    return stacked_array[index]


# every config field that applies to a stacked matrix: the side, size blocks, head blocks, τ
TORCH_PARITY_CASES = [
    pytest.param(TorchASGO, (8, 5), {}, id="asgo-tall-right-side"),
    pytest.param(TorchASGO, (5, 8), {}, id="asgo-wide-left-side"),
    pytest.param(TorchASGO, (8, 5), {"side": "left"}, id="asgo-side-left-on-tall"),
    pytest.param(TorchASGO, (8, 12), {"max_precond_dim": 3}, id="asgo-blocks"),
    pytest.param(TorchASGO, (8, 12), {"num_heads": 2}, id="asgo-heads-per-expert"),
    pytest.param(TorchASGO, (6, 9), {"precondition_frequency": 3}, id="asgo-tau3"),
    pytest.param(TorchASGO, (4, 3, 2, 2), {}, id="asgo-conv-like-4d-expert"),
    pytest.param(TorchDASGO, (6, 9), {}, id="dasgo"),
]
EXPERTS = 3


def _torch_stacked_and_separate(optimizer_type, shape, options):
    """((E, *shape) stack after the steps, its state, the E separate matrices stacked, their states)."""
    weights = torch.tensor(_random((EXPERTS, *shape), 0))
    grads = [torch.tensor(_random((EXPERTS, *shape), 100 + t)) for t in range(STEPS)]
    stacked = nn.Parameter(weights.clone())
    stacked_optimizer = optimizer_type([stacked], lr=0.05, batch_dims=1, **options)
    experts = [nn.Parameter(w.clone()) for w in weights]
    separate_optimizer = optimizer_type(experts, lr=0.05, **options)
    for grad in grads:
        stacked.grad = grad.clone()
        for expert, expert_grad in zip(experts, grad):
            expert.grad = expert_grad.clone()
        stacked_optimizer.step()
        separate_optimizer.step()
    return (stacked.detach(), stacked_optimizer.state[stacked], torch.stack([e.detach() for e in experts]),
            [separate_optimizer.state[e] for e in experts])


@pytest.mark.parametrize("optimizer_type, shape, options", TORCH_PARITY_CASES)
def test_a_torch_stacked_parameter_steps_as_its_matrices_alone(optimizer_type, shape, options):
    stacked, stacked_state, separate, separate_states = _torch_stacked_and_separate(optimizer_type, shape,
                                                                                    options)
    assert relative_error(stacked, separate) < PARITY
    momentum = torch.stack([s["momentum"] for s in separate_states])
    assert stacked_state["momentum"].shape == momentum.shape  # (E, m, n): the batch shape in front
    assert relative_error(stacked_state["momentum"], momentum) < PARITY
    if optimizer_type is TorchASGO:
        for group, gram in enumerate(stacked_state["gram"]):
            assert relative_error(gram, torch.cat([s["gram"][group] for s in separate_states])) < PARITY
        assert torch.equal(stacked_state["skipped"], torch.stack([s["skipped"] for s in separate_states]))


def test_torch_batch_dims_two_flattens_layers_and_experts():
    weights = torch.tensor(_random((2, 3, 5, 7), 0))
    grads = [torch.tensor(_random((2, 3, 5, 7), 10 + t)) for t in range(3)]
    two = nn.Parameter(weights.clone())
    one = nn.Parameter(weights.reshape(6, 5, 7).clone())
    opt_two, opt_one = TorchASGO([two], batch_dims=2), TorchASGO([one], batch_dims=1)
    for grad in grads:
        two.grad, one.grad = grad.clone(), grad.reshape(6, 5, 7).clone()
        opt_two.step()
        opt_one.step()
    assert relative_error(two.detach().reshape(6, 5, 7), one.detach()) < PARITY
    assert opt_two.state[two]["skipped"].shape == (2, 3)


def _one_step(adapter: str, stack, grad):
    """(the stack after one ASGO step with batch_dims=1, each matrix's skipped count)."""
    if adapter == "numpy":
        opt = ASGO({"w": stack}, batch_dims=1)
        opt.step({"w": grad})
        return stack, opt.state_dict()["state"]["w"]["skipped"].tolist()
    param = nn.Parameter(torch.tensor(stack))
    opt = TorchASGO([param], batch_dims=1)
    param.grad = torch.tensor(grad)
    opt.step()
    return param.detach().numpy(), opt.state[param]["skipped"].tolist()


@pytest.mark.parametrize("adapter", ["numpy", "torch"])
def test_a_nonfinite_expert_is_skipped_alone(adapter):
    start = _random((3, 6, 10), 0)
    grad = _random((3, 6, 10), 1)
    grad[1, 2, 3] = np.nan
    stack, skipped = _one_step(adapter, start.copy(), grad)
    assert np.array_equal(stack[1], start[1])
    assert not np.array_equal(stack[0], start[0]) and not np.array_equal(stack[2], start[2])
    assert skipped == [0, 1, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", [ASGO, DASGO])
def test_a_cupy_stack_matches_numpy(optimizer):
    if not gpu_available("cupy"):
        pytest.skip("cupy: no GPU on this machine")
    import cupy
    host = _random((3, 6, 10), 0)
    device = cupy.asarray(host)
    host_opt, device_opt = optimizer({"w": host}, batch_dims=1), optimizer({"w": device}, batch_dims=1)
    for t in range(5):
        grad = _random((3, 6, 10), 10 + t)
        host_opt.step({"w": grad})
        device_opt.step({"w": cupy.asarray(grad)})
    assert relative_error(device.get(), host) <= 10 * tolerance("float64")
    device_state = device_opt.state_dict()["state"]["w"]
    for field, value in host_opt.state_dict()["state"]["w"].items():
        assert relative_error(device_state[field].get(), value) <= 10 * tolerance("float64"), field


# ---- buckets: E experts cost one batched step ----------------------------------------------
def test_same_shaped_stacks_join_one_bucket_of_all_their_matrices(monkeypatch):
    params = {"up0": _random((4, 6, 10), 0), "up1": _random((2, 6, 10), 1), "conv": _random((3, 6, 2, 5), 2),
              "down": _random((4, 10, 6), 3)}
    stacks_stepped = []

    def counting_step(grad, *args, **kwargs):
        stacks_stepped.append(tuple(grad.shape))
        return core_step(grad, *args, **kwargs)

    core_step = array_adapter.core_step
    monkeypatch.setattr(array_adapter, "core_step", counting_step)
    opt = ASGO([{"params": params, "batch_dims": 1}])
    opt.step({name: _random(array.shape, 10) for name, array in params.items()})
    assert sorted(stacks_stepped) == [(4, 10, 6), (9, 6, 10)]
    assert [bucket.counts for bucket in opt._buckets] == [[4, 2, 3], [4]]


def test_torch_stacks_of_the_same_matrix_shape_share_one_bucket():
    """Two expert stacks (3 and 2 experts) and a plain matrix of the same (6, 9) shape in two
    groups: the stacks form one bucket of five matrices (one batched root)."""
    layer_a, layer_b = nn.Parameter(torch.randn(3, 6, 9)), nn.Parameter(torch.randn(2, 6, 9))
    plain = nn.Parameter(torch.randn(6, 9))
    optimizer = TorchASGO([{"params": [layer_a, layer_b], "batch_dims": 1}, {"params": [plain]}])
    for param in (layer_a, layer_b, plain):
        param.grad = torch.randn_like(param)
    buckets = optimizer.plan_buckets()
    assert [(b.handles, b.counts) for b in buckets] == [([layer_a, layer_b], [3, 2]), ([plain], [1])]


# ---- bad values -----------------------------------------------------------------------------
OPTIMIZERS = {"numpy": {"asgo": ASGO, "dasgo": DASGO}, "torch": {"asgo": TorchASGO, "dasgo": TorchDASGO}}


def _built(adapter: str, algorithm: str, shapes: dict, **options):
    """An optimizer of `adapter` over arrays of ones of `shapes` (in that order)."""
    optimizer_type = OPTIMIZERS[adapter][algorithm]
    if adapter == "numpy":
        return optimizer_type({name: np.ones(shape) for name, shape in shapes.items()}, **options)
    return optimizer_type([nn.Parameter(torch.ones(shape)) for shape in shapes.values()], **options)


def _label(adapter: str, shapes: dict, name: str) -> str:
    """How the adapter's errors name array `name` (a regular expression)."""
    if adapter == "numpy":
        return rf"params\['{name}'\]"
    return rf"param_groups\[0\]\['params'\]\[{list(shapes).index(name)}\]"


@pytest.mark.parametrize("adapter", OPTIMIZERS)
@pytest.mark.parametrize("algorithm", ["asgo", "dasgo"])
@pytest.mark.parametrize("batch_dims", [-1, True, 1.0, "1"])
def test_a_batch_dims_that_is_no_count_is_refused_even_without_matrices(adapter, algorithm, batch_dims):
    with pytest.raises(ValueError, match=r"batch_dims=.*accepted: an integer >= 0"):
        _built(adapter, algorithm, {"bias": (6,)}, batch_dims=batch_dims)


@pytest.mark.parametrize("adapter", OPTIMIZERS)
@pytest.mark.parametrize("algorithm", ["asgo", "dasgo"])
@pytest.mark.parametrize("batch_dims, shapes, refused", [
    (2, {"experts": (3, 6, 10), "bias": (6,)}, "experts"),
    (3, {"experts": (3, 6, 10), "bias": (6,)}, "experts"),
    (1, {"experts": (3, 6, 10), "w": (6, 10)}, "w")])
def test_a_batch_dims_that_leaves_no_matrix_is_refused_naming_the_array(adapter, algorithm, batch_dims,
                                                                        shapes, refused):
    shape = re.escape(str(shapes[refused]))
    with pytest.raises(ValueError, match=rf"{_label(adapter, shapes, refused)}.*batch_dims.*shape {shape}"):
        _built(adapter, algorithm, shapes, batch_dims=batch_dims)


def test_a_bad_batch_dims_in_a_group_names_the_group():
    with pytest.raises(ValueError, match=r"param_groups\[1\].*batch_dims=2.*shape \(6, 10\)"):
        ASGO([{"params": {"experts": np.ones((3, 6, 10))}, "batch_dims": 1},
              {"params": {"w": np.ones((6, 10))}, "batch_dims": 2}])


def test_changing_batch_dims_between_steps_is_refused_before_any_change():
    stack = _random((3, 6, 10), 0)
    opt = ASGO({"w": stack}, batch_dims=1)
    opt.step({"w": _random((3, 6, 10), 1)})
    before, state_before = stack.copy(), opt.state_dict()
    opt.param_groups[0]["batch_dims"] = 0
    with pytest.raises(ValueError, match="batch_dims"):
        opt.step({"w": _random((3, 6, 10), 2)})
    assert np.array_equal(stack, before)
    assert np.array_equal(opt.state_dict()["state"]["w"]["momentum"], state_before["state"]["w"]["momentum"])


# ---- state_dict -----------------------------------------------------------------------------
def _expert_model(seed=0):
    return ({"experts": _random((3, 6, 10), seed), "shared_experts": _random((2, 6, 10), seed + 1)},
            {"gate": _random((10, 3), seed + 2), "bias": _random((6,), seed + 3)})


def _expert_optimizer(optimizer, stacked, plain, **options):
    return optimizer([{"params": stacked, "batch_dims": 1}, {"params": plain}], lr=0.02, **options)


@pytest.mark.parametrize("optimizer, options", [(ASGO, dict(precondition_frequency=2, max_precond_dim=4)),
                                                (DASGO, dict())])
def test_state_dict_round_trip_through_savez_resumes_bitwise(optimizer, options, tmp_path):
    straight = _expert_model()
    opt = _expert_optimizer(optimizer, *straight, **options)
    grads = [{name: _random(array.shape, 50 + t) for part in straight for name, array in part.items()}
             for t in range(8)]
    for grad in grads[:3]:
        opt.step(grad)
    np.savez(tmp_path / "state.npz", **flatten(opt.state_dict()))
    resumed = tuple({name: array.copy() for name, array in part.items()} for part in straight)
    restored = _expert_optimizer(optimizer, *resumed, **options)
    with np.load(tmp_path / "state.npz") as stored:
        restored.load_state_dict(unflatten(dict(stored)))
    for grad in grads[3:]:
        opt.step(grad)
        restored.step(grad)
    for part, resumed_part in zip(straight, resumed):
        for name in part:
            assert np.array_equal(part[name], resumed_part[name]), name


def test_a_state_dict_of_another_batch_dims_is_refused_without_changes():
    source = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1)
    source.step({"w": _random((3, 6, 10), 1)})
    target = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=0)
    target.step({"w": _random((3, 6, 10), 2)})
    before = target.state_dict()
    with pytest.raises(ValueError, match="layout options"):
        target.load_state_dict(source.state_dict())
    for field, value in before["state"]["w"].items():
        assert np.array_equal(target.state_dict()["state"]["w"][field], value), field


@pytest.mark.parametrize("damage, message", [
    (lambda entry: entry.pop("count"), "count"),
    (lambda entry: entry.pop("gram_1"), "gram/1"),
    (lambda entry: entry.update(momentum=entry["momentum"][:2]), "momentum"),
])
def test_a_damaged_stack_state_dict_is_refused_without_changes(damage, message):
    source = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1, max_precond_dim=4)
    source.step({"w": _random((3, 6, 10), 1)})
    saved = source.state_dict()
    damage(saved["state"]["w"])
    target = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1, max_precond_dim=4)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    assert target.state_dict()["step"] == 0 and not np.any(target.state_dict()["state"]["w"]["momentum"])


def test_a_state_dict_saved_before_batch_dims_reads_it_as_zero():
    source = ASGO({"w": _random((3, 6, 10), 0)})
    source.step({"w": _random((3, 6, 10), 1)})
    saved = source.state_dict()
    del saved["param_groups"][0]["batch_dims"]
    target = ASGO({"w": _random((3, 6, 10), 0)})
    target.load_state_dict(saved)
    assert target.state_dict()["step"] == 1 and target.param_groups[0]["batch_dims"] == 0
    with pytest.raises(ValueError, match="layout options"):
        ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1).load_state_dict(saved)


def _torch_run(reload_at=None, drop_batch_dims=False):
    """Five ASGO steps (τ = 2) of a stack in a group with batch_dims=1 (the constructor's
    default is 0), reloaded through state_dict() before step `reload_at`, optionally from a
    file that, as one saved before the option existed, lacks batch_dims."""
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(EXPERTS, 6, 9))
    optimizer = TorchASGO([{"params": [stacked], "batch_dims": 1}], precondition_frequency=2)
    for step in range(5):
        if step == reload_at:
            saved = optimizer.state_dict()
            if drop_batch_dims:
                del saved["param_groups"][0]["batch_dims"]
            optimizer = TorchASGO([{"params": [stacked], "batch_dims": 1}], precondition_frequency=2)
            optimizer.load_state_dict(saved)
            assert optimizer.param_groups[0]["batch_dims"] == 1
        stacked.grad = torch.randn_like(stacked)
        optimizer.step()
    return stacked.detach()


@pytest.mark.parametrize("drop_batch_dims", [False, True], ids=["current file", "file without batch_dims"])
def test_a_torch_state_dict_with_batch_dims_resumes_bitwise(drop_batch_dims):
    """A torch state_dict saved before batch_dims existed lacks it: the loading group's own
    value (1 here, not the default 0) fills it in."""
    assert torch.equal(_torch_run(), _torch_run(reload_at=3, drop_batch_dims=drop_batch_dims))


# ---- asgo_param_groups (torch) ---------------------------------------------------------------
class _MixtureOfExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts_up = nn.Parameter(torch.randn(4, 16, 8))
        self.experts_down = nn.Parameter(torch.randn(4, 8, 16))
        self.conv = nn.Conv1d(8, 8, 3)


def test_asgo_param_groups_marks_stacked_parameters_by_name_pattern():
    model = _MixtureOfExperts()
    groups = asgo_param_groups(model, stacked={"experts_*": 1})
    by_param = {id(p): group for group in groups for p in group["params"]}
    assert by_param[id(model.experts_up)]["batch_dims"] == 1
    assert by_param[id(model.experts_down)]["batch_dims"] == 1
    assert by_param[id(model.conv.weight)].get("batch_dims", 0) == 0  # a 3-D conv kernel stays a matrix
    assert by_param[id(model.router.weight)].get("batch_dims", 0) == 0
    TorchASGO(groups)  # every group is valid


def test_asgo_param_groups_leaves_3d_kernels_unbatched_by_default():
    groups = asgo_param_groups(_MixtureOfExperts())
    assert all(group.get("batch_dims", 0) == 0 for group in groups)


# ---- portable checkpoints -------------------------------------------------------------------
OPTIONS = dict(precondition_frequency=3, max_precond_dim=4, weight_decay=0.05)
DASGO_OPTIONS = dict(weight_decay=0.05)
MODEL_SHAPES = {"experts": (3, 6, 10), "w": (6, 10), "b": (6,)}


def _model(seed=0):
    return {name: _random(shape, seed + index) for index, (name, shape) in enumerate(MODEL_SHAPES.items())}


def _grads(count):
    return [{name: _random(shape, 200 + 10 * t + index) for index, (name, shape) in enumerate(MODEL_SHAPES.items())}
            for t in range(count)]


def _numpy_steps(params, grads, lrs, portable=None, algorithm="asgo"):
    """The NumPy adapter on the model (experts with batch_dims=1), optionally resumed from
    `portable`: (arrays, portable state) after the steps."""
    arrays = {name: np.array(value) for name, value in params.items()}
    optimizer_type, options = (ASGO, OPTIONS) if algorithm == "asgo" else (DASGO, DASGO_OPTIONS)
    optimizer = optimizer_type([{"params": {"experts": arrays["experts"]}, "batch_dims": 1},
                                {"params": {"w": arrays["w"], "b": arrays["b"]}}], lr=0.0, **options)
    if portable is not None:
        optimizer.load_portable_state(portable)
    for lr, grad in zip(lrs, grads):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step(grad)
    return arrays, optimizer.portable_state()


def _torch_steps(params, grads, lrs, portable=None, algorithm="asgo"):
    """torch ASGO/DASGO on the model (experts with batch_dims=1), as _numpy_steps."""
    tensors = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    optimizer_type, options = (TorchASGO, OPTIONS) if algorithm == "asgo" else (TorchDASGO, DASGO_OPTIONS)
    optimizer = optimizer_type([{"params": [tensors["experts"]], "batch_dims": 1},
                                {"params": [tensors["w"], tensors["b"]]}], lr=0.0, **options)
    names = ["experts", "w", "b"]
    if portable is not None:
        optimizer.load_portable_state(portable, names=names)
    for lr, grad in zip(lrs, grads):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grad[name])
        optimizer.step()
    return {name: t.detach().numpy() for name, t in tensors.items()}, optimizer.portable_state(names=names)


def _optax_steps(params, grads, portable):
    """optax asgo() on the model, the experts read as (E, out, in) by weight_dimension_numbers,
    resumed from `portable`; the lr schedule is indexed by optax's own step count."""
    import jax
    import jax.numpy as jnp
    import optax
    from asgo_core.adapters.optax import MuonDimensionNumbers, asgo, portable_state, state_from_portable

    numbers = {"experts": MuonDimensionNumbers(reduction_axis=2, output_axis=1),
               "w": MuonDimensionNumbers(reduction_axis=1, output_axis=0), "b": None}
    with jax_x64():
        tx = asgo(lambda count: jnp.asarray(LRS)[count], weight_dimension_numbers=numbers, **OPTIONS)
        leaves = {name: jnp.asarray(value) for name, value in params.items()}
        state = state_from_portable(portable, leaves, tx, ASGOConfig(**OPTIONS), weight_dimension_numbers=numbers)
        update = jax.jit(tx.update)
        for grad in grads:
            updates, state = update({n: jnp.asarray(g) for n, g in grad.items()}, state, leaves)
            leaves = optax.apply_updates(leaves, updates)
        exported = portable_state(state, leaves, ASGOConfig(**OPTIONS), weight_dimension_numbers=numbers)
        return {name: np.asarray(value) for name, value in leaves.items()}, exported


def _assert_close(actual: dict, expected: dict) -> None:
    for name in expected:
        assert relative_error(actual[name], expected[name]) <= PARITY, name


def _through_file(tmp_path, portable, name):
    save_state(tmp_path / name, portable)
    return load_state(tmp_path / name)


def test_a_portable_entry_of_a_stack_holds_its_matrices_in_order():
    grads = _grads(4)
    _, portable = _numpy_steps(_model(), grads, LRS)
    entry = next(e for e in portable["params"] if e["name"] == "experts")
    assert entry["batch_dims"] == 1
    experts = _model()["experts"]
    for index in range(3):
        alone = ASGO({"w": experts[index].copy()}, lr=0.0, **OPTIONS)
        for lr, grad in zip(LRS, grads):
            alone.param_groups[0]["lr"] = lr
            alone.step({"w": grad["experts"][index]})
        expected = alone.portable_state()["params"][0]["arrays"]
        for key, value in expected.items():
            blocks = value.shape[0] if key.startswith(("gram/", "root/")) else None
            got = entry["arrays"][key][index * blocks:(index + 1) * blocks] if blocks else entry["arrays"][key][index]
            assert relative_error(got, value) <= PARITY, (index, key)


@pytest.mark.parametrize("algorithm", ["asgo", "dasgo"])
@pytest.mark.parametrize("first, second", [(_numpy_steps, _numpy_steps), (_numpy_steps, _torch_steps),
                                           (_torch_steps, _numpy_steps)],
                         ids=["numpy-to-numpy", "numpy-to-torch", "torch-to-numpy"])
def test_a_stack_resumed_from_a_file_equals_twenty_steps(tmp_path, first, second, algorithm):
    params, grads = _model(), _grads(20)
    expected, _ = _torch_steps(params, grads, LRS, algorithm=algorithm)
    halfway, exported = first(params, grads[:10], LRS[:10], algorithm=algorithm)
    resumed, _ = second(halfway, grads[10:], LRS[10:], _through_file(tmp_path, exported, "run.npz"),
                        algorithm=algorithm)
    _assert_close(resumed, expected)


@pytest.mark.parametrize("steps", [_numpy_steps, _torch_steps], ids=["numpy", "torch"])
def test_an_expert_stack_to_optax_and_back_equals_twenty_uninterrupted_steps(tmp_path, steps):
    params, grads = _model(), _grads(20)
    expected, _ = steps(params, grads, LRS)
    halfway, exported = steps(params, grads[:7], LRS[:7])
    in_optax, exported = _optax_steps(halfway, grads[7:14], _through_file(tmp_path, exported, "before.npz"))
    resumed, _ = steps(in_optax, grads[14:], LRS[14:], _through_file(tmp_path, exported, "optax.npz"))
    _assert_close(resumed, expected)


def test_optax_refuses_a_stack_checkpoint_for_a_leaf_read_as_one_matrix():
    import jax.numpy as jnp
    from asgo_core.adapters.optax import MuonDimensionNumbers, asgo, state_from_portable

    _, exported = _numpy_steps(_model(), _grads(1), LRS)
    numbers = {"experts": MuonDimensionNumbers(reduction_axis=(1, 2), output_axis=0),
               "w": MuonDimensionNumbers(reduction_axis=1, output_axis=0), "b": None}
    leaves = {name: jnp.asarray(value, jnp.float32) for name, value in _model().items()}
    tx = asgo(0.01, weight_dimension_numbers=numbers, **OPTIONS)
    with pytest.raises(CheckpointError, match="'experts'.*batch_dims 1 != 0"):
        state_from_portable(exported, leaves, tx, ASGOConfig(**OPTIONS),
                            weight_dimension_numbers=numbers)


def test_a_checkpoint_of_another_batch_dims_is_refused_without_changes():
    source = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1)
    source.step({"w": _random((3, 6, 10), 1)})
    target = ASGO({"w": _random((3, 6, 10), 0)})
    target.step({"w": _random((3, 6, 10), 2)})
    before = target.portable_state()
    with pytest.raises(CheckpointError, match="batch_dims 1 != 0"):
        target.load_portable_state(source.portable_state())
    assert all(np.array_equal(before["params"][0]["arrays"][key], value)
               for key, value in target.portable_state()["params"][0]["arrays"].items())


def test_an_entry_without_batch_dims_reads_as_zero(tmp_path):
    source = ASGO({"w": _random((3, 6, 10), 0)})
    source.step({"w": _random((3, 6, 10), 1)})
    old_format = source.portable_state()
    del old_format["params"][0]["batch_dims"]
    loaded = _through_file(tmp_path, old_format, "old.npz")
    unbatched = ASGO({"w": _random((3, 6, 10), 0)})
    unbatched.load_portable_state(loaded)
    assert unbatched.portable_state()["params"][0]["step"] == 1
    with pytest.raises(CheckpointError, match="batch_dims 0 != 1"):
        ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1).load_portable_state(loaded)


@pytest.mark.parametrize("batch_dims", [2, -1, True, 1.5])
def test_a_checkpoint_with_an_impossible_batch_dims_is_refused_on_load(tmp_path, batch_dims):
    source = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1)
    source.step({"w": _random((3, 6, 10), 1)})
    portable = source.portable_state()
    portable["params"][0]["batch_dims"] = batch_dims
    with pytest.raises(CheckpointError, match="batch_dims"):
        save_state(tmp_path / "bad.npz", portable)
    target = ASGO({"w": _random((3, 6, 10), 0)}, batch_dims=1)
    with pytest.raises(CheckpointError, match="batch_dims"):
        target.load_portable_state(portable)
    assert target.portable_state()["params"][0]["step"] == 0
    assert not np.any(target.portable_state()["params"][0]["arrays"]["momentum"])


def test_torch_matrices_at_different_step_counts_are_stepped_in_separate_buckets():
    """A matrix that missed a step (no gradient) is one step behind its twin: same shape and
    group, but its own bucket, so each is stepped at its own count."""
    first, second = nn.Parameter(torch.randn(6, 9)), nn.Parameter(torch.randn(6, 9))
    optimizer = TorchASGO([first, second])
    first.grad = torch.randn_like(first)
    optimizer.step()
    second.grad = torch.randn_like(second)
    assert [b.handles for b in optimizer.plan_buckets()] == [[first], [second]]
    optimizer.step()
    assert (optimizer.state[first]["step"], optimizer.state[second]["step"]) == (2, 1)
