"""Cost model of distributed ASGO past one machine: state, root FLOPs and traffic per rank.

    python benchmarks/cost_model.py                       # markdown table + results/cost_model.json
    python benchmarks/cost_model.py --root-method eigh    # eigh instead of the PolarExpress iteration

Pure arithmetic (no torch), see docs/cost_model.md for every assumption. For each model shape
(`SHAPES`), world size and τ it gives, per method:
  state   optimizer-state bytes on the most loaded rank
  root    root FLOPs (ASGO) or Newton–Schulz FLOPs (Muon) on the most loaded rank per refresh
  comm    bytes one rank sends per step in the optimizer's own collectives (mean over ranks)
Methods: "ddp_owner" (DistributedASGO), "fsdp_split_roots" (FSDPASGO: each sharded-Gram root
solved on one rank, shared by one all-to-all per bucket and refresh), "fsdp_replicated_roots"
(FSDPASGO with every rank solving every sharded-Gram root, the baseline mode of the same name
in benchmarks/distributed_step.py), "adamw" and "muon" (sharded state;
Muon's Newton–Schulz on whole matrices, one owner rank each). Owner splits mirror
`parameter_cost` / `root_cost` / `assign_owners` of adapters/torch_distributed.py, restated here
so the script runs without torch.
"""

from __future__ import annotations

import argparse
import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import harness  # benchmarks/, the script's own directory

FLOAT_BYTES = 4
RANKS = (8, 64, 256, 1024)
TAUS = (1, 10)
METHODS = ("ddp_owner", "fsdp_replicated_roots", "fsdp_split_roots", "adamw", "muon")
FLAG_BYTES = 4                        # FSDPASGO's int32 flags: has-gradient, momentum nonzero
ADAMW_FLOPS_PER_ELEMENT = 12          # as adapters/torch_distributed.py balances owners
EIGH_FLOPS_PER_K3 = 9                 # symmetric eigendecomposition with eigenvectors
GEMMS_PER_ROOT_STEP = 4               # coupled iteration: four k×k products a step (SPEC §5)
MUON_NS_STEPS = 5


@dataclass(frozen=True)
class Param:
    """One parameter: `count` matrices of m×n (count > 1: an expert stack, batch_dims=1), or
    a vector / embedding for AdamW (rows = its dim 0, the dim FSDP2 shards)."""
    name: str
    m: int
    n: int
    count: int = 1
    algorithm: str = "asgo"

    @property
    def numel(self) -> int:
        return self.count * self.m * self.n

    @property
    def k(self) -> int:
        return min(self.m, self.n)

    @property
    def sharded_gram(self) -> bool:
        """FSDPASGO's sharded-Gram path: one matrix, columns preconditioned (m >= n)."""
        return self.algorithm == "asgo" and self.count == 1 and self.m >= self.n


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    d_model: int
    vocab: int
    mlp_hidden: int
    mlp: str                 # "gelu" (fc1, fc2) or "swiglu" (gate, up, down)
    positions: int = 0       # learned position embedding rows (0: rotary)
    biases: bool = False
    experts: int = 0         # experts per layer (0: dense MLP)


SHAPES = (
    Shape("GPT-2 small", 12, 768, 50257, 3072, "gelu", positions=1024, biases=True),
    Shape("1.3B dense", 24, 2048, 50257, 8192, "gelu", positions=2048, biases=True),
    Shape("7B dense", 32, 4096, 32000, 11008, "swiglu"),
    Shape("MoE 64 experts", 16, 2048, 50304, 1024, "swiglu", experts=64),
)


def vector(name: str, size: int) -> Param:
    return Param(name, size, 1, algorithm="adamw")


def mlp_params(shape: Shape, prefix: str) -> list[Param]:
    d, h, count = shape.d_model, shape.mlp_hidden, max(shape.experts, 1)
    if shape.mlp == "gelu":
        biases = [vector(prefix + "fc1.bias", h), vector(prefix + "fc2.bias", d)] if shape.biases else []
        return [Param(prefix + "fc1", h, d, count), Param(prefix + "fc2", d, h, count)] + biases
    return [Param(prefix + "gate", h, d, count), Param(prefix + "up", h, d, count),
            Param(prefix + "down", d, h, count)]


def layer_params(shape: Shape, layer: int) -> list[Param]:
    d, prefix = shape.d_model, f"layers.{layer}."
    params = [Param(prefix + name, d, d) for name in ("q", "k", "v", "o")]
    params += [vector(prefix + "norm1", d), vector(prefix + "norm2", d)]
    if shape.biases:
        params += [vector(prefix + f"{name}.bias", d) for name in ("q", "k", "v", "o")]
        params += [vector(prefix + "norm1.bias", d), vector(prefix + "norm2.bias", d)]
    if shape.experts:
        params.append(Param(prefix + "router", shape.experts, d))
    return params + mlp_params(shape, prefix + ("experts." if shape.experts else "mlp."))


