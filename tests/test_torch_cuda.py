"""The torch adapter on CUDA: the routes the CPU suite covers, run on a GPU.

Every case carries the gpu marker and skips on a machine without an NVIDIA GPU (a machine with
one and a torch that cannot use it fails, see conftest). The DDP case needs two GPUs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from asgo_core.adapters.torch import ASGO, DASGO
from helpers.gpu import gpu_available
from helpers.processes import free_port

pytestmark = pytest.mark.gpu

FLOAT32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def cuda():
    if not gpu_available("torch-cuda"):
        pytest.skip("no NVIDIA GPU on this machine")
    torch.manual_seed(0)
    return torch.device("cuda")


def _mlp(device, dtype=torch.float32):
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 4)).to(device, dtype)


def _batch(device, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32, 12, generator=generator, dtype=dtype)
    return inputs.to(device), torch.randint(0, 4, (32,), generator=generator).to(device)


def _train(model, optimizer, batch, steps, scaler=None):
    inputs, targets = batch
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.float() if logits.dtype == torch.bfloat16 else logits, targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    return losses


def _copies(device):
    first = _mlp(device)
    second = copy.deepcopy(first)
    return first, second


def test_cuda_float64_matches_cpu_float64():
    cpu_model = _mlp("cpu", torch.float64)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    _train(cpu_model, ASGO(cpu_model.parameters(), precondition_frequency=2), _batch("cpu", torch.float64), 6)
    _train(cuda_model, ASGO(cuda_model.parameters(), precondition_frequency=2),
           _batch("cuda", torch.float64), 6)
    for expected, actual in zip(cpu_model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-10, atol=1e-12)


def test_adamw_route_on_cuda_follows_torch_adamw(cuda):
    ours, theirs = _copies(cuda)
    options = dict(betas=(0.8, 0.9), eps=1e-7, weight_decay=0.05)
    optimizer = ASGO([{"params": list(ours.parameters()), "algorithm": "adamw"}], lr=1e-2,
                     adamw_betas=options["betas"], adamw_eps=options["eps"],
                     adamw_weight_decay=options["weight_decay"])
    _train(ours, optimizer, _batch(cuda), 5)
    _train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, **options), _batch(cuda), 5)
    for expected, actual in zip(theirs.parameters(), ours.parameters()):
        torch.testing.assert_close(actual, expected, **FLOAT32)
    # torch.optim.AdamW keeps a non-fused, non-capturable step count on the CPU (a CUDA one
    # costs a host read per parameter per step); so must a reloaded state
    reloaded = ASGO([{"params": list(ours.parameters()), "algorithm": "adamw"}], lr=1e-2)
    reloaded.load_state_dict(optimizer.state_dict())
    assert {state["step"].device.type for state in reloaded.state.values()} == {"cpu"}


@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_bf16_params_train_with_float32_state_on_cuda(cuda, optimizer_type):
    model = _mlp(cuda, torch.bfloat16)
    optimizer = optimizer_type(model.parameters(), lr=2e-2)
    losses = _train(model, optimizer, _batch(cuda, torch.bfloat16), 20)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = optimizer.state[model[0].weight]
    assert state["momentum"].dtype == torch.float32 and state["momentum"].device.type == "cuda"


def test_grad_scaler_on_cuda_steps_on_unscaled_grads_and_skips_infs(cuda):
    plain, scaled = _copies(cuda)
    plain_optimizer, scaled_optimizer = ASGO(plain.parameters()), ASGO(scaled.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    batch = _batch(cuda)
    _train(plain, plain_optimizer, batch, 2)
    _train(scaled, scaled_optimizer, batch, 2, scaler)
    for expected, actual in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(actual, expected, **FLOAT32)  # power-of-two scaling is exact
    before = [p.detach().clone() for p in scaled.parameters()]
    _train(scaled, scaled_optimizer, (batch[0] * math.inf, batch[1]), 1, scaler)
    assert scaler.get_scale() == 2.0**7
    assert all(torch.equal(b, p) for b, p in zip(before, scaled.parameters()))


def test_a_cuda_tensor_lr_gives_the_float_lr_step(cuda):
    # One step: the two writes round differently in the last bit (1 − lr·λ is formed in double
    # from a float lr, in float32 from a float32 tensor), and over several steps
    # the inverse root amplifies that last-bit difference (2e-4 relative after 3 steps on an
    # H100). A step at lr 0.2 instead of 0.1 would differ by ~1e-2.
    as_float, as_tensor = _copies(cuda)
    _train(as_float, ASGO(as_float.parameters(), lr=0.1), _batch(cuda), 1)
    _train(as_tensor, ASGO(as_tensor.parameters(), lr=torch.tensor(0.1, device=cuda)), _batch(cuda), 1)
    for expected, actual in zip(as_float.parameters(), as_tensor.parameters()):
        torch.testing.assert_close(actual, expected, **FLOAT32)


def test_torch_compile_with_inductor_on_cuda_matches_eager(cuda):
    eager_model, compiled_model = _copies(cuda)
    eager = ASGO(eager_model.parameters(), precondition_frequency=2)
    compiled = ASGO(compiled_model.parameters(), precondition_frequency=2)
    compiled_step = torch.compile(compiled.step)
    inputs, targets = _batch(cuda)
    for _ in range(5):
        for model, step in ((eager_model, eager.step), (compiled_model, compiled_step)):
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            step()
    for expected, actual in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_resume_on_cuda_continues_bitwise_with_state_on_the_gpu(cuda):
    model = _mlp(cuda)
    optimizer = ASGO(model.parameters(), precondition_frequency=3)
    batch = _batch(cuda)
    _train(model, optimizer, batch, 2)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, batch, 3)

    resumed = _mlp(cuda)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = ASGO(resumed.parameters(), precondition_frequency=3)
    resumed_optimizer.load_state_dict(saved_optimizer)
    _train(resumed, resumed_optimizer, batch, 3)
    for expected, actual in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)
    matrix_state = resumed_optimizer.state[resumed[0].weight]
    assert {v.device.type for v in matrix_state.values() if isinstance(v, torch.Tensor)} == {"cuda"}


# ---------------------------------------------------------------- DDP with NCCL, two GPUs

DDP_STEPS = 4


def _ddp_rank(rank: int, world_size: int, port: int, start_state: dict, out_path: str):
    """One rank: DDP averages the gradients, DistributedASGO steps; saves params and the grads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from asgo_core.adapters.torch_distributed import DistributedASGO

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = _mlp(f"cuda:{rank}")
        model.load_state_dict(start_state)
        ddp = DistributedDataParallel(model, device_ids=[rank])
        optimizer = DistributedASGO(model.parameters(), lr=0.05, precondition_frequency=2)
        inputs, targets = _batch(f"cuda:{rank}", seed=10 + rank)
        grads = []
        for _ in range(DDP_STEPS):
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(inputs), targets).backward()
            grads.append([p.grad.detach().cpu().clone() for p in model.parameters()])
            optimizer.step()
        torch.save({"params": [p.detach().cpu() for p in model.parameters()], "grads": grads},
                   f"{out_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_with_nccl_on_two_gpus_matches_one_process(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("DDP with NCCL needs two GPUs")
    start = _mlp("cpu")
    out_path = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_ddp_rank, args=(2, free_port(), start.state_dict(), out_path), nprocs=2)
    ranks = [torch.load(f"{out_path}.rank{r}") for r in range(2)]
    for mine, other in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(mine, other)

    single = copy.deepcopy(start).cuda()
    optimizer = ASGO(single.parameters(), lr=0.05, precondition_frequency=2)
    for step_grads in ranks[0]["grads"]:  # DDP's averaged gradients, replayed in one process
        for param, grad in zip(single.parameters(), step_grads):
            param.grad = grad.cuda()
        optimizer.step()
    for expected, actual in zip(single.parameters(), ranks[0]["params"]):
        torch.testing.assert_close(actual, expected.cpu(), **FLOAT32)
