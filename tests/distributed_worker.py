"""One rank of the distributed tests, launched torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment) by tests/test_distributed.py:

    python tests/distributed_worker.py ddp|ddp_experts|fsdp|fsdp_other_side|fsdp_bf16 OUT_DIR
    python tests/distributed_worker.py fsdp_split_roots|fsdp_moe|fsdp_moe_hsdp OUT_DIR
    python tests/distributed_worker.py fsdp_resume|fsdp_moe_resume OUT_DIR CHECKPOINT_DIR

Trains `TinyTransformer` for STEPS steps on rank-specific batches and saves, per rank,
OUT_DIR/rank{r}.pt: the final parameters, the optimizer's full state_dict and the gradients
every step saw (so the test can replay them through the single-process optimizer). The fsdp
modes also save a torch.distributed.checkpoint in OUT_DIR/checkpoint, which fsdp_resume loads
(at any world size) to train the remaining steps; fsdp_bf16 steps two matrices on synthetic
gradients with matmul_dtype="bfloat16" (and records tensor factories its steps call without a
device), then one matrix whose statistics underflow; fsdp_split_roots steps float64 matrices whose
sharded-Gram roots are split between the ranks (and counts the roots each rank solves);
ddp_experts steps mixture-of-experts stacks (batch_dims=1) with DistributedASGO.
The fsdp_moe modes train `DenseAndExperts` (float64) under FSDPASGO: on a 1-D mesh (saving a
checkpoint, as fsdp does) or on a 2 × 2 HSDP mesh (fsdp_moe_hsdp, 4 ranks).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from asgo_core.adapters.torch import asgo_param_groups
from helpers.device_tracking import DevicelessFactories

STEPS = 10
RELOAD_AT_STEP = 5
VOCAB, WIDTH, HEADS, SEQUENCE, BATCH = 32, 16, 2, 8, 4
OPTIONS = dict(lr=0.05, precondition_frequency=2)
# The sharded Gram sums per-rank Grams in another order; eps=1e-3 keeps those float32 rounding
# differences from being amplified by the default eps=1e-6's condition number (up to 1e6).
FSDP_OPTIONS = dict(OPTIONS, eps=1e-3)
OTHER_SIDE_OPTIONS = dict(FSDP_OPTIONS, sharded_side_policy="other_side")
NO_GRAD_STEP = 7          # FSDP runs: the last rank has no gradients at this step
CHECKPOINT_AT_STEP = 5    # FSDP runs: DCP checkpoint taken before this step
BF16_SHAPES = ((32, 16), (16, 32))
BF16_OPTIONS = dict(FSDP_OPTIONS, matmul_dtype="bfloat16")
BF16_STEPS = 3
# fsdp_split_roots: float64 matrices whose sharded Grams are exact (see split_root_grad); "many"
# has 8 sharded-Gram roots in 3 buckets and one owner-held 4×12 matrix, "few" fewer roots than
# 4 ranks. Coupled Newton's 6 steps fail on the rank-1 Grams, so their eigh fallback is counted.
SPLIT_ROOT_SHAPES = {"many": ((24, 8),) * 5 + ((16, 16),) * 2 + ((32, 12), (4, 12)),
                     "few": ((16, 8), (12, 12))}
SPLIT_ROOT_OPTIONS = dict(lr=0.05, precondition_frequency=3, betas=(0.9, 0.5), eps=1e-3,
                          root_method="coupled_newton", root_steps=6)
SPLIT_ROOT_STEPS = 7
SPLIT_ROOT_SKIPPED = (3, 0)   # (step, matrix): a gradient with an inf, at a root refresh


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(3 * WIDTH, WIDTH)

    def forward(self, x):
        h = self.norm1(x)
        split = lambda t: t.view(*t.shape[:2], HEADS, -1).transpose(1, 2)  # noqa: E731
        attention = F.scaled_dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), is_causal=True)
        x = x + self.o_proj(attention.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Two pre-norm blocks; `rank0_only` is used by rank 0 alone (other ranks have no local
    gradient for it) and `unused` by nobody (no gradient anywhere)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.rank0_only = nn.Linear(WIDTH, WIDTH, bias=False)
        self.unused = nn.Linear(WIDTH, 8, bias=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens, use_rank0_layer: bool):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        if use_rank0_layer:
            x = x + self.rank0_only(x)
        return self.head(x)


def make_model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def make_param_groups(model: nn.Module) -> list[dict]:
    return asgo_param_groups(model, num_heads=HEADS)


def batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (BATCH, SEQUENCE + 1), generator=generator)


def train_ddp(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from asgo_core.adapters.torch_distributed import DistributedASGO

    rank = dist.get_rank()
    model = make_model()
    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = DistributedASGO(make_param_groups(model), **OPTIONS)
    grads_per_step = []
    for step in range(STEPS):
        if step == RELOAD_AT_STEP:  # resume from the gathered full state, as after a restart
            full_state = optimizer.state_dict()
            optimizer = DistributedASGO(make_param_groups(model), **OPTIONS)
            optimizer.load_state_dict(full_state)
        tokens = batch(step, rank)
        logits = ddp_model(tokens[:, :-1], use_rank0_layer=rank == 0)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads_per_step.append({name: None if p.grad is None else p.grad.clone()
                               for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_owner_split_result(model, optimizer, grads_per_step, out_dir)


def save_owner_split_result(model, optimizer, grads_per_step, out_dir: str) -> None:
    torch.save({"params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "state_dict": optimizer.state_dict(), "grads": grads_per_step,
                "owned": [name for name, p in model.named_parameters() if optimizer.owns(p)]},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = one_dim_mesh()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def one_dim_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def rows_of_rank(full: torch.Tensor, rank: int, world_size: int) -> slice:
    """The dim-0 rows FSDP2 gives `rank` (torch.chunk layout)."""
    chunk = -(-full.shape[0] // world_size)
    return slice(rank * chunk, (rank + 1) * chunk)


def drop_last_rank_grads(model, grads: dict) -> None:
    """The last rank loses every gradient: zero its rows in the recorded full gradients (what
    FSDPASGO must then use) and set its local .grad to None."""
    world_size = dist.get_world_size()
    for grad in grads.values():
        if grad is not None:
            grad[rows_of_rank(grad, world_size - 1, world_size)] = 0
    if dist.get_rank() == world_size - 1:
        for param in model.parameters():
            param.grad = None


def full_tensors(value):
    """The state with every DTensor gathered to a full tensor (a collective)."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: full_tensors(item) for key, item in value.items()}
    if isinstance(value, list):
        return [full_tensors(item) for item in value]
    return value


