"""One small driver per adapter, so that a single table of adversarial cases runs on all of them.

A driver takes NumPy inputs and options under neutral names (the core's: lr, beta1, beta2, ...;
adamw_* for the AdamW route), builds the adapter's optimizer, steps it, and reads everything
back as NumPy: the parameters, a bitwise snapshot of params + state, and the portable state.
`field(name)` gives the adapter's own spelling of an option, which its errors must name, and
`param_pattern(key)` a regex that names one parameter the way the adapter can (a key, a leaf
path, or for torch, whose parameters have no names, its position or shape).
"""

from __future__ import annotations

import contextlib
import copy
import re

import helpers.keras_backend  # noqa: F401  (the Keras backend, set before keras is imported)
import numpy as np

from asgo_core.config import ASGOConfig


SHAPES = {"w1": (6, 10), "w2": (5, 7), "conv": (4, 2, 3, 3), "bias": (6,)}


def standard_params(dtype="float32", shapes=SHAPES, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def standard_grads(params: dict, seed=1, scale=1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(p.shape)).astype(p.dtype) for name, p in params.items()}


def _betas(options: dict, prefix: str, defaults: tuple) -> dict:
    """beta1/beta2 (or adamw_beta1/2) → a betas pair, the other one at its default."""
    names = (f"{prefix}beta1", f"{prefix}beta2")
    if not any(name in options for name in names):
        return {}
    return {f"{prefix}betas": tuple(options.pop(name, default) for name, default in zip(names, defaults))}


class Driver:
    name: str
    algorithm = "asgo"

    def field(self, option: str) -> str:
        """The adapter's name for a neutral option (what its error message must say)."""
        return {"beta1": "betas", "beta2": "betas", "adamw_beta1": "adamw_betas",
                "adamw_beta2": "adamw_betas"}.get(option, option)

    def adapter_options(self, options: dict) -> dict:
        options = dict(options)
        defaults = (ASGOConfig.beta1, ASGOConfig.beta2) if self.algorithm == "asgo" else (0.9, 0.95)
        options.update(_betas(options, "", defaults))
        options.update(_betas(options, "adamw_", (0.9, 0.95)))
        return options

    def snapshot(self) -> dict:
        """name → (dtype, shape, bytes) of every param and state array: bitwise comparable."""
        return {name: (value.dtype.str, value.shape, value.tobytes()) for name, value in self._arrays()}

    def counters(self) -> dict:
        """{"skipped": total, level: total per FALLBACK_LEVELS} over the matrix parameters."""
        from asgo_core import FALLBACK_LEVELS
        totals = dict.fromkeys(("skipped", *FALLBACK_LEVELS), 0)
        for entry in self.portable()["params"]:
            if entry["algorithm"] == "adamw":
                continue
            totals["skipped"] += int(np.sum(entry["arrays"]["skipped"]))
            if "fallbacks" in entry["arrays"]:
                fallbacks = np.asarray(entry["arrays"]["fallbacks"]).reshape(-1, len(FALLBACK_LEVELS))
                for level, count in zip(FALLBACK_LEVELS, fallbacks.sum(axis=0)):
                    totals[level] += int(count)
        return totals


class _StatefulDriver(Driver):
    """An adapter whose optimizer object holds the state (torch, NumPy): state_dict() and back."""

    def _arrays(self):
        yield from ((f"param {k}", v) for k, v in self.params().items())
        yield from _flatten("state", self.optimizer.state_dict()["state"])

    def state_dict(self) -> dict:
        """A deep copy: torch's state_dict shares the live per-parameter state dicts, so a case
        that edits what it saved would otherwise edit the optimizer too."""
        return copy.deepcopy(self.optimizer.state_dict())

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)


# ----------------------------------------------------------------------------- torch

