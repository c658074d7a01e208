"""asgo_core.keyed: param groups of keyed arrays and the checks of a step's gradients."""

from __future__ import annotations

import numpy as np
import pytest

from asgo_core.keyed import (check_finite, check_grad, check_param, keyed_grads, nonfinite_keys,
                             split_groups)


def test_split_groups_keys_dicts_by_name_and_lists_by_position_across_groups():
    a, b, c = np.ones(2), np.ones(3), np.ones(4)
    assert split_groups({"a": a}) == [({}, {"a": a})]
    groups = split_groups([{"params": [a, b]}, {"params": [c], "lr": 0.1}])
    assert [(overrides, list(arrays)) for overrides, arrays in groups] == [({}, [0, 1]), ({"lr": 0.1}, [2])]


@pytest.mark.parametrize("params, message", [
    ({}, "at least one array"),
    ([], "at least one array"),
    ({1: np.ones(2)}, "string names"),
    ([{"lr": 0.1}], r"params\[0\]"),
    ("weights", "a dict name"),
])
def test_split_groups_refuses_what_names_no_arrays(params, message):
    with pytest.raises(ValueError, match=message):
        split_groups(params)


def test_split_groups_refuses_an_array_given_twice():
    shared = np.ones(2)
    with pytest.raises(ValueError, match="each array and each name once"):
        split_groups([{"params": {"a": shared}}, {"params": {"b": shared}}])


def test_keyed_grads_takes_a_dict_or_a_list_in_key_order():
    params = {"a": np.ones(2), "b": np.ones(3)}
    grads = [np.zeros(2), np.zeros(3)]
    assert keyed_grads(grads, params) == {"a": grads[0], "b": grads[1]}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        keyed_grads({"a": grads[0]}, params)
    with pytest.raises(ValueError, match="a sequence of 1 arrays"):
        keyed_grads(grads[:1], params)


@pytest.mark.parametrize("grad, message", [
    ([1.0, 2.0], "an array"),
    (np.ones(3), r"shape \(3,\)"),
    (np.ones(2, dtype=np.int32), "real floating"),
])
def test_check_grad_names_the_key_and_what_is_wrong(grad, message):
    with pytest.raises(ValueError, match=r"grads\['w'\].*" + message):
        check_grad("w", grad, np.ones(2))


def test_nonfinite_keys_names_the_bad_gradients_or_all_when_none_is():
    grads = {"a": np.ones(2), "b": np.array([np.nan, 1.0])}
    assert nonfinite_keys(["a", "b"], grads) == ["b"]
    assert nonfinite_keys(["a"], grads) == ["a"]


def test_check_param_takes_a_writeable_real_floating_array():
    check_param("w", np.ones(2))
    frozen = np.ones(2)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\['w'\].*writeable"):
        check_param("w", frozen)
    with pytest.raises(ValueError, match=r"params\['w'\].*real floating"):
        check_param("w", np.ones(2, dtype=np.int64))


def test_check_finite_names_every_bad_gradient():
    grads = {"a": np.ones(2), "b": np.array([np.inf, 1.0]), "c": np.array([np.nan])}
    check_finite(["a"], grads)
    with pytest.raises(FloatingPointError, match=r"\['b', 'c'\].*no state was changed"):
        check_finite(["a", "b", "c"], grads)