def transformer_loss(model, step: int) -> torch.Tensor:
    tokens = batch(step, dist.get_rank())
    logits = model(tokens[:, :-1], use_rank0_layer=False)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def fsdp_steps(model, optimizer, steps, checkpoint_dir=None, loss=transformer_loss,
               drop_grads=True) -> list[dict]:
    """Train `steps` on loss(model, step); drop the last rank's gradients at NO_GRAD_STEP (where
    drop_grads) and save a DCP checkpoint before CHECKPOINT_AT_STEP when checkpoint_dir is
    given. Returns the gradients used."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    grads_per_step = []
    for step in steps:
        if step == CHECKPOINT_AT_STEP and checkpoint_dir is not None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint_dir)
        loss(model, step).backward()
        grads = {name: None if p.grad is None else p.grad.full_tensor()
                 for name, p in model.named_parameters()}
        if step == NO_GRAD_STEP and drop_grads and dist.get_world_size() > 1:
            drop_last_rank_grads(model, grads)
        grads_per_step.append(grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads_per_step


def save_fsdp_result(model, optimizer, grads_per_step, out_dir: str, **extra) -> None:
    names = {p: name for name, p in model.named_parameters()}
    state_dict = optimizer.state_dict()
    torch.save({"params": {name: p.full_tensor() for name, p in model.named_parameters()},
                "grads": grads_per_step, "state_dict": full_tensors(state_dict),
                "placements": placements(state_dict),
                "owners": {names[p]: optimizer.owner_of(p) for p in names},
                "local_state_keys": {names[p]: sorted(optimizer.state.get(p, {})) for p in names},
                "param_placements": {name: p.placements for name, p in model.named_parameters()},
                "local_rows": {name: p.to_local().shape[0] for name, p in model.named_parameters()}, **extra},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def placements(value):
    """The state with every DTensor replaced by its placements, every other tensor by None."""
    if isinstance(value, torch.Tensor):
        return getattr(value, "placements", None)
    if isinstance(value, dict):
        return {key: placements(item) for key, item in value.items()}
    if isinstance(value, list):
        return [placements(item) for item in value]
    return value


def train_fsdp(out_dir: str, options: dict, checkpoint_dir=None) -> None:
    from asgo_core.adapters.torch_distributed import FSDPASGO

    model = fsdp_model()
    optimizer = FSDPASGO(make_param_groups(model), **options)
    grads = fsdp_steps(model, optimizer, range(STEPS), checkpoint_dir)
    save_fsdp_result(model, optimizer, grads, out_dir)


def resume_fsdp(out_dir: str, checkpoint_dir: str) -> None:
    """Load the DCP checkpoint (saved at another world size) and train its remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from asgo_core.adapters.torch_distributed import FSDPASGO

    model = fsdp_model()
    optimizer = FSDPASGO(make_param_groups(model), **FSDP_OPTIONS)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint_dir)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    grads = fsdp_steps(model, optimizer, range(CHECKPOINT_AT_STEP, STEPS))
    save_fsdp_result(model, optimizer, grads, out_dir)


