"""The PyTorch adapter: parity with the NumPy core, torch.optim contracts, training, compile."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from asgo_core import ASGOConfig, DASGOConfig, init_state, step
from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups
from helpers.numerics import relative_error, tolerance
from helpers.processes import TESTS, env_importing

LR = 0.05


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one thread avoids OpenMP barrier stalls on a busy machine
    (a ~50× slowdown of the small matmuls measured with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))]

# name → shape: two same-shaped matrices (one bucket), a tall one (right side), a conv kernel
PARITY_SHAPES = {"a": (6, 10), "b": (6, 10), "tall": (12, 6), "conv": (4, 3, 2, 2)}


def numpy_params(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in PARITY_SHAPES.items()}


def numpy_grads(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape) for name, shape in PARITY_SHAPES.items()}
            for _ in range(steps)]


def run_core_numpy(params, grads, config):
    """Each matrix stepped on its own by the NumPy core: W ← W − lr·update."""
    results = {}
    for name, W0 in params.items():
        W = W0.reshape(W0.shape[0], -1)
        state = init_state(W, config)
        for G in grads:
            update, state = step(G[name].reshape(W.shape), state, W, config)
            W = W - LR * update
        results[name] = (W.reshape(W0.shape), state)
    return results


def run_adapter(optimizer_type, params, grads, device="cpu", **options):
    tensors = {name: nn.Parameter(torch.tensor(W, device=device)) for name, W in params.items()}
    optimizer = optimizer_type(tensors.values(), lr=LR, **options)
    for G in grads:
        for name, p in tensors.items():
            p.grad = torch.tensor(G[name], device=device)
        optimizer.step()
    return tensors, optimizer


ASGO_OPTIONS = [
    {},
    {"side": "left"},
    {"side": "right", "precondition_frequency": 3},
    {"precondition_frequency": 3, "update_rms": None},
    {"accumulate": "sum", "betas": (0.9, 1.0)},
    {"max_precond_dim": 4},
    {"num_heads": 2},
    {"weight_decay": 0.0, "root_method": "polar_express"},
]


def _config_from(options, config_type):
    options = dict(options)
    beta1, beta2 = options.pop("betas", (config_type.beta1, config_type.beta2))
    return config_type(beta1=beta1, beta2=beta2, **options)


def _assert_close(actual: torch.Tensor, expected) -> None:
    assert relative_error(actual.detach().cpu().numpy(), expected) < tolerance("float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", ASGO_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_asgo_matches_the_numpy_core_over_ten_float64_steps(options, device):
    params, grads = numpy_params(), numpy_grads(10)
    expected = run_core_numpy(params, grads, _config_from(options, ASGOConfig))
    tensors, optimizer = run_adapter(ASGO, params, grads, device, **options)
    for name, p in tensors.items():
        W, state = expected[name]
        _assert_close(p, W)
        _assert_close(optimizer.state[p]["momentum"], state.momentum)
        for actual, wanted in zip(optimizer.state[p]["gram"], state.gram, strict=True):
            _assert_close(actual, wanted)
        for actual, wanted in zip(optimizer.state[p]["root"], state.root, strict=True):
            _assert_close(actual, wanted)
        assert optimizer.state[p]["step"] == 10


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.0, "update_rms": None},
                                     {"accumulate": "sum", "betas": (0.5, 1.0)}])
def test_dasgo_matches_the_numpy_core_over_ten_float64_steps(options):
    params, grads = numpy_params(), numpy_grads(10)
    expected = run_core_numpy(params, grads, _config_from(options, DASGOConfig))
    tensors, optimizer = run_adapter(DASGO, params, grads, **options)
    for name, p in tensors.items():
        W, state = expected[name]
        _assert_close(p, W)
        _assert_close(optimizer.state[p]["second_moment"], state.second_moment)


def test_maximize_is_a_step_on_the_negated_gradient():
    params, grads = numpy_params(), numpy_grads(3)
    negated = [{name: -G for name, G in step_grads.items()} for step_grads in grads]
    expected = run_core_numpy(params, negated, ASGOConfig())
    tensors, _ = run_adapter(ASGO, params, grads, maximize=True)
    for name, p in tensors.items():
        _assert_close(p, expected[name][0])


# ---------------------------------------------------------------- AdamW route

def _vector_params(seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, 5))]


def _run_steps(params, optimizer, steps=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("adamw_lr, maximize", [(None, False), (3e-3, False), (None, True)])
def test_adamw_route_equals_torch_adamw_bit_for_bit(adamw_lr, maximize):
    ours, theirs = _vector_params(), _vector_params()
    options = dict(adamw_betas=(0.8, 0.9), adamw_eps=1e-7, adamw_weight_decay=0.05)
    optimizer = ASGO([{"params": ours[:2]}, {"params": ours[2:], "algorithm": "adamw"}],
                     lr=1e-2, adamw_lr=adamw_lr, maximize=maximize, **options)
    reference = torch.optim.AdamW(theirs, lr=adamw_lr or 1e-2, betas=(0.8, 0.9), eps=1e-7,
                                  weight_decay=0.05, maximize=maximize)
    _run_steps(ours, optimizer)
    _run_steps(theirs, reference)
    for mine, expected in zip(ours, theirs):
        assert torch.equal(mine, expected)
        assert torch.equal(optimizer.state[mine]["exp_avg_sq"], reference.state[expected]["exp_avg_sq"])


def test_asgo_param_groups_route_embeddings_tied_heads_and_qk_weights():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 4)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = LM()
    groups = asgo_param_groups(model, num_heads=4, lr=0.02)
    by_param = {id(p): group for group in groups for p in group["params"]}
    assert by_param[id(model.embed.weight)]["algorithm"] == "adamw"
    assert by_param[id(model.q_proj.bias)]["algorithm"] == "adamw"
    assert by_param[id(model.q_proj.weight)]["num_heads"] == 4
    assert by_param[id(model.k_proj.weight)]["num_heads"] == 4
    assert by_param[id(model.attn.in_proj_weight)]["num_heads"] == 12
    assert "num_heads" not in by_param[id(model.v_proj.weight)]
    assert all(group["lr"] == 0.02 for group in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    ASGO(groups)  # the groups are valid ASGO groups


# ---------------------------------------------------------------- training

def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


def _train(model, optimizer, inputs, targets, steps, loss_fn=nn.functional.cross_entropy):
    losses = []
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss
        losses.append(optimizer.step(closure).item())
    return losses


@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_small_conv_net_trains(optimizer_type):
    torch.manual_seed(0)
    inputs = torch.randn(64, 1, 8, 8)
    targets = (inputs[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (inputs[:, 0, 4:].mean((1, 2)) > 0).long()
    model = _conv_net()
    losses = _train(model, optimizer_type(model.parameters(), lr=2e-2), inputs, targets, 60)
    assert losses[-1] < 0.5 * losses[0]


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d_model=32, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layer = nn.TransformerEncoderLayer(d_model, heads, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens))).flatten(0, 1)


def test_small_transformer_trains_with_head_wise_groups():
    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (32, 8))
    targets = tokens.flip(1).flatten()  # reverse the sequence: needs attention
    model = TinyTransformer()
    optimizer = ASGO(asgo_param_groups(model, num_heads=4), lr=1e-2, precondition_frequency=2)
    losses = _train(model, optimizer, tokens, targets, 80)
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- state_dict / resume

def _resume_setup(precondition_frequency=2):
    torch.manual_seed(0)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    model = _conv_net()
    optimizer = ASGO(model.parameters(), lr=1e-2, precondition_frequency=precondition_frequency)
    _train(model, optimizer, inputs, targets, 3)
    return model, optimizer, inputs, targets


def test_state_dict_round_trip_resumes_bitwise():
    model, optimizer, inputs, targets = _resume_setup()
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, inputs, targets, 3)

    resumed = _conv_net()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = ASGO(resumed.parameters(), lr=1.0, precondition_frequency=7)
    resumed_optimizer.load_state_dict(saved_optimizer)  # hyperparameters come from the save
    _train(resumed, resumed_optimizer, inputs, targets, 3)
    for expected, actual in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)


def test_resume_through_torch_save_in_a_fresh_process(tmp_path):
    model, optimizer, inputs, targets = _resume_setup()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "inputs": inputs, "targets": targets}, tmp_path / "checkpoint.pt")
    _train(model, optimizer, inputs, targets, 3)
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)  # as in this process: the thread count changes summation order
        from test_torch_adapter import _conv_net, _train
        from asgo_core.adapters.torch import ASGO
        checkpoint = torch.load({str(tmp_path / 'checkpoint.pt')!r})
        model = _conv_net(); model.load_state_dict(checkpoint["model"])
        optimizer = ASGO(model.parameters()); optimizer.load_state_dict(checkpoint["optimizer"])
        _train(model, optimizer, checkpoint["inputs"], checkpoint["targets"], 3)
        torch.save(model.state_dict(), {str(tmp_path / 'resumed.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env_importing(TESTS))
    resumed = torch.load(tmp_path / "resumed.pt")
    for name, expected in model.state_dict().items():
        assert torch.equal(expected, resumed[name]), name


def test_state_does_not_grow():
    model, optimizer, inputs, targets = _resume_setup(precondition_frequency=1)

    def state_bytes():
        storages = {}
        for state in optimizer.state.values():
            for value in state.values():
                for tensor in value if isinstance(value, list) else [value]:
                    if isinstance(tensor, torch.Tensor):
                        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(storages.values())

    before = state_bytes()
    _train(model, optimizer, inputs, targets, 30)
    assert state_bytes() == before


# ---------------------------------------------------------------- learning rate

def _first_step_delta(optimizer_factory, with_scheduler):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    before = p.detach().clone()
    optimizer = optimizer_factory([p])
    if with_scheduler:
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.25)
    p.grad = torch.randn(6, 10, dtype=torch.float64)
    optimizer.step()
    return p.detach() - before


def test_a_scheduler_changes_the_step():
    full = _first_step_delta(lambda ps: ASGO(ps, lr=0.1), with_scheduler=False)
    scheduled = _first_step_delta(lambda ps: ASGO(ps, lr=0.1), with_scheduler=True)
    # The write W·(1 − lr·λ) − lr·U rounds once at the scale of W (|W| ~ 1, eps 2.2e-16), so
    # deltas near zero need an absolute tolerance of that size; a lost factor 0.25 would be ~1e-2.
    torch.testing.assert_close(scheduled, 0.25 * full, rtol=1e-12, atol=1e-14)


def test_tensor_lr_gives_the_float_lr_step():
    as_float = _first_step_delta(lambda ps: ASGO(ps, lr=0.1), with_scheduler=False)
    as_tensor = _first_step_delta(lambda ps: ASGO(ps, lr=torch.tensor(0.1, dtype=torch.float64)), False)
    torch.testing.assert_close(as_tensor, as_float, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- GradScaler

def _scaled_step(model, optimizer, inputs, targets, scaler):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(inputs), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_grad_scaler_steps_on_unscaled_grads_and_skips_infs():
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    plain, scaled = _conv_net(), _conv_net()
    scaled.load_state_dict(plain.state_dict())
    plain_optimizer, scaled_optimizer = ASGO(plain.parameters()), ASGO(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _train(plain, plain_optimizer, inputs, targets, 2)
    for _ in range(2):
        _scaled_step(scaled, scaled_optimizer, inputs, targets, scaler)
    for expected, actual in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(expected, actual)  # power-of-two scaling is exact

    before = [p.detach().clone() for p in scaled.parameters()]
    _scaled_step(scaled, scaled_optimizer, inputs * math.inf, targets, scaler)
    assert scaler.get_scale() == 2.0**7
    assert all(torch.equal(b, p) for b, p in zip(before, scaled.parameters()))
    assert scaled_optimizer.state[scaled[0].weight]["step"] == 2


# ---------------------------------------------------------------- validation

BAD_ARGUMENTS = [
    ("lr", {"lr": -1.0}), ("lr", {"lr": math.nan}), ("betas", {"betas": (1.0, 0.5)}),
    ("betas", {"betas": (0.9,)}), ("eps", {"eps": -1e-3}), ("weight_decay", {"weight_decay": -0.1}),
    ("precondition_frequency", {"precondition_frequency": 0}), ("update_rms", {"update_rms": 0.0}),
    ("root_method", {"root_method": "svd"}), ("root_steps", {"root_steps": 0}),
    ("side", {"side": "top"}), ("max_precond_dim", {"max_precond_dim": 0}),
    ("num_heads", {"num_heads": 4}), ("accumulate", {"accumulate": "mean"}),
    ("damping", {"damping": "scaled"}), ("nonfinite", {"nonfinite": "ignore"}),
    ("residual_tolerance", {"residual_tolerance": 0.0}),
    ("adamw_lr", {"adamw_lr": -1.0}), ("adamw_betas", {"adamw_betas": (0.9, 1.0)}),
    ("adamw_eps", {"adamw_eps": -1.0}), ("adamw_weight_decay", {"adamw_weight_decay": math.inf}),
    ("maximize", {"maximize": "yes"}), ("algorithm", {"algorithm": "sgd"}),
]


@pytest.mark.parametrize("name, options", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise_naming_the_argument(name, options):
    params = [nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6))]
    with pytest.raises(ValueError, match=name):
        ASGO(params, **options)


@pytest.mark.parametrize("optimizer_type, config_type", [(ASGO, ASGOConfig), (DASGO, DASGOConfig)])
def test_the_signature_shows_every_config_option_with_the_configs_default(optimizer_type, config_type):
    parameters = inspect.signature(optimizer_type).parameters
    assert parameters["betas"].default == (config_type.beta1, config_type.beta2)
    for field in dataclasses.fields(config_type):
        if field.name not in ("beta1", "beta2"):
            assert parameters[field.name].default == field.default, field.name


@pytest.mark.parametrize("optimizer_type, option", [(ASGO, "learning_rate"), (DASGO, "precondition_frequency")])
def test_an_option_the_optimizer_does_not_have_is_refused_by_name(optimizer_type, option):
    with pytest.raises(TypeError, match=rf"{optimizer_type.__name__}\(\).*'{option}'.*accepted: params, lr"):
        optimizer_type([nn.Parameter(torch.randn(6, 10))], **{option: 1})


def test_bad_param_group_is_rejected_and_not_added():
    optimizer = ASGO([nn.Parameter(torch.randn(6, 10))])
    with pytest.raises(ValueError, match="weight_decay"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "weight_decay": -1})
    with pytest.raises(ValueError, match="algorithm"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4))], "algorithm": "asgo"})
    assert len(optimizer.param_groups) == 1


def test_dasgo_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta"):
        DASGO([nn.Parameter(torch.randn(6, 10))], betas=(0.9, 1.0))


def test_sparse_and_complex_gradients_are_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = ASGO(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    with pytest.raises(ValueError, match="complex"):
        ASGO([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


# ---------------------------------------------------------------- numerics

def test_nan_gradient_skips_that_matrix_only_and_is_counted():
    torch.manual_seed(0)
    bad, good, other = (nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6, 10)),
                        nn.Parameter(torch.randn(10, 6)))
    optimizer = ASGO([bad, good, other])
    before = [p.detach().clone() for p in (bad, good, other)]
    for p in (bad, good, other):
        p.grad = torch.randn(p.shape)
    bad.grad[2, 3] = math.nan
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in (bad, good, other))
    assert torch.equal(bad, before[0])
    assert not torch.equal(good, before[1]) and not torch.equal(other, before[2])
    assert [int(optimizer.state[p]["skipped"]) for p in (bad, good, other)] == [1, 0, 0]
    assert torch.equal(optimizer.state[bad]["momentum"], torch.zeros(6, 10))
    assert all(torch.isfinite(r).all() for p in (bad, good, other) for r in optimizer.state[p]["root"])


@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_a_zero_gradient_matrix_is_decayed_and_a_skipped_one_is_not(optimizer_type):
    """One bucket of three matrices: a zero gradient gives a zero direction and the decoupled
    decay W·(1 − lr·weight_decay) still applies (as torch.optim.AdamW decays a parameter whose
    gradient is zero); a NaN gradient leaves its matrix as it was; a random one moves it."""
    torch.manual_seed(0)
    zero, nan, random = (nn.Parameter(torch.randn(6, 10, dtype=torch.float64)) for _ in range(3))
    before = [p.detach().clone() for p in (zero, nan, random)]
    optimizer = optimizer_type([zero, nan, random], lr=0.05, weight_decay=0.1)
    zero.grad, nan.grad, random.grad = (torch.zeros(6, 10, dtype=torch.float64),
                                        torch.full((6, 10), math.nan, dtype=torch.float64),
                                        torch.randn(6, 10, dtype=torch.float64))
    optimizer.step()
    torch.testing.assert_close(zero.detach(), before[0] * (1 - 0.05 * 0.1), rtol=1e-15, atol=0)
    assert torch.equal(nan.detach(), before[1])
    assert not torch.allclose(random.detach(), before[2] * (1 - 0.05 * 0.1))
    assert [int(optimizer.state[p]["skipped"]) for p in (zero, nan, random)] == [0, 1, 0]


@pytest.mark.parametrize("optimizer_type", [ASGO, DASGO])
def test_bf16_params_keep_their_dtype_with_float32_state(optimizer_type):
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 1, 8, 8, dtype=torch.bfloat16), torch.randint(0, 4, (64,))
    model = _conv_net().to(torch.bfloat16)
    optimizer = optimizer_type(model.parameters(), lr=2e-2)
    losses = _train(model, optimizer, inputs, targets, 30)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = optimizer.state[model[0].weight]
    assert state["momentum"].dtype == torch.float32
    assert losses[-1] < losses[0]
    reloaded = optimizer_type(model.parameters())
    reloaded.load_state_dict(optimizer.state_dict())
    assert reloaded.state[model[0].weight]["momentum"].dtype == torch.float32


def test_params_without_grad_are_skipped():
    used, unused = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6, 10))
    before = unused.detach().clone()
    optimizer = ASGO([used, unused])
    used.grad = torch.randn(6, 10)
    optimizer.step()
    assert torch.equal(unused, before) and len(optimizer.state[unused]) == 0
    assert optimizer.state[used]["step"] == 1


@pytest.fixture
def float64_default():
    """torch.optim's AdamW keeps its step count in the default dtype; compiled, it computes the
    bias correction from that tensor, eagerly in Python floats. float64 keeps both exact."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.usefixtures("float64_default")
