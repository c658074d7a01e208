"""Low-rank matrix regression on NumPy: ASGO (the array-API core) vs. plain gradient descent.

Recover W* (64×256, rank 4) from noisy linear measurements Y = W*·X + noise by minimising
½‖W·X − Y‖²/batch. Ill-conditioned inputs X make plain gradient descent slow along small
directions; ASGO's one-sided preconditioner equalises them. Prints both losses every 50 steps.

    python benchmarks/lowrank_regression.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

from asgo_core import ASGOConfig, init_state, step


def make_problem(seed: int, m: int = 64, n: int = 256, rank: int = 4, samples: int = 1024):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(rank)
    column_scales = np.logspace(0, -2, n)  # input features spanning two orders of magnitude
    X = rng.standard_normal((n, samples)) * column_scales[:, None]
    Y = target @ X + 0.01 * rng.standard_normal((m, samples))
    return X, Y


def loss_and_gradient(W, X, Y):
    residual = W @ X - Y
    return 0.5 * float(np.sum(residual**2)) / X.shape[1], residual @ X.T / X.shape[1]


def train(X, Y, steps: int, update_fn):
    W = np.zeros((Y.shape[0], X.shape[0]))
    losses = []
    for t in range(steps):
        loss, gradient = loss_and_gradient(W, X, Y)
        losses.append(loss)
        W = update_fn(W, gradient, t)
    return losses


def gradient_descent(lr: float):
    return lambda W, gradient, t: W - lr * gradient


def asgo(lr: float, steps: int):
    config = ASGOConfig(weight_decay=0.0)
    state = None

    def update(W, gradient, t):
        nonlocal state
        state = init_state(W, config) if state is None else state
        direction, state = step(gradient, state, W, config)
        return W - lr * 0.5 * (1 + np.cos(np.pi * t / steps)) * direction  # cosine decay
    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    X, Y = make_problem(args.seed)
    curves = {
        "gradient descent (lr 1.0)": train(X, Y, args.steps, gradient_descent(1.0)),
        "ASGO (lr 0.05)": train(X, Y, args.steps, asgo(0.05, args.steps)),
    }
    print(f"{'step':>6} " + " ".join(f"{name:>28}" for name in curves))
    for t in list(range(0, args.steps, 50)) + [args.steps - 1]:
        print(f"{t:>6} " + " ".join(f"{curve[t]:>28.5f}" for curve in curves.values()))


if __name__ == "__main__":
    main()
