"""Parameters and gradients as arrays keyed by name or position, for the adapters that take
plain arrays (NumPy/CuPy): the param groups they are given, the check of each param, and the
checks of a step's gradients against them. Everything here goes through the array-API namespace of the arrays.
"""

from __future__ import annotations

import array_api_compat

from asgo_core.config import fail
from asgo_core.gradients import check_gradient


def split_groups(params) -> list:
    """[(overrides, {key: array})] from a dict name → array, a list of arrays, or a list of group
    dicts {"params": dict-or-list, "<option>": value, ...}. A dict's keys are its names; a list's
    are positions, counted across the groups. Each array and each name appears once."""
    keyed, position, seen_keys, seen_arrays = [], 0, set(), set()
    for overrides, arrays in _groups(params):
        items = _named(arrays) if isinstance(arrays, dict) else dict(enumerate(arrays, start=position))
        position += len(items)
        for key, array in items.items():
            if key in seen_keys or id(array) in seen_arrays:
                fail("params", key, "each array and each name once")
            seen_keys.add(key)
            seen_arrays.add(id(array))
        keyed.append((overrides, items))
    if not seen_keys:
        fail("params", params, "at least one array")
    return keyed


def _groups(params) -> list:
    if isinstance(params, dict):
        return [({}, params)]
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, dict) for p in params):
        for index, group in enumerate(params):
            if "params" not in group:
                fail(f"params[{index}]", sorted(group), "a group dict with a 'params' entry")
        return [({k: v for k, v in group.items() if k != "params"}, group["params"]) for group in params]
    if isinstance(params, (list, tuple)):
        return [({}, params)]
    fail("params", type(params).__name__, "a dict name → array, a list of arrays, or a list of group dicts")


def _named(arrays: dict) -> dict:
    if not all(isinstance(key, str) for key in arrays):
        fail("params", list(arrays), "string names as dict keys")
    return dict(arrays)


def check_param(key, array) -> None:
    """A param an adapter can update in place: a writeable real floating-point array."""
    if not array_api_compat.is_array_api_obj(array) or not array_api_compat.is_writeable_array(array):
        fail(f"params[{key!r}]", type(array).__name__,
             "a writeable array-API array (NumPy, CuPy, ...); JAX arrays are immutable")
    if not array_api_compat.array_namespace(array).isdtype(array.dtype, "real floating"):
        fail(f"params[{key!r}]", array.dtype, "a real floating-point array")


def keyed_grads(grads, params: dict) -> dict:
    """grads (a dict by key or a sequence in key order) as {key: grad}, each gradient checked
    against its param (check_grad) before the caller changes anything."""
    keys = list(params)
    if isinstance(grads, dict):
        missing = [key for key in keys if key not in grads]
        extra = [key for key in grads if key not in params]
        if missing or extra:
            fail("grads", f"dict missing {missing}, unexpected {extra}", "a dict with the params' keys")
    elif isinstance(grads, (list, tuple)):
        if len(grads) != len(keys):
            fail("grads", f"a sequence of {len(grads)} arrays", f"{len(keys)} arrays, one per param")
        grads = dict(zip(keys, grads))
    else:
        fail("grads", type(grads).__name__, "a dict or list shaped like params")
    for key in keys:
        check_grad(key, grads[key], params[key])
    return grads


def check_grad(key, grad, param) -> None:
    """A gradient a step can use: an array of the param's shape and namespace, real floating."""
    check_gradient(f"grads[{key!r}]", grad, param.shape)
    try:
        array_api_compat.array_namespace(grad, param)
    except TypeError:
        fail(f"grads[{key!r}]", type(grad).__name__,
             f"an array of the param's namespace ({type(param).__name__})")


def is_finite(array) -> bool:
    """Whether every element is finite (a host read)."""
    xp = array_api_compat.array_namespace(array)
    return bool(xp.all(xp.isfinite(array)))


def check_finite(keys, grads: dict) -> None:
    """Raise FloatingPointError naming the keys whose gradient has a NaN or inf (host reads);
    for a step with nonfinite="raise", before it changes anything."""
    bad = [key for key in keys if not is_finite(grads[key])]
    if bad:
        raise FloatingPointError(f"non-finite gradient for {bad} (nonfinite='raise'); no state was changed")


def nonfinite_keys(keys, grads: dict) -> list:
    """The keys whose gradient has a NaN or inf (a host read, for an error message); all keys
    when none has: their squares overflowed the statistics dtype."""
    return [key for key in keys if not is_finite(grads[key])] or list(keys)
