"""When to use ASGO: a regime map of train_lm's quick configuration against Muon and AdamW.

Runs train_lm.py's quick model (same data, initialisation, batches, clipping; warmup over the
first 10% of the run and cosine decay stretched to the run) at three horizons and writes one JSON
record per finished run to docs/regime_map/runs.jsonl, so a partial run is usable.

The plan is fixed before the runs (PLAN below, printed at start and stored in meta.json):
  * Horizons 300, 1200, 4800 steps; optimizers adamw, muon, asgo_tau1, asgo_tau10.
  * 300 steps: each optimizer trains with seed 0 at its previous best lr (PREVIOUS_BEST, from a
    150-step sweep) times 1/2, 1, 2; if the best is on an edge, the grid is extended
    by a factor of 2 past it (at most twice). The chosen lr (lowest final val loss, seed 0) then
    runs with seed 1.
  * 1200 steps, breadth-first so that a cut leaves every optimizer measured: each optimizer at its
    300-step lr (seed 0); the cost knobs asgo_tau3 (root every 3 steps) and asgo_tau1_mpd64
    (max_precond_dim=64: every block matrix's preconditioned small side is 128 at d_model 128,
    so 128 would block nothing; 64 splits it into two 64-wide blocks, a quarter of the eigh
    work) at asgo_tau1's 300-step lr, seed 0; each optimizer at that lr x1/2, then
    x2; [train_mlp_jax.py --sensitivity]; one factor of 2 past a winning edge; seed 1 at the
    1200-step choice.
  * 4800 steps (reduced for time): each optimizer at its 1200-step choice, seed 0 (muon,
    asgo_tau1, adamw, asgo_tau10); then the knobs' seed 1 at 1200 (part "map").
  * Part "long": seed 1 at 4800 steps at the 1200-step choice (same order); then, for asgo_tau1
    and muon, seed 0 at the 1200-step grid's neighbour of that choice on the side it favoured
    (the "lr points", shown beside the 4800-step row, not chosen among).
  * Part "batch", the batch-size axis: batch 256 (8x train_lm's quick 32) at 300 steps, each
    optimizer at its batch-32 300-step choice x 1, 2, 1/2 (breadth-first over optimizers), then
    seed 1 at the batch-256 choice. Validation uses the same
    fixed batch-32 batches as every other run. Records carry "batch_size" (records without it
    ran at 32) and "cpu" (records without it ran on the first session's machine in meta.json).
  * One run at a time per process, one torch thread (the 2 cores are shared with other processes; with 2
    threads under that load a step was 7x slower than with 1). A run is skipped (and listed in
    plan.json) when its estimated time, from the optimizer's measured seconds per step, would
    end past --deadline.

    python benchmarks/regime_map.py --deadline 22:05          # runs (resumes: finished runs kept)
    python benchmarks/regime_map.py --parts long &  python benchmarks/regime_map.py --parts batch long
    python benchmarks/regime_map.py --report                  # summary.json, tables.md, *.png

Timings come from train_lm.train_run (training seconds without evaluation); the load average
before and after each run is recorded, because other processes may share the cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import harness  # noqa: E402  (benchmarks/, the script's own directory)
import train_lm  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "regime_map"
OPTIMIZERS = ["adamw", "muon", "asgo_tau1", "asgo_tau10"]
PREVIOUS_BEST = {"adamw": 1e-3, "muon": 3e-2, "asgo_tau1": 1e-2, "asgo_tau10": 3e-3}
GRID_FACTORS = (0.5, 1.0, 2.0)
EDGE_EXTENSIONS = 2
HORIZONS = (300, 1200, 4800)
GRID_HORIZONS = (300, 1200)
LATER_GRID_FACTORS = (0.5, 2.0)  # around the 300-step choice, after it
ORDER = ["muon", "asgo_tau1", "adamw", "asgo_tau10"]
EDGE_EXTENSIONS_LATER = 1
EVAL_EVERY = {300: 25, 1200: 40, 4800: 80}
SEEDS = (0, 1)
KNOB_HORIZON = 1200
KNOBS = {"asgo_tau3": train_lm.make_asgo(3),
         "asgo_tau1_mpd64": train_lm.make_asgo(1, max_precond_dim=64)}
KNOB_LR_FROM = "asgo_tau1"
LONG_HORIZON, LONG_LR_FROM = 4800, 1200
BASE_BATCH = 32  # train_lm's quick preset; records without "batch_size" ran at it
BATCH_AXIS = {"batch_size": 256, "horizon": 300, "lr_from_batch": BASE_BATCH,
              "factors": (1.0, 2.0, 0.5)}  # x2 before x1/2: a larger batch tends to take a larger lr
PARTS = ("map", "long", "batch")
COLUMNS = [*((horizon, BASE_BATCH) for horizon in HORIZONS),
           (BATCH_AXIS["horizon"], BATCH_AXIS["batch_size"])]
LONG_LR_POINTS = ("asgo_tau1", "muon")
BAND = 0.02  # lr band: final val loss within 2% of the optimizer's best
THREADS = 1
MLP_SECONDS = 600  # train_mlp_jax --sensitivity: 20 runs of ~25 s on the shared cores
train_lm.OPTIMIZER_FACTORIES.update(KNOBS)
COLORS = {"adamw": "C0", "muon": "C1", "asgo_tau1": "C2", "asgo_tau10": "C3",
          "asgo_tau3": "C4", "asgo_tau1_mpd64": "C5"}


def lr_round(lr: float) -> float:
    return float(f"{lr:.3g}")


def grid(name: str) -> list[float]:
    return [lr_round(PREVIOUS_BEST[name] * f) for f in GRID_FACTORS]


PLAN = {
    "horizons": list(HORIZONS), "optimizers": OPTIMIZERS, "seeds": list(SEEDS),
    "previous_best_lr": PREVIOUS_BEST, "grid_factors": list(GRID_FACTORS),
    "grids": {name: grid(name) for name in OPTIMIZERS}, "grid_horizons": list(GRID_HORIZONS),
    "edge_extensions": EDGE_EXTENSIONS, "eval_every": EVAL_EVERY,
    "knobs": {"horizon": KNOB_HORIZON, "names": list(KNOBS),
              "lr": f"{KNOB_LR_FROM}'s 300-step choice",
              "asgo_tau3": "precondition_frequency=3",
              "asgo_tau1_mpd64": "precondition_frequency=1, max_precond_dim=64 (every block "
                                 "matrix's small side is 128 at d_model 128, so 128 would block "
                                 "nothing; 64 splits it in two: a quarter of the eigh work)"},
    "long_horizon": {"steps": LONG_HORIZON, "lr_from_horizon": LONG_LR_FROM,
                     "order": "1200-step choice seed 0 (muon, asgo_tau1, adamw, asgo_tau10), "
                              "knobs' seed 1 at 1200, 4800 seed 1"},
    "grid_1200": {"factors": [1.0, *LATER_GRID_FACTORS], "around": "the 300-step choice",
                  "edge_extensions": EDGE_EXTENSIONS_LATER, "order": ORDER},
    "long_seed_1": {"steps": LONG_HORIZON, "seed": 1, "lr": "the 1200-step choice", "order": ORDER,
                    "lr_points": "then seed 0 at the 1200-step grid's neighbour of the choice on "
                                 "the side it favoured, for asgo_tau1 and muon"},
    "batch_axis": {**BATCH_AXIS, "order": "grid breadth-first (every optimizer's centre, then "
                                         "x2, then x1/2), then seed 1 at each choice",
                   "val_batches": f"the same {BASE_BATCH}-sequence validation batches as every "
                                  f"other run"},
    "torch_threads": THREADS,
    "lr_band": f"final val loss <= (1 + {BAND}) x best, width in factors of lr",
}


# ----------------------------------------------------------------------------------- machine

def newton_schulz_float32_gemms(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                                ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz iteration (torch/optim/_muon.py) with each bf16 GEMM done
    as a float32 GEMM on the bf16 operands and its result rounded to bf16: what a native bf16 GEMM
    with float32 accumulation gives, up to summation order. On a CPU that emulates bf16 matmuls
    torch's kernel took 20-60x longer on this model's matrices; the results differ by 0.2-0.7%
    (relative Frobenius), the order of bf16 rounding."""
    a, b, c = ns_coefficients
    x = grad.bfloat16()
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        xf = x.float()
        gram = (xf @ xf.T).bfloat16().float()
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c).bfloat16().float()
        x = torch.addmm(xf, update, xf, beta=a).bfloat16()
    return x.T if grad.size(0) > grad.size(1) else x


