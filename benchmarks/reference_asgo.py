"""The ASGO algorithm as the authors' reference code (github infinity-stars/ASGO,
optimizers/asgo.py and the PolarExpress inverse root of optimizers/utils/matrix_decom.py) writes
it, re-implemented here for comparison only: one matrix at a time, the root recomputed every step,
a host read (.item()) for each update norm.

Per 2-D parameter (a square matrix takes the right side, as there):
    M ← lerp(M, G, 1 − β1);   V ← lerp(V, G·Gᵀ or Gᵀ·G, 1 − β2)
    s = 1.01·‖V + εI‖_F;  Y = V/s;  Z = I;  10 PolarExpress steps;  R = Z/√s   (no damping in Y)
    a non-finite R is replaced by the identity
    D = R·M or M·R;   W ← W·(1 − ηλ) − η·0.2·√(m·n)·D/‖D‖_F

benchmarks/step_time.py times it as the "reference-style" baseline; train_lm.py can train with it
(`--optimizers asgo_reference`); tests/test_reference_code.py checks that
`ASGO(..., **REFERENCE_OPTIONS)` takes the same steps.
"""

from __future__ import annotations

import math

import torch

from asgo_core.solvers import polynomial_schedule

REFERENCE_STEPS = 10
# The asgo_core options that reproduce the reference code's arithmetic: the same root iteration,
# and a damping that adds only eps (not the default relative eps·‖V‖_F) to V.
REFERENCE_OPTIONS = dict(root_method="polar_express", root_steps=REFERENCE_STEPS,
                         damping="absolute", eps=1e-10)


class ReferenceStyleASGO(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-2, momentum=0.9, beta2=0.8, eps=1e-10, weight_decay=0.1,
                 update_rms=0.2):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay, update_rms=update_rms))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_matrix(param, group)

    def _step_matrix(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        left = grad.shape[0] < grad.shape[1]
        state = self.state[param]
        if not state:
            k = min(grad.shape)
            state["momentum_buffer"] = torch.zeros_like(grad)
            state["precond"] = torch.zeros(k, k, dtype=grad.dtype, device=grad.device)
        state["momentum_buffer"].lerp_(grad, 1 - group["momentum"])
        gram = grad @ grad.T if left else grad.T @ grad
        state["precond"].lerp_(gram, 1 - group["beta2"])
        root = polar_express_inverse_root(state["precond"], group["eps"])
        if not torch.isfinite(root).all():
            root = torch.eye(root.shape[0], dtype=root.dtype, device=root.device)
        momentum = state["momentum_buffer"]
        update = root @ momentum if left else momentum @ root
        update *= group["update_rms"] * math.sqrt(grad.numel()) / update.norm().item()
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"])


def polar_express_inverse_root(V: torch.Tensor, eps: float) -> torch.Tensor:
    identity = torch.eye(V.shape[0], dtype=V.dtype, device=V.device)
    normaliser = (V + eps * identity).norm() * 1.01
    Y, Z = V / normaliser, identity
    for a, b, c in polynomial_schedule("polar_express", REFERENCE_STEPS):
        T = Z @ Y
        B = b * T + c * (T @ T)
        Y, Z = a * Y + Y @ B, a * Z + B @ Z
    return Z / normaliser.sqrt()

