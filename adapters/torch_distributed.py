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
used. Parameters must be replicated (DDP), not sharded (FSDP2: see `FSDPASGO` when available).

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

from asgo_core import matrix_view_shape

from .torch import ASGO, DASGO, Bucket, _algorithm_of, _to_device

__all__ = ["DistributedASGO", "DistributedDASGO", "parameter_cost", "assign_owners"]

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