def use_float32_gemms_where_bf16_is_emulated() -> str:
    """How Muon's bf16 GEMMs run here (stored in each record)."""
    if train_lm.bfloat16_matmul_slowdown(torch.device("cpu")) < train_lm.BF16_SLOWDOWN_LIMIT:
        return "native bf16"
    torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_float32_gemms
    return "float32 GEMMs on bf16 operands, rounded to bf16 (bf16 matmuls are emulated here)"


def machine() -> dict:
    return harness.machine("torch", torch_threads=THREADS, bf16_matmul_time_over_fp32=round(
        train_lm.bfloat16_matmul_slowdown(torch.device("cpu")), 2))


# ---------------------------------------------------------------------------------- records

def claimed_by_live_process(claim: Path) -> bool:
    """Whether another process of a parallel part is training this run now."""
    try:
        os.kill(int(claim.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def batch_size(record: dict) -> int:
    return record.get("batch_size", BASE_BATCH)


def key(horizon: int, name: str, lr: float, seed: int, batch: int = BASE_BATCH) -> str:
    return f"{horizon}/{name}/{lr:g}/{seed}" + ("" if batch == BASE_BATCH else f"/b{batch}")


def record_key(record: dict) -> str:
    return key(record["horizon"], record["optimizer"], record["lr"], record["seed"],
               batch_size(record))


def at_batch(records: list[dict], batch: int) -> list[dict]:
    return [r for r in records if batch_size(r) == batch]


class Runner:
    def __init__(self, out: Path, deadline: dt.datetime | None):
        self.out, self.deadline = out, deadline
        self.runs_path = out / "runs.jsonl"
        self.reload()
        self.cpu = harness.cpu_model()
        self.muon_gemms = use_float32_gemms_where_bf16_is_emulated()
        self.claims = (Path(tempfile.gettempdir())
                       / f"regime_map_running_{zlib.crc32(str(out.resolve()).encode())}")
        self.claims.mkdir(exist_ok=True)
        self.args = train_lm.parse_args(["--quick", "--threads", str(THREADS)])
        data, self.source = train_lm.load_corpus(None, self.args.max_bytes)
        split = int(len(data) * (1 - train_lm.VAL_FRACTION))
        self.train_data = data[:split]
        self.val_batches = train_lm.fixed_val_batches(
            data[split:], self.args.block_size, self.args.batch_size, self.args.eval_batches)

    def reload(self) -> None:
        """The finished runs, including those of a part running in parallel in another process."""
        self.records = harness.read_jsonl(self.runs_path)
        self.done = {record_key(r): r for r in self.records}

    def seconds_per_step(self, name: str, batch: int) -> float:
        """From the optimizer's latest run at this batch size, on this CPU if one ran here: the
        load on the shared cores changes over time."""
        mine = [r for r in at_batch(self.records, batch) if r["optimizer"] == name]
        here = [r for r in mine if r.get("cpu") == self.cpu] or mine
        return here[-1]["wall_seconds"] / here[-1]["steps"] if here else 0.0

    def log(self, entry: dict) -> None:
        """Re-read before appending: two parts of the plan may run in parallel processes."""
        path = self.out / "plan.json"
        log = json.loads(path.read_text())["log"] if path.exists() else []
        harness.write_json(path, {"plan": PLAN, "log": log + [entry]})

    def run(self, horizon: int, name: str, lr: float, seed: int, stage: str,
            batch: int = BASE_BATCH) -> dict | None:
        k = key(horizon, name, lr, seed, batch)
        self.reload()
        if k in self.done:
            return self.done[k]
        claim = self.claims / k.replace("/", "_")
        if claimed_by_live_process(claim):
            print(f"skip {k} ({stage}): running in process {claim.read_text()}", flush=True)
            return None
        estimate = 1.1 * self.seconds_per_step(name, batch) * horizon
        now = dt.datetime.now(dt.timezone.utc)
        if self.deadline and now + dt.timedelta(seconds=estimate) > self.deadline:
            print(f"skip {k} ({stage}): ~{estimate:.0f}s would end past the deadline", flush=True)
            self.log({"run": k, "stage": stage, "status": "skipped (deadline)",
                      "estimated_seconds": round(estimate)})
            return None
        claim.write_text(str(os.getpid()))
        try:
            return self.train(horizon, name, lr, seed, stage, batch)
        finally:
            claim.unlink()

    def train(self, horizon: int, name: str, lr: float, seed: int, stage: str,
              batch: int) -> dict:
        k = key(horizon, name, lr, seed, batch)
        self.args.eval_every = EVAL_EVERY[horizon]
        self.args.batch_size = batch
        load_before = harness.load_average()
        with harness.Stopwatch() as clock:
            run = train_lm.train_run(self.args, name, lr, seed, horizon, self.train_data,
                                     self.val_batches)
        record = {"horizon": horizon, "optimizer": name, "lr": lr, "seed": seed, "stage": stage,
                  "batch_size": batch, "cpu": self.cpu, "steps": horizon,
                  **({"muon_gemms": self.muon_gemms} if name == "muon" else {}),
                  "wall_seconds": clock.wall_s,
                  "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "load_average_before": load_before, "load_average_after": harness.load_average(),
                  **{f: run[f] for f in ("final_val_loss", "final_train_loss", "diverged",
                                         "median_step_seconds", "median_optimizer_step_seconds",
                                         "train_seconds", "curve")}}
        harness.append_jsonl(self.runs_path, record)
        self.records.append(record)
        self.done[k] = record
        self.log({"run": k, "stage": stage, "status": "done",
                  "wall_seconds": round(record["wall_seconds"], 1)})
        print(f"{record['finished_utc']} {k:32s} {stage:10s} val {run['final_val_loss']:.4f} "
              f"train {run['final_train_loss']:.4f} {record['wall_seconds']:.0f}s "
              f"load {load_before[0]:.2f}->{record['load_average_after'][0]:.2f}", flush=True)
        return record

    def grid_search(self, horizon: int, name: str, lrs: list[float],
                    extensions: int) -> float | None:
        """Seed 0 over the grid (extended past an edge that wins); the chosen lr."""
        for _ in range(extensions + 1):
            for lr in lrs:
                self.run(horizon, name, lr, 0, "grid")
            finished = {lr: self.done[key(horizon, name, lr, 0)]["final_val_loss"]
                        for lr in lrs if key(horizon, name, lr, 0) in self.done}
            if not finished:
                return None
            best = min(finished, key=lambda lr: finished[lr] if math.isfinite(finished[lr])
                       else math.inf)
            if best == lrs[0]:
                lrs = [lr_round(lrs[0] / 2)] + lrs
            elif best == lrs[-1]:
                lrs = lrs + [lr_round(lrs[-1] * 2)]
            else:
                return best
        return best


def chosen_lr(records: list[dict], horizon: int, name: str,
              batch: int = BASE_BATCH) -> float | None:
    """The lowest final val loss of the seed-0 grid runs (and, at 4800 steps, of the run at the
    1200-step choice; the extra lr points there are shown beside it, not chosen among)."""
    seed0 = [r for r in at_batch(records, batch) if r["horizon"] == horizon
             and r["optimizer"] == name and r["seed"] == 0 and r["stage"] in ("grid", "long")]
    finite = [r for r in seed0 if math.isfinite(r["final_val_loss"])]
    return min(finite, key=lambda r: r["final_val_loss"])["lr"] if finite else None


def start_session(out: Path, deadline: dt.datetime | None, parts: list[str]) -> None:
    """Append this invocation's machine and command to meta.json (the runs of one map may come
    from several machines; each record names its CPU too)."""
    path = out / "meta.json"
    sessions = json.loads(path.read_text()).get("sessions", []) if path.exists() else []
    session = {"machine": machine(), "parts": parts,
               "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "deadline_utc": deadline.isoformat() if deadline else None,
               "command": " ".join(["python", "benchmarks/regime_map.py"] + sys.argv[1:])}
    harness.write_json(path, {"plan": PLAN, "sessions": sessions + [session]})
    print(json.dumps(session, indent=1), flush=True)


def map_part(runner: Runner, skip_mlp: bool) -> None:
    """Batch 32: the 300- and 1200-step grids and seeds, the cost knobs, 4800 steps seed 0."""
    short, middle = GRID_HORIZONS
    centre = {}
    for name in OPTIMIZERS:
        centre[name] = runner.grid_search(short, name, grid(name), EDGE_EXTENSIONS)
        print(f"horizon {short}: {name} chose lr {centre[name]}", flush=True)
    for name in OPTIMIZERS:
        if centre[name] is not None:
            for seed in SEEDS[1:]:
                runner.run(short, name, centre[name], seed, "seed")
    order = [name for name in ORDER if centre[name] is not None]
    for name in order:  # breadth-first: every optimizer's centre before any neighbour
        runner.run(middle, name, centre[name], 0, "grid")
    if centre.get(KNOB_LR_FROM) is not None:
        for knob in KNOBS:
            runner.run(KNOB_HORIZON, knob, centre[KNOB_LR_FROM], 0, "knob")
    for factor in LATER_GRID_FACTORS:
        for name in order:
            runner.run(middle, name, lr_round(centre[name] * factor), 0, "grid")
    if not skip_mlp and not (runner.out / "mlp_jax_lr_sensitivity.json").exists():
        if runner.deadline and dt.datetime.now(dt.timezone.utc) + dt.timedelta(
                seconds=MLP_SECONDS) > runner.deadline:
            runner.log({"run": "train_mlp_jax --sensitivity", "status": "skipped (deadline)"})
        else:
            print("train_mlp_jax lr sensitivity", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).with_name("train_mlp_jax.py")),
                            "--sensitivity", "--out", str(runner.out)], check=False)
    for name in order:  # one factor of 2 past an edge that wins, once all three points ran
        lrs = [lr_round(centre[name] * f) for f in (*LATER_GRID_FACTORS[:1], 1.0,
                                                     *LATER_GRID_FACTORS[1:])]
        if all(key(middle, name, lr, 0) in runner.done for lr in lrs):
            best = chosen_lr(runner.records, middle, name)
            if best == min(lrs) or best == max(lrs):
                factor = 0.5 if best == min(lrs) else 2.0
                runner.run(middle, name, lr_round(best * factor), 0, "grid")
    chosen = {name: chosen_lr(runner.records, middle, name) for name in order}
    for name in order:
        if chosen[name] is not None:
            for seed in SEEDS[1:]:
                runner.run(middle, name, chosen[name], seed, "seed")
    for name in order:
        if chosen[name] is not None:
            runner.run(LONG_HORIZON, name, chosen[name], 0, "long")
    if centre.get(KNOB_LR_FROM) is not None:
        for knob in KNOBS:
            for seed in SEEDS[1:]:
                runner.run(KNOB_HORIZON, knob, centre[KNOB_LR_FROM], seed, "knob")


