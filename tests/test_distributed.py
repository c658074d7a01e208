"""Distributed training on this CPU: torch (gloo, 2 and 4 processes launched torchrun-style)
and JAX (4 host devices in a subprocess), each against the single-process optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
from asgo_core import FALLBACK_LEVELS
from asgo_core.adapters.torch import ASGO
from asgo_core.adapters.torch_distributed import DistributedASGO, FSDPASGO, assign_owners, parameter_cost
from helpers.processes import TESTS, env_importing, free_port

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 600  # per process: 4 ranks on a 2-core machine shared with other jobs can take minutes


def launch(mode: str, world_size: int, out_dir, *worker_args) -> list[dict]:
    """Run `world_size` worker processes (as torchrun would) and load what each rank saved."""
    env = {**env_importing(TESTS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, WORKER, mode, str(out_dir), *map(str, worker_args)],
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world_size)]
    try:
        outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def single_process_replay(grads_per_step: list[dict], options=worker.OPTIONS, reload_at=None,
                          param_groups=worker.make_param_groups, make_model=worker.make_model):
    """The plain ASGO on the gradients the distributed run saw (with a state_dict reload)."""
    model = make_model()
    params = dict(model.named_parameters())
    optimizer = ASGO(param_groups(model), **options)
    for step, grads in enumerate(grads_per_step):
        if step == reload_at:
            saved = optimizer.state_dict()
            optimizer = ASGO(param_groups(model), **options)
            optimizer.load_state_dict(saved)
        for name, grad in grads.items():
            params[name].grad = grad
        optimizer.step()
    state_by_name = {name: optimizer.state.get(p) for name, p in params.items()}
    return {name: p.detach() for name, p in params.items()}, optimizer.state_dict(), state_by_name


def assert_same(actual, expected, where="state", close=False):
    """Bitwise equality of nested state (tensors by torch.equal, dtype included); close=True:
    floating-point tensors within float32 rounding (1e-4 of their largest entry) instead."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, where
        if close and expected.is_floating_point():
            error = (actual - expected).abs().max().item()
            assert error <= 1e-4 * expected.abs().max().item() + 1e-7, (where, error)
        else:
            assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]", close)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]", close)
    else:
        assert actual == expected, where


def test_owners_balance_cost_deterministically():
    costs = [parameter_cost(torch.empty(64, 256), "asgo"), parameter_cost(torch.empty(64, 256), "asgo"),
             parameter_cost(torch.empty(16, 16), "asgo"), parameter_cost(torch.empty(1000), "adamw")]
    assert costs[0] == 4 * 64 * 256 * 64 + 64 ** 3
    assert assign_owners(costs, 2) == [0, 1, 0, 1]  # equal loads: the lower rank
    assert assign_owners(costs, 8) == [0, 1, 2, 3]  # more ranks than items: some own nothing


@pytest.fixture
def rank_0_of_2():
    """A default process group of world size 2 in this process, whose collectives do nothing
    (torch's fake backend): enough to construct the distributed optimizers."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_owner_split_counts_every_matrix_of_an_expert_stack(rank_0_of_2):
    """An (8, 64, 64) stack with batch_dims=1 is 8 matrices of 64×64, costlier than one 64×512
    matrix: it gets rank 0 alone and the two 64×512 matrices share rank 1."""
    stack, wide, other_wide = (torch.nn.Parameter(torch.zeros(shape))
                               for shape in ((8, 64, 64), (64, 512), (64, 512)))
    optimizer = DistributedASGO([{"params": [stack], "batch_dims": 1}, {"params": [wide, other_wide]}])
    assert [optimizer.owns(p) for p in (stack, wide, other_wide)] == [True, False, False]


@pytest.fixture
def rank_0_of_1():
    """A real gloo process group of world size 1 in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer_type", [torch.optim.AdamW, DistributedASGO])