def bf16_grads(step: int, shape) -> torch.Tensor:
    """Entries ±1 or ±2 times (1 + 2^-10): bfloat16 rounds them to ±1, ±2, whose Gram sums are
    exact in bfloat16 and float32, while the float32 Gram differs by about 2^-9 relative."""
    generator = torch.Generator().manual_seed(step)
    magnitude = torch.randint(1, 3, shape, generator=generator).float()
    sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return sign * magnitude * (1 + 2 ** -10)


def train_bf16(out_dir: str) -> None:
    """matmul_dtype="bfloat16" on a sharded-Gram (32×16) and an owner-held (16×32) matrix."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from asgo_core.adapters.torch_distributed import FSDPASGO

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    full = [torch.randn(BF16_SHAPES[0]), torch.randn(BF16_SHAPES[1])]
    params = [nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in full]
    try:
        FSDPASGO(params, nonfinite="raise")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    optimizer = FSDPASGO(params, **BF16_OPTIONS)
    for step in range(BF16_STEPS):
        for param, shape in zip(params, BF16_SHAPES):
            param.grad = distribute_tensor(bf16_grads(step, shape), mesh, [Shard(0)])
        with DevicelessFactories() as factories:
            optimizer.step()
    torch.save({"initial": full, "params": [p.full_tensor() for p in params],
                "state_dict": full_tensors(optimizer.state_dict()), "refusal": refusal,
                "deviceless_factories": factories.calls,
                "underflow_fallbacks": underflow_fallbacks(mesh)},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def underflow_grad() -> torch.Tensor:
    """A (4, 2) gradient whose Gram lies below float32's normal range, nonzero in rank 0's rows
    only (the rows of the other ranks are zero at 2 ranks and more)."""
    grad = torch.zeros(4, 2)
    grad[0] = 1e-17
    return grad


def underflow_fallbacks(mesh) -> list[int]:
    """This rank's fallback counts after one FSDPASGO step on underflow_grad() (sharded Gram)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from asgo_core.adapters.torch_distributed import FSDPASGO

    param = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    optimizer = FSDPASGO([param])
    param.grad = distribute_tensor(underflow_grad(), mesh, [Shard(0)])
    optimizer.step()
    return optimizer.state[param]["fallbacks"].tolist()


def split_root_initial(index: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)


def split_root_grad(step: int, index: int, shape) -> torch.Tensor:
    """Multiples of 1/8 (with beta2 = 0.5 every Gram, sharded or not, is exact, so the shared
    roots can be compared bitwise with single-process ASGO's); every third matrix rank-1."""
    generator = torch.Generator().manual_seed(100 * step + index)
    if index % 3 == 1:
        rows, columns = (torch.randint(-3, 4, (size,), generator=generator) for size in shape)
        grad = torch.outer(rows, columns).double() / 8
    else:
        grad = torch.randint(-3, 4, shape, generator=generator).double() / 8
    if (step, index) == SPLIT_ROOT_SKIPPED:
        grad[-1, 0] = float("inf")
    return grad


class CountedRoots:
    """Counts the root blocks this process solves (asgo_core.step.robust_root) while active."""

    core = importlib.import_module("asgo_core.step")  # the module: asgo_core.step is also the function

    def __enter__(self):
        self.blocks, self._original = 0, self.core.robust_root

        def counted(grams, *args, **kwargs):
            self.blocks += grams.shape[0]
            return self._original(grams, *args, **kwargs)
        self.core.robust_root = counted
        return self

    def __exit__(self, *exc_info):
        self.core.robust_root = self._original