def favoured_neighbour(records: list[dict], horizon: int, name: str) -> float | None:
    """The grid neighbour (choice x1/2 or x2, seed 0) with the lower final val loss."""
    choice = chosen_lr(records, horizon, name)
    losses = {r["lr"]: r["final_val_loss"] for r in at_batch(records, BASE_BATCH)
              if r["horizon"] == horizon and r["optimizer"] == name and r["seed"] == 0}
    neighbours = [lr for lr in (lr_round(choice / 2), lr_round(choice * 2)) if lr in losses] \
        if choice is not None else []
    return min(neighbours, key=lambda lr: losses[lr]) if neighbours else None


def long_part(runner: Runner) -> None:
    """4800 steps: seed 1 at the 1200-step choice, then one more lr for LONG_LR_POINTS."""
    chosen = {name: chosen_lr(runner.records, LONG_LR_FROM, name) for name in ORDER}
    for name in ORDER:
        if chosen[name] is not None:
            for seed in SEEDS[1:]:
                runner.run(LONG_HORIZON, name, chosen[name], seed, "seed")
    for name in LONG_LR_POINTS:
        neighbour = favoured_neighbour(runner.records, LONG_LR_FROM, name)
        if neighbour is not None:
            runner.run(LONG_HORIZON, name, neighbour, 0, "lr_point")


