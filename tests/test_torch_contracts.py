"""The torch adapter's fail-safe contract: all-or-nothing steps, loads checked before anything
changes, torch.compile with inductor, any memory format, state on the parameter's device."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asgo_core.adapters.torch import ASGO, DASGO
from helpers.device_tracking import DevicelessFactories


def _snapshot(optimizer, params):
    return copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in params]


def _assert_unchanged(optimizer, params, snapshot):
    saved, values = snapshot
    for param, value in zip(params, values):
        assert torch.equal(param.detach(), value)
    _assert_same(optimizer.state_dict(), saved)


def _assert_same(actual, expected):
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert actual == expected


def _three_params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(4, 12)), nn.Parameter(torch.randn(6))]


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:]}]


def _stepped(optimizer_type=ASGO, steps=2, **options):
    params = _three_params()
    optimizer = optimizer_type(_groups(params), **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return params, optimizer


# ---- all-or-nothing steps ----------------------------------------------------------------------
@pytest.mark.parametrize("nan_in", [0, 1, 2], ids=["first matrix", "second matrix", "bias"])
@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_nonfinite_raise_changes_nothing_wherever_the_nan_is(optimizer_type, nan_in):
    """After two good steps (so momentum is not zero), a NaN in any one gradient raises and
    leaves every parameter and all state, AdamW's included, bitwise as it was."""
    params, optimizer = _stepped(optimizer_type, nonfinite="raise")
    for p in params:
        p.grad = torch.randn_like(p)
    params[nan_in].grad.view(-1)[3] = float("nan")
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.step()
    _assert_unchanged(optimizer, params, snapshot)


@pytest.mark.parametrize("bad_grad, message", [
    (lambda p: torch.randn_like(p).to_sparse(), "sparse"),
    (lambda p: torch.randn(p.shape, dtype=torch.complex64), "complex64"),
    (lambda p: torch.randn(p.shape, dtype=torch.float64), "float64"),
])
def test_a_bad_gradient_in_a_later_group_changes_nothing(bad_grad, message):
    """The bias (group 1, AdamW) and the matrices (group 0) have good gradients; the bad one
    is in group 1: nothing moves."""
    params, optimizer = _stepped()
    extra = nn.Parameter(torch.randn(5, 7))
    optimizer.add_param_group({"params": [extra]})
    for p in params:
        p.grad = torch.randn_like(p)
    extra.grad_dtype = None  # torch then accepts a gradient of any dtype
    extra.grad = bad_grad(extra)
    snapshot = _snapshot(optimizer, params + [extra])
    with pytest.raises(RuntimeError, match=rf"param_groups\[2\]\['params'\]\[0\].*{message}"):
        optimizer.step()
    _assert_unchanged(optimizer, params + [extra], snapshot)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_parameters_step_cannot_write_are_refused_at_construction(dtype):
    bad = torch.zeros(4, 5, dtype=dtype)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*dtype"):
        ASGO([nn.Parameter(torch.randn(4, 5)), bad])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3, 0, 2)])
def test_zero_size_matrices_are_refused_naming_the_parameter(shape):
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*zero-size"):
        ASGO([nn.Parameter(torch.zeros(shape))])


def test_a_zero_size_parameter_can_take_adamw():
    param = nn.Parameter(torch.zeros(0, 5))
    optimizer = ASGO([param], algorithm="adamw")
    param.grad = torch.zeros_like(param)
    optimizer.step()


# ---- loads ---------------------------------------------------------------------------------
def _adamw_state_dict(params):
    adamw = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    for p in params:
        p.grad = torch.randn_like(p)
    adamw.step()
    return adamw.state_dict()


def _other_shapes_state_dict():
    torch.manual_seed(1)
    other = [nn.Parameter(torch.randn(6, 11)), nn.Parameter(torch.randn(4, 12)), nn.Parameter(torch.randn(6))]
    _, optimizer = _stepped()
    optimizer = ASGO([{"params": other[:2]}, {"params": other[2:]}])
    for p in other:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer.state_dict()


def _dasgo_state_dict():
    return _stepped(DASGO)[1].state_dict()


def _with_group_option(name, value):
    def make():
        saved = _stepped()[1].state_dict()
        saved["param_groups"][0][name] = value
        return saved
    return make


