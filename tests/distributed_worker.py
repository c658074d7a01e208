"""One rank of the distributed tests, launched torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment) by tests/test_distributed.py:

    python tests/distributed_worker.py ddp|fsdp OUT_DIR

Trains `TinyTransformer` for STEPS steps on rank-specific batches and saves, per rank,
OUT_DIR/rank{r}.pt: the final parameters, the optimizer's full state_dict and the gradients
every step saw (so the test can replay them through the single-process optimizer).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from asgo_core.adapters.torch import asgo_param_groups

STEPS = 10
RELOAD_AT_STEP = 5
VOCAB, WIDTH, HEADS, SEQUENCE, BATCH = 32, 16, 2, 8, 4
OPTIONS = dict(lr=0.05, precondition_frequency=2)
# The sharded Gram sums per-rank Grams in another order; eps=1e-3 keeps those float32 rounding
# differences from being amplified by the default eps=1e-6's condition number (up to 1e6).
FSDP_OPTIONS = dict(OPTIONS, eps=1e-3)


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
    torch.save({"params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "state_dict": optimizer.state_dict(), "grads": grads_per_step,
                "owned": [name for name, p in model.named_parameters() if optimizer.owns(p)]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def train_fsdp(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from asgo_core.adapters.torch_distributed import FSDPASGO

    rank = dist.get_rank()
    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = FSDPASGO(make_param_groups(model), **FSDP_OPTIONS)
    grads_per_step = []
    for step in range(STEPS):
        tokens = batch(step, rank)
        logits = model(tokens[:, :-1], use_rank0_layer=False)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads_per_step.append({name: None if p.grad is None else p.grad.full_tensor()
                               for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sharded_gram_state = {name: optimizer.state[p] for name, p in model.named_parameters()
                          if isinstance(optimizer.state[p].get("gram"), torch.Tensor)}
    torch.save({"params": {name: p.full_tensor() for name, p in model.named_parameters()},
                "grads": grads_per_step, "sharded_gram_state": sharded_gram_state},
               os.path.join(out_dir, f"rank{rank}.pt"))


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        {"ddp": train_ddp, "fsdp": train_fsdp}[mode](out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
