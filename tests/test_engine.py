"""The adapter engine in asgo_core: the options table, bucket planning, the state codec and the
array-level AdamW, each against an independent statement of what it must do."""

from __future__ import annotations

import dataclasses
import re

import array_api_compat.numpy as xp
import numpy as np
import pytest
import torch

from asgo_core import ASGOConfig, DASGOConfig, adamw, init_state
from asgo_core.buckets import Member, plan_buckets
from asgo_core.layout import PermutedStack
from asgo_core.options import OPTIONS, defaults, group_from, layout_options, spelled, static_args
from asgo_core.state_codec import (concat_named, flat_spec, member_named, named_arrays, split_named,
                                  state_from_member_named, state_from_named)


# ---- the options table ------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, config_type", [("asgo", ASGOConfig), ("dasgo", DASGOConfig)])
def test_every_config_field_is_a_row_with_the_configs_default(algorithm, config_type):
    rows = {row.name for row in OPTIONS if algorithm in row.algorithms}
    fields = {field.name: field.default for field in dataclasses.fields(config_type)}
    assert set(fields) <= rows
    table = defaults(algorithm, "optax")
    for name, default in fields.items():
        spelled_name = {"beta1": "b1", "beta2": "b2"}.get(name, name)
        assert table[spelled_name] == default, name
    assert defaults(algorithm)["betas"] == (fields["beta1"], fields["beta2"])


def test_static_args_are_per_algorithm():
    """DASGO's set holds only options dasgo() takes (optax.inject_hyperparams refuses others)."""
    assert {"b1", "b2", "eps", "update_rms"} <= set(static_args("dasgo")) < set(static_args("asgo"))
    asgo_only = {"precondition_frequency", "num_heads", "max_precond_dim", "matmul_dtype"}
    assert asgo_only <= set(static_args("asgo")) and not asgo_only & set(static_args("dasgo"))
    assert set(static_args("dasgo")) <= set(defaults("dasgo", "optax"))


def test_layout_options():
    assert set(layout_options("asgo")) == {"side", "max_precond_dim", "num_heads", "batch_dims"}
    assert layout_options("dasgo") == ("batch_dims",)


@pytest.mark.parametrize("adapter", ["asgo_core.adapters.torch", "asgo_core.adapters.cupy"])
def test_an_optimizer_shows_its_options_and_a_subclass_with_its_own_init_shows_that(adapter):
    import importlib
    import inspect
    module = importlib.import_module(adapter)
    positional = ["params", "lr", "betas"] if adapter.endswith("torch") else ["params", "lr"]
    for optimizer_class, algorithm in ((module.ASGO, "asgo"), (module.DASGO, "dasgo")):
        parameters = inspect.signature(optimizer_class).parameters
        assert list(parameters) == positional + [name for name in defaults(algorithm) if name not in positional]
        assert {name: parameters[name].default for name in defaults(algorithm)} == defaults(algorithm)

    class Scaled(module.ASGO):
        def __init__(self, params, scale=2.0):
            super().__init__(params, lr=0.1 * scale)

    class Renamed(module.DASGO):
        pass

    assert list(inspect.signature(Scaled).parameters) == ["params", "scale"]
    assert inspect.signature(Renamed) == inspect.signature(module.DASGO)


def test_messages_are_spelled_in_the_callers_names():
    message = "betas=(1.5, 0.9) is invalid; adamw_betas=(0.9, 1.0) too; beta2=1.0; lr=-1; eps=-1"
    assert spelled(message, "keras") == ("(beta_1, beta_2)=(1.5, 0.9) is invalid; (adam_beta_1, adam_beta_2)="
                                         "(0.9, 1.0) too; beta_2=1.0; learning_rate=-1; epsilon=-1")
    assert spelled(message, "optax").endswith("b2=1.0; learning_rate=-1; eps=-1")
    assert spelled(message, "torch") == message


def test_group_from_a_frameworks_spelling_pairs_the_betas():
    group = group_from({"beta_1": 0.5, "adam_beta_2": 0.99, "epsilon": 1e-3}, "keras", "asgo")
    assert group["betas"] == (0.5, ASGOConfig.beta2) and group["adamw_betas"] == (0.9, 0.99)
    assert group["eps"] == 1e-3 and "beta1" not in group and group["maximize"] is False
    assert group_from({"betas": (0.1, 0.2)}, "torch", "dasgo")["betas"] == (0.1, 0.2)