def _with_state_field(index, key, value):
    def make():
        saved = _stepped()[1].state_dict()
        saved["state"][index][key] = value
        return saved
    return make


def _without_group():
    saved = _stepped()[1].state_dict()
    saved["param_groups"] = saved["param_groups"][:1]
    return saved


BAD_LOADS = [
    ("torch.optim.AdamW's state", lambda: _adamw_state_dict(_three_params()), r"params'\]\[0\].*adamw|asgo"),
    ("DASGO state into ASGO", _dasgo_state_dict, r"params'\]\[0\].*asgo"),
    ("state for other shapes", _other_shapes_state_dict, r"params'\]\[0\].*momentum"),
    ("precondition_frequency=0", _with_group_option("precondition_frequency", 0), "precondition_frequency"),
    ("update_rms=True", _with_group_option("update_rms", True), "update_rms"),
    ("num_heads not dividing", _with_group_option("num_heads", 4), "num_heads"),
    ("a missing group", _without_group, "param_groups"),
    ("momentum of another shape", _with_state_field(0, "momentum", torch.zeros(10, 6)), "momentum"),
    ("integer momentum", _with_state_field(0, "momentum", torch.zeros(6, 10, dtype=torch.int64)), "momentum"),
    ("gram blocks missing", _with_state_field(1, "gram", []), "gram"),
    ("negative step", _with_state_field(0, "step", -1), "step"),
    ("AdamW exp_avg of another shape", _with_state_field(2, "exp_avg", torch.zeros(7)), "exp_avg"),
]


@pytest.mark.parametrize("make_bad", [b[1] for b in BAD_LOADS], ids=[b[0] for b in BAD_LOADS])
def test_a_bad_state_dict_raises_and_changes_nothing(make_bad):
    bad = make_bad()
    params, optimizer = _stepped()
    snapshot = _snapshot(optimizer, params)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    with pytest.raises(ValueError) as error:
        optimizer.load_state_dict(bad)
    assert "accepted" in str(error.value)
    _assert_unchanged(optimizer, params, snapshot)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    for p in params:  # and it still steps
        p.grad = torch.randn_like(p)
    optimizer.step()


def test_an_adamw_step_saved_as_a_number_loads_as_torch_adamw_loads_it():
    params, optimizer = _stepped()
    saved = optimizer.state_dict()
    saved["state"][2]["step"] = int(saved["state"][2]["step"].item())  # an older file's int
    reference = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    step = optimizer.state[params[2]]["step"]
    assert isinstance(step, torch.Tensor) and step.device.type == "cpu"
    _assert_same(optimizer.state_dict(), reference)
    params[2].grad = torch.randn_like(params[2])
    optimizer.step()


# ---- load hooks and entries of no parameter: what torch.optim.AdamW does --------------------
# Each check runs the same steps on torch.optim.AdamW and on ASGO/DASGO and compares what the two
# show, so the expected behaviour is torch's own.
MATRIX_OPTIMIZERS = [ASGO, DASGO]


def _what_a_load_pre_hook_gets(optimizer_type):
    _, optimizer = _stepped(optimizer_type)
    saved, received = optimizer.state_dict(), []
    optimizer.register_load_state_dict_pre_hook(lambda opt, state_dict: received.append((opt, state_dict)))
    optimizer.load_state_dict(saved)
    (hook_optimizer, state_dict), = received
    return {"the optimizer": hook_optimizer is optimizer, "a copy of the dict": state_dict is not saved,
            "the saved state": state_dict["state"] is saved["state"],
            "the saved groups": state_dict["param_groups"] is saved["param_groups"],
            "state entries": sorted(state_dict["state"])}


@pytest.mark.parametrize("optimizer_type", MATRIX_OPTIMIZERS)
def test_a_load_pre_hook_gets_the_saved_dict_as_with_torch_adamw(optimizer_type):
    assert _what_a_load_pre_hook_gets(optimizer_type) == _what_a_load_pre_hook_gets(torch.optim.AdamW)