def train_split_roots(out_dir: str) -> None:
    """FSDPASGO on SPLIT_ROOT_SHAPES' two sets: final params, state and root blocks solved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from asgo_core.adapters.torch_distributed import FSDPASGO

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for name, shapes in SPLIT_ROOT_SHAPES.items():
        params = [nn.Parameter(distribute_tensor(split_root_initial(index, shape), mesh, [Shard(0)]))
                  for index, shape in enumerate(shapes)]
        optimizer = FSDPASGO(params, **SPLIT_ROOT_OPTIONS)
        with CountedRoots() as solved:
            for step in range(SPLIT_ROOT_STEPS):
                for index, (param, shape) in enumerate(zip(params, shapes)):
                    param.grad = distribute_tensor(split_root_grad(step, index, shape), mesh, [Shard(0)])
                optimizer.step()
        results[name] = {"params": [p.full_tensor() for p in params], "roots_solved": solved.blocks,
                         "state_dict": full_tensors(optimizer.state_dict()),
                         "root_owners": [optimizer.root_owner_of(p) for p in params],
                         "owners": [optimizer.owner_of(p) for p in params]}
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


class Experts(nn.Module):
    """Two expert stacks (experts, out, in) of a mixture-of-experts layer, every token through
    every expert (the routing does not matter to the optimizer)."""

    def __init__(self, experts: int = 4, router_bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(WIDTH, experts, bias=router_bias)
        self.up = nn.Parameter(torch.randn(experts, 2 * WIDTH, WIDTH) / WIDTH ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, WIDTH, 2 * WIDTH) / WIDTH ** 0.5)

    def forward(self, x):
        weights = self.router(x).softmax(-1)
        hidden = F.gelu(torch.einsum("bi,eoi->beo", x, self.up))
        return torch.einsum("be,beo->bo", weights, torch.einsum("beh,eoh->beo", hidden, self.down))


MOE_EXPERTS = 5   # uneven: 3 + 2 experts per rank at 2 ranks, 2 + 2 + 1 + 0 at 4
MOE_OUTPUTS = 4
MOE_BATCH = 8


class DenseAndExperts(nn.Module):
    """A float64 mixture-of-experts model for FSDPASGO: `inp` (16×16) takes the sharded Gram,
    `experts.router` (5×16) and `head` (4×16) go to owner ranks, `experts.up` / `experts.down`
    are stacks stepped where their experts lie."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.experts = Experts(MOE_EXPERTS, router_bias=False)
        self.head = nn.Linear(WIDTH, MOE_OUTPUTS)
        self.double()

    def forward(self, x):
        hidden = F.gelu(self.inp(x))
        return self.head(hidden + self.experts(hidden))


def moe_groups(model: nn.Module) -> list[dict]:
    """asgo_param_groups with the expert stacks (batch_dims=1) in blocks of 8 (two per expert),
    so that their gram and root hold several blocks per matrix."""
    groups = asgo_param_groups(model, stacked={"*.up": 1, "*.down": 1})
    return [{**group, "max_precond_dim": 8} if group.get("batch_dims") else group for group in groups]


