"""Accuracy vs. time of every inverse-root method on every installed backend.

For SPD matrices A = Q·diag(w)·Qᵀ with a chosen size k and condition number, compare
asgo_core.inverse_root(A, method, eps) with (A + eps·‖A‖_F·I)^{-1/2} from a float64
eigendecomposition (relative Frobenius error). The default eps is the optimizer's (1e-6, relative
damping), so condition numbers above 1e6 show what the damping makes of them; --eps 0 measures
the undamped solvers (float32 cannot resolve condition numbers near 1e10 then). Each call is
timed as the median of --repeats calls after one warm-up call. Prints a table and writes the raw
rows (results.json), the machine (machine.json) and an error-vs-time scatter plot (PNG).

    python benchmarks/inverse_root.py [--sizes 64 256 1024 2048] [--conditions 1e2 1e6 1e10]
                                      [--dtypes float32 float64] [--backends numpy torch jax]
                                      [--eps 1e-6]
                                      [--out results/inverse_root]
"""

from __future__ import annotations

import argparse
import importlib
import os

import numpy as np

import harness  # benchmarks/, the script's own directory
from asgo_core import inverse_root

METHODS = ("eigh", "newton_schulz", "polar_express", "coupled_newton")
BACKENDS = ("numpy", "torch", "jax", "cupy")


def spd_matrix(k: int, condition: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (Q * np.logspace(0, -np.log10(condition), k)) @ Q.T


def exact_inverse_root(A: np.ndarray, eps: float) -> np.ndarray:
    w, Q = np.linalg.eigh(A)
    return (Q * (np.maximum(w, 0.0) + eps * np.linalg.norm(A)) ** -0.5) @ Q.T


class Converter:
    """Moves NumPy arrays into a backend and results back, and waits for the device."""

    def __init__(self, name: str):
        self.name = name
        if name == "jax":
            import jax
            jax.config.update("jax_enable_x64", True)
        self.module = importlib.import_module(name)

    def to_backend(self, array: np.ndarray, dtype: str):
        if self.name == "torch":
            device = "cuda" if self.module.cuda.is_available() else "cpu"
            return self.module.as_tensor(array.astype(dtype), device=device)
        if self.name == "jax":
            return self.module.numpy.asarray(array.astype(dtype))
        if self.name == "cupy":
            return self.module.asarray(array.astype(dtype))
        return array.astype(dtype)

    def to_numpy(self, x) -> np.ndarray:
        if self.name == "torch":
            return x.cpu().numpy()
        if self.name == "cupy":
            return x.get()
        return np.asarray(x)

    def wait(self, x) -> None:
        if self.name == "torch" and x.is_cuda:
            self.module.cuda.synchronize()
        elif self.name == "jax":
            x.block_until_ready()
        elif self.name == "cupy":
            self.module.cuda.Device().synchronize()


def available_backends(names):
    converters = []
    for name in names:
        try:
            converters.append(Converter(name))
        except ImportError:
            print(f"[skip] {name}: not installed")
    return converters


def time_call(function, converter, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up call (compilation, workspace)."""
    return harness.median_wall(harness.samples(lambda: converter.wait(function()), repeats, warmup=1))


def measure(converters, sizes, conditions, dtypes, eps: float, repeats: int):
    rows = []
    for k in sizes:
        for condition in conditions:
            A = spd_matrix(k, condition)
            expected = exact_inverse_root(A, eps)
            for converter in converters:
                for dtype in dtypes:
                    A_backend = converter.to_backend(A, dtype)
                    for method in METHODS:
                        solve = lambda: inverse_root(A_backend, method=method, eps=eps)  # noqa: E731
                        seconds = time_call(solve, converter, repeats)
                        result = converter.to_numpy(solve()).astype(np.float64)
                        error = float(np.linalg.norm(result - expected) / np.linalg.norm(expected))
                        rows.append(dict(backend=converter.name, dtype=dtype, method=method, k=k, eps=eps,
                                         condition=condition, seconds=seconds, relative_error=error))
                        print_row(rows[-1])
    return rows


def print_row(row) -> None:
    print(f"{row['backend']:>6} {row['dtype']:>8} {row['method']:>15} {row['k']:>5} "
          f"{row['condition']:>8.0e} {row['seconds'] * 1e3:>10.2f} ms {row['relative_error']:>10.2e}")


def plot(rows, path: str) -> None:
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    markers = dict(zip(METHODS, "osD^"))
    for axis, dtype in zip(axes, ("float32", "float64")):
        for row in (r for r in rows if r["dtype"] == dtype):
            axis.scatter(row["seconds"], max(row["relative_error"], 1e-17), marker=markers[row["method"]],
                         s=12 + 4 * np.log2(row["k"]), alpha=0.7,
                         color=f"C{BACKENDS.index(row['backend'])}")
        axis.set(xscale="log", yscale="log", xlabel="seconds per call (median)", title=dtype)
    axes[0].set_ylabel("relative error vs. float64 eigh")
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="gray", label=name) for name, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=f"C{i}", label=b) for i, b in enumerate(BACKENDS)]
    axes[1].legend(handles=handles, loc="best", fontsize=8)
    figure.suptitle("inverse_root: error vs. time (marker size grows with k)")
    harness.save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--conditions", type=float, nargs="+", default=[1e2, 1e6, 1e10])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--eps", type=float, default=1e-6, help="relative damping (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/inverse_root")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    machine = harness.machine("torch", "jax", "jaxlib", "cupy-cuda13x")
    harness.write_json(os.path.join(args.out, "machine.json"), machine)
    print(f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average'][0]:.1f}")
    print(f"eps = {args.eps:g} (relative damping)")
    print(f"{'backend':>6} {'dtype':>8} {'method':>15} {'k':>5} {'cond':>8} {'time':>13} {'rel.err':>10}")
    rows = measure(available_backends(args.backends), args.sizes, args.conditions, args.dtypes, args.eps, args.repeats)
    harness.write_json(os.path.join(args.out, "results.json"), rows)
    plot(rows, os.path.join(args.out, "error_vs_time.png"))
    print(f"wrote {args.out}/results.json, machine.json and error_vs_time.png")


if __name__ == "__main__":
    main()