def _loaded_through_a_replacing_pre_hook(optimizer_type):
    """(lr of each group, step of each parameter) after a load whose pre-hook returns another
    run's state (three steps instead of one) with lr 0.5."""
    params, optimizer = _stepped(optimizer_type, steps=1)
    other_run = _stepped(optimizer_type, steps=3)[1].state_dict()
    optimizer.register_load_state_dict_pre_hook(lambda opt, state_dict: {
        "state": other_run["state"], "param_groups": [{**g, "lr": 0.5} for g in other_run["param_groups"]]})
    optimizer.load_state_dict(optimizer.state_dict())
    return ([group["lr"] for group in optimizer.param_groups],
            [int(optimizer.state[p]["step"]) for p in params])


@pytest.mark.parametrize("optimizer_type", MATRIX_OPTIMIZERS)
def test_what_a_load_pre_hook_returns_is_loaded_as_with_torch_adamw(optimizer_type):
    assert _loaded_through_a_replacing_pre_hook(optimizer_type) == \
        _loaded_through_a_replacing_pre_hook(torch.optim.AdamW)


@pytest.mark.parametrize("optimizer_type", [torch.optim.AdamW, *MATRIX_OPTIMIZERS])
def test_the_load_checks_what_the_pre_hooks_return(optimizer_type):
    """A dict that lacks a group loads when a pre-hook restores it; a good dict a pre-hook
    spoils is refused, and nothing changes (torch.optim.AdamW first, as the reference)."""
    params, optimizer = _stepped(optimizer_type)
    saved = optimizer.state_dict()
    repair = optimizer.register_load_state_dict_pre_hook(
        lambda opt, state_dict: {**state_dict, "param_groups": saved["param_groups"]})
    optimizer.load_state_dict({**saved, "param_groups": saved["param_groups"][:1]})
    repair.remove()
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, state_dict: {**state_dict, "param_groups": state_dict["param_groups"][:1]})
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(ValueError, match="group"):
        optimizer.load_state_dict(saved)
    _assert_unchanged(optimizer, params, snapshot)


def _what_a_load_post_hook_sees(optimizer_type):
    """(lr, each parameter's step) in the optimizer as a post-hook sees it, loading a two-step
    state with lr 0.02 into a fresh optimizer."""
    params, optimizer = _stepped(optimizer_type, lr=0.02)
    fresh, seen = optimizer_type(_groups(params)), []
    fresh.register_load_state_dict_post_hook(lambda opt: seen.append(
        (opt.param_groups[0]["lr"], [int(opt.state[p]["step"]) for p in params if p in opt.state])))
    fresh.load_state_dict(optimizer.state_dict())
    return seen


@pytest.mark.parametrize("optimizer_type", MATRIX_OPTIMIZERS)
def test_a_load_post_hook_sees_the_loaded_state_as_with_torch_adamw(optimizer_type):
    assert _what_a_load_post_hook_sees(optimizer_type) == _what_a_load_post_hook_sees(torch.optim.AdamW)


def _entry_of_no_parameter_after_a_round_trip(optimizer_type):
    params, optimizer = _stepped(optimizer_type)
    optimizer.state["ema"] = {"decay": 0.999, "updates": torch.tensor(7)}
    resumed = optimizer_type(_groups(params))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return resumed.state.get("ema")


@pytest.mark.parametrize("optimizer_type", MATRIX_OPTIMIZERS)
def test_a_state_entry_of_no_parameter_survives_a_round_trip_as_with_torch_adamw(optimizer_type):
    expected = _entry_of_no_parameter_after_a_round_trip(torch.optim.AdamW)
    assert expected is not None
    _assert_same(_entry_of_no_parameter_after_a_round_trip(optimizer_type), expected)


# ---- layouts -------------------------------------------------------------------------------
def test_channels_last_conv_weights_step_like_contiguous_ones():
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    grads = [torch.randn(8, 3, 3, 3, dtype=torch.float64) for _ in range(3)]
    contiguous = nn.Parameter(weight.clone())
    channels_last = nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    opt_a, opt_b = ASGO([contiguous]), ASGO([channels_last])
    for grad in grads:
        contiguous.grad = grad.clone()
        channels_last.grad = grad.clone().to(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(channels_last.detach(), contiguous.detach(), rtol=0, atol=1e-13)


def test_a_non_contiguous_gradient_steps_like_its_contiguous_copy():
    torch.manual_seed(0)
    weight = torch.randn(6, 10)
    grad = torch.randn(10, 6).t()
    a, b = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    opt_a, opt_b = ASGO([a]), ASGO([b])
    a.grad, b.grad = grad, grad.contiguous()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a.detach(), b.detach())


