"""Frozen, validated configurations for ASGO and DASGO (SPEC §2–4, §6).

Every value is checked when the config is built, so a bad hyperparameter fails before any
optimizer state exists. Error messages name the field and the accepted values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

SIDES = ("auto", "left", "right")
ROOT_METHODS = ("auto", "eigh", "newton_schulz", "polar_express", "coupled_newton")
ACCUMULATE_MODES = ("ema", "sum")
DAMPING_MODES = ("relative", "absolute")
NONFINITE_POLICIES = ("skip", "raise")
MATMUL_DTYPES = (None, "bfloat16")
STATE_DTYPES = (None, "bfloat16")

# Steps each iterative solver runs when `root_steps` is None. PolarExpress reaches
# normalised eigenvalues down to ~1e-8 in ten steps (SPEC §5); Newton–Schulz lifts small
# eigenvalues by a factor 2 per step only, and coupled Newton by 2.25, so they need more.
DEFAULT_ROOT_STEPS = {"polar_express": 10, "newton_schulz": 20, "coupled_newton": 30}


def fail(field_name: str, value, accepted: str) -> None:
    """Raise the ValueError every option check uses: the name, the value, what is accepted."""
    raise ValueError(f"{field_name}={value!r} is invalid; accepted: {accepted}")


def _check_unit_interval(name: str, value: float, *, closed_right: bool) -> None:
    if not (is_number(value) and 0.0 <= value and (value <= 1.0 if closed_right else value < 1.0)):
        fail(name, value, "a number in [0, 1]" if closed_right else "a number in [0, 1)")


def is_number(value) -> bool:
    """An int or float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    # comparisons, not math.isfinite: under torch.compile a float option can arrive as a
    # symbolic float, which comparisons guard on and math.isfinite cannot trace
    return -math.inf < value < math.inf


def check_non_negative(name: str, value: float) -> None:
    if not (is_number(value) and _is_finite(value) and value >= 0.0):
        fail(name, value, "a finite number >= 0")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        fail(name, value, " | ".join(repr(c) for c in choices))


