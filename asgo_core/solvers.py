"""Inverse square roots (A + δI)^{-1/2} of symmetric PSD matrices, batched (SPEC §5, §6).

Every method shares one damping definition (`damping_shift`), so the same eps means the same
matrix in eigh, Newton–Schulz, PolarExpress and coupled Newton. Each solver returns the root
and a per-matrix residual the fallback chain in `asgo_core.step` judges it by.
"""

from __future__ import annotations

import math

from asgo_core import _xp
from asgo_core.config import DAMPING_MODES, DEFAULT_ROOT_STEPS

SOLVER_METHODS = ("eigh", "newton_schulz", "polar_express", "coupled_newton")

# PolarExpress coefficients (Amsel et al.) for the odd polynomial a·x + b·x³ + c·x⁵; the first
# seven are shrunk by (1.01, 1.01³, 1.01⁵) so roundoff cannot push a value past the fixed point.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW
) + ((1.875, -1.25, 0.375),)

# The quintic Newton–Schulz polynomial of the reference code: p(1) = 1, p'(1) = 0, p'(0) = 2.
NEWTON_SCHULZ_COEFFICIENTS = (2.0, -1.5, 0.5)

# The normaliser s = 1.01·‖A + δI‖_F bounds the spectral norm, so A/s has eigenvalues in (0, 1).
_NORMALISER_MARGIN = 1.01


def damping_shift(A, eps: float, damping: str, xp):
    """δ with shape (..., 1, 1): eps·‖A‖_F ("relative") or eps ("absolute"); 0 when eps = 0.

    The relative shift is floored at the dtype's smallest normal number so that A = 0 (an
    unused layer) still has a finite root.
    """
    return damping_for_norm(_xp.safe_frobenius_norm(A, xp), eps, damping, xp)


def damping_for_norm(norm, eps: float, damping: str, xp):
    """`damping_shift` from ‖A‖_F already computed (shape (..., 1, 1))."""
    if damping not in DAMPING_MODES:
        raise ValueError(f"damping={damping!r} is invalid; accepted: " + " | ".join(map(repr, DAMPING_MODES)))
    if eps == 0.0:
        return xp.zeros_like(norm)
    if damping == "absolute":
        return xp.full_like(norm, eps)
    # A full_like array, not a Python float: array-api-compat turns a scalar operand of
    # maximum into a new tensor, a blocking host→device copy on CUDA.
    return xp.maximum(eps * norm, xp.full_like(norm, _xp.smallest_normal(norm, xp)))


def below_normal_range(norm, eps: float, damping: str, xp):
    """Per matrix (norm's shape less its two size-1 axes): whether the statistics have left the
    dtype's normal range, so the root is no longer the scale-invariant one. With relative
    damping that is where eps·‖A‖_F falls below the smallest normal number (the floor of
    `damping_for_norm` replaces it); otherwise where ‖A‖_F itself does (A is subnormal or 0)."""
    smallest = _xp.smallest_normal(norm, xp)
    relative = damping == "relative" and eps > 0.0
    return ((eps * norm if relative else norm) < smallest)[..., 0, 0]


def polynomial_schedule(method: str, steps: int):
    """The (a, b, c) coefficients of each coupled-iteration step."""
    if method == "newton_schulz":
        return (NEWTON_SCHULZ_COEFFICIENTS,) * steps
    last = POLAR_EXPRESS_COEFFICIENTS[-1]
    return tuple(POLAR_EXPRESS_COEFFICIENTS[i] if i < len(POLAR_EXPRESS_COEFFICIENTS) else last
                 for i in range(steps))


def eigh_root(A, delta, xp):
    """Q·diag(max(w, 0) + δ)^{-1/2}·Qᵀ. A decomposition that fails to converge yields NaN
    (counted by the fallback chain); any other error (out of memory, a CUDA error) propagates."""
    eigh = _xp.backend_function(xp, "eigh") or xp.linalg.eigh
    try:
        eigenvalues, eigenvectors = eigh(A)
    except _eigh_errors(xp):
        return xp.full_like(A, math.nan)
    clipped = xp.maximum(eigenvalues, xp.zeros_like(eigenvalues)) + delta[..., 0]
    scaled_vectors = eigenvectors * (clipped ** -0.5)[..., None, :]
    return _xp.matmul(scaled_vectors, _xp.transpose(eigenvectors, xp), xp)


def _eigh_errors(xp) -> tuple:
    """The exception types by which namespace xp's eigh reports a matrix it cannot decompose:
    the backend's EIGH_ERRORS, else NumPy's LinAlgError (array-api-strict wraps NumPy)."""
    errors = _xp.backend_function(xp, "EIGH_ERRORS")
    if errors is not None:
        return errors
    from numpy.linalg import LinAlgError
    return (LinAlgError,)


def _generic_coupled_step(Y, Z, a, b, c, xp):
    T = _xp.matmul(Z, Y, xp)
    B = b * T + c * _xp.matmul(T, T, xp) if c != 0.0 else b * T
    return a * Y + _xp.matmul(Y, B, xp), a * Z + _xp.matmul(B, Z, xp)


