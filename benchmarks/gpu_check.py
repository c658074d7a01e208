"""One GPU check, under 5 minutes: parity, inverse-root timings and ASGO step time per GPU backend.

    python benchmarks/gpu_check.py            # exit 1 on a parity failure, 0 otherwise

1. Versions of Python, NumPy, asgo and every GPU framework, and the device name.
2. Parity: the same seeded problem (three matrix stacks, both preconditioned sides, block
   splitting) is run for 20 steps through `asgo_core.step` on NumPy float64 and on each GPU
   backend (torch-cuda, jax-gpu, cupy), for every root method. float64 on the GPU must match
   NumPy to 1e-8 (params moved, momentum, Gram, root); float32 to 2e-2 (params moved). The core
   is called directly, so the check does not depend on the adapters.
3. Timing table: `inverse_root` per backend and method for k in {256, 1024, 4096}, single
   matrix and a batch, float32 (median of 3 after a warm-up; a cell whose warm-up takes longer
   than 5 s is reported without repeats).
4. One ASGO step (root refreshed, float32) on the GPT-2-style matrices of benchmarks/step_time.py
   (d_model 384, 6 layers: qkv 1152×384, attention projection 384×384, MLP fc 1536×384,
   MLP projection 384×1536), stacked by shape as the adapters do.
Backends that are not installed or see no GPU are reported and skipped; on a machine with no GPU
at all the script says so and exits 0.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from importlib import metadata

import numpy as np

from asgo_core import ASGOConfig, init_state, inverse_root, needs_root_refresh, step

ROOT_METHODS = ("eigh", "newton_schulz", "polar_express", "coupled_newton")
PARITY_SHAPES = ((2, 24, 40), (1, 40, 24), (3, 32, 32))
PARITY_STEPS, LR = 20, 1e-2
PARITY_TOLERANCE = {"float64": 1e-8, "float32": 2e-2}
TIMING_SIZES = {256: 16, 1024: 8, 4096: 2}          # k → batch size of the batched row
GPT2_STACKS = ((6, 1152, 384), (6, 384, 384), (6, 1536, 384), (6, 384, 1536))
SLOW_CELL_S = 5.0


# ---- backends ----------------------------------------------------------------------------
class GPUBackend:
    """Move NumPy data to one GPU framework and back, and wait for its queued work."""

    def __init__(self, name):
        self.name = name
        if name == "torch-cuda":
            import torch
            self.module = torch
        elif name == "jax-gpu":
            import jax
            jax.config.update("jax_enable_x64", True)
            gpus = [device for device in jax.devices() if device.platform == "gpu"]
            self.module, self.device = jax, gpus[0] if gpus else None
        else:
            import cupy
            self.module = cupy

    def to_device(self, array):
        if self.name == "torch-cuda":
            return self.module.as_tensor(array, device="cuda")
        if self.name == "jax-gpu":
            return self.module.device_put(array, self.device)
        return self.module.asarray(array)

    def to_numpy(self, array):
        if self.name == "torch-cuda":
            return array.detach().cpu().numpy()
        if self.name == "cupy":
            return array.get()
        return np.asarray(array)

    def synchronize(self, result=None):
        if self.name == "torch-cuda":
            self.module.cuda.synchronize()
        elif self.name == "jax-gpu":
            self.module.block_until_ready(result)
        else:
            self.module.cuda.Device().synchronize()

    def device_name(self):
        if self.name == "torch-cuda":
            return self.module.cuda.get_device_name(0)
        if self.name == "jax-gpu":
            return self.device.device_kind
        props = self.module.cuda.runtime.getDeviceProperties(0)
        return props["name"].decode() if isinstance(props["name"], bytes) else props["name"]

    def compiled(self, function):
        """jax.jit for JAX (eager JAX dispatch would dominate the timings); others as is."""
        return self.module.jit(function) if self.name == "jax-gpu" else function


def gpu_backends():
    """(available backends, {name: reason skipped})."""
    available, skipped = [], {}
    for name, package in (("torch-cuda", "torch"), ("jax-gpu", "jax"), ("cupy", "cupy")):
        try:
            backend = GPUBackend(name)
            if not has_gpu(backend):
                skipped[name] = f"{package} is installed but sees no GPU"
                continue
            available.append(backend)
        except ImportError:
            skipped[name] = f"{package} is not installed"
        except Exception as error:  # a broken driver or CUDA library: report, do not crash
            skipped[name] = f"{package} failed to start: {error}"
    return available, skipped


def has_gpu(backend) -> bool:
    if backend.name == "torch-cuda":
        return backend.module.cuda.is_available()
    if backend.name == "jax-gpu":
        return backend.device is not None
    return backend.module.cuda.runtime.getDeviceCount() > 0


def print_versions():
    print(f"python {platform.python_version()}  numpy {np.__version__}  asgo {metadata.version('asgo')}")
    for distribution in ("torch", "jax", "jaxlib", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        try:
            print(f"  {distribution} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            pass


# ---- parity ---------------------------------------------------------------------------
def parity_problem():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape) for shape in PARITY_SHAPES]
    grads = [[rng.standard_normal(shape) for shape in PARITY_SHAPES] for _ in range(PARITY_STEPS)]
    return params, grads


def parity_config(method):
    return ASGOConfig(root_method=method, precondition_frequency=3, max_precond_dim=16)


def run_core(params, grads, config, convert):
    """20 core steps on the arrays `convert` produces; returns (params, states)."""
    params = [convert(p) for p in params]
    states = [init_state(p, config) for p in params]
    for t, step_grads in enumerate(grads):
        refresh = needs_root_refresh(t, config)
        for i, g in enumerate(step_grads):
            update, states[i] = step(convert(g), states[i], params[i], config, refresh_root=refresh)
            params[i] = params[i] - LR * update
    return params, states


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def compare(backend, method, dtype, reference, start):
    """Largest relative error of one backend run against the NumPy float64 run."""
    params, grads = parity_problem()
    config = parity_config(method)
    got_params, got_states = run_core(params, grads, config,
                                      lambda a: backend.to_device(np.asarray(a, dtype=dtype)))
    ref_params, ref_states = reference
    errors = [relative_error(backend.to_numpy(p) - s, r - s) for p, r, s in zip(got_params, ref_params, start)]
    if dtype == "float64":
        for got, ref in zip(got_states, ref_states):
            errors.append(relative_error(backend.to_numpy(got.momentum), ref.momentum))
            errors += [relative_error(backend.to_numpy(g), r) for g, r in zip(got.gram, ref.gram)]
            errors += [relative_error(backend.to_numpy(g), r) for g, r in zip(got.root, ref.root)]
    return max(errors)


def parity(backends) -> bool:
    print(f"\n== parity: {PARITY_STEPS} core steps vs NumPy float64 "
          f"(tolerance float64 {PARITY_TOLERANCE['float64']:g}, float32 {PARITY_TOLERANCE['float32']:g})")
    start, grads = parity_problem()
    all_passed = True
    for method in ROOT_METHODS:
        reference = run_core(start, grads, parity_config(method), lambda a: a)
        for backend in backends:
            for dtype in ("float64", "float32"):
                try:
                    error = compare(backend, method, dtype, reference, start)
                    passed = error <= PARITY_TOLERANCE[dtype]
                    verdict = "ok" if passed else "FAIL"
                except Exception as error_raised:
                    error, passed, verdict = float("nan"), False, f"FAIL ({type(error_raised).__name__}: {error_raised})"
                all_passed &= passed
                print(f"  {backend.name:10s} {method:15s} {dtype:8s} max rel error {error:.2e}  {verdict}")
    return all_passed


# ---- timings ----------------------------------------------------------------------------
def timed(backend, function, *args):
    """Median seconds of function(*args) (3 runs after a warm-up; 1 run if the warm-up is slow)."""
    started = time.perf_counter()
    backend.synchronize(function(*args))
    warm_up = time.perf_counter() - started
    if warm_up > SLOW_CELL_S:
        return warm_up
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        backend.synchronize(function(*args))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def spd_batch(k, batch):
    rng = np.random.default_rng(k)
    G = rng.standard_normal((batch, k, k // 2)).astype(np.float32)
    return G @ np.swapaxes(G, -1, -2)   # rank k/2: the rank-deficient case of early training


def root_timings(backends):
    print("\n== inverse_root time (float32, ms; batched rows: batch of B)")
    print(f"  {'backend':10s} {'k':>5s} {'B':>3s} " + " ".join(f"{m:>15s}" for m in ROOT_METHODS))
    for backend in backends:
        for k, batch in TIMING_SIZES.items():
            for size in (1, batch):
                A = backend.to_device(spd_batch(k, size))
                cells = []
                for method in ROOT_METHODS:
                    solve = backend.compiled(lambda X, method=method: inverse_root(X, method=method))
                    try:
                        cells.append(f"{timed(backend, solve, A) * 1e3:15.2f}")
                    except Exception as error:
                        cells.append(f"{'error':>15s}")
                        print(f"    {backend.name} k={k} {method}: {type(error).__name__}: {error}")
                print(f"  {backend.name:10s} {k:5d} {size:3d} " + " ".join(cells))


def gpt2_step_timings(backends):
    count = sum(b * m * n for b, m, n in GPT2_STACKS)
    print(f"\n== one ASGO step, root refreshed, float32: GPT-2-style d_model 384 × 6 layers "
          f"({count / 1e6:.1f} M matrix params, {len(GPT2_STACKS)} stacks), ms")
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32))
            for shape in GPT2_STACKS]
    for backend in backends:
        stacks = [(backend.to_device(W), backend.to_device(G)) for W, G in host]
        cells = []
        for method in ("auto",) + ROOT_METHODS:
            config = ASGOConfig(root_method=method)
            states = [init_state(W, config) for W, _ in stacks]

            def one_step(states, config=config):
                return [step(G, state, W, config, refresh_root=True)[0]
                        for (W, G), state in zip(stacks, states)]

            try:
                seconds = timed(backend, backend.compiled(one_step), states)
                cells.append(f"{method}={seconds * 1e3:.1f}")
            except Exception as error:
                cells.append(f"{method}=error ({type(error).__name__})")
        print(f"  {backend.name:10s} " + "  ".join(cells))


def main() -> int:
    print("asgo GPU check")
    print_versions()
    backends, skipped = gpu_backends()
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}")
    if not backends:
        print("\nNo GPU is present on this machine (no backend sees one): nothing to check. Exit 0.")
        return 0
    for backend in backends:
        print(f"  {backend.name}: device {backend.device_name()}")
    started = time.perf_counter()
    passed = parity(backends)
    root_timings(backends)
    gpt2_step_timings(backends)
    print(f"\nparity {'passed' if passed else 'FAILED'}; total {time.perf_counter() - started:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