# ---- buckets --------------------------------------------------------------------------------------
def test_buckets_group_by_matrix_shape_and_key_and_round_trip():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((8, 6)), "b": rng.standard_normal((2, 4, 6)),
              "c": rng.standard_normal((8, 6)), "d": rng.standard_normal((6, 5))}
    members = [Member("a", PermutedStack.outputs_last((8, 6))),
               Member("b", PermutedStack.outputs_first((2, 4, 6), 1)),
               Member("c", PermutedStack.outputs_last((8, 6))),
               Member("d", PermutedStack.outputs_first((6, 5)))]
    buckets = plan_buckets(members, lambda member: (member.handle == "d",))
    assert [bucket.handles for bucket in buckets] == [["a", "c"], ["b"], ["d"]]
    assert buckets[0].matrix_shape == (6, 8) and buckets[1].counts == [2]
    stack = buckets[0].gather([arrays["a"], arrays["c"]], xp)
    np.testing.assert_array_equal(stack, np.stack([arrays["a"].T, arrays["c"].T]))
    for original, back in zip((arrays["a"], arrays["c"]), buckets[0].scatter(stack, xp)):
        np.testing.assert_array_equal(back, original)
    np.testing.assert_array_equal(buckets[1].gather([arrays["b"]], xp), arrays["b"])
    renamed = buckets[0].mapped({"c": "c2"})
    assert renamed.key == buckets[0].key and renamed.handles == ["c2"] and renamed.views == [members[2].view]
    kept = buckets[0].only(lambda handle: handle != "a")
    assert kept.key == buckets[0].key and kept.handles == ["c"] and kept.views == [members[2].view]


def test_permuted_stack_from_axes_reads_any_layout():
    x = np.arange(3 * 5 * 7 * 2, dtype=float).reshape(3, 5, 7, 2)
    view = PermutedStack.from_axes(x.shape, input_axes=(1, -1), output_axes=2)  # batch axis 0
    assert view.stack_shape == (3, 7, 10) and view.batch_dims == 1
    stack = view.to_stack(x, xp)
    for matrix in range(3):
        for out in range(7):
            np.testing.assert_array_equal(stack[matrix, out], x[matrix, :, out, :].reshape(-1))
    np.testing.assert_array_equal(view.from_stack(stack, xp), x)
    assert PermutedStack.from_axes((4, 6), 0, 1) == PermutedStack.outputs_last((4, 6))


@pytest.mark.parametrize("shape, inputs, outputs, message", [
    ((8,), 0, 0, "fewer than 2 axes"),
    ((4, 6), 0, (0, 1), "disjoint, non-empty"),
    ((4, 6), (), 1, "disjoint, non-empty"),
    ((0, 4, 6), 1, 2, r"zero-size matrix stack \(0, 6, 4\)"),
])
def test_permuted_stack_from_axes_refuses_what_is_no_matrix_stack(shape, inputs, outputs, message):
    with pytest.raises(ValueError, match=message):
        PermutedStack.from_axes(shape, inputs, outputs)


# ---- state codec ----------------------------------------------------------------------------------
def test_state_codec_round_trips_and_splits_by_matrix_counts():
    config = ASGOConfig(max_precond_dim=4)
    state = init_state(np.zeros((3, 6, 10)), config)
    rng = np.random.default_rng(1)
    state = state_from_named(type(state), {name: rng.standard_normal(a.shape).astype(a.dtype)
                                           for name, a in named_arrays(state).items()}, state.count)
    named = named_arrays(state)
    assert list(named) == ["momentum", "gram/0", "gram/1", "root/0", "root/1", "skipped", "fallbacks"]
    assert [(name, shape) for name, shape, _ in flat_spec(state)][1] == ("gram/0", (3, 4, 4))
    rebuilt = state_from_named(type(state), named, state.count)
    assert all(np.array_equal(a, b) for a, b in zip(named_arrays(rebuilt).values(), named.values()))
    first, second = split_named(named, [1, 2])
    assert first["momentum"].shape == (1, 6, 10) and second["gram/0"].shape == (2, 4, 4)
    np.testing.assert_array_equal(second["gram/1"], named["gram/1"][1:])
    joined = concat_named([first, second], xp)
    assert all(np.array_equal(joined[name], named[name]) for name in named)


def test_member_named_keeps_each_momentum_in_its_members_shape():
    """A parameter-shaped state (optax): members' named arrays ↔ the stack's core state."""
    views = [PermutedStack.from_axes((6, 4), 0, 1), PermutedStack.from_axes((2, 6, 4), 1, 2)]
    rng = np.random.default_rng(3)
    state = init_state(np.zeros((3, 4, 6)), ASGOConfig())
    state = state_from_named(type(state), {name: rng.standard_normal(a.shape).astype(a.dtype)
                                           for name, a in named_arrays(state).items()}, state.count)
    members = member_named(state, views, xp)
    momentum = named_arrays(state)["momentum"]
    np.testing.assert_array_equal(members[0]["momentum"], momentum[0].T)
    np.testing.assert_array_equal(members[1]["momentum"], np.swapaxes(momentum[1:], 1, 2))
    np.testing.assert_array_equal(members[1]["gram/0"], named_arrays(state)["gram/0"][1:])
    rebuilt = state_from_member_named(type(state), members, views, state.count, xp)
    assert all(np.array_equal(a, b)
               for a, b in zip(named_arrays(rebuilt).values(), named_arrays(state).values()))


