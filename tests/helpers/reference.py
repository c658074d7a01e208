"""An independent float64 re-derivation of ASGO (SPEC §2) and DASGO (SPEC §3) in plain NumPy.

Written from the specification, one matrix at a time with explicit loops, sharing no code with
asgo_core, so that tests compare the library against the algorithm rather than against itself.
"""

from __future__ import annotations

import numpy as np


def inverse_sqrt(A: np.ndarray, delta: float) -> np.ndarray:
    w, Q = np.linalg.eigh(A.astype(np.float64))
    return (Q * (np.maximum(w, 0.0) + delta) ** -0.5) @ Q.T


def reference_asgo(W0, grads, *, lr=1e-2, beta1=0.9, beta2=0.8, weight_decay=0.1, eps=1e-6,
                   damping="relative", tau=1, update_rms=0.2, accumulate="ema", side="auto"):
    """Run ASGO on one matrix W0 (m, n) through the gradient list; returns (W, M, V, R)."""
    W = np.array(W0, dtype=np.float64)
    m, n = W.shape
    if side == "auto":
        side = "left" if m < n else "right"
    k = m if side == "left" else n
    M = np.zeros_like(W)
    V = np.zeros((k, k))
    R = np.zeros((k, k))
    for t, G in enumerate(grads):
        G = np.asarray(G, dtype=np.float64)
        M = beta1 * M + (1 - beta1) * G
        S = G @ G.T if side == "left" else G.T @ G
        V = beta2 * V + ((1 - beta2) * S if accumulate == "ema" else S)
        if t % tau == 0:
            delta = eps * np.linalg.norm(V) if damping == "relative" else eps
            R = inverse_sqrt(V, delta)
        D = R @ M if side == "left" else M @ R
        if update_rms is not None:
            D = D * update_rms * np.sqrt(m * n) / np.linalg.norm(D)
        W = W - lr * (D + weight_decay * W)
    return W, M, V, R


def reference_dasgo(W0, grads, *, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8,
                    update_rms=0.2, accumulate="ema"):
    """Run DASGO on one matrix; returns (W, M, v)."""
    W = np.array(W0, dtype=np.float64)
    m, n = W.shape
    M = np.zeros_like(W)
    v = np.zeros(n)
    for G in grads:
        G = np.asarray(G, dtype=np.float64)
        M = beta1 * M + (1 - beta1) * G
        column_energy = (G * G).sum(axis=0)
        v = beta2 * v + ((1 - beta2) * column_energy if accumulate == "ema" else column_energy)
        D = M / np.sqrt(v + eps)
        if update_rms is not None:
            D = D * update_rms * np.sqrt(m * n) / np.linalg.norm(D)
        W = W - lr * (D + weight_decay * W)
    return W, M, v


def spd_matrix(rng: np.random.Generator, k: int, condition: float, scale: float = 1.0) -> np.ndarray:
    """A symmetric positive definite k×k matrix with the given condition number and top eigenvalue."""
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    eigenvalues = scale * np.logspace(0, -np.log10(condition), k)
    return (Q * eigenvalues) @ Q.T
