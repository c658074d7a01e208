"""Checks of a saved per-parameter state before an adapter loads it.

An adapter that keeps its state per parameter (named arrays, a tuple field of the core state as
the list of its block groups' arrays, and a step count) checks each saved entry against a
template of what the parameter holds: exactly the template's fields and "step", every array of
the template's shape and kind (floating point or not; never complex), the step a number >= 0.
A failure is a ValueError naming the parameter and the field; the adapter changes nothing
until every entry has passed.
"""

from __future__ import annotations

import math

import array_api_compat

from asgo_core.config import fail


def loaded_state(entry: dict, template: dict, algorithm: str, label: str, *, array_type, convert,
                 integer_step: bool = True) -> dict:
    """The saved `entry` checked against `template` ({field: array or list of arrays}) and
    converted: each array by convert(value, like), "step" to a Python number (an integer where
    integer_step, else any number; a one-element array of `array_type` is read)."""
    expected = set(template) | {"step"}
    if set(entry) != expected:
        raise ValueError(f"{label}: state fields {sorted(entry)} are not {algorithm}'s; accepted: "
                         f"{sorted(expected)} (a state saved by another optimizer or algorithm?)")
    step = _checked_step(entry["step"], f"{label}: state field 'step'", array_type, integer_step)
    state = {key: _loaded_like(entry[key], like, f"{label}: state field {key!r}", array_type, convert)
             for key, like in template.items()}
    state["step"] = step
    return state


def _checked_step(step, label: str, array_type, integer: bool):
    if isinstance(step, array_type) and math.prod(step.shape) == 1:
        if not _has_kind(step, "real floating" if integer else "complex floating"):
            step = step.item()
    if isinstance(step, bool) or not isinstance(step, int if integer else (int, float)) or not step >= 0:
        fail(label, step, "an integer >= 0" if integer else "a number >= 0")
    return step


def _loaded_like(value, like, label: str, array_type, convert):
    """A saved array (or list of them, for a tuple field) checked against its template's shape
    and kind, converted by convert(value, like)."""
    if isinstance(like, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(like):
            raise ValueError(f"{label}: {_describe(value)}; accepted: a list of {len(like)} block arrays")
        return [_loaded_like(v, l, f"{label}[{i}]", array_type, convert)
                for i, (v, l) in enumerate(zip(value, like))]
    if (not isinstance(value, array_type) or tuple(value.shape) != tuple(like.shape)
            or _has_kind(value, "real floating") != _has_kind(like, "real floating")
            or _has_kind(value, "complex floating")):
        raise ValueError(f"{label}: {_describe(value)}; accepted: {_describe(like)}")
    return convert(value, like)


def _has_kind(array, kind: str) -> bool:
    return array_api_compat.array_namespace(array).isdtype(array.dtype, kind)


def _describe(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"a {value.dtype} {type(value).__name__.lower()} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