# ---- AdamW ----------------------------------------------------------------------------------------
def test_adamw_step_is_torch_adamw_and_skips_a_non_finite_gradient():
    rng = np.random.default_rng(2)
    start = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(4)]
    grads[2] = grads[2].copy()
    grads[2][1] = np.nan
    param = torch.nn.Parameter(torch.tensor(start))
    reference = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    state, value, taken = adamw.zero_state(start, xp), start.copy(), 0
    for grad in grads:
        hyper = adamw.hyperparameters(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05, step=taken + 1)
        before = value
        value, state = adamw.adamw_step(value, grad, state, xp, **hyper)
        if not np.all(np.isfinite(grad)):
            assert int(state["skipped"]) == 1
            np.testing.assert_array_equal(value, before)
            continue
        taken += 1
        param.grad = torch.tensor(grad)
        reference.step()
        np.testing.assert_allclose(value, param.detach().numpy(), rtol=1e-14, atol=1e-15)


def _group(**overrides):
    return dict(defaults("asgo"), **overrides)


def test_group_settings_gives_each_algorithms_config_and_adamws_options():
    from asgo_core.options import group_settings
    settings = group_settings(_group(lr=0.5, betas=(0.8, 0.9), adamw_eps=1e-6), ("asgo", "dasgo"))
    assert settings["configs"]["asgo"] == ASGOConfig(beta1=0.8, beta2=0.9)
    assert (settings["configs"]["dasgo"].beta1, settings["configs"]["dasgo"].beta2) == (0.8, 0.9)
    assert settings["adamw"] == {"lr": 0.5, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.0}
    assert group_settings(_group(lr=0.5, adamw_lr=0.1), ("dasgo",))["adamw"]["lr"] == 0.1
    with pytest.raises(ValueError, match="batch_dims=-1 is invalid"):
        group_settings(_group(batch_dims=-1), ("asgo",))
    with pytest.raises(ValueError, match="adamw_eps=-1.0 is invalid"):
        group_settings(_group(adamw_eps=-1.0), ("asgo",))


def test_algorithm_of_follows_the_option_then_the_dims():
    from asgo_core.options import algorithm_of
    assert algorithm_of(2, _group(), "dasgo") == "dasgo"
    assert algorithm_of(1, _group(), "asgo") == "adamw"
    assert algorithm_of(3, _group(algorithm="adamw"), "asgo") == "adamw"


def test_check_param_shape_refuses_what_a_matrix_algorithm_cannot_step():
    from asgo_core.options import check_param_shape
    check_param_shape((4,), _group(), "adamw")
    check_param_shape((2, 8, 6), _group(batch_dims=1, num_heads=2), "asgo")
    with pytest.raises(ValueError, match="algorithm='dasgo' is invalid.*shape \\(4,\\)"):
        check_param_shape((4,), _group(), "dasgo")
    with pytest.raises(ValueError, match="batch_dims=1 is invalid for a parameter of shape \\(8, 6\\)"):
        check_param_shape((8, 6), _group(batch_dims=1), "asgo")
    with pytest.raises(ValueError, match="num_heads"):
        check_param_shape((8, 6), _group(num_heads=5), "asgo")


def test_group_settings_refuses_an_algorithm_the_optimizer_lacks():
    from asgo_core.options import group_settings
    accepted = "algorithm='asgo' is invalid; accepted: None | 'dasgo' | 'adamw'"
    with pytest.raises(ValueError, match=re.escape(accepted)):
        group_settings(_group(algorithm="asgo"), ("dasgo",))


def test_layout_of_reads_the_layout_options_and_none_where_a_group_lacks_one():
    from asgo_core.options import layout_of
    assert layout_of(_group(side="left", num_heads=2)) == ("left", None, 2, 0)
    assert layout_of({"batch_dims": 1}) == (None, None, None, 1)


def test_check_keywords_names_the_unknown_ones():
    from asgo_core.options import check_keywords
    check_keywords("ASGO", {"lr": 0.1}, defaults("asgo"))
    with pytest.raises(TypeError, match=r"ASGO\(\) got unexpected keyword arguments \['learning_rate'\]"):
        check_keywords("ASGO", {"learning_rate": 0.1}, defaults("asgo"))