def model_params(shape: Shape) -> list[Param]:
    """asgo_param_groups' split: matrices to ASGO; vectors and the (tied) embedding to AdamW."""
    params = [Param("embedding", shape.vocab, shape.d_model, algorithm="adamw")]
    if shape.positions:
        params.append(Param("positions", shape.positions, shape.d_model, algorithm="adamw"))
    for layer in range(shape.layers):
        params += layer_params(shape, layer)
    return params + [vector("final_norm", shape.d_model)]


# ---- per-parameter costs ---------------------------------------------------------------------
def asgo_state_bytes(param: Param, rows: int | None = None) -> int:
    """Momentum (the given rows, default all) + Gram V + root R, float32."""
    momentum_rows = param.m if rows is None else rows
    return FLOAT_BYTES * param.count * (momentum_rows * param.n + 2 * param.k ** 2)


def adamw_state_bytes(param: Param, rows: int | None = None) -> int:
    return FLOAT_BYTES * 2 * param.count * (param.m if rows is None else rows) * param.n


def root_flops(param: Param, method: str, steps: int) -> int:
    per_k3 = EIGH_FLOPS_PER_K3 if method == "eigh" else GEMMS_PER_ROOT_STEP * 2 * steps
    return param.count * per_k3 * param.k ** 3


def newton_schulz_flops(param: Param) -> int:
    """Muon's 5 steps on one small×large matrix (SPEC §7): 5·(4·k²·K + 2·k³)."""
    k, large = param.k, max(param.m, param.n)
    return param.count * MUON_NS_STEPS * (4 * k * k * large + 2 * k ** 3)


def parameter_cost(param: Param, tau: int) -> int:
    """adapters/torch_distributed.parameter_cost: the owner split's balancing weight."""
    if param.algorithm == "adamw":
        return ADAMW_FLOPS_PER_ELEMENT * param.numel
    return param.count * 4 * param.m * param.n * param.k + root_cost(param, tau)


def root_cost(param: Param, tau: int) -> int:
    """adapters/torch_distributed.root_cost: the root split's balancing weight."""
    return param.count * (param.k ** 3 // tau)


def assign_owners(costs: list[int], world: int, loads: list[int] | None = None) -> list[int]:
    """Greedy longest-processing-time split as adapters/torch_distributed.assign_owners: the
    most expensive item (ties: lower index) to the least loaded rank (ties: lower rank),
    starting from `loads` (default none), to which the assigned costs are added."""
    loads = [0] * world if loads is None else loads
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[index] = rank
        heapq.heappush(heap, (load + costs[index], rank))
    for load, rank in heap:
        loads[rank] = load
    return owners


def rows_on(rows: int, rank: int, world: int) -> int:
    """Rows of dim 0 on `rank` when FSDP2 shards it (torch.chunk: ceil-sized chunks)."""
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk))


# ---- methods -----------------------------------------------------------------------------------
@dataclass
class Cost:
    """Per-rank totals of one method: state bytes and root FLOPs per rank, traffic (mean)."""
    state: list[float]
    root: list[float]
    comm: float = 0.0
    payload: float = 0.0     # bytes of the collectives' result tensors per rank (the benchmark's)

    def summary(self) -> dict:
        return {"state_bytes": max(self.state), "root_flops": max(self.root),
                "comm_bytes": self.comm, "payload_bytes": self.payload}


def new_cost(world: int) -> Cost:
    return Cost([0.0] * world, [0.0] * world)


def ddp_owner(params, world, tau, root_method, root_steps) -> Cost:
    """DistributedASGO: whole parameters on owners, one all-gather of a padded chunk per rank."""
    cost = new_cost(world)
    owners = assign_owners([parameter_cost(p, tau) for p in params], world)
    owned_numel = [0] * world
    for param, owner in zip(params, owners):
        owned_numel[owner] += param.numel
        if param.algorithm == "adamw":
            cost.state[owner] += adamw_state_bytes(param)
        else:
            cost.state[owner] += asgo_state_bytes(param)
            cost.root[owner] += root_flops(param, root_method, root_steps)
    gathered = world * max(owned_numel) * FLOAT_BYTES
    cost.comm = cost.payload = all_gather_bytes(gathered, world)  # the other ranks' chunks
    return cost


def all_reduce_bytes(size: float, world: int) -> float:
    return 2 * (world - 1) / world * size


def all_gather_bytes(gathered: float, world: int) -> float:
    return (world - 1) / world * gathered


