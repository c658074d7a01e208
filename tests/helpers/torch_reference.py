"""The torch adapter as the reference for the JAX training stacks' parameter layouts.

A layer's weight is (out, in) in torch; the same layer's kernel is (in, out) in Flax and
(out, in) in Equinox. Whatever the layout, the optax adapter must precondition the same side,
split the same head blocks and keep the same per-input statistics as the torch adapter does
for the (out, in) weight.
"""

from __future__ import annotations

import numpy as np
import torch

from asgo_core.adapters.torch import ASGO, DASGO

# Options under which the layout matters (side="auto" and max_precond_dim alone do not: the
# auto side is the smaller dimension whichever way the matrix is stored). num_heads=4 divides
# both dimensions of an (8 → 12) layer, so a wrong split would still run, and differ.
LAYOUT_SENSITIVE_CASES = [
    ("asgo", {"side": "left"}),
    ("asgo", {"side": "right"}),
    ("asgo", {"num_heads": 4}),   # head blocks split the outputs
    ("dasgo", {}),                # statistics per input column
]


def torch_steps(weight_out_in, grads_out_in, algorithm: str, lr: float, **options) -> np.ndarray:
    """The (out, in) float64 weight after one torch ASGO/DASGO step per gradient."""
    weight = torch.nn.Parameter(torch.tensor(np.asarray(weight_out_in), dtype=torch.float64))
    opt = {"asgo": ASGO, "dasgo": DASGO}[algorithm]([weight], lr=lr, **options)
    for grad in grads_out_in:
        weight.grad = torch.tensor(np.asarray(grad), dtype=torch.float64)
        opt.step()
    return weight.detach().numpy()
