"""ASGO / DASGO for data-parallel training (DDP): each parameter is stepped by one owner rank.

    model = DistributedDataParallel(model)
    opt = DistributedASGO(asgo_param_groups(model.module), lr=1e-2)   # process_group=None: WORLD

Under DDP every rank holds the same, already averaged gradients, so every rank computing every
preconditioner is wasted work. Here each parameter has one *owner* rank, chosen once by a
greedy longest-processing-time split of the estimated step cost (`parameter_cost`: Gram + apply
≈ 4·m·n·k, root ≈ k³/τ, AdamW and DASGO elementwise). Each rank steps only the parameters it owns
— through the unchanged `ASGO` / `DASGO` machinery, so an owner runs exactly the single-process
arithmetic on its matrices — and then one `all_gather_single` per (dtype, device) per step hands
every rank the new values of all parameters. The gathered layout is fixed at construction, so
every rank calls the same collectives with the same sizes every step, whatever gradients it has:
a parameter without a gradient on its owner is sent unchanged, and a rank that owns nothing
(more ranks than parameters) sends padding only. No rank waits on a value another rank lacks.

Gradients must be identical on all ranks (DDP guarantees it); the owner's gradient is the one
used. Parameters must be replicated (DDP), not sharded (FSDP2: see `FSDPASGO` below).

State (matrix and AdamW alike) lives only on the owner. `state_dict()` is a collective — call it
on every rank — that gathers the full state to every rank as CPU tensors, in exactly the layout
of the single-process `ASGO.state_dict()`: save it from rank 0, and load it with
`load_state_dict()` at any world size (each rank keeps the entries it owns) or into a plain
`ASGO`. Param groups must be added before the first `step()` / `load_state_dict()`, since adding
one re-plans ownership.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from asgo_core import _xp, block_layout, matrix_view_shape
from asgo_core.layout import resolve_side
from asgo_core.step import FALLBACK_LEVELS, needs_root_refresh, robust_root

from .torch import ASGO, DASGO, Bucket, _algorithm_of, _to_device, group_config

__all__ = ["DistributedASGO", "DistributedDASGO", "FSDPASGO", "parameter_cost", "assign_owners"]

_ADAMW_FLOPS_PER_ELEMENT = 12
_DASGO_FLOPS_PER_ELEMENT = 8


def parameter_cost(param: torch.Tensor, algorithm: str, precondition_frequency: int = 1) -> int:
    """Rough flops of one optimizer step of `param` (SPEC §7), for balancing owners."""
    if algorithm == "adamw":
        return _ADAMW_FLOPS_PER_ELEMENT * param.numel()
    if algorithm == "dasgo":
        return _DASGO_FLOPS_PER_ELEMENT * param.numel()
    m, n = matrix_view_shape(param.shape)
    k = min(m, n)
    return 4 * m * n * k + k ** 3 // precondition_frequency


def assign_owners(costs: list[int], world_size: int) -> list[int]:
    """Owner rank of each item: the most expensive item goes to the least loaded rank (ties:
    the lower index first, the lower rank first), so the split is the same on every rank."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