def add_sharded_state(cost: Cost, param: Param, world: int, state_fn) -> None:
    for rank in range(world):
        cost.state[rank] += state_fn(param, rows_on(param.m, rank, world))


def add_local_experts(cost: Cost, param: Param, world: int, state_fn, flops_fn) -> None:
    """An expert stack sharded on its expert axis: each rank steps its whole experts."""
    for rank in range(world):
        experts = rows_on(param.count, rank, world)
        local = Param(param.name, param.m, param.n, experts, param.algorithm)
        cost.state[rank] += state_fn(local) if experts else 0
        cost.root[rank] += flops_fn(local) if experts else 0


def add_to_owners(cost: Cost, params: list[Param], world: int, owners: list[int], state_fn,
                  flops_fn, exchanged_copies: int) -> None:
    """Owner-held matrices: owner keeps the whole state; an all-to-all moves `exchanged_copies`
    m×n matrices' off-owner rows (to the owner and back) per step."""
    for param, owner in zip(params, owners):
        cost.state[owner] += state_fn(param)
        cost.root[owner] += flops_fn(param)
        moved = exchanged_copies * (param.m - rows_on(param.m, owner, world)) * param.n * FLOAT_BYTES
        cost.comm += moved / world
        cost.payload += moved / world


def fsdp_asgo(params, world, tau, root_method, root_steps, split_roots: bool) -> Cost:
    """FSDPASGO (owner policy): sharded-Gram matrices all-reduce their n×n Gram and squared
    norm each step and a momentum-nonzero flag each refresh; the m < n ones go to owners
    (weight + gradient rows there, rows back: 3 copies); one has-gradient flag a parameter is
    all-reduced each step. split_roots: each sharded-Gram root is solved by one rank, balanced
    on top of the owner-held matrices' parameter_cost, and every rank receives the others'
    roots with their 4 fallback flags (an all-to-all per bucket and refresh)."""
    cost = new_cost(world)
    flops = lambda p: root_flops(p, root_method, root_steps)  # noqa: E731
    gram_params = [p for p in params if p.sharded_gram]
    owner_held = [p for p in params if p.algorithm == "asgo" and p.count == 1 and not p.sharded_gram]
    for param in params:
        if param.algorithm == "adamw":
            add_sharded_state(cost, param, world, adamw_state_bytes)
        elif param.count > 1:
            add_local_experts(cost, param, world, asgo_state_bytes, flops)
    loads = [0] * world
    owners = assign_owners([parameter_cost(p, tau) for p in owner_held], world, loads)
    add_to_owners(cost, owner_held, world, owners, asgo_state_bytes, flops, exchanged_copies=3)
    reduced = FLAG_BYTES * len(params) + sum(FLOAT_BYTES * (p.k ** 2 + 1) + FLAG_BYTES / tau
                                             for p in gram_params)
    cost.comm += all_reduce_bytes(reduced, world)
    cost.payload += reduced
    for param in gram_params:
        add_sharded_state(cost, param, world, asgo_state_bytes)
    if split_roots:
        root_owners = assign_owners([root_cost(p, tau) for p in gram_params], world, loads)
        for param, owner in zip(gram_params, root_owners):
            cost.root[owner] += flops(param)
        roots_bytes = FLOAT_BYTES * sum(p.k ** 2 + 4 for p in gram_params)
        cost.comm += all_gather_bytes(roots_bytes, world) / tau
        cost.payload += all_gather_bytes(roots_bytes, world) / tau
    else:
        every_root = sum(flops(p) for p in gram_params)
        cost.root = [load + every_root for load in cost.root]
    return cost


def adamw(params, world, *_) -> Cost:
    """AdamW with FSDP2/ZeRO-sharded state: elementwise on each rank's rows, no traffic."""
    cost = new_cost(world)
    for param in params:
        if param.count > 1:
            add_local_experts(cost, param, world, adamw_state_bytes, lambda p: 0)
        else:
            add_sharded_state(cost, param, world, adamw_state_bytes)
    return cost


def muon_state_bytes(param: Param, rows: int | None = None) -> int:
    return FLOAT_BYTES * param.count * (param.m if rows is None else rows) * param.n