# ---- devices ---------------------------------------------------------------------------------
def test_every_state_tensor_is_on_its_parameters_device_and_created_there():
    params, optimizer = _stepped(steps=1)
    for p in params:
        p.grad = torch.randn_like(p)
    with DevicelessFactories() as factories:
        optimizer.step()
    assert factories.calls == []
    for param in params:
        for key, value in optimizer.state[param].items():
            tensors = value if isinstance(value, list) else [value]
            for tensor in (t for t in tensors if isinstance(t, torch.Tensor)):
                expected = "cpu" if key == "step" else param.device.type  # AdamW's step: CPU, as torch
                assert tensor.device.type == expected, key


# ---- torch.compile with the default backend (inductor) ---------------------------------------
def _regression_problem():
    torch.manual_seed(0)
    inputs, targets = torch.randn(32, 12), torch.randn(32, 4)

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    return inputs, targets, model


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _compiled_against_eager(what, steps, **options):
    """(final eager params, final compiled params, graphs compiled so far after each step)."""
    inputs, targets, make_model = _regression_problem()
    eager_model, compiled_model = make_model(), make_model()
    eager = ASGO(eager_model.parameters(), **options)
    compiled = ASGO(compiled_model.parameters(), **options)

    def train_step(model, optimizer):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss

    compiled_step = torch.compile(compiled.step) if what == "opt.step" else None
    compiled_train_step = torch.compile(train_step) if what == "train step" else None
    graphs_after = []
    for _ in range(steps):
        train_step(eager_model, eager)
        if compiled_step is not None:
            compiled.zero_grad()
            nn.functional.mse_loss(compiled_model(inputs), targets).backward()
            compiled_step()
        else:
            compiled_train_step(compiled_model, compiled)
        graphs_after.append(_frames_compiled())
    return list(eager_model.parameters()), list(compiled_model.parameters()), graphs_after


@pytest.mark.parametrize("what", ["opt.step", "train step"])
def test_inductor_compiled_steps_equal_eager_without_recompiling(what):
    """Seven steps at τ = 2 (refresh and non-refresh steps), float32: the compiled run equals
    eager within float32 rounding, and from the fifth step on no new graph is compiled (the
    first four compile the fresh-state and step-1 variants, then the step count becomes
    symbolic: one graph for refresh steps, one for the others). Then a second optimizer with
    other options, compiled in the same process (dynamo's caches now hold the first one's
    graphs), must still equal its eager run."""
    torch._dynamo.reset()
    eager, compiled, graphs_after = _compiled_against_eager(what, 7, lr=0.02, precondition_frequency=2)
    assert graphs_after[3] == graphs_after[-1], graphs_after
    for expected, actual in zip(eager, compiled):
        assert torch.allclose(actual, expected, rtol=0, atol=1e-5)
    eager, compiled, _ = _compiled_against_eager(what, 5, lr=0.05, betas=(0.95, 0.9), weight_decay=0.0,
                                                 precondition_frequency=3)
    for expected, actual in zip(eager, compiled):
        assert torch.allclose(actual, expected, rtol=0, atol=1e-5)


def test_a_bool_option_is_refused_even_after_its_number_was_cached():
    """True == 1 and hashes alike: a cached valid config for 1 must not answer for True."""
    ASGO([nn.Parameter(torch.randn(4, 5))], precondition_frequency=1)
    with pytest.raises(ValueError, match="precondition_frequency=True"):
        ASGO([nn.Parameter(torch.randn(4, 5))], precondition_frequency=True)


@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_a_step_traces_as_one_graph_without_breaks(optimizer_type):
    """A graph break splits the step into frames compiled and cached separately; keeping the
    step whole keeps those caches out of the way (see the inductor test for the values)."""
    params, optimizer = _stepped(optimizer_type, steps=1)
    for p in params:
        p.grad = torch.randn_like(p)
    explanation = torch._dynamo.explain(optimizer.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
