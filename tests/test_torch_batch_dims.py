"""batch_dims in the torch adapter: a stacked (E, m, n) parameter takes exactly the steps of E
separate (m, n) parameters, joins their buckets, and is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups

EXPERTS = 3
STEPS = 6

# every config field that applies to a stacked matrix: the side, size blocks, head blocks, τ
CASES = [
    ("asgo tall (right side)", ASGO, (8, 5), {}),
    ("asgo wide (left side)", ASGO, (5, 8), {}),
    ("asgo side=left on a tall matrix", ASGO, (8, 5), {"side": "left"}),
    ("asgo max_precond_dim blocks", ASGO, (8, 12), {"max_precond_dim": 3}),
    ("asgo num_heads per expert", ASGO, (8, 12), {"num_heads": 2}),
    ("asgo tau=3", ASGO, (6, 9), {"precondition_frequency": 3}),
    ("asgo conv-like 4-D expert", ASGO, (4, 3, 2, 2), {}),
    ("dasgo", DASGO, (6, 9), {}),
]


def _grads(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((EXPERTS, *shape), generator=generator, dtype=torch.float64) for _ in range(STEPS)]


def _run_stacked(optimizer_type, weights, grads, options):
    stacked = nn.Parameter(weights.clone())
    optimizer = optimizer_type([stacked], lr=0.05, batch_dims=1, **options)
    for grad in grads:
        stacked.grad = grad.clone()
        optimizer.step()
    return stacked.detach(), optimizer.state[stacked]


def _run_separate(optimizer_type, weights, grads, options):
    experts = [nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_type(experts, lr=0.05, **options)
    for grad in grads:
        for expert, expert_grad in zip(experts, grad):
            expert.grad = expert_grad.clone()
        optimizer.step()
    return torch.stack([e.detach() for e in experts]), [optimizer.state[e] for e in experts]


def _relative(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name, optimizer_type, shape, options", CASES, ids=[c[0] for c in CASES])
def test_a_stacked_parameter_steps_like_separate_matrices(name, optimizer_type, shape, options):
    weights = torch.randn((EXPERTS, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = _grads(shape, seed=1)
    stacked, stacked_state = _run_stacked(optimizer_type, weights, grads, options)
    separate, separate_states = _run_separate(optimizer_type, weights, grads, options)
    assert _relative(stacked, separate) < 1e-12
    momentum = torch.stack([s["momentum"] for s in separate_states])
    assert stacked_state["momentum"].shape == momentum.shape  # (E, m, n): the batch shape in front
    assert _relative(stacked_state["momentum"], momentum) < 1e-12
    if optimizer_type is ASGO:
        for group, gram in enumerate(stacked_state["gram"]):
            expected = torch.cat([s["gram"][group] for s in separate_states])
            assert _relative(gram, expected) < 1e-12
        assert torch.equal(stacked_state["skipped"], torch.stack([s["skipped"] for s in separate_states]))


def test_a_nonfinite_expert_is_skipped_alone():
    weights = torch.randn(EXPERTS, 6, 9, dtype=torch.float64)
    stacked = nn.Parameter(weights.clone())
    optimizer = ASGO([stacked], lr=0.05, batch_dims=1)
    grad = torch.randn(EXPERTS, 6, 9, dtype=torch.float64)
    grad[1, 2, 3] = float("nan")
    stacked.grad = grad
    optimizer.step()
    assert torch.equal(stacked.detach()[1], weights[1])
    assert not torch.equal(stacked.detach()[0], weights[0])
    assert optimizer.state[stacked]["skipped"].tolist() == [0, 1, 0]


def test_stacks_of_the_same_matrix_shape_share_one_bucket():
    """Two expert stacks (3 and 2 experts) and a plain matrix of the same (6, 9) shape in the
    same group: the stacks form one bucket of five matrices (one batched root)."""
    layer_a = nn.Parameter(torch.randn(3, 6, 9))
    layer_b = nn.Parameter(torch.randn(2, 6, 9))
    plain = nn.Parameter(torch.randn(6, 9))
    optimizer = ASGO([{"params": [layer_a, layer_b], "batch_dims": 1}, {"params": [plain]}])
    for param in (layer_a, layer_b, plain):
        param.grad = torch.randn_like(param)
    buckets = optimizer.plan_buckets()
    assert [(b.params, b.matrix_counts) for b in buckets] == [((layer_a, layer_b), (3, 2)), ((plain,), (1,))]


def test_batch_dims_two_flattens_layers_and_experts():
    weights = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    grads = [torch.randn(2, 3, 5, 7, dtype=torch.float64) for _ in range(3)]
    two = nn.Parameter(weights.clone())
    one = nn.Parameter(weights.reshape(6, 5, 7).clone())
    opt_two, opt_one = ASGO([two], batch_dims=2), ASGO([one], batch_dims=1)
    for grad in grads:
        two.grad, one.grad = grad.clone(), grad.reshape(6, 5, 7).clone()
        opt_two.step()
        opt_one.step()
    assert _relative(two.detach().reshape(6, 5, 7), one.detach()) < 1e-12
    assert opt_two.state[two]["skipped"].shape == (2, 3)


@pytest.mark.parametrize("value", [-1, 2, True, 1.0, "1"])
def test_bad_batch_dims_are_refused_at_construction(value):
    with pytest.raises(ValueError, match="batch_dims"):
        ASGO([nn.Parameter(torch.randn(3, 4, 5))], batch_dims=value)


def test_batch_dims_leaving_no_matrix_names_the_parameter():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*batch_dims"):
        ASGO([nn.Parameter(torch.randn(3, 4, 5)), nn.Parameter(torch.randn(4, 5))], batch_dims=1)


def test_state_dict_round_trip_with_batch_dims_resumes_bitwise():
    def run(reload_at=None):
        torch.manual_seed(0)
        stacked = nn.Parameter(torch.randn(EXPERTS, 6, 9))
        optimizer = ASGO([stacked], batch_dims=1, precondition_frequency=2)
        for step in range(5):
            if step == reload_at:
                saved = optimizer.state_dict()
                optimizer = ASGO([stacked], batch_dims=1, precondition_frequency=2)
                optimizer.load_state_dict(saved)
            stacked.grad = torch.randn_like(stacked)
            optimizer.step()
        return stacked.detach()

    assert torch.equal(run(), run(reload_at=3))


def test_a_state_dict_saved_before_batch_dims_takes_the_groups_value():
    """A file from before the option existed has no "batch_dims" in its groups: the loading
    group's own value (here 1, not the constructor's 0) stays, and the run resumes bitwise."""
    def run(reload_at=None):
        torch.manual_seed(0)
        stacked = nn.Parameter(torch.randn(EXPERTS, 6, 9))
        optimizer = ASGO([{"params": [stacked], "batch_dims": 1}])
        for step in range(4):
            if step == reload_at:
                saved = optimizer.state_dict()
                del saved["param_groups"][0]["batch_dims"]
                optimizer = ASGO([{"params": [stacked], "batch_dims": 1}])
                optimizer.load_state_dict(saved)
                assert optimizer.param_groups[0]["batch_dims"] == 1
            stacked.grad = torch.randn_like(stacked)
            optimizer.step()
        return stacked.detach()

    assert torch.equal(run(), run(reload_at=2))


class _MixtureOfExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts_up = nn.Parameter(torch.randn(4, 16, 8))
        self.experts_down = nn.Parameter(torch.randn(4, 8, 16))
        self.conv = nn.Conv1d(8, 8, 3)


def test_asgo_param_groups_marks_stacked_parameters_by_name_pattern():
    model = _MixtureOfExperts()
    groups = asgo_param_groups(model, stacked={"experts_*": 1})
    by_param = {id(p): group for group in groups for p in group["params"]}
    assert by_param[id(model.experts_up)]["batch_dims"] == 1
    assert by_param[id(model.experts_down)]["batch_dims"] == 1
    assert by_param[id(model.conv.weight)].get("batch_dims", 0) == 0  # a 3-D conv kernel stays a matrix
    assert by_param[id(model.router.weight)].get("batch_dims", 0) == 0
    ASGO(groups)  # every group is valid


def test_asgo_param_groups_leaves_3d_kernels_unbatched_by_default():
    model = _MixtureOfExperts()
    groups = asgo_param_groups(model)
    assert all(group.get("batch_dims", 0) == 0 for group in groups)