def test_owner_split_keeps_an_entry_of_no_parameter_as_torch_adamw_does(optimizer_type, rank_0_of_1):
    weight = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    optimizer = optimizer_type([weight], lr=0.01)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    optimizer.state["ema"] = {"updates": torch.tensor(7)}
    resumed = optimizer_type([weight], lr=0.01)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state["ema"] == {"updates": torch.tensor(7)}
    assert int(resumed.state[weight]["step"]) == int(optimizer.state[weight]["step"]) == 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_owner_split_equals_single_process_bitwise(world_size, tmp_path):
    ranks = launch("ddp", world_size, tmp_path)
    grads = ranks[0]["grads"]
    assert grads[0]["unused.weight"] is None and grads[0]["rank0_only.weight"] is not None
    owners = {name: rank for rank, saved in enumerate(ranks) for name in saved["owned"]}
    assert sorted(owners) == sorted(ranks[0]["params"]) and len(set(owners.values())) == world_size
    expected_params, expected_state, _ = single_process_replay(grads, reload_at=worker.RELOAD_AT_STEP)
    for rank, saved in enumerate(ranks):
        assert_same(saved["grads"], grads, f"rank {rank} grads")  # DDP gave every rank the same
        assert_same(saved["params"], expected_params, f"rank {rank} params")
        assert_same(saved["state_dict"], expected_state, f"rank {rank} state_dict")


def test_ddp_owner_split_steps_expert_stacks_like_single_process(tmp_path):
    """Two (E, out, in) stacks with batch_dims=1 at 2 ranks: one owner each, bitwise equal to
    the single-process ASGO on the same gradients."""
    ranks = launch("ddp_experts", 2, tmp_path)
    owners = {name: rank for rank, saved in enumerate(ranks) for name in saved["owned"]}
    assert owners["up"] != owners["down"]  # the two equally costly stacks go to different ranks
    model = worker.Experts()
    params = dict(model.named_parameters())
    optimizer = ASGO(worker.expert_groups(model), **worker.OPTIONS)
    for grads in ranks[0]["grads"]:
        for name, grad in grads.items():
            params[name].grad = grad
        optimizer.step()
    for rank, saved in enumerate(ranks):
        assert_same(saved["params"], {name: p.detach() for name, p in params.items()}, f"rank {rank} params")
        assert_same(saved["state_dict"], optimizer.state_dict(), f"rank {rank} state_dict")


def names_in_group_order(param_groups=worker.make_param_groups, make_model=worker.make_model) -> list[str]:
    """Parameter names in the optimizer's index order (its state_dict keys)."""
    model = make_model()
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in param_groups(model) for param in group["params"]]


def assert_fsdp_matches(saved, expected_params, expected_state, where, param_groups=worker.make_param_groups,
                        make_model=worker.make_model, stacks=()):
    """FSDPASGO's final params and (gathered) state against the single-process run: bitwise for
    owner-held matrices, stacks (the names in `stacks`) and AdamW, within float32 rounding for
    the sharded-Gram matrices (their partial Grams are summed in another order). Returns the
    sharded-Gram names."""
    names = names_in_group_order(param_groups, make_model)
    state = {index: in_asgo_layout(entry) if names[index] in stacks else entry
             for index, entry in saved["state_dict"]["state"].items()}
    sharded = {name for index, name in enumerate(names)
               if saved["owners"][name] is None and "gram" in state[index] and name not in stacks}
    for name, expected in expected_params.items():
        difference = (saved["params"][name] - expected).abs().max().item()
        assert difference < 1e-5 if name in sharded else difference == 0.0, (where, name, difference)
    for index, name in enumerate(names):
        if int(state[index]["step"]) == 0:  # never stepped: a zero entry, no state in ASGO
            assert index not in expected_state["state"], (where, name)
        else:
            assert_same(state[index], expected_state["state"][index], f"{where} {name}",
                        close=name in sharded)
    return sharded