def muon(params, world, *_) -> Cost:
    """Muon under FSDP2: momentum sharded; each matrix has an owner (balanced by Newton–Schulz
    FLOPs) that gathers the momentum rows, orthogonalises, and sends rows back (2 copies)."""
    cost = new_cost(world)
    matrices = [p for p in params if p.algorithm == "asgo" and p.count == 1]
    for param in params:
        if param.algorithm == "adamw":
            add_sharded_state(cost, param, world, adamw_state_bytes)
        elif param.count > 1:
            add_local_experts(cost, param, world, muon_state_bytes, newton_schulz_flops)
    owners = assign_owners([newton_schulz_flops(p) for p in matrices], world)
    for param, owner in zip(matrices, owners):
        add_sharded_state(cost, param, world, muon_state_bytes)
        cost.root[owner] += newton_schulz_flops(param)
        moved = 2 * (param.m - rows_on(param.m, owner, world)) * param.n * FLOAT_BYTES
        cost.comm += moved / world
        cost.payload += moved / world
    return cost


def method_cost(method: str, params, world: int, tau: int, root_method="polar_express",
                root_steps=10) -> Cost:
    if method == "ddp_owner":
        return ddp_owner(params, world, tau, root_method, root_steps)
    if method in ("fsdp_replicated_roots", "fsdp_split_roots"):
        return fsdp_asgo(params, world, tau, root_method, root_steps, method == "fsdp_split_roots")
    return {"adamw": adamw, "muon": muon}[method](params, world)


def framework_bytes(params, world: int) -> dict:
    """The training framework's own traffic per rank and step, the same for every optimizer:
    DDP all-reduces the gradients; FSDP2 all-gathers the parameters twice (forward, backward)
    and reduce-scatters the gradients."""
    total = FLOAT_BYTES * sum(p.numel for p in params)
    return {"ddp": all_reduce_bytes(total, world), "fsdp": 3 * all_gather_bytes(total, world)}


# ---- report ------------------------------------------------------------------------------------
def run(ranks=RANKS, taus=TAUS, root_method="polar_express", root_steps=10) -> list[dict]:
    rows = []
    for shape in SHAPES:
        params = model_params(shape)
        for world in ranks:
            for method in METHODS:
                row = {"shape": shape.name, "params": sum(p.numel for p in params), "ranks": world,
                       "method": method, "framework_bytes": framework_bytes(params, world)}
                for tau in taus:
                    row[f"tau{tau}"] = method_cost(method, params, world, tau, root_method,
                                                   root_steps).summary()
                rows.append(row)
    return rows


def markdown(rows: list[dict], taus) -> str:
    metrics = [("state_bytes", "state MiB", 2 ** 20), ("root_flops", "root GFLOP", 1e9),
               ("comm_bytes", "comm MiB", 2 ** 20)]
    header = ["model", "ranks", "method"] + [f"{label} τ={tau}" for _, label, _ in metrics for tau in taus]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        cells = [row["shape"], str(row["ranks"]), row["method"]]
        cells += [f"{row[f'tau{tau}'][key] / scale:,.1f}" for key, _, scale in metrics for tau in taus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BENCHMARK_MATRICES = {  # benchmarks/distributed_step.py --matrices
    "transformer": [(128, 128)] * 4 * 4 + [(512, 128), (128, 512)] * 4,
    "roots": [(384, 384)] * 4 + [(256, 256)] * 4,
}
BENCHMARK_MODES = {"owner": "ddp_owner", "fsdp": "fsdp_split_roots",
                   "fsdp_replicated_roots": "fsdp_replicated_roots"}


def benchmark_check(ranks=(2, 4)) -> str:
    """The model for distributed_step.py's matrices (τ = 1, roots by eigh: the CPU's method),
    in the units that benchmark prints, to set beside its output: payload (bytes received
    from other ranks per rank and step, mean) and root GFLOP per step on the busiest rank."""
    lines = ["| matrices | ranks | mode | payload KiB (model) | root GFLOP (model) |",
             "|---|---:|---|---:|---:|"]
    for matrices, shapes in BENCHMARK_MATRICES.items():
        params = [Param(f"matrix{index}", m, n) for index, (m, n) in enumerate(shapes)]
        for world in ranks:
            for mode, method in BENCHMARK_MODES.items():
                cost = method_cost(method, params, world, 1, root_method="eigh")
                lines.append(f"| {matrices} | {world} | {mode} | {cost.payload / 1024:.1f} "
                             f"| {max(cost.root) / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--taus", type=int, nargs="+", default=list(TAUS))
    parser.add_argument("--root-method", choices=("polar_express", "eigh"), default="polar_express")
    parser.add_argument("--root-steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("results/cost_model.json"))
    parser.add_argument("--check-benchmark", action="store_true",
                        help="print the model's payload for benchmarks/distributed_step.py only")
    args = parser.parse_args()
    if args.check_benchmark:
        print(benchmark_check())
        return
    rows = run(args.ranks, args.taus, args.root_method, args.root_steps)
    print(markdown(rows, args.taus))
    harness.write_json(args.json, {"root_method": args.root_method, "root_steps": args.root_steps,
                                   "rows": rows})
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
