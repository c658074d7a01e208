"""One GPU check in one command: parity, fallbacks, adapters, inverse-root and step timings.

    python benchmarks/gpu_check.py [--json PATH]     # exit 1 on a failed check, 0 otherwise

Runs on every framework target it finds: torch (CUDA, else CPU), JAX (its GPU, else CPU) and
CuPy (GPU only; skipped with a line saying why). On a machine without a GPU the CPU targets run
a reduced plan (smaller sizes), which checks the script itself in under a minute. Every figure
goes to a JSON file (--json, else $OUT/gpu_check.json, else ./gpu_check.json); the printed
summary stays under 100 lines.

1. Parity: three matrix stacks (both preconditioned sides, block splitting) through 20 core
   steps (`asgo_core.step`, jitted per step on JAX) against NumPy float64, per root method:
   float64 within 1e-8 (params moved, momentum, Gram, root), float32 within 5e-5 (params moved:
   float32 gives ~1e-5 at most, matmul inputs rounded to TF32 2e-4 to 9e-4), and no fallback
   counted (an eigh that always failed would otherwise pass through the float64 retry).
2. Fallback branch: a root method that cannot converge (Newton–Schulz, one step) must fall
   back to eigh on every block, count it, and give the eigh step.
3. Adapters: the torch adapter on its device and the CuPy adapter (its fused kernels: the
   parameter write and AdamW), float32, 5 steps of matrices and a bias, against the NumPy
   adapter in float64 (params moved within the float32 parity tolerance).
4. `inverse_root` per method and size, single matrix and a batch, float32.
5. eigh against the iteration, float32 (torch only): torch's eigh, CuPy's eigh on the same
   tensor through DLPack, and polar_express, at the GPT-2 shape (k 384, batch 6), 500×100×100
   and k = 1024 / 4096. Its "auto_table" (median ms per k and method of torch's own two) is
   what asgo_core.backends.torch.CUDA_ROOT_TIMINGS_MS takes for root_method="auto" on CUDA.
6. One ASGO step (root refreshed, float32) on GPT-2-style stacks (d_model 384 × 6 layers on a
   GPU: qkv 1152×384, attention projection 384×384, MLP 1536×384 and 384×1536), per root method.
Timings: a jitted function is compiled first (its compile time reported apart), then one
warm-up run (reported), then the median of 3 timed runs; a cell whose warm-up exceeds
CELL_BUDGET_S is reported over budget without timed runs, which keeps the script within its
budget. Arrays enter every jitted function as arguments, never as closed-over constants (XLA
would fold them at compile time). JAX is told not to preallocate GPU memory
(XLA_PYTHON_CLIENT_PREALLOCATE=false): torch, JAX and CuPy share the GPU in this process.
"""

from __future__ import annotations

import argparse
import os

# Before JAX starts: its default takes 75% of GPU memory at the first array, which torch and
# CuPy in this process then lack.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import harness  # benchmarks/, the script's own directory (standard library and NumPy only)
from asgo_core import ASGOConfig, FALLBACK_LEVELS, init_state, inverse_root, needs_root_refresh, step