def coupled_polynomial_root(A, delta, method: str, steps: int, xp):
    """(A + δI)^{-1/2} by the coupled sign iteration; returns (root, ‖Z·Y − I‖_F/√k).

    With Y₀ = (A + δI)/s and Z₀ = I, each step applies p(x) = a·x + b·x³ + c·x⁵ to the
    singular values of [[0, Y], [Z, 0]], driving Y → ((A+δI)/s)^{1/2} and Z → its inverse.
    """
    step_fn = _xp.backend_function(xp, "coupled_step")
    identity = _xp.eye_like(A, xp)
    shifted = A + delta * identity
    normaliser = _NORMALISER_MARGIN * _xp.safe_frobenius_norm(shifted, xp)
    Y = shifted / normaliser
    Z = xp.broadcast_to(identity, A.shape)
    for a, b, c in polynomial_schedule(method, steps):
        Y, Z = step_fn(Y, Z, a, b, c) if step_fn else _generic_coupled_step(Y, Z, a, b, c, xp)
    residual = _normalised_distance_to_identity(_xp.matmul(Z, Y, xp), identity, xp)
    return Z / xp.sqrt(normaliser), residual


def coupled_newton_root(A, delta, steps: int, tolerance: float | None, xp):
    """(A + δI)^{-1/2} by the coupled Newton iteration for p = 2; returns (root, ‖M − I‖_F/√k).

    X₀ = I, M₀ = (A + δI)/s; T = (3I − M)/2, X ← X·T, M ← T²·M, so M → I and X → (M₀)^{-1/2}.
    A matrix stops changing once ‖M − I‖_F/√k < tolerance (None: 1000 × machine epsilon); the
    step count is fixed, so there is no host synchronisation.
    """
    if tolerance is None:
        tolerance = 1000 * float(xp.finfo(A.dtype).eps)
    identity = _xp.eye_like(A, xp)
    shifted = A + delta * identity
    normaliser = _NORMALISER_MARGIN * _xp.safe_frobenius_norm(shifted, xp)
    M = shifted / normaliser
    X = xp.broadcast_to(identity, A.shape)
    residual = _normalised_distance_to_identity(M, identity, xp)
    for _ in range(steps):
        T = 1.5 * identity - 0.5 * M
        converged = (residual < tolerance)[..., None, None]
        X = xp.where(converged, X, _xp.matmul(X, T, xp))
        M = xp.where(converged, M, _xp.matmul(_xp.matmul(T, T, xp), M, xp))
        residual = _normalised_distance_to_identity(M, identity, xp)
    return X / xp.sqrt(normaliser), residual


def _normalised_distance_to_identity(M, identity, xp):
    difference = M - identity
    return xp.sqrt(xp.sum(difference * difference, axis=(-2, -1))) / math.sqrt(M.shape[-1])


def solve_root(A, delta, method: str, steps: int | None, tolerance: float | None, xp):
    """Dispatch to one solver; returns (root, residual) with residual 0 for eigh."""
    if method == "eigh":
        root = eigh_root(A, delta, xp)
        return root, xp.zeros(A.shape[:-2], dtype=A.dtype, device=_xp.device(A))
    steps = DEFAULT_ROOT_STEPS[method] if steps is None else steps
    if method == "coupled_newton":
        return coupled_newton_root(A, delta, steps, tolerance, xp)
    return coupled_polynomial_root(A, delta, method, steps, xp)


def resolve_method(method: str, A, xp) -> str:
    """Turn "auto" into a concrete method: the backend's choice, else eigh."""
    if method != "auto":
        return method
    choose = _xp.backend_function(xp, "choose_root_method")
    return choose(A.shape[-1], A.dtype, _xp.device(A)) if choose else "eigh"


def inverse_root(A, *, method: str = "eigh", eps: float = 1e-6, damping: str = "relative",
                 steps: int | None = None, tolerance: float | None = None):
    """(A + δI)^{-1/2} for symmetric PSD A of shape (..., k, k), in A's namespace and dtype.

    method: "eigh" | "newton_schulz" | "polar_express" | "coupled_newton" | "auto".
    eps, damping: δ = eps·‖A‖_F ("relative", the default) or δ = eps ("absolute");
        eps = 0 means no damping (A must then be positive definite).
    steps: iterations of an iterative method (None: its default); tolerance: coupled Newton's
        stopping threshold on ‖M − I‖_F/√k (None: 1000 × the dtype's machine epsilon).
    """
    _check_method(method)
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r} is invalid; accepted: a finite number >= 0")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} is invalid; accepted: an integer >= 1 or None")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (..., k, k); got {tuple(A.shape)}")
    xp = _xp.namespace(A)
    delta = damping_shift(A, eps, damping, xp)
    root, _ = solve_root(A, delta, resolve_method(method, A, xp), steps, tolerance, xp)
    return root


def _check_method(method: str) -> None:
    accepted = ("auto",) + SOLVER_METHODS
    if method not in accepted:
        raise ValueError(f"method={method!r} is invalid; accepted: " + " | ".join(map(repr, accepted)))
