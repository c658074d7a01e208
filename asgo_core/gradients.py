"""The checks every adapter runs on a step's gradients before it changes anything."""

from __future__ import annotations

import array_api_compat

from asgo_core.config import fail


def check_gradient(where: str, grad, shape, nonfinite: str = "skip") -> None:
    """A gradient for a parameter of `shape`: an array of that shape with a real floating dtype
    (ValueError naming `where` otherwise), and finite under nonfinite="raise" (FloatingPointError;
    a host read, so not for a traced step)."""
    if not array_api_compat.is_array_api_obj(grad):
        fail(where, type(grad).__name__, "an array")
    if tuple(grad.shape) != tuple(shape):
        fail(where, f"shape {tuple(grad.shape)}", f"the parameter's shape {tuple(shape)}")
    xp = array_api_compat.array_namespace(grad)
    if not xp.isdtype(grad.dtype, "real floating"):
        fail(where, grad.dtype, "a real floating-point array")
    if nonfinite == "raise" and not bool(xp.all(xp.isfinite(grad))):
        raise FloatingPointError(f"non-finite {where} (nonfinite='raise'); no state was changed")