ROOT_METHODS = ("eigh", "newton_schulz", "polar_express", "coupled_newton")
PARITY_SHAPES = ((2, 24, 40), (1, 40, 24), (3, 32, 32))
PARITY_STEPS, LR = 20, 1e-2
TOLERANCE = {"float64": 1e-8, "float32": 5e-5}
ADAPTER_SHAPES = {"w1": (24, 40), "w2": (40, 24), "bias": (24,)}
ADAPTER_STEPS = 5
TIMED_RUNS = 3
CELL_BUDGET_S = 10.0


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: full on a GPU, reduced on a CPU (where only the script is checked)."""
    parity_methods: tuple
    timing_sizes: dict        # k → batch size of the batched row
    eigh_shapes: tuple        # (k, batch) of the eigh comparison
    d_model: int
    layers: int
    step_methods: tuple


GPU_PLAN = Plan(ROOT_METHODS, {256: 16, 1024: 8}, ((384, 6), (100, 500), (1024, 2), (4096, 1)),
                384, 6, ("auto",) + ROOT_METHODS)
# eigh and polar_express cover both root paths and the fallback chain (lax.cond under jit)
CPU_PLAN = Plan(("eigh", "polar_express"), {64: 4}, ((48, 3), (96, 2)), 96, 1, ("auto", "polar_express"))


def gpt2_stacks(plan):
    """qkv (3d, d), attention projection (d, d), MLP (4d, d) and (d, 4d), one matrix per layer."""
    d, layers = plan.d_model, plan.layers
    return ((layers, 3 * d, d), (layers, d, d), (layers, 4 * d, d), (layers, d, 4 * d))


# ---- targets -------------------------------------------------------------------------------
class Target:
    """One framework on one device: moves NumPy data in and out, waits for queued work, and
    compiles (jax.jit) where eager dispatch would dominate."""

    def __init__(self, name, module, device=None):
        self.name, self.module, self.device = name, module, device
        self.on_gpu = not name.endswith("-cpu")

    def to_device(self, array):
        if self.name.startswith("torch"):
            return self.module.as_tensor(array, device=self.device)
        if self.name.startswith("jax"):
            return self.module.device_put(array, self.device)
        return self.module.asarray(array)

    def to_numpy(self, array):
        if self.name.startswith("torch"):
            return array.detach().cpu().numpy()
        if self.name == "cupy":
            return array.get()
        return np.asarray(array)

    def synchronize(self, result):
        if self.name == "torch-cuda":
            self.module.cuda.synchronize()
        elif self.name.startswith("jax"):
            self.module.block_until_ready(result)
        elif self.name == "cupy":
            self.module.cuda.Device().synchronize()

    def compiled(self, function):
        return self.module.jit(function) if self.name.startswith("jax") else function

    def device_name(self):
        if self.name == "torch-cuda":
            return self.module.cuda.get_device_name(0)
        if self.name == "cupy":
            props = self.module.cuda.runtime.getDeviceProperties(0)
            return props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        if self.name.startswith("jax"):
            return self.device.device_kind
        return harness.cpu_model()


def find_targets():
    """(targets, {name: why skipped}); a framework that fails to start is reported, not fatal."""
    targets, skipped = [], {}
    for name, start in (("torch", _torch_target), ("jax", _jax_target), ("cupy", _cupy_target)):
        try:
            targets.append(start())
        except ImportError as error:
            skipped[name] = f"not installed ({error})"
        except _NoGPU as reason:
            skipped[name] = str(reason)
        except Exception as error:  # a broken driver or CUDA library: the finding to report
            skipped[name] = f"failed to start: {type(error).__name__}: {error}"
    return targets, skipped


class _NoGPU(Exception):
    pass


def _torch_target():
    import torch
    if torch.cuda.is_available():
        return Target("torch-cuda", torch, "cuda")
    torch.set_num_threads(1)  # small CPU problems: OpenMP barriers cost more than they gain
    return Target("torch-cpu", torch, "cpu")


def _jax_target():
    import jax
    jax.config.update("jax_enable_x64", True)
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    return Target("jax-gpu" if gpus else "jax-cpu", jax, gpus[0] if gpus else jax.devices("cpu")[0])


def _cupy_target():
    import cupy
    if cupy.cuda.runtime.getDeviceCount() == 0:
        raise _NoGPU("installed, but sees no GPU")
    return Target("cupy", cupy)


def versions():
    return harness.versions("asgo", "torch", "jax", "jaxlib", "jax-cuda13-plugin", "cupy-cuda13x")


# ---- timing --------------------------------------------------------------------------------
def timed(target, function, *args):
    """{"compile_s", "warmup_s", "median_ms", "repeats"}: a jitted function compiled first
    (compile_s), one warm-up run, then the median of TIMED_RUNS runs; a warm-up longer than
    CELL_BUDGET_S ends the cell there (over_budget, no timed runs)."""
    figures = {}
    if hasattr(function, "lower"):  # jax.jit: compile apart from the runs
        with harness.Stopwatch() as compilation:
            function = function.lower(*args).compile()
        figures["compile_s"] = round(compilation.wall_s, 4)
    run = lambda: target.synchronize(function(*args))  # noqa: E731
    figures["warmup_s"] = round(harness.sample(run).wall_s, 4)
    if figures["warmup_s"] > CELL_BUDGET_S:
        return dict(figures, median_ms=float("nan"), repeats=0, over_budget=True)
    samples = harness.samples(run, TIMED_RUNS)
    return dict(figures, median_ms=round(harness.median_wall(samples) * 1e3, 3), repeats=len(samples))


# ---- 1. parity -------------------------------------------------------------------------------
def parity_problem():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape) for shape in PARITY_SHAPES]
    grads = [[rng.standard_normal(shape) for shape in PARITY_SHAPES] for _ in range(PARITY_STEPS)]
    return params, grads


def parity_config(method):
    return ASGOConfig(root_method=method, precondition_frequency=3, max_precond_dim=16)


def core_steppers(config, compile_):
    """{refresh: one step of every stack, params ← params − LR·update}, compiled by `compile_`."""
    def make(refresh):
        def one_step(params, grads, states):
            results = [step(g, s, w, config, refresh_root=refresh) for w, g, s in zip(params, grads, states)]
            return [w - LR * u for w, (u, _) in zip(params, results)], [s for _, s in results]
        return compile_(one_step)
    return {True: make(True), False: make(False)}


def run_core(params, grads, config, convert, compile_=lambda f: f):
    """PARITY_STEPS core steps on the arrays `convert` makes; returns (params, states)."""
    params = [convert(p) for p in params]
    states = [init_state(p, config) for p in params]
    steppers = core_steppers(config, compile_)
    for t, step_grads in enumerate(grads):
        params, states = steppers[needs_root_refresh(t, config)](params, [convert(g) for g in step_grads], states)
    return params, states


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def parity_error(target, method, dtype, reference, start, grads):
    config = parity_config(method)
    got_params, got_states = run_core(start, grads, config,
                                      lambda a: target.to_device(np.asarray(a, dtype=dtype)), target.compiled)
    ref_params, ref_states = reference
    fallbacks = [target.to_numpy(state.fallbacks).sum(axis=0).tolist() for state in got_states]
    if any(map(any, fallbacks)):
        raise AssertionError(f"fallbacks counted per stack {fallbacks} (columns {list(FALLBACK_LEVELS)})")
    errors = [relative_error(target.to_numpy(p) - s, r - s) for p, r, s in zip(got_params, ref_params, start)]
    if dtype == "float64":
        for got, ref in zip(got_states, ref_states):
            errors.append(relative_error(target.to_numpy(got.momentum), ref.momentum))
            errors += [relative_error(target.to_numpy(g), r) for g, r in zip(got.gram, ref.gram)]
            errors += [relative_error(target.to_numpy(g), r) for g, r in zip(got.root, ref.root)]
    return max(errors)


def parity(targets, plan, report):
    start, grads = parity_problem()
    print(f"\n== parity: {PARITY_STEPS} core steps vs NumPy float64 (max rel error; tolerance "
          f"float64 {TOLERANCE['float64']:g}, float32 {TOLERANCE['float32']:g})")
    for method in plan.parity_methods:
        reference = run_core(start, grads, parity_config(method), lambda a: a)
        for target in targets:
            cells = []
            for dtype in ("float64", "float32"):
                record = checked(lambda: parity_error(target, method, dtype, reference, start, grads),
                                 TOLERANCE[dtype])
                report["parity"].append(dict(target=target.name, method=method, dtype=dtype, **record))
                cells.append(f"{dtype} {record['error']:.1e} {record['verdict']}")
            print(f"  {target.name:10s} {method:15s} " + "   ".join(cells))


def checked(measure, tolerance):
    """{"error", "passed", "verdict"} of measure() against tolerance; an exception fails it."""
    try:
        error = measure()
    except Exception as raised:  # report every failure and go on with the other checks
        return {"error": float("nan"), "passed": False, "verdict": f"FAIL ({type(raised).__name__}: {raised})"}
    passed = bool(error <= tolerance)
    return {"error": error, "passed": passed, "verdict": "ok" if passed else "FAIL"}


# ---- 2. fallback branch --------------------------------------------------------------------
def fallback_error(target):
    """Relative error of the fallen-back update against the eigh update; raises unless every
    block counted an eigh fallback."""
    G = target.to_device(np.random.default_rng(1).standard_normal((2, 24, 40)).astype(np.float32))
    failing = ASGOConfig(root_method="newton_schulz", root_steps=1, weight_decay=0.0)
    exact = ASGOConfig(root_method="eigh", weight_decay=0.0)
    update, state = target.compiled(lambda G, s: step(G, s, None, failing, refresh_root=True))(G, init_state(G, failing))
    expected, _ = target.compiled(lambda G, s: step(G, s, None, exact, refresh_root=True))(G, init_state(G, exact))
    counts = target.to_numpy(state.fallbacks)[:, FALLBACK_LEVELS.index("eigh")].tolist()
    if counts != [1, 1]:
        raise AssertionError(f"eigh fallbacks counted {counts}, expected [1, 1]")
    return relative_error(target.to_numpy(update), target.to_numpy(expected))


def fallbacks(targets, report):
    print("\n== fallback branch: Newton–Schulz with one step falls back to eigh (rel error vs eigh)")
    for target in targets:
        record = checked(lambda: fallback_error(target), 1e-6)
        report["fallback"].append(dict(target=target.name, **record))
        print(f"  {target.name:10s} {record['error']:.1e} {record['verdict']}")


# ---- 3. adapters -----------------------------------------------------------------------------
def adapter_problem():
    rng = np.random.default_rng(2)
    params = {name: rng.standard_normal(shape) for name, shape in ADAPTER_SHAPES.items()}
    grads = [{name: rng.standard_normal(shape) for name, shape in ADAPTER_SHAPES.items()}
             for _ in range(ADAPTER_STEPS)]
    return params, grads


def numpy_adapter_run(params, grads):
    from asgo_core.adapters.cupy import ASGO
    params = {name: value.copy() for name, value in params.items()}
    optimizer = ASGO(params, lr=LR)
    for step_grads in grads:
        optimizer.step(step_grads)
    return params


def torch_adapter_run(target, params, grads):
    from asgo_core.adapters.torch import ASGO
    torch = target.module
    tensors = {name: torch.nn.Parameter(torch.as_tensor(value, dtype=torch.float32, device=target.device))
               for name, value in params.items()}
    optimizer = ASGO(list(tensors.values()), lr=LR)
    for step_grads in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.as_tensor(step_grads[name], dtype=torch.float32, device=target.device)
        optimizer.step()
    return {name: target.to_numpy(tensor) for name, tensor in tensors.items()}


def cupy_adapter_run(target, params, grads):
    """The CuPy adapter: its matrices go through the core, its writes and AdamW through the
    backend's ElementwiseKernels (apply_update, adamw_update)."""
    from asgo_core.adapters.cupy import ASGO
    arrays = {name: target.to_device(value.astype(np.float32)) for name, value in params.items()}
    optimizer = ASGO(arrays, lr=LR)
    for step_grads in grads:
        optimizer.step({name: target.to_device(g.astype(np.float32)) for name, g in step_grads.items()})
    return {name: target.to_numpy(array) for name, array in arrays.items()}


