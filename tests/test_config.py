"""Config validation: every bad value is rejected at construction with the field named."""

from __future__ import annotations

import dataclasses
import math

import pytest

from asgo_core import ASGOConfig, DASGOConfig

BAD_ASGO_VALUES = {
    "beta1": [-0.1, 1.0, "0.9"],
    "beta2": [-0.5, 1.5],
    "weight_decay": [-1e-3, math.inf],
    "eps": [-1e-8, math.nan],
    "damping": ["scaled", None],
    "precondition_frequency": [0, 2.5, True],
    "update_rms": [0.0, -0.2, math.inf],
    "accumulate": ["mean"],
    "side": ["top", None],
    "root_method": ["svd", "EIGH"],
    "root_steps": [0, 1.5],
    "root_tolerance": [-1.0],
    "residual_tolerance": [0.0, -1.0],
    "max_precond_dim": [0, -4],
    "num_heads": [0],
    "nonfinite": ["ignore"],
    "matmul_dtype": ["float16", "bf16"],
    "mu_dtype": ["float16", "bf16", "float32"],
    "precond_dtype": ["float16", "bfloat"],
}

BAD_DASGO_VALUES = {
    "beta1": [1.0],
    "beta2": [2.0],
    "weight_decay": [-0.1],
    "eps": [-1.0],
    "update_rms": [0.0],
    "accumulate": ["max"],
    "nonfinite": ["warn"],
    "mu_dtype": ["float8"],
}


def _cases(config_type, bad_values):
    return [(config_type, field, value) for field, values in bad_values.items() for value in values]


@pytest.mark.parametrize("config_type, field, value",
                         _cases(ASGOConfig, BAD_ASGO_VALUES) + _cases(DASGOConfig, BAD_DASGO_VALUES))
def test_bad_value_raises_naming_the_field(config_type, field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        config_type(**{field: value})


@pytest.mark.parametrize("config_type, bad_values", [(ASGOConfig, BAD_ASGO_VALUES), (DASGOConfig, BAD_DASGO_VALUES)])
def test_every_field_has_a_bad_value_case(config_type, bad_values):
    """A new option must come with its validation case here."""
    assert {f.name for f in dataclasses.fields(config_type)} == set(bad_values)


def test_reference_defaults():
    config = ASGOConfig()
    assert (config.beta1, config.beta2, config.weight_decay, config.update_rms) == (0.9, 0.8, 0.1, 0.2)
    assert (config.precondition_frequency, config.accumulate, config.side) == (1, "ema", "auto")
    dasgo = DASGOConfig()
    assert (dasgo.beta2, dasgo.eps) == (0.95, 1e-8)


def test_sum_mode_allows_beta2_one_and_ema_does_not():
    ASGOConfig(accumulate="sum", beta2=1.0)
    with pytest.raises(ValueError, match="^beta2="):
        ASGOConfig(beta2=1.0)


def test_head_blocks_cannot_take_the_right_side():
    with pytest.raises(ValueError, match="^side="):
        ASGOConfig(num_heads=4, side="right")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ASGOConfig().beta1 = 0.5