def moe_loss(model, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(MOE_BATCH, WIDTH, generator=generator, dtype=torch.float64)
    target = torch.randn(MOE_BATCH, MOE_OUTPUTS, generator=generator, dtype=torch.float64)
    return (model(x) - target).square().mean()


def fsdp_moe_model(mesh):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(DenseAndExperts(), mesh=mesh)


def train_fsdp_moe(out_dir: str, hsdp: bool) -> None:
    """DenseAndExperts under FSDPASGO: on a 1-D mesh, checkpointed as train_fsdp does, or on a
    2 × 2 (replicate, shard) HSDP mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from asgo_core.adapters.torch_distributed import FSDPASGO

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp else one_dim_mesh()
    model = fsdp_moe_model(mesh)
    optimizer = FSDPASGO(moe_groups(model), **FSDP_OPTIONS)
    checkpoint_dir = None if hsdp else os.path.join(out_dir, "checkpoint")
    grads = fsdp_steps(model, optimizer, range(STEPS), checkpoint_dir, moe_loss, drop_grads=not hsdp)
    save_fsdp_result(model, optimizer, grads, out_dir, refusal=stack_refusal(mesh),
                     load_refusal=gathered_stack_load_refusal(model, optimizer))


def gathered_stack_load_refusal(model, optimizer) -> dict:
    """load_state_dict given experts.up's state as plain (gathered) tensors: the error, and
    whether the optimizer's state stayed as it was."""
    import copy

    up = dict(model.named_parameters())["experts.up"]
    index = next(i for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"])
                 if param is up)
    state_dict = optimizer.state_dict()
    state_dict["state"][index] = full_tensors(state_dict["state"][index])
    before = copy.deepcopy(optimizer.state[up])
    try:
        optimizer.load_state_dict(state_dict)
        error = None
    except ValueError as refusal:
        error = str(refusal)
    after = optimizer.state[up]
    unchanged = before["step"] == after["step"] and torch.equal(before["momentum"], after["momentum"])
    return {"error": error, "unchanged": unchanged}


def resume_fsdp_moe(out_dir: str, checkpoint_dir: str) -> None:
    """Load train_fsdp_moe's DCP checkpoint (saved at another world size) and train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from asgo_core.adapters.torch_distributed import FSDPASGO

    model = fsdp_moe_model(one_dim_mesh())
    optimizer = FSDPASGO(moe_groups(model), **FSDP_OPTIONS)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint_dir)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    grads = fsdp_steps(model, optimizer, range(CHECKPOINT_AT_STEP, STEPS), loss=moe_loss)
    save_fsdp_result(model, optimizer, grads, out_dir)


def stack_refusal(mesh) -> str | None:
    """FSDPASGO's error for a stack sharded on a matrix dim (its dim 1 with batch_dims=1)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from asgo_core.adapters.torch_distributed import FSDPASGO

    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(1)]
    stack = nn.Parameter(distribute_tensor(torch.zeros(2, 4, 4), mesh, placements))
    try:
        FSDPASGO([{"params": [stack], "batch_dims": 1}])
    except ValueError as error:
        return str(error)
    return None


def expert_groups(model: nn.Module) -> list[dict]:
    return asgo_param_groups(model, stacked={"up": 1, "down": 1})


def expert_batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1000 * step + rank))


def train_ddp_experts(out_dir: str) -> None:
    """DistributedASGO on expert stacks: each stack has one owner rank."""
    from torch.nn.parallel import DistributedDataParallel

    from asgo_core.adapters.torch_distributed import DistributedASGO

    rank = dist.get_rank()
    model = Experts()
    ddp_model = DistributedDataParallel(model)
    optimizer = DistributedASGO(expert_groups(model), **OPTIONS)
    grads_per_step = []
    for step in range(STEPS):
        ddp_model(expert_batch(step, rank)).square().mean().backward()
        grads_per_step.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_owner_split_result(model, optimizer, grads_per_step, out_dir)


def leave_process_group() -> None:
    """End a worker whose results are saved: wait for every rank, free what still holds the
    process group (DDP's reducer, device meshes), destroy it, and exit without the interpreter's
    teardown. That teardown destroys whatever torch objects are left, gloo's threads among them,
    in no fixed order while the peers are closing their connections; a rank killed there
    (SIGABRT, "terminate called without an active exception") fails a run that succeeded."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    mode, out_dir, *checkpoint_dir = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    modes = {"ddp": train_ddp, "ddp_experts": train_ddp_experts,
             "fsdp": lambda out: train_fsdp(out, FSDP_OPTIONS, os.path.join(out, "checkpoint")),
             "fsdp_other_side": lambda out: train_fsdp(out, OTHER_SIDE_OPTIONS),
             "fsdp_resume": lambda out: resume_fsdp(out, *checkpoint_dir), "fsdp_bf16": train_bf16,
             "fsdp_split_roots": train_split_roots,
             "fsdp_moe": lambda out: train_fsdp_moe(out, hsdp=False),
             "fsdp_moe_hsdp": lambda out: train_fsdp_moe(out, hsdp=True),
             "fsdp_moe_resume": lambda out: resume_fsdp_moe(out, *checkpoint_dir)}
    modes[mode](out_dir)  # an error ends this rank with its traceback (the others time out)
    leave_process_group()


if __name__ == "__main__":
    main()
