"""The per-parameter state plumbing of asgo_core that adapters keeping state per parameter use:
member_states / stacked_state (asgo_core.state_codec), the checks of a saved entry
(asgo_core.saved_state) and of saved param groups, options and parameter shapes
(asgo_core.options), each against a statement written here of what it must do."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from asgo_core import FALLBACK_LEVELS, ASGOConfig, DASGOConfig, init_state
from asgo_core.options import (bound_options, check_learning_rate, check_param_shape, defaults,
                               loaded_groups)
from asgo_core.saved_state import loaded_state
from asgo_core.state_codec import member_states, named_arrays, stacked_state, state_from_named


def _numbered_state(config, stack_shape):
    """A core state whose every array holds distinct numbers, so a misplaced row shows."""
    state = init_state(np.zeros(stack_shape), config)
    named = {name: (np.arange(array.size) + 1000 * index).reshape(array.shape).astype(array.dtype)
             for index, (name, array) in enumerate(named_arrays(state).items())}
    return state_from_named(type(state), named, state.count)


# ---- member_states / stacked_state ------------------------------------------------------------
def test_member_states_give_each_member_its_rows_with_its_batch_shape():
    state = _numbered_state(ASGOConfig(max_precond_dim=4), (1 + 3 * 2, 6, 10))
    plain, experts = member_states(state, [1, 6], [(), (3, 2)], np.reshape)
    assert plain["momentum"].shape == (6, 10) and experts["momentum"].shape == (3, 2, 6, 10)
    np.testing.assert_array_equal(experts["momentum"][1, 0], state.momentum[1 + 2])
    assert experts["skipped"].shape == (3, 2) and experts["fallbacks"].shape == (3, 2, len(FALLBACK_LEVELS))
    assert len(plain["gram"]) == len(state.gram) == 2  # one array per block group, in group order
    rows = state.gram[1].shape[0] // 7  # blocks of one matrix in block group 1
    np.testing.assert_array_equal(experts["gram"][1], state.gram[1][rows:])
    np.testing.assert_array_equal(plain["root"][0], state.root[0][:state.root[0].shape[0] // 7])


@pytest.mark.parametrize("config", [ASGOConfig(max_precond_dim=4), DASGOConfig()])
def test_stacked_state_inverts_member_states_and_ignores_other_keys(config):
    state = _numbered_state(config, (10, 6, 10))
    members = member_states(state, [4, 6], [(2, 2), (3, 2)], np.reshape)
    for member in members:
        member["step"] = 7  # an adapter's own key beside the state's fields
    joined = []

    def join(arrays, item_shape):
        joined.append(item_shape)
        return np.concatenate([np.reshape(array, (-1, *item_shape)) for array in arrays])

    rebuilt = stacked_state(type(state), members, 2, state.count, join)
    assert type(rebuilt) is type(state) and rebuilt.count is state.count
    for name, array in named_arrays(state).items():
        np.testing.assert_array_equal(named_arrays(rebuilt)[name], array, err_msg=name)
    assert (6, 10) in joined and () in joined  # momentum and skipped lose their batch dims only


# ---- saved_state.loaded_state ---------------------------------------------------------------------
_TEMPLATE = {"momentum": np.zeros((2, 3), np.float32), "gram": [np.zeros((1, 3, 3), np.float32)],
             "skipped": np.zeros((), np.int32)}


def _entry(**changes):
    entry = {"momentum": np.ones((2, 3)), "gram": [np.ones((1, 3, 3))], "skipped": np.array(4), "step": 5}
    entry.update(changes)
    return entry


def _load(entry, integer_step=True):
    return loaded_state(entry, _TEMPLATE, "asgo", "param 0", array_type=np.ndarray,
                        convert=lambda value, like: value.astype(like.dtype), integer_step=integer_step)


def test_a_saved_entry_loads_converted_to_the_templates_dtypes():
    state = _load(_entry(step=np.array(5)))
    assert state["step"] == 5 and isinstance(state["step"], int)
    assert state["momentum"].dtype == np.float32 and state["gram"][0].dtype == np.float32
    assert state["skipped"] == 4 and state["skipped"].dtype == np.int32


@pytest.mark.parametrize("changes, message", [
    ({"extra": np.zeros(1)}, r"state fields .* are not asgo's"),
    ({"momentum": np.ones((3, 2))}, r"param 0: state field 'momentum': a float64 ndarray of shape \(3, 2\)"),
    ({"momentum": np.ones((2, 3), complex)}, "complex128"),
    ({"skipped": np.array(4.0)}, r"'skipped': a float64 ndarray"),
    ({"gram": np.ones((1, 3, 3))}, "a list of 1 block arrays"),
    ({"gram": [np.ones((1, 3, 3), np.int64)]}, r"'gram'\[0\]"),
    ({"momentum": [[1.0] * 3] * 2}, "a list"),
    ({"step": 1.5}, r"'step'=1.5 is invalid; accepted: an integer >= 0"),
    ({"step": -1}, "an integer >= 0"),
    ({"step": True}, "an integer >= 0"),
    ({"step": np.array(2.0)}, "an integer >= 0"),
])
def test_a_damaged_entry_is_refused_naming_the_parameter_and_field(changes, message):
    with pytest.raises(ValueError, match=message):
        _load(_entry(**changes))


def test_a_number_step_takes_floats_but_not_nan_or_complex():
    assert _load(_entry(step=np.array(2.5)), integer_step=False)["step"] == 2.5
    for step in (float("nan"), np.array(1 + 1j)):
        with pytest.raises(ValueError, match="a number >= 0"):
            _load(_entry(step=step), integer_step=False)


# ---- options: bound_options, check_learning_rate, check_param_shape ---------
def test_bound_options_fill_defaults_and_name_the_caller_on_a_bad_call():
    accepted = inspect.Signature([inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                  inspect.Parameter("lr", inspect.Parameter.KEYWORD_ONLY, default=0.5)])
    assert bound_options(accepted, "Opt", ([1],), {}) == {"params": [1], "lr": 0.5}
    with pytest.raises(TypeError, match=r"Opt\(\): .*'bogus'.*; accepted: params, lr"):
        bound_options(accepted, "Opt", ([1],), {"bogus": 1})


@pytest.mark.parametrize("lr", [0.0, 3, np.float64(0.1), np.array(0.1), np.array([0.1], np.float32)])
def test_a_learning_rate_may_be_a_number_or_a_one_element_float_array(lr):
    check_learning_rate("lr", lr)


@pytest.mark.parametrize("lr", [-0.1, float("inf"), True, "0.1", np.array([0.1, 0.2]), np.array(1),
                                np.array(-0.5)])
def test_a_bad_learning_rate_is_refused_by_name(lr):
    with pytest.raises(ValueError, match="lr="):
        check_learning_rate("lr", lr)


@pytest.mark.parametrize("shape, algorithm, options, message", [
    ((4,), "asgo", {}, r"algorithm='asgo' is invalid; accepted: 'adamw' or None for a parameter of shape"),
    ((0, 4), "dasgo", {}, "zero"),
    ((2, 3, 4), "asgo", {"batch_dims": 2}, "batch_dims"),
    ((6, 4), "asgo", {"num_heads": 4}, "num_heads"),
    ((6, 4), "asgo", {"side": "sideways"}, "side"),
])
def test_check_param_shape_refuses_what_the_matrix_algorithms_cannot_step(shape, algorithm, options, message):
    group = {**defaults("asgo"), **options}
    with pytest.raises(ValueError, match=message):
        check_param_shape(shape, group, algorithm)


def test_check_param_shape_passes_what_they_can():
    group = {**defaults("asgo"), "num_heads": 2, "batch_dims": 1}
    check_param_shape((3, 6, 4), group, "asgo")
    check_param_shape((5,), group, "adamw")


# ---- options.loaded_groups --------------------------------------------------------------------
def test_loaded_groups_put_copies_of_the_saved_options_over_the_groups():
    params = [object(), object()]
    groups = [{"params": params, "lr": 0.1, "betas": (0.9, 0.8)}]
    saved = [{"params": [0, 1], "lr": 0.2, "betas": [0.5, 0.6]}]
    checked = []
    merged = loaded_groups(groups, saved, lambda group, index: checked.append(index))
    assert merged == [{"params": params, "lr": 0.2, "betas": [0.5, 0.6]}] and checked == [0]
    assert merged[0]["betas"] is not saved[0]["betas"] and groups[0]["lr"] == 0.1


@pytest.mark.parametrize("saved, message", [
    ([], r"state_dict\['param_groups'\]=.*0 groups"),
    ([{"params": [0]}], r"state_dict\['param_groups'\]\[0\]\['params'\]=.*1 parameters"),
])
def test_loaded_groups_refuse_other_counts(saved, message):
    with pytest.raises(ValueError, match=message):
        loaded_groups([{"params": [object(), object()]}], saved, lambda group, index: None)


def test_loaded_groups_pass_on_the_validators_error():
    def validate(group, index):
        raise ValueError(f"group {index}: lr={group['lr']} is invalid")

    with pytest.raises(ValueError, match="group 0: lr=-1"):
        loaded_groups([{"params": [], "lr": 0.1}], [{"params": [], "lr": -1}], validate)
