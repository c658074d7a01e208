"""The core's checks and routing helpers that adapters call on a user's options and gradients:
the Keras-only rows of the options table, variable-path regexes, gradients, stochastic rounding."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from asgo_core.gradients import check_gradient
from asgo_core.options import batch_dims_for_path, checked_group, defaults, matches_path, spelled
from asgo_core.precision import rounds_stochastically


# ---- options spelled the Keras way --------------------------------------------------------------
def test_keras_only_options_take_keras_names_and_defaults():
    keras_defaults = defaults("asgo", "keras")
    assert {"adam_lr_ratio": 1.0, "exclude_layers": None, "exclude_embeddings": True,
            "batch_dims": None}.items() <= keras_defaults.items()
    keras_only = {"adam_lr_ratio", "exclude_layers", "exclude_embeddings"}
    for framework in ("torch", "optax"):
        assert not keras_only & set(defaults("asgo", framework))
    assert defaults("asgo", "torch")["batch_dims"] == 0  # the torch adapters' int, not Keras' dict


def test_checked_group_reads_keras_names():
    group, config = checked_group({"learning_rate": 0.1, "beta_1": 0.5, "adam_lr_ratio": 0.25,
                                   "batch_dims": {"experts": 1}}, "keras", "dasgo")
    assert group["lr"] == 0.1 and group["adamw_lr_ratio"] == 0.25 and config.beta1 == 0.5
    assert group["batch_dims_by_path"] == {"experts": 1} and group["batch_dims"] == 0


@pytest.mark.parametrize("options, message", [
    ({"adam_lr_ratio": -1.0}, "adam_lr_ratio=-1.0 is invalid"),
    ({"exclude_layers": "head"}, "exclude_layers='head' is invalid"),
    ({"exclude_layers": ["("]}, "regex error"),
    ({"exclude_embeddings": 1}, "exclude_embeddings=1 is invalid"),
    ({"batch_dims": {"experts": True}}, "batch_dims={'experts': True} is invalid"),
    ({"batch_dims": {"[": 1}}, "regex error"),
    ({"batch_dims": 1}, "batch_dims=1 is invalid"),
])
def test_checked_group_refuses_in_the_frameworks_names(options, message):
    with pytest.raises(ValueError, match="accepted") as error:
        checked_group(options, "keras", "asgo")
    assert message in str(error.value) and "batch_dims_by_path" not in str(error.value)


def test_spelled_leaves_an_option_the_framework_spells_alike():
    assert spelled("batch_dims=1 is invalid", "keras") == "batch_dims=1 is invalid"
    assert spelled("batch_dims_by_path=1 is invalid", "keras") == "batch_dims=1 is invalid"


# ---- variable paths -----------------------------------------------------------------------------
def test_paths_route_by_the_first_matching_regex():
    assert matches_path(["^head/", "embed"], "head/kernel")
    assert not matches_path(["^head/"], "body/head/kernel") and not matches_path(None, "head/kernel")
    by_path = {"experts": 1, "moe": 2}
    assert batch_dims_for_path(by_path, "moe/experts/kernel") == 1
    assert batch_dims_for_path(by_path, "moe/router/kernel") == 2
    assert batch_dims_for_path(by_path, "dense/kernel") == 0 and batch_dims_for_path(None, "moe") == 0


# ---- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grad, message", [
    ([[1.0, 2.0]], "accepted: an array"),
    (np.ones((3, 2)), r"shape \(3, 2\)' is invalid; accepted: the parameter's shape \(2, 3\)"),
    (np.ones((2, 3), np.int32), "int32.*real floating"),
    (np.ones((2, 3), np.complex64), "complex64.*real floating"),
])
def test_check_gradient_names_the_gradient(grad, message):
    with pytest.raises(ValueError, match=message) as error:
        check_gradient("grads['w']", grad, (2, 3))
    assert str(error.value).startswith("grads['w']=")


def test_check_gradient_reads_finiteness_only_under_raise():
    grad = np.ones((2, 3))
    grad[1, 2] = np.nan
    check_gradient("g", grad, (2, 3))
    check_gradient("g", grad, (2, 3), nonfinite="skip")
    with pytest.raises(FloatingPointError, match="non-finite g"):
        check_gradient("g", grad, (2, 3), nonfinite="raise")


# ---- rounding -------------------------------------------------------------------------------------
def test_rounds_stochastically_only_narrow_dtypes_under_stochastic():
    import array_api_compat.numpy as xp
    assert rounds_stochastically("stochastic", np.dtype(np.float16), xp)
    assert rounds_stochastically("stochastic", np.dtype(ml_dtypes.bfloat16), xp)
    assert not rounds_stochastically("stochastic", np.dtype(np.float32), xp)
    assert not rounds_stochastically("nearest", np.dtype(np.float16), xp)