def test_torch_compile_matches_eager():
    """float64, so that a real difference is not hidden in float32 roundoff (which ASGO's
    normalised steps amplify to ~1e-4 in four steps)."""
    eager_model, compiled_model, _ = _eager_and_compiled_runs(
        lambda model: ASGO(model.parameters(), precondition_frequency=2), steps=4)
    for expected, actual in zip(eager_model.parameters(), compiled_model.parameters()):
        assert relative_error(actual.detach().numpy(), expected.detach().numpy()) < tolerance("float64")


@pytest.mark.usefixtures("float64_default")
def test_compiled_adamw_route_on_the_capturable_path_matches_eager(monkeypatch):
    """What a compiled step on an accelerator runs (torch's capturable AdamW with device copies
    of the step counts), forced here on the CPU: same values as eager, counts on the CPU."""
    from asgo_core.adapters import torch as torch_adapter
    monkeypatch.setattr(torch_adapter, "_takes_capturable_path",
                        lambda params: torch.compiler.is_compiling() and bool(params))
    eager_model, compiled_model, compiled = _eager_and_compiled_runs(
        lambda model: ASGO([{"params": list(model.parameters()), "algorithm": "adamw"}], lr=1e-2), steps=3)
    for expected, actual in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert all(state["step"].device.type == "cpu" and state["step"].item() == 3
               for state in compiled.state.values())


def _eager_and_compiled_runs(make_optimizer, steps: int):
    """Two copies of a conv net trained side by side, one with the eager step and one with
    torch.compile(step, backend="eager"): (eager model, compiled model, compiled optimizer)."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    eager_model, compiled_model = _conv_net(), _conv_net()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager, compiled = make_optimizer(eager_model), make_optimizer(compiled_model)
    compiled_step = torch.compile(compiled.step, backend="eager")
    for _ in range(steps):
        for model, step_fn in ((eager_model, eager.step), (compiled_model, compiled_step)):
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            step_fn()
    return eager_model, compiled_model, compiled
