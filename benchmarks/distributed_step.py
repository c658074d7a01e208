"""Per-step time, root time and collective payload of distributed ASGO on localhost (gloo, CPU).

    python benchmarks/distributed_step.py --world-size 2            # spawns the ranks itself
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py      # or launched by torchrun
    python benchmarks/distributed_step.py --world-size 4 --matrices roots \
        --modes fsdp fsdp_replicated_roots --reps 5 --steps 2      # split roots against the baseline

Optimizer step only (random gradients, no model), one thread per rank, for `--matrices`:
  transformer  the matrices of a small transformer (`--layers` blocks of width `--width`: q, k,
               v, o (d×d), fc1 (4d×d), fc2 (d×4d))
  roots        matrices whose roots dominate the step: 4 of 384×384 and 4 of 256×256
Modes:
  replicated  every rank runs the plain ASGO on the full (DDP-averaged) gradients
  owner       DistributedASGO: each matrix stepped by its owner, one all-gather of the results
  fsdp        FSDPASGO on row-sharded DTensors, sharded_side_policy="owner" (default): sharded
              column Gram (all-reduce n×n) for the m ≥ n matrices, each of their roots solved on
              one rank and shared (one all-to-all per bucket and refresh); the m < n ones (fc2)
              are gathered on one owner rank, stepped there and their rows sent back (all-to-all)
  fsdp_replicated_roots  baseline: FSDPASGO with every rank solving every sharded-Gram root
              (nothing shared)
  fsdp_other  FSDPASGO with sharded_side_policy="other_side": fc2 preconditioned on its columns
              too (a different preconditioner), so every matrix takes the sharded Gram
  gather      baseline for sharded weights: all-gather every full gradient, every rank steps
              the full matrices with the plain ASGO and keeps its rows
The modes run interleaved: `--reps` rounds, each timing `--steps` steps of every mode; the
figures are medians over all timed steps. "Root" is the time in the core's robust_root (the
roots this rank solves) and the blocks it solved, per step, on the busiest rank. "Payload" is
the bytes of the collectives' result tensors per rank and step that come from other ranks, the
mean over ranks, counted at the torch.distributed calls the optimizers make (a ring all-reduce
moves about twice its payload over the wire, an all-gather or all-to-all about its payload);
it includes FSDPASGO's has-gradient flags (4 bytes a matrix).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness  # benchmarks/, the script's own directory

MODES = ("replicated", "owner", "fsdp", "fsdp_replicated_roots", "fsdp_other", "gather")


def matrix_shapes(matrices: str, width: int, layers: int) -> list[tuple[int, int]]:
    if matrices == "roots":
        return [(384, 384)] * 4 + [(256, 256)] * 4
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return block * layers


def random_grads(shapes, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator) for shape in shapes]


class Meter:
    """What this rank spends, per mode, over the timed steps: step seconds, the seconds and
    blocks of the roots it solves, and the bytes it receives from other ranks per collective.
    `install` wraps the core's robust_root and the torch.distributed calls the optimizers make."""

    def __init__(self):
        self.mode, self.timing = None, False
        self.step_seconds: dict = defaultdict(list)
        self.root_seconds: dict = defaultdict(list)
        self.root_cpu_seconds: dict = defaultdict(list)
        self.root_blocks: dict = defaultdict(lambda: defaultdict(int))     # mode → k → blocks
        self.received: dict = defaultdict(lambda: defaultdict(int))        # mode → collective → bytes
        self._root_seconds = self._root_cpu_seconds = 0.0

    def install(self) -> None:
        core = importlib.import_module("asgo_core.step")  # the module (asgo_core.step is also a function)
        core.robust_root = self._timed_root(core.robust_root)
        rank_share = {"all_reduce": lambda tensor, *_, **__: _bytes(tensor),
                      "all_to_all_single": _all_to_all_received,
                      "all_gather_into_tensor": _all_gather_received}
        for name, received in rank_share.items():
            setattr(dist, name, self._counted(name, getattr(dist, name), received))

    def _timed_root(self, robust_root):
        @functools.wraps(robust_root)
        def timed(grams, *args, **kwargs):
            start, cpu_start = time.perf_counter(), time.thread_time()
            result = robust_root(grams, *args, **kwargs)
            if self.timing:
                self._root_seconds += time.perf_counter() - start
                self._root_cpu_seconds += time.thread_time() - cpu_start
                self.root_blocks[self.mode][grams.shape[-1]] += grams.shape[0]
            return result
        return timed

    def _counted(self, name, collective, received):
        @functools.wraps(collective)
        def counted(*args, **kwargs):
            if self.timing:
                self.received[self.mode][name] += received(*args, **kwargs)
            return collective(*args, **kwargs)
        return counted

    def run(self, mode: str, step_fn, steps: int, first_step: int) -> None:
        """`steps` timed steps of one mode, every rank starting each together."""
        self.mode = mode
        for step in range(first_step, first_step + steps):
            dist.barrier()
            self.timing, self._root_seconds, self._root_cpu_seconds = True, 0.0, 0.0
            with harness.Stopwatch() as clock:
                step_fn(step)
                dist.barrier()
            self.step_seconds[mode].append(clock.wall_s)
            self.timing = False
            self.root_seconds[mode].append(self._root_seconds)
            self.root_cpu_seconds[mode].append(self._root_cpu_seconds)

    def summary(self, mode: str) -> dict:
        steps = len(self.step_seconds[mode])
        return {"step_s": statistics.median(self.step_seconds[mode]),
                "root_s": statistics.median(self.root_seconds[mode]),
                "root_cpu_s": statistics.median(self.root_cpu_seconds[mode]),
                "root_blocks": {k: blocks / steps for k, blocks in self.root_blocks[mode].items()},
                "received": {name: total / steps for name, total in self.received[mode].items()}}