def _check_positive_int(name: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(name, value, "an integer >= 1" + (" or None" if allow_none else ""))


def _check_update_rms(value) -> None:
    if value is None:
        return
    if not (is_number(value) and _is_finite(value) and value > 0.0):
        fail("update_rms", value, "a finite number > 0, or None for the raw step")


def _check_common(config) -> None:
    _check_unit_interval("beta1", config.beta1, closed_right=False)
    _check_unit_interval("beta2", config.beta2, closed_right=True)
    check_non_negative("weight_decay", config.weight_decay)
    check_non_negative("eps", config.eps)
    _check_update_rms(config.update_rms)
    _check_choice("accumulate", config.accumulate, ACCUMULATE_MODES)
    _check_choice("nonfinite", config.nonfinite, NONFINITE_POLICIES)
    _check_choice("mu_dtype", config.mu_dtype, STATE_DTYPES)
    if config.accumulate == "ema" and config.beta2 == 1.0:
        fail("beta2", config.beta2, "a number in [0, 1) with accumulate='ema' "
              "(beta2=1 never updates the statistics; use accumulate='sum' for Algorithm 1)")


@dataclass(frozen=True)
class ASGOConfig:
    """Hyperparameters of ASGO (SPEC §2). Defaults are the reference code's.

    beta1: momentum, M ← beta1·M + (1 − beta1)·G.
    beta2: statistics decay. "ema": V ← beta2·V + (1 − beta2)·S;
        "sum": V ← beta2·V + S (beta2 = 1 is Algorithm 1's plain sum).
    weight_decay: decoupled, the update carries weight_decay·W.
    eps, damping: the root is (V + δI)^{-1/2}. "relative" (default): δ = eps·‖V‖_F, so the
        damped matrix has condition number at most 1 + 1/eps whatever the scale of the
        gradients, and every solver sees the same normalised spectrum. "absolute": δ = eps,
        as the reference code (use eps=1e-10 there for fidelity). eps = 0: no damping.
    precondition_frequency: τ, the root is recomputed every τ steps (and at the first).
    update_rms: ρ, the update is rescaled to RMS ρ; None keeps the raw step.
    side: which side is preconditioned; "auto" takes the small side (right when square).
    root_method: inverse-root solver; "auto" lets the backend choose by size and device.
    root_steps: iterations of the iterative solvers (None: per-method default).
    root_tolerance: coupled Newton stops refining a matrix once ‖M − I‖_F/√k is below it
        (None: 1000 × the machine epsilon of the statistics dtype).
    residual_tolerance: a root whose ‖R (V + δI) R − I‖_F/√k exceeds this is rejected and
        the fallback chain runs (iterative → eigh → eigh in float64 → keep the previous root).
    max_precond_dim: a preconditioned side larger than this is split into diagonal blocks.
    num_heads: split the preconditioned (left, output) side into this many equal head blocks
        (SPEC §4: attention Q/K); None disables it.
    nonfinite: "skip" a matrix whose gradient is not finite (counted), or "raise".
    matmul_dtype: None, or "bfloat16": the inputs of the Gram G·Gᵀ and of the apply R·M are
        rounded to bfloat16 (products accumulate in float32 where the backend does so) while V,
        R and the solve stay in the statistics dtype. About three significant digits of S and D
        for 2–4× faster GEMMs on bf16 hardware, the trade torch.optim.Muon makes for its whole
        iteration. Needs a namespace with bfloat16 (torch, JAX); None (default) keeps full precision.
    mu_dtype: None, or "bfloat16": the dtype the momentum is stored in between steps (optax's
        name). The step computes in the statistics dtype and rounds the new momentum to nearest
        for storage. None (default): the statistics dtype (float32 for 16-bit parameters).
    precond_dtype: None, or "bfloat16": the dtype the Gram statistics V and the root R are
        stored in; both are computed in the statistics dtype each step. None (default): the
        statistics dtype. NumPy's bfloat16 is ml_dtypes'; CuPy has none.
    """

    beta1: float = 0.9
    beta2: float = 0.8
    weight_decay: float = 0.1
    eps: float = 1e-6
    damping: str = "relative"
    precondition_frequency: int = 1
    update_rms: Optional[float] = 0.2
    accumulate: str = "ema"
    side: str = "auto"
    root_method: str = "auto"
    root_steps: Optional[int] = None
    root_tolerance: Optional[float] = None
    residual_tolerance: float = 0.1
    max_precond_dim: Optional[int] = None
    num_heads: Optional[int] = None
    nonfinite: str = "skip"
    matmul_dtype: Optional[str] = None
    mu_dtype: Optional[str] = None
    precond_dtype: Optional[str] = None

    def __post_init__(self):
        _check_common(self)
        _check_choice("matmul_dtype", self.matmul_dtype, MATMUL_DTYPES)
        _check_choice("precond_dtype", self.precond_dtype, STATE_DTYPES)
        _check_choice("damping", self.damping, DAMPING_MODES)
        _check_positive_int("precondition_frequency", self.precondition_frequency, allow_none=False)
        _check_choice("side", self.side, SIDES)
        _check_choice("root_method", self.root_method, ROOT_METHODS)
        _check_positive_int("root_steps", self.root_steps, allow_none=True)
        if self.root_tolerance is not None:
            check_non_negative("root_tolerance", self.root_tolerance)
        if not (is_number(self.residual_tolerance) and self.residual_tolerance > 0):
            fail("residual_tolerance", self.residual_tolerance, "a number > 0 (math.inf disables the check)")
        _check_positive_int("max_precond_dim", self.max_precond_dim, allow_none=True)
        _check_positive_int("num_heads", self.num_heads, allow_none=True)
        if self.num_heads is not None and self.side == "right":
            fail("side", self.side, "'auto' or 'left' when num_heads is set "
                  "(head blocks split the output rows, the left side)")


@dataclass(frozen=True)
class DASGOConfig:
    """Hyperparameters of DASGO, the diagonal variant (SPEC §3).

    v ← beta2·v + (1 − beta2)·colsum(G ⊙ G) ("ema") or beta2·v + colsum(G ⊙ G) ("sum"),
    D = M · diag(v + eps)^{-1/2} with an absolute eps, as Adam's. Other fields as ASGOConfig
    (v, n numbers per matrix, stays in the statistics dtype).
    """

    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    eps: float = 1e-8
    update_rms: Optional[float] = 0.2
    accumulate: str = "ema"
    nonfinite: str = "skip"
    mu_dtype: Optional[str] = None

    def __post_init__(self):
        _check_common(self)


def config_field_names(config_type) -> tuple[str, ...]:
    """The option names of a config class, in declaration order."""
    return tuple(f.name for f in fields(config_type))