@dataclass(frozen=True)
class _GatherSlot:
    """The parameters of one (dtype, device) exchanged by one all-gather: rank r contributes
    the flattened values of params_by_rank[r], padded to chunk_numel elements."""
    dtype: torch.dtype
    device: torch.device
    params_by_rank: tuple[tuple[torch.Tensor, ...], ...]
    chunk_numel: int

    @property
    def bytes_gathered(self) -> int:
        """Bytes every rank receives per all-gather (its own chunk included)."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return len(self.params_by_rank) * self.chunk_numel * element_size


class _OwnerSplit:
    """Mixin over ASGO / DASGO: step owned parameters only, then all-gather the new values."""

    def __init__(self, params, *, process_group=None, **options):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed initialised "
                               "(dist.init_process_group) before construction")
        self.process_group = process_group
        self._has_state = False
        super().__init__(params, **options)
        self._plan_ownership()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_has_state", False):
            raise RuntimeError("add param groups before the first step() or load_state_dict(): "
                               "a new group re-plans which rank owns which parameter")
        super().add_param_group(param_group)
        if hasattr(self, "_owner"):
            self._plan_ownership()

    def _plan_ownership(self) -> None:
        params, costs = [], []
        for group in self.param_groups:
            for param in group["params"]:
                algorithm = _algorithm_of(param, group, self.matrix_algorithm)
                params.append(param)
                costs.append(parameter_cost(param, algorithm, group.get("precondition_frequency", 1)))
        owners = assign_owners(costs, self.world_size)
        self._owner = {param: owner for param, owner in zip(params, owners)}
        self._slots = self._gather_slots(params, owners)

    def _gather_slots(self, params, owners) -> list[_GatherSlot]:
        by_kind: dict[tuple, list[list]] = {}
        for param, owner in zip(params, owners):
            per_rank = by_kind.setdefault((param.dtype, param.device), [[] for _ in range(self.world_size)])
            per_rank[owner].append(param)
        return [_GatherSlot(dtype, device, tuple(map(tuple, per_rank)),
                            max(_numel(owned) for owned in per_rank))
                for (dtype, device), per_rank in by_kind.items()]

    def owns(self, param: torch.Tensor) -> bool:
        return self._owner[param] == self.rank

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank receives from the per-step all-gathers (padding included)."""
        return sum(slot.bytes_gathered for slot in self._slots)

    @torch.no_grad()
    def step(self, closure=None):
        """Step the owned parameters (closure as in ASGO.step), then share all new values."""
        self._has_state = True
        loss = super().step(closure)
        for slot in self._slots:
            self._share(slot)
        return loss

    def plan_buckets(self) -> list[Bucket]:
        """ASGO's buckets restricted to owned matrices (same grouping, so the same batches
        of the single-process run when one rank owns a whole bucket)."""
        owned_buckets = []
        for bucket in super().plan_buckets():
            owned = tuple(p for p in bucket.params if self.owns(p))
            if owned:
                owned_buckets.append(Bucket(bucket.group_index, bucket.algorithm, owned))
        return owned_buckets

    def _adamw_step(self, group: dict) -> None:
        super()._adamw_step({**group, "params": [p for p in group["params"] if self.owns(p)]})

    def _share(self, slot: _GatherSlot) -> None:
        mine = slot.params_by_rank[self.rank]
        chunk = torch.zeros(slot.chunk_numel, dtype=slot.dtype, device=slot.device)
        if mine:
            torch.cat([p.reshape(-1) for p in mine], out=chunk[:_numel(mine)])
        gathered = torch.empty(self.world_size * slot.chunk_numel, dtype=slot.dtype, device=slot.device)
        dist.all_gather_single(gathered, chunk, group=self.process_group)
        for rank, (owned, received) in enumerate(zip(slot.params_by_rank,
                                                     gathered.split(slot.chunk_numel))):
            if rank == self.rank or not owned:
                continue
            values = received[:_numel(owned)].split([p.numel() for p in owned])
            torch._foreach_copy_(list(owned), [v.view(p.shape) for v, p in zip(values, owned)])

    def state_dict(self) -> dict:
        """The full state on every rank (a collective: call it on all ranks), CPU tensors, in
        the single-process ASGO layout."""
        local = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]  # the index order
        owned_state = {index: _to_device(entry, "cpu") for index, entry in local["state"].items()
                       if self.owns(params[index])}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, owned_state, group=self.process_group)
        full_state = {}
        for rank_state in gathered:
            full_state.update(rank_state)
        return {"state": dict(sorted(full_state.items())), "param_groups": local["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from `state_dict()` or a single-process ASGO, any world size);
        each rank keeps the state of the parameters it owns."""
        self._has_state = True
        super().load_state_dict(state_dict)
        for param in [p for p in self.state if not self.owns(p)]:
            del self.state[param]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


class DistributedASGO(_OwnerSplit, ASGO):
    """`ASGO` with each parameter stepped on one owner rank (see the module docstring).
    Same options as ASGO, plus process_group (None: the default group)."""


class DistributedDASGO(_OwnerSplit, DASGO):
    """`DASGO` with each parameter stepped on one owner rank (see the module docstring)."""


class FSDPASGO(ASGO):
    """ASGO for FSDP2 (`fully_shard`) models: DTensor parameters sharded on dim 0 (rows).

    Sharded-Gram path — a bucket whose preconditioned side is the columns (side "right": the
    default for m >= n) with no head or size blocks: the column Gram GᵀG is the sum of the
    shards' Grams, so each step all-reduces one (bucket, n, n) stack, every rank computes the
    same root, applies it to its own momentum rows, and one more all-reduce of the (bucket,)
    squared norms gives the global ‖D‖_F of the RMS normalisation. No gradient is gathered;
    momentum stays sharded like the parameter, Gram and root (n×n) are replicated.

    Every other bucket (rows preconditioned, head blocks, max_precond_dim blocks) gathers the
    full gradient and parameter on every rank and runs the single-process step there; its
    state is then full-size on every rank. Parameters with fewer than 2 dims take AdamW on
    their local shards. state_dict() is this rank's shard of the state (save one per rank).

    Not done yet: owner split of the gathered buckets, side="auto_sharded" (choosing the
    unsharded side), torch.distributed.checkpoint integration of the sharded state.
    """

    def _bucket_step(self, bucket: Bucket) -> None:
        group = self.param_groups[bucket.group_index]
        config = group_config(group, bucket.algorithm)
        if _is_row_sharded(bucket.params[0]) and _uses_sharded_gram(bucket, config):
            self._sharded_gram_step(bucket, group, config)
        else:
            self._gathered_step(bucket)

    def _gathered_step(self, bucket: Bucket) -> None:
        """The single-process step on full tensors, keeping this rank's rows of the result."""
        params = bucket.params
        locals_ = [p.to_local() if _is_dtensor(p) else p for p in params]
        full = [_full(p) for p in params]
        full_params = [torch.nn.Parameter(f) for f in full]
        for full_param, param in zip(full_params, params):
            full_param.grad = _full(param.grad)
            self.state[full_param] = self.state.pop(param, {})
        super()._bucket_step(Bucket(bucket.group_index, bucket.algorithm, tuple(full_params)))
        for full_param, param, local in zip(full_params, params, locals_):
            self.state[param] = self.state.pop(full_param)
            local.copy_(_my_rows(full_param.detach(), param))

    def _sharded_gram_step(self, bucket: Bucket, group: dict, config) -> None:
        params, mesh_group = bucket.params, bucket.params[0].device_mesh.get_group()
        m, n = bucket.matrix_shape
        weights = torch.stack([p.to_local().reshape(-1, n) for p in params])
        statistics_dtype = torch.promote_types(weights.dtype, torch.float32)
        grads = torch.stack([p.grad.to_local().reshape(-1, n) for p in params]).to(statistics_dtype)
        if group["maximize"]:
            grads = -grads
        states = [self._sharded_state(p, weights[0].to(statistics_dtype), n) for p in params]
        momentum_old = torch.stack([s["momentum"] for s in states])
        gram_old = torch.stack([s["gram"] for s in states])
        column_gram = grads.mT @ grads
        dist.all_reduce(column_gram, group=mesh_group)
        decay, weight = config.beta2, 1.0 if config.accumulate == "sum" else 1.0 - config.beta2
        gram_new = decay * gram_old + weight * column_gram
        finite = torch.isfinite(gram_new.diagonal(dim1=-2, dim2=-1).sum(-1))
        keep = ~finite[:, None, None]
        momentum = torch.where(keep, momentum_old, torch.lerp(momentum_old, grads, 1.0 - config.beta1))
        gram = torch.where(keep, gram_old, gram_new)
        root = torch.stack([s["root"] for s in states])
        fallbacks = torch.zeros(len(params), len(FALLBACK_LEVELS), dtype=torch.int32)
        if needs_root_refresh(states[0]["step"], config):
            new_root, fallbacks = robust_root(gram, root, config, _xp.namespace(gram))
            root = torch.where(keep, root, new_root)
            fallbacks = torch.where(keep[:, :, 0], 0, fallbacks)
        direction = momentum @ root
        update = self._normalised(direction, mesh_group, m * n, config) * finite[:, None, None]
        update = update + config.weight_decay * weights.to(statistics_dtype) * finite[:, None, None]
        for index, (param, state) in enumerate(zip(params, states)):
            state.update(step=state["step"] + 1, momentum=momentum[index], gram=gram[index],
                         root=root[index], skipped=state["skipped"] + (~finite[index]).int(),
                         fallbacks=state["fallbacks"] + fallbacks[index])
            local = param.to_local()
            local.sub_((group["lr"] * update[index]).to(local.dtype).view(local.shape))

    @staticmethod
    def _normalised(direction, mesh_group, numel: int, config):
        """D·ρ·sqrt(m·n)/‖D‖_F with the global norm (one all-reduce); ρ = None: D itself."""
        if config.update_rms is None:
            return direction
        squared_norm = direction.square().sum(dim=(-2, -1))
        dist.all_reduce(squared_norm, group=mesh_group)
        norm = squared_norm.sqrt()
        scale = torch.where(norm > 0, config.update_rms * numel ** 0.5 / norm.clamp_min(1e-30), 0.0)
        return direction * scale[:, None, None]

    def _sharded_state(self, param, local_rows, n: int) -> dict:
        state = self.state[param]
        if not state:
            zeros = lambda *shape: local_rows.new_zeros(shape)  # noqa: E731
            state.update(step=0, momentum=zeros(*local_rows.shape), gram=zeros(n, n),
                         root=zeros(n, n), skipped=torch.zeros((), dtype=torch.int32),
                         fallbacks=torch.zeros(len(FALLBACK_LEVELS), dtype=torch.int32))
        return state


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "placements") and hasattr(tensor, "to_local")


def _is_row_sharded(param) -> bool:
    return (_is_dtensor(param) and len(param.placements) == 1
            and param.placements[0].is_shard(dim=0))


def _uses_sharded_gram(bucket: Bucket, config) -> bool:
    m, n = bucket.matrix_shape
    single_block = block_layout((len(bucket.params), m, n), config).is_single_block
    return resolve_side(m, n, config) == "right" and single_block


def _full(tensor):
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _my_rows(full, param):
    """This rank's dim-0 shard of `full`, as FSDP2 lays it out (torch.chunk order)."""
    if not _is_dtensor(param):
        return full
    mesh = param.device_mesh
    return full.chunk(mesh.size(), dim=0)[mesh.get_local_rank()]