def in_asgo_layout(stack_entry: dict) -> dict:
    """A stack's gathered FSDPASGO state with each gram/root block group's (E, blocks per
    expert, size, size) back in ASGO's (E·blocks, size, size)."""
    return {key: [block.flatten(0, 1) for block in value] if key in ("gram", "root") else value
            for key, value in stack_entry.items()}


@pytest.fixture(scope="module")
def fsdp_two_ranks(tmp_path_factory):
    """The FSDP2 run at 2 ranks (default policy "owner"); it saves a DCP checkpoint too."""
    out_dir = tmp_path_factory.mktemp("fsdp2")
    return launch("fsdp", 2, out_dir), out_dir / "checkpoint"


def test_fsdp2_owner_policy_equals_single_process(fsdp_two_ranks):
    ranks, _ = fsdp_two_ranks
    grads = ranks[0]["grads"]
    no_grad_rows = worker.rows_of_rank(grads[0]["head.weight"], 1, 2)
    assert not grads[worker.NO_GRAD_STEP]["head.weight"][no_grad_rows].any()  # rank 1 had none
    expected_params, expected_state, _ = single_process_replay(grads, worker.FSDP_OPTIONS)
    for rank, saved in enumerate(ranks):
        sharded = assert_fsdp_matches(saved, expected_params, expected_state, f"rank {rank}")
        assert {"blocks.0.v_proj.weight", "blocks.0.fc1.weight", "head.weight"} <= sharded
        owners = saved["owners"]
        owned = {"blocks.0.q_proj.weight", "blocks.0.fc2.weight"}  # head blocks; rows preconditioned
        assert all(owners[name] is not None for name in owned) and set(owners.values()) == {None, 0, 1}
        for name in owned:  # state on the owner only
            assert ("momentum" in saved["local_state_keys"][name]) == (owners[name] == rank)


@pytest.mark.parametrize("world_size", [4, 1])
def test_fsdp2_checkpoint_resumes_at_another_world_size(world_size, fsdp_two_ranks, tmp_path):
    """DCP checkpoint of the 2-rank run before CHECKPOINT_AT_STEP, loaded at 4 ranks (owners
    move; the owner policy at 4 ranks) and at 1, then trained to the end: as if uninterrupted."""
    first_ranks, checkpoint = fsdp_two_ranks
    ranks = launch("fsdp_resume", world_size, tmp_path, checkpoint)
    grads = first_ranks[0]["grads"][:worker.CHECKPOINT_AT_STEP] + ranks[0]["grads"]
    expected_params, expected_state, _ = single_process_replay(grads, worker.FSDP_OPTIONS)
    for rank, saved in enumerate(ranks):
        assert_fsdp_matches(saved, expected_params, expected_state, f"rank {rank} of {world_size}")
    assert {owner for owner in ranks[0]["owners"].values() if owner is not None} == set(range(world_size))


def right_side_matrices(model) -> list[dict]:
    """worker.make_param_groups with side="right" for the matrices without head blocks."""
    return [group if group.get("num_heads") else {**group, "side": "right"}
            for group in worker.make_param_groups(model)]