class TorchDriver(_StatefulDriver):
    name = "torch"

    def __init__(self, algorithm="asgo"):
        self.algorithm = algorithm
        self.name = "torch" if algorithm == "asgo" else "torch-dasgo"

    def build(self, params: dict, options=None, groups=None):
        """groups: optional list of (keys, group options) param groups instead of one group."""
        import torch
        from asgo_core.adapters.torch import ASGO, DASGO
        self.keys = list(params)
        self.tensors = {k: _parameter(_to_torch(v)) for k, v in params.items()}
        make = ASGO if self.algorithm == "asgo" else DASGO
        if groups is None:
            groups = [(self.keys, {})]
        self.keys = [key for keys, _ in groups for key in keys]
        torch_groups = [{"params": [self.tensors[k] for k in keys], **self.adapter_options(extra)}
                        for keys, extra in groups]
        self.optimizer = make(torch_groups, **self.adapter_options(options or {}))
        return self

    def step(self, grads: dict):
        import torch
        for key, tensor in self.tensors.items():
            grad = grads.get(key)
            tensor.grad = None if grad is None else (grad if isinstance(grad, torch.Tensor) else _to_torch(grad))
        self.optimizer.step()

    def params(self) -> dict:
        return {k: _to_numpy(t) for k, t in self.tensors.items()}

    def portable(self) -> dict:
        return self.optimizer.portable_state(names=self.keys)

    def load_portable(self, portable):
        self.optimizer.load_portable_state(portable, names=self.keys)

    def param_pattern(self, key, params=None) -> str:
        """params: the dict a failed build was given (None: the built optimizer's)."""
        keys, arrays = (self.keys, self.tensors) if params is None else (list(params), params)
        index, shape = keys.index(key), tuple(arrays[key].shape)
        return rf"(\[{index}\]|parameter {index}\b|index {index}\b|{re.escape(str(shape))})"


# ----------------------------------------------------------------------------- NumPy adapter

class NumpyDriver(_StatefulDriver):
    name = "numpy"

    def build(self, params: dict, options=None, groups=None):
        from asgo_core.adapters.cupy import ASGO
        self.arrays = dict(params)  # updated in place: a failed construction must leave them as given
        if groups is None:
            self.optimizer = ASGO(self.arrays, **self.adapter_options(options or {}))
        else:
            self.optimizer = ASGO([{"params": {k: self.arrays[k] for k in keys}, **self.adapter_options(extra)}
                                   for keys, extra in groups], **self.adapter_options(options or {}))
        return self

    def step(self, grads: dict):
        self.optimizer.step(dict(grads))

    def params(self) -> dict:
        return {k: v.copy() for k, v in self.arrays.items()}

    def portable(self) -> dict:
        return self.optimizer.portable_state()

    def load_portable(self, portable):
        self.optimizer.load_portable_state(portable)

    def param_pattern(self, key, params=None) -> str:
        return re.escape(repr(key))


# ----------------------------------------------------------------------------- optax

_OPTAX_STEPS: dict = {}


def _jitted_train_step(tx):
    import jax
    import optax

    @jax.jit
    def train_step(leaves, state, grads):
        updates, state = tx.update(grads, state, leaves)
        return optax.apply_updates(leaves, updates), state
    return train_step


class OptaxDriver(Driver):
    name = "optax"

    def __init__(self, x64=False):
        self.x64 = x64

    _NAMES = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2", "adamw_eps": "adam_eps",
              "adamw_weight_decay": "adam_weight_decay", "adamw_lr": "adam_learning_rate",
              "adamw_beta1": "adam_b1", "adamw_beta2": "adam_b2"}

    def field(self, option: str) -> str:
        return self._NAMES.get(option, option)

    def adapter_options(self, options: dict) -> dict:
        return {self.field(name): value for name, value in options.items()}

    def context(self):
        from helpers.numerics import jax_x64
        return jax_x64() if self.x64 else contextlib.nullcontext()

    def build(self, params: dict, options=None, groups=None):
        import jax.numpy as jnp
        from helpers.layouts import torch_layout_dimension_numbers

        from asgo_core.adapters.optax import asgo
        assert groups is None, "optax: one set of options per transformation"
        options = {"lr": 1e-2, **(options or {})}
        self.numbers = torch_layout_dimension_numbers(params)
        with self.context():
            self.tx = asgo(weight_dimension_numbers=self.numbers, **self.adapter_options(options))
            self.leaves = {k: jnp.asarray(v) for k, v in params.items()}
            self.state = self.tx.init(self.leaves)
        self.options = options
        key = (repr(sorted(options.items())), repr(self.numbers), self.x64)
        if key not in _OPTAX_STEPS:  # compiling is most of an optax case's time: reuse the step
            _OPTAX_STEPS[key] = _jitted_train_step(self.tx)
        self.train_step = _OPTAX_STEPS[key]
        return self

    def step(self, grads: dict):
        import jax.numpy as jnp
        with self.context():
            self.leaves, self.state = self.train_step(self.leaves, self.state,
                                                      {k: jnp.asarray(v) for k, v in grads.items()})

    def params(self) -> dict:
        return {k: np.array(v) for k, v in self.leaves.items()}

    def _arrays(self):
        import jax
        yield from ((f"param {k}", v) for k, v in self.params().items())
        yield from ((f"state {i}", np.array(v)) for i, v in enumerate(jax.tree.leaves(self.state)))

    def core_config(self):
        """The ASGOConfig the transformation was built with (asgo()'s weight_decay default: 0.1)."""
        fields = ASGOConfig.__dataclass_fields__
        return ASGOConfig(**{k: v for k, v in self.options.items() if k in fields})

    def adamw_options(self) -> dict:
        return {"betas": [self.options.get("adamw_beta1", 0.9), self.options.get("adamw_beta2", 0.95)],
                "eps": self.options.get("adamw_eps", 1e-8),
                "weight_decay": self.options.get("adamw_weight_decay", 0.0)}

    def portable(self) -> dict:
        from asgo_core.adapters.optax import portable_state
        with self.context():
            return portable_state(self.state, self.leaves, self.core_config(), adamw=self.adamw_options(),
                                  weight_dimension_numbers=self.numbers)

    def load_portable(self, portable):
        from asgo_core.adapters.optax import state_from_portable
        with self.context():
            self.state = state_from_portable(portable, self.leaves, self.tx, self.core_config(),
                                             adamw=self.adamw_options(), weight_dimension_numbers=self.numbers)

    def param_pattern(self, key, params=None) -> str:
        return re.escape(f"['{key}']")