def _bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _all_to_all_received(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_):
    """Bytes of the output that other ranks sent (dim-0 splits; None: equal ones)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = output_split_sizes or [output.shape[0] // world] * world
    row_bytes = _bytes(output) // max(output.shape[0], 1)
    return row_bytes * (sum(rows) - rows[rank])


def _all_gather_received(output, input, group=None, **_):
    return _bytes(output) - _bytes(input)


def step_with(optimizer_type, shapes):
    """A step function of optimizer_type on full (replicated) parameters."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = optimizer_type(params)

    def step_fn(step):
        for param, grad in zip(params, random_grads(shapes, step)):
            param.grad = grad
        optimizer.step()
    return step_fn


def replicated(shapes):
    from asgo_core.adapters.torch import ASGO
    return step_with(ASGO, shapes)


def owner(shapes):
    from asgo_core.adapters.torch_distributed import DistributedASGO
    return step_with(DistributedASGO, shapes)


def _row_sharded(tensors, mesh):
    """Every rank's rows of the same full tensors (each rank made them all: no scatter)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    return [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in tensors]


def fsdp(shapes, optimizer_type=None, sharded_side_policy="owner"):
    from torch.distributed.device_mesh import init_device_mesh

    from asgo_core.adapters.torch_distributed import FSDPASGO

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    params = [torch.nn.Parameter(t) for t in _row_sharded([torch.randn(s) for s in shapes], mesh)]
    optimizer = (optimizer_type or FSDPASGO)(params, sharded_side_policy=sharded_side_policy)

    def step_fn(step):
        for param, grad in zip(params, _row_sharded(random_grads(shapes, step), mesh)):
            param.grad = grad
        optimizer.step()
    return step_fn


def replicated_roots_fsdpasgo():
    """FSDPASGO in which every rank solves every sharded-Gram root and nothing is shared."""
    from asgo_core import every_root
    from asgo_core.adapters.torch_distributed import FSDPASGO

    class ReplicatedRootsFSDPASGO(FSDPASGO):
        def _share_roots(self, root_owners, solve, grams, previous_roots, moving):
            return every_root(solve, grams, previous_roots, moving)
    return ReplicatedRootsFSDPASGO


def gather(shapes):
    from asgo_core.adapters.torch import ASGO

    world, rank = dist.get_world_size(), dist.get_rank()
    full = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = ASGO(full)
    numel = sum(p.numel() for p in full)
    local_rows = [p.detach().chunk(world)[rank].clone() for p in full]

    def step_fn(step):
        grad_shards = [g.chunk(world)[rank] for g in random_grads(shapes, step)]
        gathered = torch.empty(numel)
        dist.all_gather_into_tensor(gathered, torch.cat([g.reshape(-1) for g in grad_shards]))
        per_rank = [part.split([g.numel() for g in grad_shards]) for part in gathered.chunk(world)]
        for index, param in enumerate(full):
            param.grad = torch.cat([parts[index].view(-1, *param.shape[1:]) for parts in per_rank])
        optimizer.step()
        for local, param in zip(local_rows, full):
            local.copy_(param.detach().chunk(world)[rank])
    return step_fn


SETUPS = {"replicated": replicated, "owner": owner, "fsdp": fsdp,
          "fsdp_replicated_roots": lambda shapes: fsdp(shapes, replicated_roots_fsdpasgo()),
          "fsdp_other": lambda shapes: fsdp(shapes, sharded_side_policy="other_side"), "gather": gather}


def machine() -> str:
    described = harness.machine("torch")
    load = " ".join(f"{value:.1f}" for value in described["load_average"])
    return (f"{described['cpu']} (family {described['cpu_family']}), {described['cores']} cores, "
            f"load average {load}, torch {described['torch']}")


def report(summaries: list[dict], args, shapes) -> None:
    """Markdown table: per mode, the median step, the busiest rank's root seconds (wall and
    this thread's CPU time, which other jobs on a loaded machine do not inflate) and root GFLOP
    (9·k³ a root: eigh, the CPU's root method) per step, and the mean payload per rank."""
    world = len(summaries)
    print(f"\n{len(shapes)} matrices ({args.matrices}), {world} ranks, gloo/CPU, one thread a rank; "
          f"{args.reps} interleaved rounds of {args.steps} steps, medians; {machine()}\n")
    print("| mode | ms / step | root ms / step (busiest rank) | root CPU ms / step (busiest) "
          "| root blocks / step per rank | root GFLOP / step (busiest) | payload KiB / step / rank |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for mode in args.modes:
        ranks = [summary[mode] for summary in summaries]
        blocks = " / ".join("+".join(f"{count:g}×{k}" for k, count in sorted(rank["root_blocks"].items()))
                            or "0" for rank in ranks)
        flops = max(sum(9 * k ** 3 * count for k, count in rank["root_blocks"].items()) for rank in ranks)
        payload = statistics.mean(sum(rank["received"].values()) for rank in ranks)
        root_ms = (1e3 * max(rank[key] for rank in ranks) for key in ("root_s", "root_cpu_s"))
        print(f"| {mode} | {1e3 * ranks[0]['step_s']:.1f} | " + " | ".join(f"{ms:.1f}" for ms in root_ms)
              + f" | {blocks} | {flops / 1e9:.2f} | {payload / 1024:.1f} |")


def worker(rank: int, world_size: int, args) -> None:
    if rank >= 0:  # spawned by this script rather than torchrun
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shapes = matrix_shapes(args.matrices, args.width, args.layers)
    meter = Meter()
    meter.install()
    step_fns = {mode: SETUPS[mode](shapes) for mode in args.modes}
    for step_fn in step_fns.values():  # warm-up, untimed
        step_fn(0)
    for round_index in range(args.reps):
        for mode, step_fn in step_fns.items():
            meter.run(mode, step_fn, args.steps, first_step=1 + round_index * args.steps)
    summaries: list = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, {mode: meter.summary(mode) for mode in args.modes})
    if dist.get_rank() == 0:
        report(summaries, args, shapes)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--matrices", choices=("transformer", "roots"), default="transformer")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each mode per round")
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    if "RANK" in os.environ:  # torchrun
        worker(-1, -1, args)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    mp.spawn(worker, args=(args.world_size, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