def adapters(targets, report):
    print(f"\n== adapters: {ADAPTER_STEPS} float32 steps (matrices + an AdamW bias) vs the NumPy "
          f"adapter in float64 (params moved, tolerance {TOLERANCE['float32']:g})")
    params, grads = adapter_problem()
    expected = numpy_adapter_run(params, grads)
    runs = {"torch-cuda": torch_adapter_run, "torch-cpu": torch_adapter_run, "cupy": cupy_adapter_run}
    for target in targets:
        if target.name not in runs:
            continue

        def error(target=target):
            got = runs[target.name](target, params, grads)
            return max(relative_error(got[n] - params[n], expected[n] - params[n]) for n in params)
        record = checked(error, TOLERANCE["float32"])
        report["adapters"].append(dict(target=target.name, adapter=runs[target.name].__name__, **record))
        print(f"  {target.name:10s} {runs[target.name].__name__:18s} {record['error']:.1e} {record['verdict']}")


# ---- 4. inverse_root timings -------------------------------------------------------------
def spd_batch(k, batch):
    rng = np.random.default_rng(k)
    G = rng.standard_normal((batch, k, k // 2)).astype(np.float32)
    return G @ np.swapaxes(G, -1, -2)   # rank k/2: the rank-deficient case of early training


def root_timings(targets, plan, report, save):
    print("\n== inverse_root, float32, ms (compile + warm-up s in brackets)")
    print(f"  {'target':10s} {'k':>5s} {'B':>3s} " + " ".join(f"{m:>21s}" for m in ROOT_METHODS))
    for target in targets:
        for k, batch in plan.timing_sizes.items():
            for size in (1, batch):
                A = target.to_device(spd_batch(k, size))
                cells = []
                for method in ROOT_METHODS:
                    solve = target.compiled(lambda X, method=method: inverse_root(X, method=method))
                    cells.append(_timing_cell(report["inverse_root"], dict(target=target.name, k=k, batch=size,
                                                                           method=method),
                                              lambda: timed(target, solve, A)))
                print(f"  {target.name:10s} {k:5d} {size:3d} " + " ".join(f"{c:>21s}" for c in cells))
                save()


def _timing_cell(records, key, measure):
    try:
        figures = measure()
    except Exception as error:  # one failing cell must not hide the others
        records.append(dict(key, error=f"{type(error).__name__}: {error}"))
        return "error"
    records.append(dict(key, **figures))
    seconds = figures.get("compile_s", 0.0) + figures["warmup_s"]
    if figures.get("over_budget"):
        return f"over budget [{seconds:.1f}]"
    return f"{figures['median_ms']:.2f} [{seconds:.1f}]"


# ---- 5. eigh against the iteration -----------------------------------------------------------
def cupy_root_of_torch(tensor):
    """The eigh inverse root of a torch tensor computed by CuPy (zero-copy both ways)."""
    import cupy
    import torch
    return torch.from_dlpack(inverse_root(cupy.from_dlpack(tensor.detach()), method="eigh"))


def eigh_comparison(targets, plan, report, save):
    torch_target = next((t for t in targets if t.name.startswith("torch")), None)
    if torch_target is None:
        print("\n== eigh vs iteration: skipped (no torch target)")
        return
    with_cupy = any(t.name == "cupy" for t in targets) and torch_target.on_gpu
    solvers = {"eigh": lambda A: inverse_root(A, method="eigh"),
               "polar_express": lambda A: inverse_root(A, method="polar_express")}
    if with_cupy:
        solvers["cupy_eigh"] = cupy_root_of_torch
    print(f"\n== eigh vs iteration on {torch_target.name}, float32 inverse root, ms (compile + warm-up s)")
    table = report["auto_table"]
    for k, batch in plan.eigh_shapes:
        A = torch_target.to_device(spd_batch(k, batch))
        cells = []
        for name, solve in solvers.items():
            key = dict(target=torch_target.name, k=k, batch=batch, solver=name)
            cell = _timing_cell(report["eigh_comparison"], key, lambda: timed(torch_target, solve, A))
            cells.append(f"{name}={cell}")
            figures = report["eigh_comparison"][-1]
            if name != "cupy_eigh" and figures.get("repeats"):
                table.setdefault(k, {})[name] = figures["median_ms"]
        print(f"  k {k:5d} batch {batch:4d}  " + "  ".join(cells))
        save()
    if torch_target.on_gpu:
        print(f"  CUDA_ROOT_TIMINGS_MS = {table!r}  (for asgo_core/backends/torch.py)")


# ---- 6. GPT-2-style step timings -----------------------------------------------------------
def gpt2_step_timings(targets, plan, report, save):
    stacks = gpt2_stacks(plan)
    count = sum(b * m * n for b, m, n in stacks)
    print(f"\n== one ASGO step, root refreshed, float32, ms (compile + warm-up s): GPT-2-style d_model "
          f"{plan.d_model} × {plan.layers} layers ({count / 1e6:.2f} M matrix params, {len(stacks)} stacks)")
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32))
            for shape in stacks]
    for target in sorted(targets, key=lambda t: t.name.startswith("jax")):  # JAX's compiles last
        weights = [target.to_device(W) for W, _ in host]
        grads = [target.to_device(G) for _, G in host]
        cells = []
        for method in plan.step_methods:
            config = ASGOConfig(root_method=method)
            states = [init_state(W, config) for W in weights]

            def one_step(weights, grads, states, config=config):
                return [step(G, state, W, config, refresh_root=True)[0]
                        for W, G, state in zip(weights, grads, states)]

            cell = _timing_cell(report["gpt2_step"], dict(target=target.name, method=method),
                                lambda: timed(target, target.compiled(one_step), weights, grads, states))
            cells.append(f"{method}={cell}")
        print(f"  {target.name:10s} " + "  ".join(cells))
        save()


