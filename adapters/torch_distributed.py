"""ASGO / DASGO for data-parallel training (DDP): each parameter is stepped by one owner rank.

    model = DistributedDataParallel(model)
    opt = DistributedASGO(asgo_param_groups(model.module), lr=1e-2)   # process_group=None: WORLD

Under DDP every rank holds the same, already averaged gradients, so every rank computing every
preconditioner is wasted work. Here each parameter has one *owner* rank, chosen once by a
greedy longest-processing-time split of the estimated step cost (`parameter_cost`: Gram + apply
≈ 4·m·n·k, root ≈ k³/τ, AdamW and DASGO elementwise). Each rank steps only the parameters it owns
— through the unchanged `ASGO` / `DASGO` machinery, so an owner runs exactly the single-process
arithmetic on its matrices — and then one `all_gather_into_tensor` per (dtype, device) per step hands
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

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asgo_core import (FALLBACK_LEVELS, ASGOState, RowShards, block_layout, init_state, matrix_stack_shape,
                       matrix_view_shape, needs_root_refresh, step_terms)
from asgo_core.buckets import Bucket
from asgo_core.config import fail
from asgo_core.layout import resolve_side
from asgo_core.options import group_config

from .torch import ASGO, DASGO, evaluate_closure

__all__ = ["DistributedASGO", "DistributedDASGO", "FSDPASGO", "parameter_cost", "root_cost", "assign_owners"]

_ADAMW_FLOPS_PER_ELEMENT = 12
_DASGO_FLOPS_PER_ELEMENT = 8


def parameter_cost(param: torch.Tensor, algorithm: str, precondition_frequency: int = 1,
                   batch_dims: int = 0) -> int:
    """Rough flops of one optimizer step of `param` (SPEC §7), for balancing owners."""
    if algorithm == "adamw":
        return _ADAMW_FLOPS_PER_ELEMENT * param.numel()
    if algorithm == "dasgo":
        return _DASGO_FLOPS_PER_ELEMENT * param.numel()
    count, m, n = matrix_stack_shape(param.shape, batch_dims)
    return count * 4 * m * n * min(m, n) + root_cost(param, precondition_frequency, batch_dims)


def root_cost(param: torch.Tensor, precondition_frequency: int = 1, batch_dims: int = 0) -> int:
    """Rough flops per step of the inverse roots of `param` (k³ a matrix every τ steps)."""
    count, m, n = matrix_stack_shape(param.shape, batch_dims)
    return count * (min(m, n) ** 3 // precondition_frequency)


def assign_owners(costs: list[int], world_size: int, loads: list[int] | None = None) -> list[int]:
    """Owner rank of each item: the most expensive item goes to the least loaded rank (ties:
    the lower index first, the lower rank first), so the split is the same on every rank.
    loads: the work each rank has already (default none); the assigned costs are added to it."""
    loads = [0] * world_size if loads is None else loads
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def _balanced_owners(optimizer, loads: list[int], cost_of) -> dict:
    """param → owner rank for each parameter to which cost_of(param, group, algorithm) gives a
    cost (None: no owner), in param-group order, by assign_owners from `loads` (updated), so
    the split is the same on every rank."""
    params, costs = [], []
    for group in optimizer.param_groups:
        for param in group["params"]:
            cost = cost_of(param, group, optimizer.algorithm_of(param, group))
            if cost is not None:
                params.append(param)
                costs.append(cost)
    return dict(zip(params, assign_owners(costs, len(loads), loads)))


def _step_cost(param, group: dict, algorithm: str) -> int:
    return parameter_cost(param, algorithm, group.get("precondition_frequency", 1), group["batch_dims"])


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


def _refuse_nonfinite_raise(optimizer_name: str, group: dict) -> None:
    if group["nonfinite"] == "raise":
        fail("nonfinite", "raise", f"'skip' in {optimizer_name} (an error raised on the rank that owns "
             "a parameter would leave the other ranks waiting in a collective; skipped steps are "
             "counted in the state's 'skipped')")


class _OwnerSplit:
    """Mixin over ASGO / DASGO: step owned parameters only, then all-gather the new values."""

    def __init__(self, params, *, process_group=None, **options):
        _require_process_group(type(self).__name__)
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

    def _validate_group(self, group: dict, group_index: int) -> None:
        _refuse_nonfinite_raise(type(self).__name__, group)
        super()._validate_group(group, group_index)

    def _plan_ownership(self) -> None:
        self._owner = _balanced_owners(self, [0] * self.world_size, _step_cost)
        self._slots = self._gather_slots()

    def _gather_slots(self) -> list[_GatherSlot]:
        by_kind: dict[tuple, list[list]] = {}
        for param, owner in self._owner.items():
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
            owned = bucket.only(self.owns)
            if owned.members:
                owned_buckets.append(owned)
        return owned_buckets

    def _adamw_step(self, group: dict) -> None:
        super()._adamw_step({**group, "params": [p for p in group["params"] if self.owns(p)]})

    def _share(self, slot: _GatherSlot) -> None:
        mine = slot.params_by_rank[self.rank]
        chunk = torch.zeros(slot.chunk_numel, dtype=slot.dtype, device=slot.device)
        if mine:
            torch.cat([p.reshape(-1) for p in mine], out=chunk[:_numel(mine)])
        gathered = torch.empty(self.world_size * slot.chunk_numel, dtype=slot.dtype, device=slot.device)
        dist.all_gather_into_tensor(gathered, chunk, group=self.process_group)
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
        param_ids = {index for group in local["param_groups"] for index in group["params"]}
        param_state = {key: entry for key, entry in local["state"].items() if key in param_ids}
        owned_state = {index: _to_device(entry, "cpu") for index, entry in param_state.items()
                       if self.owns(params[index])}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, owned_state, group=self.process_group)
        full_state = {}
        for rank_state in gathered:
            full_state.update(rank_state)
        other_state = {key: entry for key, entry in local["state"].items() if key not in param_state}
        return {"state": {**dict(sorted(full_state.items())), **other_state},
                "param_groups": local["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from `state_dict()` or a single-process ASGO, any world size);
        each rank keeps the state of the parameters it owns."""
        self._has_state = True
        super().load_state_dict(state_dict)
        for param in [p for p in self.state if isinstance(p, torch.Tensor) and not self.owns(p)]:
            del self.state[param]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _to_device(value, device):
    """A copy of nested state (dicts, lists, tuples of tensors) with every tensor on device."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


class DistributedASGO(_OwnerSplit, ASGO):
    """`ASGO` with each parameter stepped on one owner rank (see the module docstring).
    Same options as ASGO, plus process_group (None: the default group)."""


class DistributedDASGO(_OwnerSplit, DASGO):
    """`DASGO` with each parameter stepped on one owner rank (see the module docstring)."""


SHARDED_SIDE_POLICIES = ("owner", "other_side")


class FSDPASGO(ASGO):
    """ASGO for FSDP2 (`fully_shard`) models: DTensor parameters sharded on dim 0 (rows) of
    a 1-D device mesh, or of the shard dim of HSDP's 2-D (replicate, shard) mesh. With HSDP
    every collective below runs within this rank's replica (its shard dim): the replicas hold
    the same gradients (FSDP2 all-reduces them across replicas) and compute the same step.

    Same options as ASGO, plus sharded_side_policy (below); param_rounding must be "nearest".
    Each step costs one small all-reduce of has-gradient flags first, so every rank calls the
    same collectives: a parameter with a gradient on some rank but not on this one takes zeros
    for this rank's rows (the gradient is set to zeros), one without a gradient anywhere is
    skipped.

    Sharded-Gram path — a bucket whose preconditioned side is the columns (side "right": the
    default for m >= n) with no head or size blocks: the column Gram GᵀG is the sum of the
    shards' Grams, so each step all-reduces one (bucket, n, n) stack; at a refresh each root is
    solved by one rank (`root_owner_of`: assign_owners on root_cost, starting from the
    owner-held matrices' cost on each rank) and one all-to-all per bucket gives every rank all
    the roots and their fallback flags; every rank applies the roots to its own momentum rows,
    and one more all-reduce of the (bucket,) squared norms gives the global ‖D‖_F of the RMS
    normalisation. No gradient is gathered.
    Equal to single-process ASGO within float32 rounding (the partial Grams are summed in
    another order). matmul_dtype="bfloat16" rounds the Gram and apply GEMM inputs as ASGO
    does; the partial Grams are summed in float32.

    Every other matrix (rows preconditioned, head blocks, max_precond_dim blocks, DASGO)
    depends on the rows of other ranks. sharded_side_policy chooses what happens to it:
      "owner" (default): each such matrix has one owner rank (cost-balanced, as
        DistributedASGO). One all-to-all per step sends every rank's rows of the weight and
        gradient to the owners, each owner steps its matrices with the unchanged
        single-process code, and one more all-to-all returns every rank its rows. Bitwise
        equal to single-process ASGO on CPU/gloo; the state lives on the owner only.
      "other_side": a matrix whose side was chosen automatically (side="auto", no num_heads)
        and that is a single block when its columns are preconditioned takes side "right"
        instead, so it uses the sharded-Gram path and nothing is gathered. This changes the
        algorithm for m < n matrices: they then equal single-process ASGO with side="right".
        The rest (head or size blocks, an explicit side="left", DASGO) goes to owners.
    Parameters with fewer than 2 dims (and algorithm="adamw" groups) take AdamW on their
    local shards.

    Stacks (a group's batch_dims > 0: mixture-of-experts weights (E, out, in), scan-stacked
    layers) are sharded on their first batch dim, so each rank holds whole matrices (FSDP2's
    uneven chunks: some ranks may hold fewer, or none). Each rank steps its own matrices with
    the unchanged single-process code and no communication: bitwise equal to single-process
    ASGO on CPU/gloo.

    state_dict() is a collective (call it on every rank) in the layout of ASGO.state_dict()
    with one difference: "momentum" is a DTensor sharded on dim 0 like the parameter; "gram",
    "root", "step", "skipped" and "fallbacks" are replicated (owner-held ones are sent to
    every rank), AdamW's state is the DTensors it already is. A stack's state is all DTensors
    sharded on dim 0 like the parameter ("step" aside): momentum, skipped and fallbacks in
    ASGO's layout, each block group of gram and root as (param.shape[0], matrices·blocks of
    one dim-0 slice, size, size) instead of ASGO's (matrices·blocks, size, size), so that its
    dim 0 is the parameter's. So torch.distributed.checkpoint saves it and loads it at any
    world size:

        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        # later, any world size: build model and opt the same way, then
        model_sd, optim_sd = get_state_dict(model, opt)     # the template DCP loads into
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)

    load_state_dict() (also a collective) takes that layout from any world size.
    nonfinite="raise" is refused: an error on one rank would leave the others waiting in a
    collective (skipped steps are counted in the state's "skipped").
    """

    def __init__(self, params, *, sharded_side_policy: str = "owner", **options):
        if sharded_side_policy not in SHARDED_SIDE_POLICIES:
            fail("sharded_side_policy", sharded_side_policy, " | ".join(map(repr, SHARDED_SIDE_POLICIES)))
        _require_process_group(type(self).__name__)
        self.sharded_side_policy = sharded_side_policy
        self.device_mesh = None  # the mesh of the collectives: the shard dimension's (1-D)
        self._param_mesh, self._placements = None, None
        super().__init__(params, **options)
        self._plan_ownership()

    # ---- construction --------------------------------------------------------------------
    def _validate_group(self, group: dict, group_index: int) -> None:
        _refuse_nonfinite_raise(type(self).__name__, group)
        if group["param_rounding"] != "nearest":
            fail("param_rounding", group["param_rounding"], "'nearest' in FSDPASGO (its sharded "
                 "writes round to nearest)")
        super()._validate_group(group, group_index)

    def _validate_param(self, param, group: dict) -> None:
        super()._validate_param(param, group)
        if _shard_dim_of(param) is None:
            placements = getattr(param, "placements", None)
            got = f"placements {placements}" if placements else f"a {type(param).__name__}"
            raise ValueError(f"FSDPASGO needs DTensor parameters sharded on dim 0 (for a stack with "
                             "batch_dims, its first batch dim) as fully_shard makes them: placements "
                             f"(Shard(dim=0),) on a 1-D mesh, or (Replicate(), Shard(dim=0)) on HSDP's "
                             f"2-D (replicate, shard) mesh; got {got}. Replicated parameters: ASGO or "
                             "DistributedASGO")
        if self._param_mesh is None:
            self._param_mesh, self._placements = param.device_mesh, param.placements
            self.device_mesh = _shard_mesh(param)
        elif param.device_mesh != self._param_mesh or param.placements != self._placements:
            raise ValueError(f"FSDPASGO needs every parameter on one device mesh with the same placements; "
                             f"got {param.placements} after {self._placements}")

    def add_param_group(self, param_group: dict) -> None:
        if any(self.state.values()):
            raise RuntimeError("add param groups before the first step() or load_state_dict(): "
                               "a new group re-plans which rank owns which matrix")
        super().add_param_group(param_group)
        if hasattr(self, "_owner"):
            self._plan_ownership()

    def _plan_ownership(self) -> None:
        """Owners of the matrices the sharded-Gram path cannot take, balanced by cost (a stack
        is stepped where its matrices lie); then the rank that computes each sharded-Gram
        root, balancing roots on top of that work."""
        def owner_cost(param, group, algorithm):
            if (algorithm != "adamw" and not group["batch_dims"]
                    and self._column_gram_config(param, group) is None):
                return _step_cost(param, group, algorithm)
            return None

        def sharded_root_cost(param, group, algorithm):
            if self._column_gram_config(param, group) is not None:
                return root_cost(param, group["precondition_frequency"])
            return None
        loads = [0] * self.device_mesh.size()
        self._owner = _balanced_owners(self, loads, owner_cost)
        self._root_owner = _balanced_owners(self, loads, sharded_root_cost)

    def _column_gram_config(self, param, group: dict):
        """The config the sharded-Gram path runs `param` with, or None where it cannot."""
        algorithm = self.algorithm_of(param, group)
        if algorithm != "asgo" or group["batch_dims"]:
            return None
        config = group_config(group, algorithm)
        shape = matrix_view_shape(param.shape)
        if _preconditions_whole_columns(shape, config):
            return config
        if self.sharded_side_policy == "other_side" and config.side == "auto" and config.num_heads is None:
            right = _with_right_side(config)
            if _preconditions_whole_columns(shape, right):
                return right
        return None

    def _state_template(self, param, group: dict, algorithm: str) -> dict:
        """ASGO's, but a sharded-Gram matrix (its columns preconditioned) holds only this rank's
        momentum rows, and a stack only the state of this rank's matrices."""
        if group["batch_dims"]:
            return self._stack_template(param, group, algorithm, _rows_on(param, self._mesh_rank))
        if self._column_gram_config(param, group) is None:
            return super()._state_template(param, group, algorithm)
        template = super()._state_template(param, {**group, "side": "right"}, algorithm)
        n = matrix_view_shape(param.shape)[1]
        return {**template, "momentum": template["momentum"].new_empty(_rows_on(param, self._mesh_rank), n)}

    def _stack_template(self, param, group: dict, algorithm: str, slices: int) -> dict:
        """ASGO's state template of `slices` dim-0 slices of a stack (none allowed): dim 0 of a
        per-matrix field counts slices, that of gram/root the slices' matrices·blocks."""
        one_slice = torch.empty((1, *param.shape[1:]), dtype=param.dtype, device="meta")
        scaled = lambda like: like.new_empty((slices * like.shape[0], *like.shape[1:]))  # noqa: E731
        return {key: [scaled(b) for b in value] if isinstance(value, list) else scaled(value)
                for key, value in super()._state_template(one_slice, group, algorithm).items()}

    def _zero_state(self, param, group: dict, algorithm: str) -> dict:
        """The state this rank holds for a matrix before its first step (step 0), as zeros."""
        zeros = lambda like: torch.zeros_like(like, device=param.device)  # noqa: E731
        return {"step": 0, **{key: [zeros(b) for b in value] if isinstance(value, list) else zeros(value)
                              for key, value in self._state_template(param, group, algorithm).items()}}

    def owner_of(self, param) -> int | None:
        """The mesh rank that steps this matrix; None where every rank steps its own rows
        (sharded-Gram matrices, AdamW) or its own matrices (stacks)."""
        return self._owner.get(param)

    def root_owner_of(self, param) -> int | None:
        """The mesh rank that computes this sharded-Gram matrix's root; None for the others."""
        return self._root_owner.get(param)

    @property
    def _mesh_group(self):
        return self.device_mesh.get_group()

    @property
    def _mesh_rank(self) -> int:
        return self.device_mesh.get_local_rank()

    def _params_in_order(self) -> list:
        return [param for group in self.param_groups for param in group["params"]]

    # ---- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter (closure as in ASGO.step); a collective."""
        loss = evaluate_closure(closure)
        self._check_gradients()
        self._agree_on_gradients()
        for group in self.param_groups:
            self._adamw_step(group)
        owner_buckets = []
        for bucket in self.plan_buckets():
            group, _ = self._bucket_group(bucket)
            if group["batch_dims"]:
                self._step_own_matrices(bucket)
                continue
            config = self._column_gram_config(bucket.handles[0], group)
            if config is None:
                owner_buckets.append(bucket)
            else:
                self._sharded_gram_step(bucket, group, config)
        self._owner_step(owner_buckets)
        return loss

    def _agree_on_gradients(self) -> None:
        """Every rank steps the same parameters: those with a gradient on some rank (a rank
        without one takes zeros). One all-reduce of a flag per parameter (and a host read)."""
        params = self._params_in_order()
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                                device=self.device_mesh.device_type)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=self._mesh_group)
        for param, anywhere in zip(params, has_grad.tolist()):
            if anywhere and param.grad is None:
                param.grad = torch.zeros_like(param)

    def _owner_step(self, buckets: list[Bucket]) -> None:
        """Owners gather, step and return the rows of the matrices in `buckets`. The bucket
        split differs between ranks (the step count is only known to the owner), so the
        exchanges go in parameter order, one per dtype."""
        index = {param: i for i, param in enumerate(self._params_in_order())}
        by_dtype: dict[torch.dtype, list] = {}
        for param in sorted((p for bucket in buckets for p in bucket.handles), key=index.__getitem__):
            by_dtype.setdefault(param.dtype, []).append(param)
        full_params = {}
        for params in by_dtype.values():
            full_params.update(self._gather_on_owners(params))
        for bucket in buckets:
            mine = bucket.only(full_params.__contains__)
            if mine.members:
                self._step_on(mine, full_params)
        for params in by_dtype.values():
            self._return_rows(params, full_params)

    def _gather_on_owners(self, params: list) -> dict:
        """One all-to-all: each rank's rows of weight and gradient go to the matrix's owner,
        which gets back {param: full nn.Parameter with its full .grad} for the ones it owns."""
        world = self.device_mesh.size()
        to_rank: list[list] = [[] for _ in range(world)]
        for param in params:
            to_rank[self._owner[param]] += [param.to_local(), param.grad.to_local()]
        mine = [p for p in params if self._owner[p] == self._mesh_rank]
        from_rank = [sum(2 * _rows_on(p, rank) * _row_numel(p) for p in mine) for rank in range(world)]
        received = self._all_to_all(to_rank, from_rank, params[0].dtype)
        pieces = [chunk.split([n for p in mine for n in 2 * [_rows_on(p, rank) * _row_numel(p)]])
                  for rank, chunk in enumerate(received)]
        full_params = {}
        for position, param in enumerate(mine):
            weight, grad = (torch.cat([rank_pieces[2 * position + offset] for rank_pieces in pieces])
                            .view(param.shape) for offset in (0, 1))
            full_params[param] = torch.nn.Parameter(weight)
            full_params[param].grad = grad
        return full_params

    def _step_on(self, bucket: Bucket, stand_ins: dict) -> None:
        """The single-process step of the bucket's matrices on stand-ins (an owner's full matrices,
        a rank's own matrices of a stack): {param: nn.Parameter with .grad} holding its state."""
        replaced = [stand_ins[p] for p in bucket.handles]
        for param, stand_in in zip(bucket.handles, replaced):
            self.state[stand_in] = self.state.pop(param, {})
        stand_in_bucket = bucket.mapped(stand_ins)
        self._commit_bucket(stand_in_bucket, self._bucket_terms(stand_in_bucket, in_place=True))
        for param, stand_in in zip(bucket.handles, replaced):
            self.state[param] = self.state.pop(stand_in)

    def _step_own_matrices(self, bucket: Bucket) -> None:
        """Stacks sharded on a batch dim: each rank steps the whole matrices it holds with the
        single-process code, no communication; a rank holding none of a stack counts the step."""
        held = bucket.only(lambda param: _rows_on(param, self._mesh_rank))
        if held.members:
            self._step_on(held, {p: _local_parameter(p) for p in held.handles})
        group, algorithm = self._bucket_group(bucket)
        for param in bucket.handles:
            if not _rows_on(param, self._mesh_rank):
                state = self.state[param] or self._zero_state(param, group, algorithm)
                self.state[param] = {**state, "step": state["step"] + 1}

    def _return_rows(self, params: list, full_params: dict) -> None:
        """One all-to-all: each owner sends every rank its rows of the new weights."""
        world, me = self.device_mesh.size(), self._mesh_rank
        mine = [p for p in params if self._owner[p] == me]
        to_rank = [[_rows_of(full_params[p].detach(), rank, world) for p in mine] for rank in range(world)]
        from_rank = [sum(_rows_on(p, me) * _row_numel(p) for p in params if self._owner[p] == rank)
                     for rank in range(world)]
        received = self._all_to_all(to_rank, from_rank, params[0].dtype)
        for rank, chunk in enumerate(received):
            owned = [p for p in params if self._owner[p] == rank]
            for param, values in zip(owned, chunk.split([_rows_on(p, me) * _row_numel(p) for p in owned])):
                local = param.to_local()
                local.copy_(values.view(local.shape))

    def _all_to_all(self, to_rank: list[list], from_rank_numel: list[int], dtype) -> list:
        """Rank r's tensors to_rank[d] arrive, flattened and concatenated, at rank d; returns
        the flat tensor received from each rank."""
        device = self.device_mesh.device_type
        flat = [t.reshape(-1) for tensors in to_rank for t in tensors]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(from_rank_numel), dtype=dtype, device=device)
        dist.all_to_all_single(received, send, from_rank_numel,
                               [sum(t.numel() for t in tensors) for tensors in to_rank],
                               group=self._mesh_group)
        return list(received.split(from_rank_numel))

    def _sharded_gram_step(self, bucket: Bucket, group: dict, config) -> None:
        """The core step on this rank's rows (asgo_core.RowShards): the column Grams, the
        squared norms and the momentum flags are all-reduced over the mesh."""
        params, (m, n) = bucket.handles, bucket.matrix_shape
        config = _with_right_side(config)
        grads = torch.stack([p.grad.to_local().reshape(-1, n) for p in params])
        if group["maximize"]:
            grads = grads.neg()
        step = self.state[params[0]].get("step", 0)
        core_state = self._stacked_state(params, step) if step else init_state(grads, config)
        root_owners = tuple(self._root_owner[p] for p in params)
        row_shards = RowShards(rows=m, sum=self._sum_over_mesh, any=self._any_over_mesh,
                               roots=functools.partial(self._share_roots, root_owners))
        direction, scale, new_state = step_terms(grads, core_state, config, row_shards=row_shards,
                                                 refresh_root=needs_root_refresh(step, config))
        for index, param in enumerate(params):
            self.state[param].update(
                step=step + 1, momentum=new_state.momentum[index], gram=[new_state.gram[0][index:index + 1]],
                root=[new_state.root[0][index:index + 1]], skipped=new_state.skipped[index],
                fallbacks=new_state.fallbacks[index])
            local = param.to_local()
            rows = local.reshape(-1, n).to(direction.dtype)
            update = direction[index] * scale[index] + config.weight_decay * (scale[index] != 0) * rows
            local.sub_((group["lr"] * update).to(local.dtype).view(local.shape))

    def _stacked_state(self, params: tuple, step: int) -> ASGOState:
        """The core state of a sharded-Gram bucket from its parameters' state (new tensors)."""
        states = [self.state[p] for p in params]
        stacked = lambda key: torch.stack([s[key] for s in states])  # noqa: E731
        blocks = lambda key: (torch.cat([s[key][0] for s in states]),)  # noqa: E731
        count = torch.tensor(step, dtype=torch.int32)
        return ASGOState(stacked("momentum"), blocks("gram"), blocks("root"), count, stacked("skipped"),
                         stacked("fallbacks"))

    def _share_roots(self, root_owners: tuple[int, ...], solve, grams, previous_roots, moving):
        """RowShards.roots: each rank solves the roots it owns, then one all-to-all sends them,
        with their fallback flags, to every rank (an all-gather of uneven shares, which gloo's
        all_gather refuses; no padding, and a rank that owns none of them sends nothing)."""
        world, me = self.device_mesh.size(), self._mesh_rank
        mine = [index for index, owner in enumerate(root_owners) if owner == me]
        size = grams.shape[-1]
        packed = grams.new_empty(len(mine), size * size + len(FALLBACK_LEVELS))
        if mine:
            index = torch.tensor(mine, device=grams.device)
            roots, flags = solve(grams[index], previous_roots[index], moving[index])
            torch.cat([roots.reshape(len(mine), -1), flags.to(packed.dtype)], dim=1, out=packed)
        received = grams.new_empty(len(root_owners), packed.shape[1])
        dist.all_to_all_single(received, packed.repeat(world, 1),
                               [root_owners.count(rank) for rank in range(world)], [len(mine)] * world,
                               group=self._mesh_group)
        by_rank = sorted(range(len(root_owners)), key=lambda i: (root_owners[i], i))
        shared = torch.empty_like(received)
        shared[by_rank] = received
        return shared[:, :size * size].reshape(grams.shape), shared[:, size * size:].to(torch.int32)

    def _sum_over_mesh(self, partial):
        dist.all_reduce(partial, group=self._mesh_group)
        return partial

    def _any_over_mesh(self, flags):
        """(bucket,) bool: whether some rank's flag is set, so every rank counts the same."""
        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._mesh_group)
        return flags.bool()

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """ASGO's layout with "momentum" a row-sharded DTensor, the rest replicated (see the
        class docstring), with an entry for every parameter (a zero state, step 0, for one
        not stepped yet), so that any checkpoint has every key a loading run asks for.
        A collective: owner-held state is sent to every rank."""
        packed = super().state_dict()
        owner_held = self._share_owner_held_state(packed["state"], self._params_in_order())
        state = {index: self._checkpoint_entry(param, group, packed["state"].get(index) or {},
                                               owner_held.get(index))
                 for index, (param, group) in enumerate(self._params_and_groups())}
        return {"state": state, "param_groups": packed["param_groups"]}

    def _checkpoint_entry(self, param, group: dict, entry: dict, owner_held) -> dict:
        algorithm = self.algorithm_of(param, group)
        if algorithm == "adamw":
            return entry or self._adamw_state(param)
        if group["batch_dims"]:
            return self._stack_checkpoint_entry(param, group, algorithm, entry)
        if param in self._owner:
            if owner_held is None:
                return self._fresh_matrix_entry(param, group, algorithm)
            return {**owner_held, "momentum": self._momentum_from_owner(param, entry.get("momentum"))}
        if not entry:
            return self._fresh_matrix_entry(param, group, algorithm)
        return {**entry, "momentum": _row_sharded_like(entry["momentum"], param)}

    def _fresh_matrix_entry(self, param, group: dict, algorithm: str) -> dict:
        """The zero state (step 0) of a matrix, in the checkpoint layout."""
        entry = self._zero_state(param, group, algorithm)
        rows = entry["momentum"].new_zeros(_rows_on(param, self._mesh_rank), entry["momentum"].shape[-1])
        return {**entry, "momentum": _row_sharded_like(rows, param)}

    def _stack_checkpoint_entry(self, param, group: dict, algorithm: str, entry: dict) -> dict:
        """A stack's state (zeros, step 0, before its first step) as DTensors sharded on dim 0
        like the parameter: the per-matrix fields in ASGO's layout, each block group of gram and
        root as (param.shape[0], matrices·blocks of one dim-0 slice, size, size)."""
        slices = _rows_on(param, self._mesh_rank)
        one_slice = self._stack_template(param, group, algorithm, 1)
        checkpoint = {}
        for key, value in (entry or self._zero_state(param, group, algorithm)).items():
            if isinstance(value, list):
                checkpoint[key] = [_sharded_like(block.view(slices, *like.shape), param)
                                   for block, like in zip(value, one_slice[key])]
            else:
                checkpoint[key] = value if key == "step" else _sharded_like(value, param)
        return checkpoint

    def _share_owner_held_state(self, local_state: dict, params: list) -> dict:
        """{index: state without momentum} of every owner-held matrix with state, on every
        rank (one all_gather_object of the k×k statistics and counters)."""
        mine = {index: _to_device({k: v for k, v in entry.items() if k != "momentum"}, "cpu")
                for index, entry in local_state.items()
                if entry and self._owner.get(params[index]) == self._mesh_rank}
        gathered: list = [None] * self.device_mesh.size()
        dist.all_gather_object(gathered, mine, group=self._mesh_group)
        return {index: _to_device(entry, params[index].device)
                for rank_state in gathered for index, entry in sorted(rank_state.items())}

    def _momentum_from_owner(self, param, momentum):
        """The owner's full momentum scattered to a row-sharded DTensor (a collective)."""
        from torch.distributed.tensor import Shard, distribute_tensor

        if momentum is None:  # not the owner: the shape and dtype of what it will receive
            dtype = torch.promote_types(param.dtype, torch.float32)
            momentum = torch.empty(matrix_view_shape(param.shape), dtype=dtype, device=param.device)
        rows = distribute_tensor(momentum, self.device_mesh, [Shard(0)], src_data_rank=self._owner[param])
        return _row_sharded_like(rows.to_local(), param)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the state_dict() layout saved at any world size (e.g. through
        torch.distributed.checkpoint). A collective: owners receive the full momentum."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        local = {}
        for saved_id, (param, group) in zip(saved_ids, self._params_and_groups()):
            entry = state_dict["state"].get(saved_id)
            if entry is None or int(entry["step"]) == 0:  # never stepped: no state
                continue
            if group["batch_dims"] and self.algorithm_of(param, group) != "adamw":
                label = f"state_dict['state'][{saved_id!r}] (the parameter of shape {tuple(param.shape)})"
                local[saved_id] = _local_stack_entry(entry, label)
            elif param in self._owner:
                full_momentum = entry["momentum"].full_tensor()
                if self._owner[param] == self._mesh_rank:
                    local[saved_id] = {**entry, "momentum": full_momentum}
            elif "momentum" in entry:
                local[saved_id] = {**entry, "momentum": entry["momentum"].to_local()}
            else:
                local[saved_id] = entry
        super().load_state_dict({**state_dict, "state": local})


