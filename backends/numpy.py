"""NumPy fast paths: LAPACK eigh and in-place coupled-iteration steps."""

from __future__ import annotations

import numpy as np


def eigh(A):
    return np.linalg.eigh(A)


def coupled_step(Y, Z, a, b, c):
    """One coupled step with two temporaries instead of the generic code's six."""
    T = np.matmul(Z, Y)
    B = np.matmul(T, T) if c != 0.0 else np.zeros_like(T)
    B *= c
    B += b * T
    Y_next = np.matmul(Y, B)
    Y_next += a * Y
    Z_next = np.matmul(B, Z)
    Z_next += a * Z
    return Y_next, Z_next


def gram_update(V, G, decay, weight):
    gram = np.matmul(G, np.swapaxes(G, -1, -2))
    gram *= weight
    gram += decay * V
    return gram
