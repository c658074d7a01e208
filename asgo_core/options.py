"""The options the torch and array adapters share, checked once for both.

Both adapters spell the betas as a pair, route non-matrix parameters to a built-in AdamW with
`adamw_*` options, and build the core config of a group of options. Errors name the option
and what it accepts, like the configs' own checks.
"""

from __future__ import annotations

import functools

from asgo_core.config import ASGOConfig, DASGOConfig, check_non_negative, config_field_names, fail, is_number
from asgo_core.precision import check_param_rounding

ALGORITHMS = ("asgo", "dasgo", "adamw")
CONFIG_TYPES = {"asgo": ASGOConfig, "dasgo": DASGOConfig}
_FIELD_NAMES = {config_type: config_field_names(config_type) for config_type in CONFIG_TYPES.values()}


def check_betas(name: str, betas, *, beta2_may_be_one: bool) -> None:
    """beta1 in [0, 1); beta2 in [0, 1], or [0, 1) where beta2 = 1 has no meaning."""
    pair = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(is_number, betas))
    if not (pair and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1]
            and (betas[1] <= 1.0 if beta2_may_be_one else betas[1] < 1.0)):
        fail(name, betas, "a pair (beta1, beta2) with beta1 in [0, 1) and beta2 in "
             + ("[0, 1]" if beta2_may_be_one else "[0, 1)"))


def check_group_options(group: dict, check_lr=check_non_negative) -> None:
    """The adapter-level options of one param group (the matrix options are the config's).
    check_lr(name, value) checks a learning rate (the torch adapter also takes tensors)."""
    check_lr("lr", group["lr"])
    check_betas("betas", group["betas"], beta2_may_be_one=True)
    if group["adamw_lr"] is not None:
        check_lr("adamw_lr", group["adamw_lr"])
    check_betas("adamw_betas", group["adamw_betas"], beta2_may_be_one=False)
    check_non_negative("adamw_eps", group["adamw_eps"])
    check_non_negative("adamw_weight_decay", group["adamw_weight_decay"])
    if not isinstance(group["maximize"], bool):
        fail("maximize", group["maximize"], "True | False")
    check_param_rounding(group["param_rounding"])
    if group["algorithm"] is not None and group["algorithm"] not in ALGORITHMS:
        fail("algorithm", group["algorithm"], "None | " + " | ".join(map(repr, ALGORITHMS)))


def group_config(group: dict, algorithm: str):
    """The validated ASGOConfig / DASGOConfig of one group's options (cached by value)."""
    config_type = CONFIG_TYPES[algorithm]
    beta1, beta2 = group["betas"]
    options = {"beta1": beta1, "beta2": beta2}
    for name in _FIELD_NAMES[config_type]:
        if name in group and name not in options:
            options[name] = group[name]
    # the value's type is part of the cache key: True == 1 and hash alike, but only 1 is valid
    key = []  # a loop, not a generator: a generator argument breaks a torch.compile graph here
    for name in sorted(options):
        key.append((name, type(options[name]), options[name]))
    return _cached_config(config_type, tuple(key))


@functools.lru_cache(maxsize=256)
def _cached_config(config_type, options: tuple):
    return config_type(**{name: value for name, _, value in options})
