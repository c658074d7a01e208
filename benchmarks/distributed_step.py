"""Per-step time and collective payload of distributed ASGO on localhost (gloo, CPU).

    python benchmarks/distributed_step.py --world-size 2            # spawns the ranks itself
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py      # or launched by torchrun

Optimizer step only (random gradients, no model), for the matrices of a small transformer
(`--layers` blocks of width `--width`: q, k, v, o (d×d), fc1 (4d×d), fc2 (d×4d)), one thread
per rank. Modes:
  replicated  every rank runs the plain ASGO on the full (DDP-averaged) gradients
  owner       DistributedASGO: each matrix stepped by its owner, one all-gather of the results
  fsdp        FSDPASGO on row-sharded DTensors, sharded_side_policy="owner" (default): sharded
              column Gram (all-reduce n×n) for the m ≥ n matrices; the m < n ones (fc2) are
              gathered on one owner rank, stepped there and their rows sent back (all-to-all)
  fsdp_other  FSDPASGO with sharded_side_policy="other_side": fc2 preconditioned on its columns
              too (a different preconditioner), so every matrix takes the sharded Gram
  gather      baseline for sharded weights: all-gather every full gradient, every rank steps
              the full matrices with the plain ASGO and keeps its rows
"Payload" is the bytes of the collectives' result tensors on one rank per step, the mean over
ranks (a ring all-reduce moves about twice its payload over the wire, an all-gather or
all-to-all about its payload); the per-step has-gradient flags of FSDPASGO (4 bytes a matrix)
are left out.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness  # benchmarks/, the script's own directory

MODES = ("replicated", "owner", "fsdp", "fsdp_other", "gather")
FLOAT_BYTES = 4


def matrix_shapes(width: int, layers: int) -> list[tuple[int, int]]:
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return block * layers


def random_grads(shapes, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def timed_steps(step_fn, steps: int, warmup: int = 2) -> float:
    """Median seconds of step_fn(step) over `steps`, every rank starting together."""
    taken = [harness.sample(lambda step=step: step_fn(step), sync=dist.barrier)
             for step in range(warmup + steps)]
    return harness.median_wall(taken[warmup:])


def run_with(optimizer_type, shapes, steps):
    """Time optimizer_type on full (replicated) parameters; returns (seconds, bytes sent)."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = optimizer_type(params)

    def step_fn(step):
        for param, grad in zip(params, random_grads(shapes, step)):
            param.grad = grad
        optimizer.step()
    return timed_steps(step_fn, steps), getattr(optimizer, "bytes_per_step", 0)


def run_replicated(shapes, steps):
    from asgo_core.adapters.torch import ASGO
    return run_with(ASGO, shapes, steps)


def run_owner(shapes, steps):
    from asgo_core.adapters.torch_distributed import DistributedASGO
    return run_with(DistributedASGO, shapes, steps)


def _row_sharded(tensors, mesh):
    """Every rank's rows of the same full tensors (each rank made them all: no scatter)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    return [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in tensors]


def run_fsdp(shapes, steps, sharded_side_policy="owner"):
    from torch.distributed.device_mesh import init_device_mesh

    from asgo_core.adapters.torch_distributed import FSDPASGO

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    params = [torch.nn.Parameter(t) for t in _row_sharded([torch.randn(s) for s in shapes], mesh)]
    optimizer = FSDPASGO(params, sharded_side_policy=sharded_side_policy)

    def step_fn(step):
        for param, grad in zip(params, _row_sharded(random_grads(shapes, step), mesh)):
            param.grad = grad
        optimizer.step()
    return timed_steps(step_fn, steps), fsdp_payload(optimizer, params)


def fsdp_payload(optimizer, params) -> float:
    """Mean bytes received per rank and step. Sharded-Gram matrices: the n×n Gram and one
    squared norm. Owner-held ones: the owner receives the other ranks' rows of weight and
    gradient (2·m·n·(P−1)/P), each other rank its own rows back (m·n/P)."""
    world, payload = dist.get_world_size(), 0.0
    for param in params:
        m, n = param.shape
        if optimizer.owner_of(param) is None:
            payload += n * n + 1
        else:
            payload += 3 * m * n * (world - 1) / world ** 2
    return FLOAT_BYTES * payload


def run_gather(shapes, steps):
    from asgo_core.adapters.torch import ASGO

    world, rank = dist.get_world_size(), dist.get_rank()
    full = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = ASGO(full)
    numel = sum(p.numel() for p in full)
    local_rows = [p.detach().chunk(world)[rank].clone() for p in full]

    def step_fn(step):
        grad_shards = [g.chunk(world)[rank] for g in random_grads(shapes, step)]
        gathered = torch.empty(numel)
        dist.all_gather_single(gathered, torch.cat([g.reshape(-1) for g in grad_shards]))
        per_rank = [part.split([g.numel() for g in grad_shards]) for part in gathered.chunk(world)]
        for index, param in enumerate(full):
            param.grad = torch.cat([parts[index].view(-1, *param.shape[1:]) for parts in per_rank])
        optimizer.step()
        for local, param in zip(local_rows, full):
            local.copy_(param.detach().chunk(world)[rank])
    return timed_steps(step_fn, steps), FLOAT_BYTES * numel


def worker(rank: int, world_size: int, args) -> None:
    if rank >= 0:  # spawned by this script rather than torchrun
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shapes = matrix_shapes(args.width, args.layers)
    runners = {"replicated": run_replicated, "owner": run_owner, "fsdp": run_fsdp,
               "fsdp_other": lambda *args: run_fsdp(*args, sharded_side_policy="other_side"),
               "gather": run_gather}
    rows = [(mode, *runners[mode](shapes, args.steps)) for mode in args.modes]
    if dist.get_rank() == 0:
        print(f"\n{len(shapes)} matrices (width {args.width}, {args.layers} blocks), "
              f"{dist.get_world_size()} ranks, gloo/CPU, median of {args.steps} steps\n")
        print("| mode | ms / step | payload KiB / step / rank |")
        print("|---|---:|---:|")
        for mode, seconds, payload in rows:
            print(f"| {mode} | {1e3 * seconds:.1f} | {payload / 1024:.0f} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
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