# ---- main ------------------------------------------------------------------------------------
def json_path(argument):
    if argument:
        return Path(argument)
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="where to write every figure (default: $OUT/gpu_check.json)")
    arguments = parser.parse_args(argv)
    whole = harness.Stopwatch()
    report = {"versions": versions(), "parity": [], "fallback": [], "adapters": [],
              "inverse_root": [], "eigh_comparison": [], "auto_table": {}, "gpt2_step": []}
    print("asgo GPU check: " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()))
    targets, skipped = find_targets()
    plan = GPU_PLAN if any(t.on_gpu for t in targets) else CPU_PLAN
    report.update(skipped=skipped, plan=plan.__dict__ | {"name": "gpu" if plan is GPU_PLAN else "cpu"},
                  targets={t.name: t.device_name() for t in targets})
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}")
    for target in targets:
        print(f"  target {target.name}: {report['targets'][target.name]}")
    if plan is CPU_PLAN:
        print("  no GPU target: CPU targets only, reduced sizes (checks the script, not a GPU)")
    report["section_s"] = {}
    path = json_path(arguments.json)

    def save():  # after each section and each timing row: a run stopped by its budget keeps its figures
        checks = report["parity"] + report["fallback"] + report["adapters"]
        report["passed"] = all(record["passed"] for record in checks)
        report["total_s"] = round(whole.elapsed().wall_s, 1)
        harness.write_json(path, report)

    sections = (("parity", lambda: parity(targets, plan, report)), ("fallback", lambda: fallbacks(targets, report)),
                ("adapters", lambda: adapters(targets, report)),
                ("inverse_root", lambda: root_timings(targets, plan, report, save)),
                ("eigh_comparison", lambda: eigh_comparison(targets, plan, report, save)),
                ("gpt2_step", lambda: gpt2_step_timings(targets, plan, report, save)))
    if not targets:
        print("\nno framework target (torch, JAX, CuPy): nothing checked")
        report.update(passed=False, total_s=round(whole.elapsed().wall_s, 1))
        harness.write_json(path, report)
        return 1
    for name, run in sections:
        with harness.Stopwatch() as section:
            run()
        report["section_s"][name] = round(section.wall_s, 1)
        save()
    checks = report["parity"] + report["fallback"] + report["adapters"]
    failed = sum(not record["passed"] for record in checks)
    print(f"\nchecks {'passed' if report['passed'] else f'FAILED ({failed} of {len(checks)})'}; "
          f"total {report['total_s']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in report["section_s"].items())
          + f"); figures in {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