def _require_process_group(optimizer_name: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(f"{optimizer_name} needs torch.distributed initialised "
                           "(dist.init_process_group) before construction")


def _shard_dim_of(param) -> int | None:
    """The mesh dim that shards `param` on its dim 0 where every other mesh dim replicates it
    (fully_shard on a 1-D mesh, HSDP on a (replicate, shard) mesh); None for another layout."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return None
    sharding = [dim for dim, placement in enumerate(placements) if not placement.is_replicate()]
    if len(sharding) != 1 or not placements[sharding[0]].is_shard(dim=0):
        return None
    return sharding[0]


def _shard_mesh(param):
    """The 1-D mesh of the ranks that hold `param`'s shards (for HSDP, this rank's replica)."""
    from torch.distributed.device_mesh import DeviceMesh

    mesh, shard_dim = param.device_mesh, _shard_dim_of(param)
    if mesh.ndim == 1:
        return mesh
    return DeviceMesh.from_group(mesh.get_group(shard_dim), mesh.device_type)


def _preconditions_whole_columns(shape: tuple[int, int], config) -> bool:
    """Whether one column-side preconditioner covers the matrix (the sharded-Gram case)."""
    m, n = shape
    return resolve_side(m, n, config) == "right" and block_layout((1, m, n), config).is_single_block


@functools.lru_cache(maxsize=None)
def _with_right_side(config):
    return dataclasses.replace(config, side="right")


def _rows_on(param, rank: int) -> int:
    """Rows of `param` on shard rank `rank` in FSDP2's dim-0 layout (torch.chunk: ceil-sized
    chunks, empty ones at the end)."""
    world = param.device_mesh.size(_shard_dim_of(param))
    chunk = -(-param.shape[0] // world)
    return max(0, min(chunk, param.shape[0] - rank * chunk))


def _row_numel(param) -> int:
    return math.prod(param.shape[1:])


def _rows_of(full, rank: int, world: int):
    """Rank `rank`'s dim-0 shard of `full` (the torch.chunk layout, possibly empty)."""
    chunk = -(-full.shape[0] // world)
    return full[rank * chunk:(rank + 1) * chunk]


def _row_sharded_like(rows, param):
    """This rank's (rows, n) momentum as the (m, n) DTensor it is a shard of."""
    return _sharded_like(rows, param, matrix_view_shape(param.shape)[0])


def _sharded_like(local, param, length=None):
    """This rank's dim-0 shard `local` as the DTensor it is a shard of, placed like `param`;
    dim 0 of the whole has `length` entries (default param.shape[0])."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size((param.shape[0] if length is None else length, *local.shape[1:]))
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _local_parameter(param):
    """This rank's shard of `param` as an nn.Parameter on the same storage, with its gradient's."""
    local = torch.nn.Parameter(param.to_local())
    local.grad = param.grad.to_local()
    return local


def _local_stack_entry(entry: dict, label: str) -> dict:
    """A stack's saved state (_stack_checkpoint_entry's DTensors) → this rank's, in ASGO's
    layout; the shapes are checked by the load itself."""
    from torch.distributed.tensor import DTensor

    def local(key, saved):
        if not isinstance(saved, DTensor):
            raise ValueError(f"{label}: state field {key!r} is a {type(saved).__name__}; accepted: a "
                             "DTensor sharded like the parameter (as FSDPASGO.state_dict() saves it)")
        shard = saved.to_local()
        return shard.flatten(0, 1) if key in ("gram", "root") and shard.ndim == 4 else shard

    return {key: value if key == "step"
            else [local(key, v) for v in value] if isinstance(value, (list, tuple)) else local(key, value)
            for key, value in entry.items()}