def batch_part(runner: Runner) -> None:
    """BATCH_AXIS: a 3-point grid around the base batch's choice, breadth-first; then seed 1 at
    each choice."""
    horizon, batch = BATCH_AXIS["horizon"], BATCH_AXIS["batch_size"]
    centre = {name: chosen_lr(runner.records, horizon, name, BATCH_AXIS["lr_from_batch"])
              for name in ORDER}
    grids = {name: sorted(lr_round(centre[name] * f) for f in BATCH_AXIS["factors"])
             for name in ORDER if centre[name] is not None}
    for factor in BATCH_AXIS["factors"]:
        for name in grids:
            runner.run(horizon, name, lr_round(centre[name] * factor), 0, "grid", batch)
    for name, lrs in grids.items():  # once its grid is complete (another process may run part)
        best = chosen_lr(runner.records, horizon, name, batch)
        if all(key(horizon, name, lr, 0, batch) in runner.done for lr in lrs):
            for seed in SEEDS[1:]:
                runner.run(horizon, name, best, seed, "seed", batch)


def run_all(out: Path, deadline: dt.datetime | None, skip_mlp: bool, parts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    start_session(out, deadline, parts)
    runner = Runner(out, deadline)
    for part in parts:  # in the order given
        if part == "map":
            map_part(runner, skip_mlp)
        else:
            {"long": long_part, "batch": batch_part}[part](runner)
    print("done", flush=True)


# ----------------------------------------------------------------------------------- report

def time_to_reach(curve: dict, target: float) -> tuple[float, float] | None:
    """(steps, seconds) at which the mean val curve first reaches target, linearly interpolated
    between evaluations; None when it never does."""
    previous = None
    for step, seconds, val in zip(curve["step"], curve["seconds"], curve["val_mean"]):
        if val <= target:
            if previous is None or previous[2] == val:
                return float(step), seconds
            s0, t0, v0 = previous
            w = (v0 - target) / (v0 - val)
            return s0 + w * (step - s0), t0 + w * (seconds - t0)
        previous = (step, seconds, val)
    return None


def half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else float("nan")


def lr_band(losses: dict[float, float]) -> dict:
    """Width (max lr / min lr) of the band where the final val loss is within BAND of the best:
    on grid points, and with the edges interpolated linearly in log lr between grid points."""
    lrs = sorted(lr for lr in losses if math.isfinite(losses[lr]))
    best = min(losses[lr] for lr in lrs)
    limit = (1 + BAND) * best
    i_best = min(range(len(lrs)), key=lambda i: losses[lrs[i]])
    lo = hi = i_best
    while lo > 0 and losses[lrs[lo - 1]] <= limit:
        lo -= 1
    while hi < len(lrs) - 1 and losses[lrs[hi + 1]] <= limit:
        hi += 1

    def edge(inside: int, outside: int) -> float:
        a, b = math.log(lrs[inside]), math.log(lrs[outside])
        va, vb = losses[lrs[inside]], losses[lrs[outside]]
        return math.exp(a + (limit - va) / (vb - va) * (b - a))
    low = edge(lo, lo - 1) if lo > 0 else lrs[lo]
    high = edge(hi, hi + 1) if hi < len(lrs) - 1 else lrs[hi]
    return {"best_lr": lrs[i_best], "best_loss": best, "limit": limit,
            "grid_points_in_band": [lrs[i] for i in range(lo, hi + 1)],
            "grid_width": lrs[hi] / lrs[lo], "interpolated_low": low, "interpolated_high": high,
            "interpolated_width": high / low,
            "open_low": lo == 0, "open_high": hi == len(lrs) - 1}


def mlp_sensitivity(out: Path) -> tuple[dict, str]:
    """train_mlp_jax's final val loss by lr (seed 0): from --sensitivity (the stored lr x 1/4..4)
    when it ran, else from the --sweep grid stored in benchmarks/lr_choices_jax.json."""
    sensitivity = out / "mlp_jax_lr_sensitivity.json"
    if sensitivity.exists():
        return (json.loads(sensitivity.read_text())["final_val_loss_by_lr"],
                "python benchmarks/train_mlp_jax.py --sensitivity")
    sweep = Path(__file__).with_name("lr_choices_jax.json")
    if sweep.exists():
        choices = json.loads(sweep.read_text())
        return ({name: choices[name]["final_val_loss_by_lr"] for name in OPTIMIZERS
                 if name in choices},
                "python benchmarks/train_mlp_jax.py --sweep (benchmarks/lr_choices_jax.json)")
    return {}, ""


def column_name(horizon: int, batch: int) -> str:
    return str(horizon) if batch == BASE_BATCH else f"{horizon}_b{batch}"


def column_title(column: str) -> str:
    horizon, _, batch = column.partition("_b")
    return f"{horizon} steps" + (f", batch {batch}" if batch else "")


def run_cpu(record: dict, meta: dict) -> str:
    """Records written before runs named their CPU come from the first session in meta.json."""
    return record.get("cpu") or meta["sessions"][0]["machine"]["cpu"]


def report(out: Path) -> dict:
    all_records = harness.read_jsonl(out / "runs.jsonl")
    meta = json.loads((out / "meta.json").read_text())
    summary: dict = {"meta": meta, "horizons": {}, "lr_sensitivity": {}, "knobs": {}}
    names = OPTIMIZERS + list(KNOBS)
    for horizon, batch in COLUMNS:
        column = column_name(horizon, batch)
        records = at_batch(all_records, batch)
        rows = {}
        for name in names:
            knob_lrs = [r["lr"] for r in records if r["optimizer"] == name]
            lr = (chosen_lr(records, horizon, name, batch) if name in OPTIMIZERS
                  else knob_lrs[0] if knob_lrs else None)
            runs = [r for r in records if r["horizon"] == horizon and r["optimizer"] == name
                    and r["lr"] == lr]
            if lr is None or not runs:
                continue
            vals = [r["final_val_loss"] for r in runs]
            trains = [r["final_train_loss"] for r in runs]
            rows[name] = {"lr": lr, "seeds": sorted(r["seed"] for r in runs),
                          "val_mean": statistics.fmean(vals), "val_half_range": half_range(vals),
                          "train_mean": statistics.fmean(trains),
                          "train_half_range": half_range(trains),
                          "step_ms": 1e3 * statistics.median(r["median_step_seconds"] for r in runs),
                          "optimizer_ms": 1e3 * statistics.median(
                              r["median_optimizer_step_seconds"] for r in runs),
                          "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
                          "load_average": [round(max(r["load_average_before"][0],
                                                     r["load_average_after"][0]), 2)
                                           for r in runs],
                          "cpu_by_seed": {r["seed"]: run_cpu(r, meta) for r in runs},
                          "curve": train_lm.mean_curve(runs)}
        for name, row in rows.items():
            row["reach"] = {}
            for other, other_row in rows.items():
                if other != name:
                    hit = time_to_reach(row["curve"], other_row["val_mean"])
                    row["reach"][other] = None if hit is None else {"steps": hit[0],
                                                                    "seconds": hit[1]}
        if rows:
            summary["horizons"][column] = rows
        sensitivity = {}
        for name in OPTIMIZERS:
            losses = {r["lr"]: r["final_val_loss"] for r in records if r["horizon"] == horizon
                      and r["optimizer"] == name and r["seed"] == 0}
            if len(losses) >= 2:
                sensitivity[name] = {"final_val_by_lr": {f"{lr:g}": v for lr, v in
                                                         sorted(losses.items())},
                                     "band": lr_band(losses)}
        if sensitivity:
            summary["lr_sensitivity"][column] = sensitivity
    mlp_by_lr, mlp_source = mlp_sensitivity(out)
    if mlp_by_lr:
        summary["lr_sensitivity"]["mlp_jax"] = {
            name: {"final_val_by_lr": v, "band": lr_band({float(k): x for k, x in v.items()})}
            for name, v in mlp_by_lr.items()}
        summary["mlp_jax_source"] = mlp_source
    harness.write_json(out / "summary.json", summary)
    (out / "tables.md").write_text(tables_markdown(summary))
    plot(summary, out)
    return summary


def fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    seeds = len(row["seeds"])
    return (f"{fmt(row['val_mean'])} ± {fmt(row['val_half_range'])} "
            f"(lr {row['lr']:g}, {seeds} seed{'s' if seeds > 1 else ''})")


def cpus_by_seed(row: dict) -> str:
    return ", ".join(f"{seed}: {cpu.replace('(R)', '')}"
                     for seed, cpu in sorted(row["cpu_by_seed"].items()))


def tables_markdown(summary: dict) -> str:
    horizons = summary["horizons"]
    lines = ["### Final validation loss by run length and batch size (lr chosen in each column; "
             "± half-range over seeds)", "",
             "| optimizer | " + " | ".join(column_title(h) for h in horizons) + " |",
             "|---|" + "---|" * len(horizons)]
    for name in OPTIMIZERS:
        lines.append(f"| {name} | " + " | ".join(cell(rows.get(name))
                                                 for rows in horizons.values()) + " |")
    knob_rows = horizons.get(str(KNOB_HORIZON), {})
    if any(name in knob_rows for name in KNOBS):
        lines += ["", f"### Cost knobs at {KNOB_HORIZON} steps", "",
                  "| optimizer | lr | seeds | final val ± half-range | final train | optimizer ms "
                  "| step ms | load avg |", "|---|---|---|---|---|---|---|---|"]
        for name in ["asgo_tau1", *KNOBS, "asgo_tau10", "muon", "adamw"]:
            if name in knob_rows:
                r = knob_rows[name]
                lines.append(f"| {name} | {r['lr']:g} | {len(r['seeds'])} "
                             f"| {fmt(r['val_mean'])} ± {fmt(r['val_half_range'])} "
                             f"| {fmt(r['train_mean'])} | {r['optimizer_ms']:.1f} "
                             f"| {r['step_ms']:.1f} | {max(r['load_average']):.2f} |")
    lines.append("")
    for horizon, rows in summary["horizons"].items():
        lines += [f"### {column_title(horizon)}", "",
                  "| optimizer | lr | seeds | final val ± half-range | final train ± half-range "
                  "| step ms | opt ms | train s | load avg | CPU by seed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['lr']:g} | {len(r['seeds'])} "
                         f"| {fmt(r['val_mean'])} ± {fmt(r['val_half_range'])} "
                         f"| {fmt(r['train_mean'])} ± {fmt(r['train_half_range'])} "
                         f"| {r['step_ms']:.1f} | {r['optimizer_ms']:.1f} "
                         f"| {r['train_seconds']:.0f} | {max(r['load_average']):.2f} "
                         f"| {cpus_by_seed(r)} |")
        main = [n for n in rows if n in OPTIMIZERS]
        lines += ["", f"Steps / training seconds for the row's mean val curve to reach the "
                      f"column's final mean val loss, {column_title(horizon)} (– never):", "",
                  "| optimizer | " + " | ".join(f"→ {n} ({fmt(rows[n]['val_mean'])})"
                                                 for n in main) + " |",
                  "|---|" + "---|" * len(main)]
        for name in rows:
            cells = []
            for other in main:
                if other == name:
                    cells.append("·")
                    continue
                hit = rows[name]["reach"].get(other)
                cells.append("–" if hit is None else f"{hit['steps']:.0f} / {hit['seconds']:.0f}s")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for horizon, sens in summary["lr_sensitivity"].items():
        title = (f"train_mlp_jax.py (20 epochs, seed 0; {summary['mlp_jax_source']})"
                 if horizon == "mlp_jax"
                 else f"{column_title(horizon)} (seed 0)")
        lines += [f"### lr sensitivity, {title}", "",
                  "| optimizer | final val loss by lr | best lr | band within 2% "
                  "(grid points) | width, grid | width, interpolated |",
                  "|---|---|---|---|---|---|"]
        for name, s in sens.items():
            band = s["band"]
            by_lr = ", ".join(f"{lr}: {v:.4f}" if math.isfinite(v) else f"{lr}: nan"
                              for lr, v in s["final_val_by_lr"].items())
            open_mark = "≥ " if band["open_low"] or band["open_high"] else ""
            lines.append(f"| {name} | {by_lr} | {band['best_lr']:g} | "
                         + ", ".join(f"{lr:g}" for lr in band["grid_points_in_band"])
                         + f" | {open_mark}{band['grid_width']:.1f}× "
                         f"| {open_mark}{band['interpolated_width']:.1f}× |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    plt = harness.pyplot()
    colors = COLORS
    horizons = list(summary["horizons"])
    for x_key, x_label, file_name in (("step", "step", "val_loss_vs_step.png"),
                                      ("seconds", "training seconds (no eval; shared 2 cores)",
                                       "val_loss_vs_seconds.png")):
        figure, axes = plt.subplots(1, len(horizons), figsize=(5 * len(horizons), 4.2),
                                    squeeze=False)
        for ax, horizon in zip(axes[0], horizons):
            rows = summary["horizons"][horizon]
            tails = []
            for name, row in rows.items():
                c = row["curve"]
                ax.plot(c[x_key], c["val_mean"], color=colors.get(name),
                        label=f"{name} (lr {row['lr']:g}, {len(row['seeds'])} seed"
                              f"{'s' if len(row['seeds']) > 1 else ''})")
                ax.fill_between(c[x_key], c["val_min"], c["val_max"], color=colors.get(name),
                                alpha=0.2)
                tails += c["val_max"][len(c["val_max"]) // 5:]
            finite = [v for v in tails if math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.02, max(finite))
            ax.set(title=column_title(horizon), xlabel=x_label, ylabel="validation loss (nats/byte)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        harness.save_figure(figure, out / file_name, dpi=110)

    sens = summary["lr_sensitivity"]
    if sens:
        figure, axes = plt.subplots(1, len(sens), figsize=(5 * len(sens), 4.2), squeeze=False)
        for ax, (horizon, by_name) in zip(axes[0], sens.items()):
            for name, s in by_name.items():
                lrs = [float(k) for k in s["final_val_by_lr"]]
                vals = list(s["final_val_by_lr"].values())
                ax.plot(lrs, vals, "o-", color=colors.get(name), label=name)
                band = s["band"]
                ax.plot([band["interpolated_low"], band["interpolated_high"]],
                        [band["limit"]] * 2, color=colors.get(name), lw=4, alpha=0.4)
            title = ("train_mlp_jax (digits MLP)" if horizon == "mlp_jax"
                     else f"train_lm quick, {column_title(horizon)}")
            finite = [v for s in by_name.values() for v in s["final_val_by_lr"].values()
                      if math.isfinite(v)]
            if horizon == "mlp_jax":  # losses near 0.06..1.2: a log axis shows them all
                ax.set_yscale("log")
            else:
                best = min(finite)
                ax.set_ylim(best - 0.05 * abs(best), min(max(finite), best * 1.6))
            ax.set(xscale="log", xlabel="peak lr", ylabel="final validation loss (seed 0)",
                   title=f"{title}\nthick bar: within 2% of best")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        harness.save_figure(figure, out / "lr_sensitivity.png", dpi=110)

    batch_axis = column_name(BATCH_AXIS["horizon"], BATCH_AXIS["batch_size"])
    base_columns = [c for c in summary["horizons"] if c != batch_axis]
    final_val_plot(summary, base_columns, [int(c) for c in base_columns],
                   "run length (steps; lr tuned per horizon, see docs)",
                   f"train_lm quick, batch {BASE_BATCH}: final val loss vs horizon",
                   out / "final_val_vs_horizon.png")
    if batch_axis in summary["horizons"]:
        base = column_name(BATCH_AXIS["horizon"], BASE_BATCH)
        final_val_plot(summary, [base, batch_axis], [BASE_BATCH, BATCH_AXIS["batch_size"]],
                       "batch size (sequences of 64 bytes; lr chosen per batch size)",
                       f"train_lm quick, {BATCH_AXIS['horizon']} steps: final val loss vs batch",
                       out / "batch_axis.png")

    knob_rows = summary["horizons"].get(str(KNOB_HORIZON), {})
    if knob_rows:
        figure, ax = plt.subplots(figsize=(6, 4.2))
        for name, row in knob_rows.items():
            ax.errorbar(row["optimizer_ms"], row["val_mean"],
                        yerr=0 if not math.isfinite(row["val_half_range"]) else row["val_half_range"],
                        fmt="o", color=colors.get(name), label=name, capsize=3)
        ax.set(xscale="log", xlabel="median optimizer step (ms, 2 shared cores)",
               ylabel="final validation loss", title=f"{KNOB_HORIZON} steps: quality vs step cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        harness.save_figure(figure, out / "cost_knobs.png", dpi=110)


def final_val_plot(summary: dict, columns: list[str], xs: list[int], x_label: str, title: str,
                   path: Path) -> None:
    """Final val loss (mean, ± half-range bars) of each optimizer over the columns."""
    figure, ax = harness.pyplot().subplots(figsize=(6, 4.2))
    for name in OPTIMIZERS:
        points = [(x, summary["horizons"][c][name]) for c, x in zip(columns, xs)
                  if name in summary["horizons"][c]]
        if points:
            ax.errorbar([x for x, _ in points], [r["val_mean"] for _, r in points],
                        yerr=[0 if not math.isfinite(r["val_half_range"]) else r["val_half_range"]
                              for _, r in points], fmt="o-", color=COLORS[name], label=name,
                        capsize=3)
    ax.set(xscale="log", xlabel=x_label, ylabel="final validation loss", title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    harness.save_figure(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="tables and plots from runs.jsonl")
    parser.add_argument("--deadline", help="HH:MM UTC today: skip runs that would end later")
    parser.add_argument("--skip-mlp", action="store_true", help="leave out train_mlp_jax")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="in this order. map: batch-32 grids, knobs, 4800 seed 0; long: 4800 "
                             "seed 1 and lr points; batch: the batch-size axis (two processes may "
                             "run parts in parallel: a run one has started, the other skips)")
    args = parser.parse_args()
    if args.report:
        summary = report(args.out)
        print((args.out / "tables.md").read_text())
        print(f"wrote {args.out}/summary.json, tables.md, *.png "
              f"({sum(len(r) for r in summary['horizons'].values())} rows)")
        return
    deadline = None
    if args.deadline:
        hour, minute = map(int, args.deadline.split(":"))
        deadline = dt.datetime.now(dt.timezone.utc).replace(hour=hour, minute=minute, second=0,
                                                            microsecond=0)
    run_all(args.out, deadline, args.skip_mlp, args.parts)
    report(args.out)


if __name__ == "__main__":
    main()
