"""Low-precision storage: rounding a parameter write and the dtypes of stored optimizer state.

Every adapter computes a step in the statistics dtype (float32 for 16-bit parameters) and writes
the result into the parameter's own dtype. Rounded to nearest, an update smaller than half the
spacing of bfloat16 (2^-8 relative) is lost whole: at lr 1e-3 and an update RMS of 0.2 most
weights never move. Stochastic rounding rounds up with probability equal to the fractional
distance to the upper neighbour, so the written value is the computed one in expectation and
small updates accumulate.

The uniform numbers come from the adapter's own generator (torch.Generator, numpy Generator,
Keras/JAX seeds), seeded by `rounding_seed` below from the step count and the bucket: the stream
is a function of state the optimizer already saves, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from asgo_core.config import fail

PARAM_ROUNDINGS = ("nearest", "stochastic")


def check_param_rounding(value) -> None:
    if value not in PARAM_ROUNDINGS:
        fail("param_rounding", value, " | ".join(map(repr, PARAM_ROUNDINGS)))


def namespace_dtype(name: str, xp, option: str):
    """The dtype called `name` in namespace xp (NumPy's bfloat16 is ml_dtypes'); a ValueError
    naming `option` when the namespace has none (CuPy has no bfloat16)."""
    dtype = getattr(xp, name, None)
    if dtype is None and name == "bfloat16" and "numpy" in xp.__name__:
        try:
            import ml_dtypes
            dtype = ml_dtypes.bfloat16
        except ImportError:
            pass
    if dtype is None:
        raise ValueError(f"{option}={name!r} is not supported by the {xp.__name__} namespace; "
                         "accepted there: None")
    return dtype


def storage_dtype(name, compute_dtype, xp, option: str):
    """The dtype a state array is stored in: `compute_dtype` when name is None."""
    return compute_dtype if name is None else namespace_dtype(name, xp, option)


def is_narrow(dtype, xp) -> bool:
    """Whether a parameter dtype is narrower than float32 (its writes round away small steps)."""
    return xp.finfo(dtype).bits < 32


def rounds_stochastically(param_rounding: str, dtype, xp) -> bool:
    """Whether a write into a parameter of `dtype` is rounded stochastically: param_rounding
    "stochastic" and a dtype narrower than float32."""
    return param_rounding == "stochastic" and is_narrow(dtype, xp)


def rounding_seed(step_count: int, bucket_index: int) -> int:
    """The seed of one bucket's uniform numbers at one step: distinct for every (step, bucket),
    a function of nothing but them, so a resumed run draws what the uninterrupted one drew."""
    return (step_count * 1_000_003 + bucket_index) % (2**63 - 1)


def stochastic_round(value, dtype, uniform, xp):
    """value (float32 or wider) in `dtype`, rounded stochastically: to the neighbour on the far
    side of value with probability |value − nearest| / |far − nearest|, to the nearest one
    otherwise, which makes the result equal to value in expectation. uniform: numbers in
    [0, 1) of value's shape. Exact values, infinities and NaN come out as a plain cast gives them."""
    nearest = xp.astype(value, dtype)
    nearest_wide = xp.astype(nearest, value.dtype)
    infinity = xp.full_like(nearest, float("inf"))
    far = xp.nextafter(nearest, xp.where(nearest_wide <= value, infinity, -infinity))
    gap = xp.astype(far, value.dtype) - nearest_wide
    distance = value - nearest_wide
    probability = xp.where(distance != 0, distance / gap, xp.zeros_like(distance))
    return xp.where(uniform < probability, far, nearest)


def rounded_sum(param, update, draw_uniform, xp):
    """param + update written into param's dtype: computed in float32 for a dtype narrower than
    float32 and rounded stochastically with the numbers draw_uniform(shape) gives (an adapter's
    own generator); otherwise as param + update in param's dtype."""
    if not is_narrow(param.dtype, xp):
        return xp.astype(param + update, param.dtype)
    value = xp.astype(param, xp.float32) + xp.astype(update, xp.float32)
    return stochastic_round(value, param.dtype, draw_uniform(value.shape), xp)
