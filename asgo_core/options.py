"""Every option of every adapter, in one table, and what is derived from it.

A row (`Option`) says once what an option is: its default (the core config's, for the options
the config has), which matrix algorithms have it, whether it must be a Python value under jit
(`static`: it shapes the traced program), whether it shapes the optimizer state (`layout`: fixed
once the state exists), and how each framework spells it. From the table come the adapters'
signature defaults (`defaults`), error messages in the caller's names (`spelled`), the
per-algorithm static-argument sets of optax.inject_hyperparams (`static_args`) and the layout
options (`layout_options`). Adding an option is adding a row; its check lives with the config
(asgo_core.config), in `check_group_options`, or in the row's `check` (an adapter's own option).

Frameworks: "torch" (the torch and NumPy/CuPy adapters: torch.optim's names, betas as pairs),
"keras" (keras.optimizers' names) and "optax". A spelling of None: the framework lacks it.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import array_api_compat

from asgo_core.config import ASGOConfig, DASGOConfig, check_non_negative, config_field_names, fail, is_number
from asgo_core.layout import block_layout, check_batch_dims_value, matrix_stack_shape
from asgo_core.precision import check_param_rounding

ALGORITHMS = ("asgo", "dasgo", "adamw")
CONFIG_TYPES = {"asgo": ASGOConfig, "dasgo": DASGOConfig}
FRAMEWORKS = ("torch", "keras", "optax")
_FIELD_NAMES = {config_type: config_field_names(config_type) for config_type in CONFIG_TYPES.values()}
_FROM_CONFIG = object()  # the default is the algorithm's config default
_BOTH = ("asgo", "dasgo")


@dataclass(frozen=True)
class Option:
    name: str                       # the torch / NumPy name; the core config's where it has it
    algorithms: tuple = _BOTH
    default: Any = _FROM_CONFIG
    static: bool = False            # a Python value under jit (optax.inject_hyperparams static_args)
    layout: bool = False            # shapes the state: cannot change once the state exists
    spellings: dict = field(default_factory=dict)  # framework → name (None: absent); else `name`
    pair: tuple = ()                # a (first, second) pair of two other options (betas)
    check: Any = None               # check(name, value) of an option the config does not have

    def spelling(self, framework: str):
        return self.spellings.get(framework, self.name)

    def default_for(self, algorithm: str):
        if self.pair:
            return tuple(option(name).default_for(algorithm) for name in self.pair)
        if self.default is _FROM_CONFIG:
            return getattr(CONFIG_TYPES[algorithm], self.name)
        return self.default


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        fail(name, value, "True | False")


def check_rate_or_schedule(name: str, value) -> None:
    """A learning rate: a number >= 0, or a schedule / callable (the framework checks those)."""
    if not callable(value):
        check_non_negative(name, value)


def check_path_patterns(name: str, patterns, accepted="None or a list of variable-path regexes") -> None:
    """None, or a list of regexes that compile."""
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(pattern, str) for pattern in patterns):
        fail(name, patterns, accepted)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            fail(name, pattern, f"{accepted} (regex error: {error})")


def check_batch_dims_by_path(name: str, batch_dims) -> None:
    """None, or {variable-path regex: batch_dims} (Keras' batch_dims)."""
    accepted = "None or a dict {variable-path regex: integer >= 0}"
    if batch_dims is None:
        return
    if not isinstance(batch_dims, dict):
        fail(name, batch_dims, accepted)
    check_path_patterns(name, list(batch_dims), accepted)
    if not all(is_number(dims) and isinstance(dims, int) and dims >= 0 for dims in batch_dims.values()):
        fail(name, batch_dims, accepted)


def matches_path(patterns, path: str) -> bool:
    """Whether a regex of `patterns` (None: none) matches somewhere in `path`."""
    return any(re.search(pattern, path) for pattern in patterns or ())


def batch_dims_for_path(batch_dims_by_path, path: str, glob: bool = False) -> int:
    """The batch_dims of the first pattern of `batch_dims_by_path` that matches `path`: a regex
    found somewhere in it (Keras), or with glob an fnmatch pattern of the whole path (torch's
    parameter names); 0 if none."""
    for pattern, dims in (batch_dims_by_path or {}).items():
        if fnmatch.fnmatchcase(path, pattern) if glob else re.search(pattern, path):
            return dims
    return 0


_SEPARATE = {"torch": None}  # torch.optim spells the two betas as one pair
_PAIRED = {"keras": None, "optax": None}
_KERAS_ONLY = {"torch": None, "optax": None}
# The rows' order is every generated signature's order (the optax functions take them positionally)
OPTIONS = (
    Option("lr", default=1e-2, spellings={"keras": "learning_rate", "optax": "learning_rate"}),
    Option("betas", pair=("beta1", "beta2"), spellings=_PAIRED),
    Option("beta1", static=True, spellings=_SEPARATE | {"keras": "beta_1", "optax": "b1"}),
    Option("beta2", static=True, spellings=_SEPARATE | {"keras": "beta_2", "optax": "b2"}),
    Option("eps", static=True, spellings={"keras": "epsilon"}),
    Option("damping", ("asgo",)),
    Option("precondition_frequency", ("asgo",), static=True),
    Option("update_rms", static=True),
    Option("accumulate"),
    Option("side", ("asgo",), layout=True),
    Option("root_method", ("asgo",)),
    Option("root_steps", ("asgo",), static=True),
    Option("root_tolerance", ("asgo",), static=True),
    Option("residual_tolerance", ("asgo",), static=True),
    Option("max_precond_dim", ("asgo",), static=True, layout=True),
    Option("num_heads", ("asgo",), static=True, layout=True),
    Option("nonfinite"),
    Option("matmul_dtype", ("asgo",), static=True),
    Option("mu_dtype", static=True),
    Option("precond_dtype", ("asgo",), static=True),
    Option("weight_decay"),
    Option("param_rounding", default="nearest", spellings={"optax": None}),  # optax: apply_updates_stochastic
    Option("adamw_betas", pair=("adamw_beta1", "adamw_beta2"), spellings=_PAIRED),
    Option("adamw_beta1", default=0.9, spellings=_SEPARATE | {"keras": "adam_beta_1", "optax": "adam_b1"}),
    Option("adamw_beta2", default=0.95, spellings=_SEPARATE | {"keras": "adam_beta_2", "optax": "adam_b2"}),
    Option("adamw_eps", default=1e-8, spellings={"keras": "adam_epsilon", "optax": "adam_eps"}),
    Option("adamw_weight_decay", default=0.0, spellings={"keras": "adam_weight_decay",
                                                         "optax": "adam_weight_decay"}),
    Option("adamw_lr", default=None, spellings={"keras": None, "optax": "adam_learning_rate"}),
    Option("maximize", default=False, spellings=_PAIRED),
    Option("algorithm", default=None, spellings=_PAIRED),
    Option("batch_dims", default=0, layout=True, spellings=_PAIRED),
    # Keras' own, with keras.optimizers.Muon's names: the AdamW variables' lr as a ratio of the
    # learning rate, the variables routed to AdamW, and batch_dims by variable path
    Option("adamw_lr_ratio", default=1.0, spellings=_KERAS_ONLY | {"keras": "adam_lr_ratio"},
           check=check_non_negative),
    Option("exclude_layers", default=None, spellings=_KERAS_ONLY, check=check_path_patterns),
    Option("exclude_embeddings", default=True, spellings=_KERAS_ONLY, check=check_bool),
    Option("batch_dims_by_path", default=None, spellings=_KERAS_ONLY | {"keras": "batch_dims"},
           check=check_batch_dims_by_path),
)
_BY_NAME = {row.name: row for row in OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]


def defaults(algorithm: str, framework: str = "torch") -> dict:
    """{the framework's name: default} of every option `algorithm`'s optimizer takes there."""
    return {row.spelling(framework): row.default_for(algorithm) for row in OPTIONS
            if algorithm in row.algorithms and row.spelling(framework) is not None}


def static_args(algorithm: str, framework: str = "optax") -> tuple:
    """The numeric options of `algorithm` that must stay Python values under jit, spelled."""
    return tuple(row.spelling(framework) for row in OPTIONS
                 if row.static and algorithm in row.algorithms and row.spelling(framework) is not None)


def layout_options(algorithm: str = "asgo") -> tuple:
    return tuple(row.name for row in OPTIONS if row.layout and algorithm in row.algorithms)


def layout_of(group: dict) -> tuple:
    """The values of a group's layout options (None where it lacks one): what must stay as it
    was when the state was built."""
    return tuple(group.get(name) for name in layout_options())


def message_name(name: str, framework: str) -> str:
    """How an error about option `name` names it to a `framework` user: a pair the framework
    spells as two options reads "(first, second)"."""
    row = _BY_NAME[name]
    spelled_name = row.spelling(framework)
    if spelled_name is None and row.pair:
        return "(" + ", ".join(message_name(part, framework) for part in row.pair) + ")"
    return spelled_name or name


@functools.lru_cache(maxsize=None)
def _name_pattern(framework: str):
    renamed = [row.name for row in OPTIONS if message_name(row.name, framework) != row.name]
    return re.compile(r"\b(" + "|".join(sorted(renamed, key=len, reverse=True)) + r")=") if renamed else None


def spelled(message: str, framework: str) -> str:
    """An error message of the shared checks ("betas=... is invalid") in `framework`'s names."""
    pattern = _name_pattern(framework)
    if pattern is None:
        return message
    return pattern.sub(lambda match: message_name(match.group(1), framework) + "=", message)


def check_keywords(owner: str, given: dict, accepted: dict) -> None:
    """A constructor's keyword arguments: TypeError naming those `owner` does not take."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}; "
                        f"accepted: {', '.join(accepted)}")


def signature(positional: tuple, keywords: dict) -> inspect.Signature:
    """The signature an optimizer class shows (help, inspect) when its __init__ takes the options
    as **options: `positional` names first, then the other keywords with their defaults."""
    parameters = []
    for name in positional:
        default = keywords.get(name, inspect.Parameter.empty)
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
                   for name, value in keywords.items() if name not in positional]
    return inspect.Signature(parameters)


class OptionsSignature:
    """Mixin of an adapter's optimizer base class, whose __init__ takes the options table's
    options: a subclass that sets matrix_algorithm and keeps that __init__ shows (help,
    inspect.signature) positional_options, then every other option of its algorithm with the
    `options_framework`'s defaults; a subclass with another __init__ shows that one's."""

    positional_options: tuple
    options_framework = "torch"

    @classmethod
    def options_signature(cls) -> inspect.Signature:
        return signature(cls.positional_options, defaults(cls.matrix_algorithm, cls.options_framework))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "positional_options" in vars(cls):  # the adapter's base class: its __init__ takes the options
            cls._options_init = cls.__init__
        takes_options = cls.__init__ is cls._options_init and hasattr(cls, "matrix_algorithm")
        cls.__signature__ = cls.options_signature() if takes_options else None


def bound_options(accepted: inspect.Signature, caller: str, args: tuple, kwargs: dict) -> dict:
    """{name: value} of a call (args, kwargs) to `caller`, whose signature is `accepted`, with
    the defaults filled in; a TypeError naming the caller and the accepted names otherwise."""
    try:
        arguments = accepted.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{caller}(): {error}; accepted: {', '.join(accepted.parameters)}") from None
    arguments.apply_defaults()
    return dict(arguments.arguments)


def group_from(options: dict, framework: str, algorithm: str) -> dict:
    """A group of options under the torch names (what check_group_options and group_config
    read) from options spelled the `framework`'s way; an option absent there takes its default,
    a pair the framework spells as two options is built from them."""
    group = {}
    for row in OPTIONS:
        name = row.spelling(framework)
        if algorithm in row.algorithms and not row.pair:
            group[row.name] = options[name] if name in options else row.default_for(algorithm)
    for row in OPTIONS:
        if row.pair:
            name, parts = row.spelling(framework), tuple(group.pop(part) for part in row.pair)
            group[row.name] = options[name] if name in options else parts
    return group


def check_betas(name: str, betas, *, beta2_may_be_one: bool) -> None:
    """beta1 in [0, 1); beta2 in [0, 1], or [0, 1) where beta2 = 1 has no meaning."""
    pair = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(is_number, betas))
    if not (pair and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1]
            and (betas[1] <= 1.0 if beta2_may_be_one else betas[1] < 1.0)):
        fail(name, betas, "a pair (beta1, beta2) with beta1 in [0, 1) and beta2 in "
             + ("[0, 1]" if beta2_may_be_one else "[0, 1)"))


def check_learning_rate(name: str, lr) -> None:
    """A learning rate: a number, or a one-element floating-point array (a scheduler's tensor);
    the array's value is read, so call it outside a step."""
    if array_api_compat.is_array_api_obj(lr):
        floating = array_api_compat.array_namespace(lr).isdtype(lr.dtype, "real floating")
        if math.prod(lr.shape) != 1 or not floating:
            fail(name, lr, "a float or a one-element floating-point tensor")
        lr = float(lr.reshape(()))
    check_non_negative(name, lr)


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
    check_bool("maximize", group["maximize"])
    check_param_rounding(group["param_rounding"])
    if group["algorithm"] is not None and group["algorithm"] not in ALGORITHMS:
        fail("algorithm", group["algorithm"], "None | " + " | ".join(map(repr, ALGORITHMS)))
    for row in OPTIONS:
        if row.check is not None and row.name in group:
            row.check(row.name, group[row.name])


def checked_group(options: dict, framework: str, algorithm: str, check_lr=check_non_negative) -> tuple:
    """(group, config) of options spelled the `framework`'s way (group_from), checked by
    group_settings; an error names the options as the framework spells them."""
    try:
        group = group_from(options, framework, algorithm)
        return group, group_settings(group, (algorithm,), check_lr)["configs"][algorithm]
    except ValueError as error:
        raise ValueError(spelled(str(error), framework)) from None


def group_settings(group: dict, algorithms, check_lr=check_non_negative) -> dict:
    """Every check of one group's options (check_group_options, an algorithm among `algorithms`
    and "adamw", batch_dims, the config of each of `algorithms`) and what a step reads from
    them: {"configs": {algorithm: config}, "adamw": adamw_options(group)}."""
    check_group_options(group, check_lr)
    if group["algorithm"] not in (None, *algorithms, "adamw"):
        fail("algorithm", group["algorithm"], " | ".join(map(repr, (None, *algorithms, "adamw"))))
    check_batch_dims_value(group["batch_dims"])
    return {"configs": {algorithm: group_config(group, algorithm) for algorithm in algorithms},
            "adamw": adamw_options(group)}


def check_traceable(config, where: str = "") -> None:
    """A config a traced (jitted) step can run: nonfinite="raise" reads the gradients'
    finiteness on the host, which a traced step cannot."""
    if config.nonfinite == "raise":
        fail("nonfinite", "raise", f"'skip' {where}('raise' reads the gradients' finiteness on the "
             "host, which a jitted step cannot)")


def adamw_options(group: dict) -> dict:
    """The AdamW options of a group in asgo_core.adamw.hyperparameters' names (lr: adamw_lr,
    or the group's lr where that is None)."""
    lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
    return {"lr": lr, "betas": group["adamw_betas"], "eps": group["adamw_eps"],
            "weight_decay": group["adamw_weight_decay"]}


def algorithm_of(ndim: int, group: dict, matrix_algorithm: str) -> str:
    """What steps a parameter of `ndim` dims in `group`: the group's algorithm option, or by
    dims the optimizer's matrix algorithm (2 or more) or AdamW."""
    if group["algorithm"] is not None:
        return group["algorithm"]
    return matrix_algorithm if ndim >= 2 else "adamw"


def check_param_shape(shape, group: dict, algorithm: str) -> None:
    """A parameter's shape under its group's options: a matrix algorithm needs 2 or more dims
    and a matrix view batch_dims leaves nonempty; ASGO a block layout the options allow
    (num_heads divides the preconditioned side). Errors name the option."""
    if algorithm == "adamw":
        return
    if len(shape) < 2:
        fail("algorithm", algorithm, f"'adamw' or None for a parameter of shape {tuple(shape)} "
             "(ASGO/DASGO need at least 2 dims)")
    _, m, n = matrix_stack_shape(shape, group["batch_dims"])
    config = group_config(group, algorithm)
    if algorithm == "asgo":
        block_layout((m, n), config)


def loaded_groups(groups: list, saved_groups: list, validate) -> list:
    """The param groups a state_dict load leaves: each of `groups` with a deep copy of its saved
    group's options over it (its own "params" kept), checked by validate(group, index). A
    ValueError names the field where the numbers of groups or of their parameters differ."""
    if len(saved_groups) != len(groups):
        fail("state_dict['param_groups']", f"{len(saved_groups)} groups", f"{len(groups)} groups")
    merged_groups = []
    for index, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            fail(f"state_dict['param_groups'][{index}]['params']",
                 f"{len(saved['params'])} parameters", f"{len(group['params'])}")
        options = copy.deepcopy({key: value for key, value in saved.items() if key != "params"})
        merged = {**group, **options, "params": group["params"]}
        validate(merged, index)
        merged_groups.append(merged)
    return merged_groups


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


def checkpoint_config(group: dict, algorithm: str) -> dict:
    """The options of a group that a portable checkpoint entry records and must match on load
    (asgo_core.checkpoint): the core config's, or the AdamW ones; lr is left out (schedules
    change it)."""
    if algorithm == "adamw":
        return {"betas": list(group["adamw_betas"]), "eps": group["adamw_eps"],
                "weight_decay": group["adamw_weight_decay"]}
    return dataclasses.asdict(group_config(group, algorithm))


@functools.lru_cache(maxsize=256)
def _cached_config(config_type, options: tuple):
    return config_type(**{name: value for name, _, value in options})