def test_fsdp2_other_side_policy_equals_single_process_right_side(tmp_path):
    ranks = launch("fsdp_other_side", 2, tmp_path)
    grads = ranks[0]["grads"]
    expected_params, expected_state, _ = single_process_replay(
        grads, worker.FSDP_OPTIONS, param_groups=right_side_matrices)
    for rank, saved in enumerate(ranks):
        sharded = assert_fsdp_matches(saved, expected_params, expected_state, f"rank {rank}",
                                      right_side_matrices)
        assert "blocks.0.fc2.weight" in sharded  # 16×48: its 48 columns, nothing gathered
        assert {name for name, owner in saved["owners"].items() if owner is not None} == {
            f"blocks.{b}.{proj}.weight" for b in (0, 1) for proj in ("q_proj", "k_proj")}
    auto_side_params, _, _ = single_process_replay(grads, worker.FSDP_OPTIONS)
    name = "blocks.0.fc2.weight"  # the comparison above can tell the two sides apart
    assert (auto_side_params[name] - expected_params[name]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def fsdp_synthetic_ranks(tmp_path_factory):
    """The 2-rank FSDP2 run on synthetic gradients (bfloat16 matmuls, then an underflow)."""
    return launch("fsdp_bf16", 2, tmp_path_factory.mktemp("fsdp_bf16"))


def test_fsdp2_honours_matmul_dtype(fsdp_synthetic_ranks):
    """Gradients whose bfloat16 Grams are exact: the sharded Gram equals single-process ASGO's
    with matmul_dtype="bfloat16" and differs from the float32 one; the owner-held matrix is
    stepped by the single-process code itself (bitwise)."""
    ranks = fsdp_synthetic_ranks

    def single_process(matmul_dtype):
        params = [torch.nn.Parameter(t.clone()) for t in ranks[0]["initial"]]
        optimizer = ASGO(params, **{**worker.BF16_OPTIONS, "matmul_dtype": matmul_dtype})
        for step in range(worker.BF16_STEPS):
            for param, shape in zip(params, worker.BF16_SHAPES):
                param.grad = worker.bf16_grads(step, shape)
            optimizer.step()
        return [p.detach() for p in params], optimizer.state_dict()["state"]

    bf16_params, bf16_state = single_process("bfloat16")
    _, float32_state = single_process(None)
    for rank, saved in enumerate(ranks):
        state = saved["state_dict"]["state"]
        gram, scale = state[0]["gram"][0], state[0]["gram"][0].abs().max()
        assert (gram - bf16_state[0]["gram"][0]).abs().max() < 1e-6 * scale  # float32 rounding
        assert (gram - float32_state[0]["gram"][0]).abs().max() > 1e-4 * scale
        assert (saved["params"][0] - bf16_params[0]).abs().max() < 1e-5, rank
        assert_same(state[1], bf16_state[1], f"rank {rank} owner-held state")
        assert torch.equal(saved["params"][1], bf16_params[1]), rank
        assert "nonfinite='raise' is invalid" in saved["refusal"]
        assert saved["deviceless_factories"] == [], rank  # every state tensor made on its device


def test_fsdp2_ranks_agree_on_statistics_underflow(fsdp_synthetic_ranks):
    """The gradient's only nonzero rows lie on rank 0, so rank 1's own momentum rows are zero:
    every rank counts the underflow of the shared Gram, as the single-process ASGO does."""
    ranks = fsdp_synthetic_ranks
    param = torch.nn.Parameter(torch.ones(4, 2))
    optimizer = ASGO([param])
    param.grad = worker.underflow_grad()
    optimizer.step()
    expected = optimizer.state[param]["fallbacks"].tolist()
    assert expected[FALLBACK_LEVELS.index("statistics_underflow")] == 1
    assert [saved["underflow_fallbacks"] for saved in ranks] == [expected, expected]


def split_roots_single_process(shapes):
    """Single-process ASGO on the gradients the fsdp_split_roots workers used."""
    params = [torch.nn.Parameter(worker.split_root_initial(index, shape))
              for index, shape in enumerate(shapes)]
    optimizer = ASGO(params, **worker.SPLIT_ROOT_OPTIONS)
    for step in range(worker.SPLIT_ROOT_STEPS):
        for index, (param, shape) in enumerate(zip(params, shapes)):
            param.grad = worker.split_root_grad(step, index, shape)
        optimizer.step()
    return [p.detach() for p in params], optimizer.state_dict()["state"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_solves_each_root_on_one_rank_and_equals_single_process(world_size, tmp_path):
    """The sharded-Gram roots are split between the ranks and shared: every rank ends with the
    single-process state bitwise in float64 (Grams exact here, so roots, momentum and the
    fallback and skip counters must match exactly), while each root was solved on one rank
    only, including when there are fewer roots than ranks. τ = 3 over 7 steps: refreshes at
    steps 0, 3 and 6. The params agree within 1e-8 of their largest entry: the sharded-Gram
    path writes W − lr·(s·D + wd·W) with s from the all-reduced norm, ASGO
    W·(1 − lr·wd) − lr·s·D."""
    ranks = launch("fsdp_split_roots", world_size, tmp_path)
    refreshes = 3
    for run, shapes in worker.SPLIT_ROOT_SHAPES.items():
        expected_params, expected_state = split_roots_single_process(shapes)
        eigh_fallbacks = [int(entry["fallbacks"][FALLBACK_LEVELS.index("eigh")])
                          for entry in expected_state.values()]
        assert 0 in eigh_fallbacks and max(eigh_fallbacks) > 0  # counts that tell the matrices apart
        for rank, saved in enumerate(ranks):
            result = saved[run]
            assert_same(result["state_dict"]["state"], expected_state, f"{run}: rank {rank} state")
            for index, (actual, expected) in enumerate(zip(result["params"], expected_params)):
                error = (actual - expected).abs().max().item()
                assert error <= 1e-8 * expected.abs().max().item(), (run, rank, index, error)
        root_owners, owners = ranks[0][run]["root_owners"], ranks[0][run]["owners"]
        assert all(saved[run]["root_owners"] == root_owners for saved in ranks)
        solved = [saved[run]["roots_solved"] for saved in ranks]
        assert solved == [refreshes * (root_owners.count(rank) + owners.count(rank))
                          for rank in range(world_size)]
        assert sum(solved) == refreshes * len(shapes)  # each root once, not once per rank
        if run == "many":
            assert min(root_owners.count(rank) for rank in range(world_size)) > 0
        else:
            assert sorted(solved) == [0] * (world_size - 2) + [refreshes] * 2


def test_fsdp2_rejects_an_unknown_sharded_side_policy():
    with pytest.raises(ValueError, match="sharded_side_policy='gather'.*'owner' | 'other_side'"):
        FSDPASGO([torch.nn.Parameter(torch.zeros(4, 8))], sharded_side_policy="gather")


MOE_STACKS = ("experts.up", "experts.down")


@pytest.fixture(scope="module")
def fsdp_moe_run(tmp_path_factory):
    """run(world_size): the FSDP2 MoE run at that world size (launched once; it saves a DCP
    checkpoint before worker.CHECKPOINT_AT_STEP): (ranks, checkpoint directory)."""
    runs = {}

    def run(world_size: int):
        if world_size not in runs:
            out_dir = tmp_path_factory.mktemp(f"fsdp_moe_{world_size}")
            runs[world_size] = launch("fsdp_moe", world_size, out_dir), out_dir / "checkpoint"
        return runs[world_size]
    return run


def assert_moe_matches_single_process(ranks, grads):
    """Every rank's DenseAndExperts params and state against the single-process ASGO on the
    same float64 gradients: the expert stacks and owner-held matrices bitwise, the
    sharded-Gram inp.weight within rounding; the stacks' state DTensors placed like the stacks."""
    expected_params, expected_state, _ = single_process_replay(
        grads, worker.FSDP_OPTIONS, param_groups=worker.moe_groups, make_model=worker.DenseAndExperts)
    names = names_in_group_order(worker.moe_groups, worker.DenseAndExperts)
    for rank, saved in enumerate(ranks):
        sharded = assert_fsdp_matches(saved, expected_params, expected_state, f"rank {rank}",
                                      worker.moe_groups, worker.DenseAndExperts, MOE_STACKS)
        assert sharded == {"inp.weight"}
        assert {saved["owners"][name] for name in ("experts.router.weight", "head.weight")} == {0, 1}
        for name in MOE_STACKS:
            assert saved["owners"][name] is None
            placements = saved["placements"]["state"][names.index(name)]
            state_placements = [placements[key] for key in ("momentum", "skipped", "fallbacks")]
            state_placements += placements["gram"] + placements["root"]
            assert len(state_placements) == 5 and set(state_placements) == {saved["param_placements"][name]}


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_moe_equals_single_process(world_size, fsdp_moe_run):
    """Expert stacks (5 experts, batch_dims=1, two blocks each) beside dense layers: at 2 ranks
    3 + 2 experts per rank, at 4 ranks 2 + 2 + 1 + 0; the last rank drops its gradients once."""
    ranks, _ = fsdp_moe_run(world_size)
    assert [saved["local_rows"]["experts.up"] for saved in ranks] == {2: [3, 2], 4: [2, 2, 1, 0]}[world_size]
    assert_moe_matches_single_process(ranks, ranks[0]["grads"])


def test_fsdp2_moe_load_refuses_a_gathered_stack_state(fsdp_moe_run):
    """A stack's state given as plain tensors (e.g. full_tensor() of each) is refused, naming
    the entry and what is accepted, and the optimizer's state stays as it was."""
    for saved in fsdp_moe_run(2)[0]:
        refusal = saved["load_refusal"]
        assert refusal["error"].startswith("state_dict['state'][3] (the parameter of shape (5, 32, 16)): "
                                           "state field 'momentum' is a Tensor; accepted: a DTensor")
        assert refusal["unchanged"]


def test_fsdp2_moe_resumes_at_another_world_size(fsdp_moe_run, tmp_path):
    """The 4-rank MoE run's DCP checkpoint loaded at 2 ranks and trained to the end: as if
    uninterrupted (the experts move from 2 + 2 + 1 + 0 per rank to 3 + 2)."""
    first_ranks, checkpoint = fsdp_moe_run(4)
    ranks = launch("fsdp_moe_resume", 2, tmp_path, checkpoint)
    grads = first_ranks[0]["grads"][:worker.CHECKPOINT_AT_STEP] + ranks[0]["grads"]
    assert_moe_matches_single_process(ranks, grads)


def test_fsdp2_refuses_a_stack_sharded_on_a_matrix_dim(fsdp_moe_run):
    refusal = fsdp_moe_run(2)[0][0]["refusal"]
    assert refusal.startswith("param_groups[0]['params'][0] (shape (2, 4, 4)): FSDPASGO needs")
    assert "placements (Shard(dim=0),) on a 1-D mesh" in refusal
    assert "got placements (Shard(dim=1),)" in refusal


def test_hsdp_two_by_two_equals_single_process(tmp_path):
    """HSDP: 4 ranks on a (replicate 2, shard 2) mesh. Each replica steps on its own shard
    group; both equal the single-process run (stacks, owners and sharded Gram alike)."""
    from torch.distributed.tensor import Replicate, Shard

    ranks = launch("fsdp_moe_hsdp", 4, tmp_path)
    assert ranks[0]["param_placements"]["experts.up"] == (Replicate(), Shard(0))
    assert [saved["local_rows"]["experts.up"] for saved in ranks] == [3, 2, 3, 2]
    assert "(Replicate(), Shard(dim=1))" in ranks[0]["refusal"]
    assert_moe_matches_single_process(ranks, ranks[0]["grads"])


def test_jax_sharded_over_a_mesh_equals_unsharded():
    script = os.path.join(os.path.dirname(__file__), "jax_sharded_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    assert report["moved"] > 0.1  # the runs trained: the comparison below is not trivial
    assert report["param_difference"] < 5e-5 and report["state_difference"] < 5e-4
    assert report["param_specs"] == {"w_in": "P(None, 'model')", "b_in": "P('model',)",
                                     "w_mid": "P('model',)", "w_out": "P(None, 'model')",
                                     "w_out2": "P(None, 'model')"}
    momentum = [spec for path, spec in report["state_specs"].items() if ".momentum[" in path]
    grams = [spec for path, spec in report["state_specs"].items() if "gram" in path or "root" in path]
    assert momentum and all("'model'" in spec for spec in momentum)  # sharded like the params
    assert grams and all(spec == "P()" for spec in grams)            # k×k: replicated
