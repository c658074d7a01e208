"""The built-in AdamW of the non-matrix parameters, torch.optim.AdamW's arithmetic, on arrays.

`adamw_step` is pure: it returns the new parameter and state, and which it keeps is decided
on the device (a non-finite gradient keeps the parameter and moments as they were and is
counted), so it serves the in-place NumPy/CuPy adapter and Keras' assignments alike. The moments are float32 or wider.
"""

from __future__ import annotations

import math

from asgo_core.precision import stochastic_round


def moment_dtype(param_dtype, xp):
    return xp.result_type(param_dtype, xp.float32)


def zero_state(param, xp) -> dict:
    """exp_avg, exp_avg_sq (moment_dtype) and skipped, the count of non-finite gradients."""
    from asgo_core import _xp
    dtype, device = moment_dtype(param.dtype, xp), _xp.device(param)
    return {"exp_avg": xp.zeros(param.shape, dtype=dtype, device=device),
            "exp_avg_sq": xp.zeros(param.shape, dtype=dtype, device=device),
            "skipped": xp.zeros((), dtype=xp.int32, device=device)}


def hyperparameters(*, lr, betas, eps, weight_decay, step) -> dict:
    """The scalars of step number `step` (from 1), torch.optim.AdamW's bias correction: Python
    floats for a Python step, arrays for an array step (a traced iteration count)."""
    beta1, beta2 = betas
    correction2 = 1 - beta2 ** step
    correction2_sqrt = math.sqrt(correction2) if isinstance(correction2, float) else correction2 ** 0.5
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                step_size=lr / (1 - beta1 ** step), bias_correction2_sqrt=correction2_sqrt)


def adamw_step(param, grad, state: dict, xp, *, lr, beta1, beta2, eps, weight_decay, step_size,
               bias_correction2_sqrt, uniform=None) -> tuple:
    """(new param, new state) of one step; state: zero_state's arrays. A non-finite gradient
    keeps the param and moments as they were (decided on the device) and adds one to skipped.
    uniform: numbers in [0, 1) shaped like param for a stochastically rounded new param (None:
    rounded to nearest)."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    dtype = exp_avg.dtype
    g = xp.astype(grad, dtype)
    finite = xp.all(xp.isfinite(g))
    g = xp.where(finite, g, xp.zeros_like(g))
    new_exp_avg = beta1 * exp_avg + (1 - beta1) * g
    new_exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * (g * g)
    denom = xp.sqrt(new_exp_avg_sq) / bias_correction2_sqrt + eps
    old = xp.astype(param, dtype)
    new_param = xp.where(finite, old * (1 - lr * weight_decay) - step_size * (new_exp_avg / denom), old)
    new_param = (xp.astype(new_param, param.dtype) if uniform is None
                 else stochastic_round(new_param, param.dtype, uniform, xp))
    return new_param, {"exp_avg": xp.where(finite, new_exp_avg, exp_avg),
                       "exp_avg_sq": xp.where(finite, new_exp_avg_sq, exp_avg_sq),
                       "skipped": state["skipped"] + xp.astype(~finite, xp.int32)}