# ----------------------------------------------------------------------------- Keras

class KerasDriver(Driver):
    """The Keras adapter on the backend tests/helpers/keras_backend.py sets. Parameters are in
    the torch layout here and in the Keras layout (outputs last) in the variables, which the
    adapter reads back as the torch layout."""
    name = "keras"

    def field(self, option: str) -> str:
        from asgo_core.options import option as table_option
        return "adam_lr_ratio" if option == "adamw_lr" else table_option(option).spelling("keras")

    def adapter_options(self, options: dict) -> dict:
        """Neutral names → Keras'; adamw_lr becomes adam_lr_ratio = adamw_lr / lr."""
        options = dict(options)
        if "adamw_lr" in options:
            lr = options.get("lr", 1e-2)
            adamw_lr = options.pop("adamw_lr")
            options["adam_lr_ratio"] = adamw_lr / lr if _is_float(lr) else adamw_lr
        return {name if name == "adam_lr_ratio" else self.field(name): value
                for name, value in options.items()}

    def build(self, params: dict, options=None, groups=None):
        import keras
        from asgo_core.adapters.keras import ASGO
        assert groups is None, "keras: one set of options per optimizer"
        self.keys = list(params)
        self.variables = [keras.Variable(np.moveaxis(value, 0, -1), name=key, dtype=str(value.dtype),
                                         trainable=np.issubdtype(value.dtype, np.floating))
                          for key, value in params.items()]  # torch cannot make integer tensors trainable
        self.optimizer = ASGO(**self.adapter_options(options or {}))
        self.optimizer.build(self.variables)
        return self

    def step(self, grads: dict):
        import keras
        tensors = [keras.ops.convert_to_tensor(np.moveaxis(grads[key], 0, -1)) for key in self.keys]
        self.optimizer.apply(tensors, self.variables)

    def params(self) -> dict:
        import keras
        return {key: np.moveaxis(keras.ops.convert_to_numpy(v), -1, 0).copy()
                for key, v in zip(self.keys, self.variables)}

    def _arrays(self):
        import keras
        yield from ((f"param {k}", v) for k, v in self.params().items())
        yield from ((f"state {v.path}", keras.ops.convert_to_numpy(v)) for v in self.optimizer.variables)

    def portable(self) -> dict:
        return self.optimizer.portable_state(names=self.keys)

    def load_portable(self, portable):
        self.optimizer.load_portable_state(portable, names=self.keys)

    def param_pattern(self, key, params=None) -> str:
        return re.escape(repr(key))


def _is_float(value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool)


def _to_torch(array):
    """A tensor copy of a NumPy array (ml_dtypes bfloat16 included, which torch cannot read)."""
    import torch
    if str(array.dtype) == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _parameter(tensor):
    """An nn.Parameter; an integer one cannot require grad, but can still be handed to an optimizer."""
    import torch
    return torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point() or tensor.is_complex())


def _to_numpy(tensor):
    import torch
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


def _flatten(prefix, value):
    """(path, NumPy array) for every tensor / array / number inside nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(f"{prefix}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _flatten(f"{prefix}[{index}]", item)
    elif hasattr(value, "detach"):
        yield prefix, _to_numpy(value)
    else:
        yield prefix, np.array(value)


DRIVERS = {"torch": lambda: TorchDriver("asgo"), "torch-dasgo": lambda: TorchDriver("dasgo"),
           "optax": OptaxDriver, "numpy": NumpyDriver, "keras": KerasDriver}
