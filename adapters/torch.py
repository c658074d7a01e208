"""ASGO and DASGO as torch.optim optimizers.

    from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups
    opt = ASGO(model.parameters(), lr=1e-2)          # <2-D parameters → built-in AdamW
    opt = ASGO(asgo_param_groups(model), lr=1e-2)    # embeddings and tied heads → AdamW too

Parameters with two or more dims are matrices (N-D kernels are viewed as (out, rest)).
Matrices with the same group, algorithm, shape, dtype, device and step count form a
`Bucket`: each step stacks a bucket's gradients and state, runs `asgo_core.step` once on the
stack and writes the results back. State stays per parameter in `self.state`, so
`state_dict()` / `load_state_dict()` work with plain torch.save / torch.load.

Matrix state keys: "step" (a Python int, so choosing a root-refresh step reads no device
value), "momentum" ((m, n), float32 or wider), ASGO: "gram" and "root" (one
(blocks, size, size) tensor per block group of `asgo_core.layout`), "skipped" (steps skipped
for a non-finite gradient) and "fallbacks" (root solves that needed each
`asgo_core.FALLBACK_LEVELS` entry); DASGO: "second_moment" ((n,)) instead of gram/root.
AdamW parameters carry torch.optim.AdamW's own state ("step", "exp_avg", "exp_avg_sq").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_functional

from asgo_core import (ASGOConfig, ASGOState, DASGOConfig, DASGOState, block_layout, init_state,
                       matrix_view_shape, needs_root_refresh)
from asgo_core import step_terms
from asgo_core.config import check_non_negative, fail
from asgo_core.options import check_group_options, group_config
from asgo_core.checkpoint import (CheckpointError, check_entry_matches, entries_in_order,
                                  stacked_state_entries, stacked_state_from_entries)

__all__ = ["ASGO", "DASGO", "Bucket", "asgo_param_groups"]

def _check_lr(name: str, lr) -> None:
    """A learning rate: a number, or a one-element floating-point tensor (for schedulers)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            fail(name, lr, "a float or a one-element floating-point tensor")
        lr = float(lr)  # construction time: reading the value is fine here
    check_non_negative(name, lr)


def _algorithm_of(param: torch.Tensor, group: dict, matrix_algorithm: str) -> str:
    if group["algorithm"] is not None:
        return group["algorithm"]
    return matrix_algorithm if param.ndim >= 2 else "adamw"


@dataclass(frozen=True, eq=False)
class Bucket:
    """Matrices stepped as one batch: same group, algorithm, shape, dtype, device and step
    count. Buckets are independent units of work in a fixed order (the order of first
    appearance in the param groups), so a distributed version can assign them to ranks."""
    group_index: int
    algorithm: str
    params: tuple

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_view_shape(self.params[0].shape)

    @property
    def cost(self) -> int:
        """Rough flops of one step (Gram + apply), for balancing buckets across ranks."""
        m, n = self.matrix_shape
        return len(self.params) * 4 * min(m, n) ** 2 * max(m, n)


class _MatrixOptimizer(torch.optim.Optimizer):
    """Shared machinery of ASGO and DASGO; subclasses set the matrix algorithm and defaults."""

    matrix_algorithm: str

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict) -> None:
        check_group_options(group, check_lr=_check_lr)
        for param in group["params"]:
            self._validate_param(param, group)

    def _validate_param(self, param: torch.Tensor, group: dict) -> None:
        if torch.is_complex(param):
            raise ValueError(f"complex parameters are not supported by {type(self).__name__}")
        algorithm = _algorithm_of(param, group, self.matrix_algorithm)
        if algorithm == "adamw":
            return
        if param.ndim < 2:
            fail("algorithm", algorithm, f"'adamw' or None for a parameter of shape {tuple(param.shape)} "
                  "(ASGO/DASGO need at least 2 dims)")
        config = group_config(group, algorithm)  # raises ValueError naming the bad field
        if algorithm == "asgo":
            block_layout(matrix_view_shape(param.shape), config)  # e.g. num_heads must divide k

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; closure (optional) re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            self._adamw_step(group)
        for bucket in self.plan_buckets():
            self._bucket_step(bucket)
        return loss

    def plan_buckets(self) -> list[Bucket]:
        """This step's buckets: every matrix with a gradient, grouped (see Bucket)."""
        buckets: dict[tuple, list] = {}
        for group_index, group in enumerate(self.param_groups):
            for param in _params_with_grad(group):
                algorithm = _algorithm_of(param, group, self.matrix_algorithm)
                if algorithm == "adamw":
                    continue
                key = (group_index, algorithm, tuple(param.shape), param.dtype, param.device,
                       self.state[param].get("step", 0))
                buckets.setdefault(key, []).append(param)
        return [Bucket(key[0], key[1], tuple(params)) for key, params in buckets.items()]

    def _bucket_step(self, bucket: Bucket) -> None:
        group = self.param_groups[bucket.group_index]
        config = group_config(group, bucket.algorithm)
        params = bucket.params
        m, n = bucket.matrix_shape
        grads = torch.stack([p.grad for p in params]).view(len(params), m, n)
        if group["maximize"]:
            grads = -grads
        states = [self.state[p] for p in params]
        step_count = states[0].get("step", 0)
        core_state = init_state(grads, config) if step_count == 0 else _stack_state(states, step_count)
        refresh = bucket.algorithm == "asgo" and needs_root_refresh(step_count, config)
        direction, scale, new_state = step_terms(grads, core_state, config, refresh_root=refresh,
                                                 overwrite_state=True)
        _unstack_state(states, new_state, step_count + 1)
        _write_update(params, direction, scale, group["lr"], config.weight_decay)

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in _params_with_grad(group)
                  if _algorithm_of(p, group, self.matrix_algorithm) == "adamw"]
        if not params:
            return
        states = [self._adamw_state(p) for p in params]
        beta1, beta2 = group["adamw_betas"]
        lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
        adamw_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["adamw_weight_decay"],
            eps=group["adamw_eps"], maximize=group["maximize"])

    def _adamw_state(self, param: torch.Tensor) -> dict:
        """torch.optim.AdamW's state layout, so its arithmetic is reproduced bit for bit."""
        state = self.state[param]
        if not state:
            state.update(_fresh_adamw_state(param))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, but tensors keep their dtype (float32 statistics of
        bf16 parameters, integer counters); they move to the parameter's device."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[param] = _to_device(saved_state[saved_id], param.device)

    # ---- portable checkpoints (asgo_core.checkpoint) ----------------------------------------
    def portable_state(self, names=None) -> dict:
        """This optimizer's state in the framework-neutral format of asgo_core.checkpoint.

        names: one string per parameter, in param-group order (e.g. the names of
        model.named_parameters()); None names them "<group>.<index>"."""
        entries = []
        for (param, group), name in zip(self._params_and_groups(), self._entry_names(names)):
            algorithm, config = self._portable_identity(param, group)
            state = self.state[param]
            if algorithm == "adamw":
                state = state or _fresh_adamw_state(param)
                step = int(state["step"])
                arrays = {key: state[key].detach().cpu().numpy() for key in ("exp_avg", "exp_avg_sq")}
            else:
                step = state.get("step", 0)
                core_state = _stack_state([state], step) if step else self._fresh_core_state(param, group, algorithm)
                arrays = stacked_state_entries(core_state, [1], lambda t: t.detach().cpu().numpy())[0]
            entries.append({"name": name, "algorithm": algorithm, "shape": list(param.shape),
                            "step": step, "config": config, "arrays": arrays})
        return {"format": "asgo-portable-state", "version": 1, "params": entries}

    def load_portable_state(self, portable: dict, names=None) -> None:
        """Resume from a portable state (asgo_core.load_state(path) or any adapter's export).
        Every entry is checked (algorithm, shape, math-changing options, array shapes) before
        anything changes; a mismatch raises asgo_core.CheckpointError. Statistics keep this
        optimizer's dtype and device. names: as in portable_state."""
        pairs = self._params_and_groups()
        entries = entries_in_order(portable, self._entry_names(names))
        for (param, group), entry in zip(pairs, entries):
            algorithm, config = self._portable_identity(param, group)
            check_entry_matches(entry, name=entry["name"], algorithm=algorithm, shape=param.shape, config=config)
        new_states = [self._state_from_entry(param, group, entry) for (param, group), entry in zip(pairs, entries)]
        for (param, _), state in zip(pairs, new_states):
            self.state[param] = state

    def _params_and_groups(self) -> list:
        return [(param, group) for group in self.param_groups for param in group["params"]]

    def _entry_names(self, names) -> list:
        default = [f"{g}.{i}" for g, group in enumerate(self.param_groups) for i in range(len(group["params"]))]
        if names is None:
            return default
        names = [str(name) for name in names]
        if len(names) != len(default):
            fail("names", f"{len(names)} names", f"one per parameter ({len(default)})")
        return names

    def _portable_identity(self, param, group) -> tuple:
        """(algorithm, the options a checkpoint must share); lr is left out: schedules change it."""
        algorithm = _algorithm_of(param, group, self.matrix_algorithm)
        if algorithm == "adamw":
            return algorithm, {"betas": list(group["adamw_betas"]), "eps": group["adamw_eps"],
                               "weight_decay": group["adamw_weight_decay"]}
        return algorithm, dataclasses.asdict(group_config(group, algorithm))

    def _fresh_core_state(self, param, group, algorithm):
        m, n = matrix_view_shape(param.shape)
        return init_state(param.detach().reshape(1, m, n), group_config(group, algorithm))

    def _state_from_entry(self, param, group, entry) -> dict:
        if entry["algorithm"] == "adamw":
            template = self.state[param] or _fresh_adamw_state(param)
            state = {key: _tensor_like(entry, key, template[key]) for key in ("exp_avg", "exp_avg_sq")}
            state["step"] = torch.tensor(float(entry["step"]), dtype=template["step"].dtype)
            return state
        template = self._fresh_core_state(param, group, entry["algorithm"])
        core_state = stacked_state_from_entries(template, [entry], [1], _tensor_from_numpy)
        state: dict = {}
        _unstack_state([state], core_state, int(entry["step"]))
        return state


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _fresh_adamw_state(param: torch.Tensor) -> dict:
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return {"step": torch.tensor(0.0, dtype=scalar_dtype),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def _tensor_from_numpy(array, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(array).to(dtype=like.dtype, device=like.device).clone()


def evaluate_closure(closure):
    """closure() with gradients enabled (step runs under no_grad), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _tensor_like(entry: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    array = entry["arrays"][key]
    if tuple(array.shape) != tuple(like.shape):
        raise CheckpointError(f"checkpoint parameter {entry['name']!r}: {key} has shape "
                              f"{tuple(array.shape)}, expected {tuple(like.shape)}")
    return _tensor_from_numpy(array, like)


def _write_update(params, direction, scale, lr, weight_decay: float) -> None:
    """W ← W·(1 − lr·weight_decay) − lr·scale·D for each matrix: two passes over W, no
    update-sized temporary. A skipped matrix (scale 0) is neither moved nor decayed. The
    factors are in the statistics dtype (float64 for float64 params); a tensor lr (e.g. a
    scheduler's) works as a float does."""
    scale = scale.view(-1)
    if weight_decay != 0.0:
        factors = 1.0 - (lr * weight_decay) * (scale != 0).to(scale.dtype)
        torch._foreach_mul_(list(params), list(factors.unbind(0)))
    shaped = direction.view(len(params), *params[0].shape)
    torch._foreach_addcmul_(list(params), list(shaped.unbind(0)), list((scale * -lr).unbind(0)))


def _params_with_grad(group: dict):
    for param in group["params"]:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("ASGO/DASGO do not support sparse gradients "
                               "(e.g. nn.Embedding(sparse=True)); use dense gradients")
        if torch.is_complex(grad):
            raise RuntimeError("ASGO/DASGO do not support complex gradients")
        yield param


def _stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without a copy when the tensors are still last step's unbound views."""
    base = _reassembled_base(tensors, (len(tensors), *tensors[0].shape))
    return torch.stack(tensors) if base is None else base


def _concat_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, without a copy when the tensors are still last step's split views."""
    total = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    base = _reassembled_base(tensors, total)
    return torch.cat(tensors) if base is None else base


def _reassembled_base(tensors: list[torch.Tensor], shape: tuple) -> torch.Tensor | None:
    """The contiguous tensor of this shape whose in-order, back-to-back slices the tensors are
    (what _unstack_state left last step), or None."""
    base = tensors[0]._base
    if base is None or not base.is_contiguous() or base.shape != shape:
        return None
    offset = base.storage_offset()
    for tensor in tensors:
        if tensor._base is not base or not tensor.is_contiguous() or tensor.storage_offset() != offset:
            return None
        offset += tensor.numel()
    return base


def _stack_state(states: list[dict], step_count: int):
    """Per-parameter state → the core's state for the stacked bucket."""
    stack = lambda key: _stack_tensors([s[key] for s in states])  # noqa: E731
    count = torch.tensor(step_count, dtype=torch.int32)
    if "second_moment" in states[0]:
        return DASGOState(stack("momentum"), stack("second_moment"), count, stack("skipped"))
    concat_groups = lambda key: tuple(_concat_tensors(list(parts)) for parts in zip(*(s[key] for s in states)))  # noqa: E731
    return ASGOState(stack("momentum"), concat_groups("gram"), concat_groups("root"), count,
                     stack("skipped"), stack("fallbacks"))


def _unstack_state(states: list[dict], core_state, step_count: int) -> None:
    """Write the core's stacked state back per parameter (views into the stacked tensors)."""
    bucket_size = len(states)
    per_param = {key: value.unbind(0) for key, value in core_state._asdict().items()
                 if key not in ("count", "gram", "root")}
    if isinstance(core_state, ASGOState):
        for key in ("gram", "root"):
            per_param[key] = list(zip(*(blocks.split(blocks.shape[0] // bucket_size)
                                        for blocks in getattr(core_state, key))))
    for index, state in enumerate(states):
        state["step"] = step_count
        for key, values in per_param.items():
            state[key] = list(values[index]) if key in ("gram", "root") else values[index]


class ASGO(_MatrixOptimizer):
    """ASGO (one-sided Shampoo) for matrices, built-in AdamW for everything else.

    Update of a matrix W: W ← W − lr·(U + weight_decay·W), U the RMS-normalised
    preconditioned momentum; the options mean what they mean in asgo_core.ASGOConfig (same
    names, same defaults; betas = (beta1, beta2)). Parameters with fewer than 2 dims — and any
    group with algorithm="adamw" — take a step identical to torch.optim.AdamW with the adamw_*
    options (adamw_lr=None: the group's lr). A group may set algorithm="asgo" | "dasgo" |
    "adamw". maximize negates every gradient.
    """

    matrix_algorithm = "asgo"

    def __init__(self, params, lr=1e-2, betas=(ASGOConfig.beta1, ASGOConfig.beta2), *,
                 eps=ASGOConfig.eps, weight_decay=ASGOConfig.weight_decay,
                 precondition_frequency=ASGOConfig.precondition_frequency,
                 update_rms=ASGOConfig.update_rms, root_method=ASGOConfig.root_method,
                 root_steps=ASGOConfig.root_steps, side=ASGOConfig.side,
                 max_precond_dim=ASGOConfig.max_precond_dim, num_heads=ASGOConfig.num_heads,
                 accumulate=ASGOConfig.accumulate, damping=ASGOConfig.damping,
                 root_tolerance=ASGOConfig.root_tolerance,
                 residual_tolerance=ASGOConfig.residual_tolerance, nonfinite=ASGOConfig.nonfinite,
                 matmul_dtype=ASGOConfig.matmul_dtype,
                 adamw_lr=None, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.0,
                 maximize=False, algorithm=None):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, update_rms=update_rms,
            root_method=root_method, root_steps=root_steps, side=side,
            max_precond_dim=max_precond_dim, num_heads=num_heads, accumulate=accumulate,
            damping=damping, root_tolerance=root_tolerance, residual_tolerance=residual_tolerance,
            nonfinite=nonfinite, matmul_dtype=matmul_dtype, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
            adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, maximize=maximize,
            algorithm=algorithm)
        super().__init__(params, defaults)


class DASGO(_MatrixOptimizer):
    """DASGO, the diagonal variant (asgo_core.DASGOConfig), with the same AdamW routing as ASGO."""

    matrix_algorithm = "dasgo"

    def __init__(self, params, lr=1e-2, betas=(DASGOConfig.beta1, DASGOConfig.beta2), *,
                 eps=DASGOConfig.eps, weight_decay=DASGOConfig.weight_decay,
                 update_rms=DASGOConfig.update_rms, accumulate=DASGOConfig.accumulate,
                 nonfinite=DASGOConfig.nonfinite, adamw_lr=None, adamw_betas=(0.9, 0.95),
                 adamw_eps=1e-8, adamw_weight_decay=0.0, maximize=False, algorithm=None):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_rms=update_rms,
            accumulate=accumulate, nonfinite=nonfinite, adamw_lr=adamw_lr,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay,
            maximize=maximize, algorithm=algorithm)
        super().__init__(params, defaults)


def asgo_param_groups(model: nn.Module, *, num_heads: int | None = None,
                      qk_names=("q_proj", "k_proj", "query", "key", "wq", "wk"), **overrides):
    """Param groups in the reference training recipe's split.

    AdamW: parameters with fewer than 2 dims and nn.Embedding weights (an output head tied to
    an embedding is the same parameter, so it follows). With num_heads, the weights of modules
    named in qk_names (the last component of the module path) get head-wise preconditioning
    (SPEC §4); a fused nn.MultiheadAttention in_proj_weight gets 3·num_heads blocks (its Q, K
    and V heads). overrides (lr, weight_decay, ...) are set on every group.
    """
    embedding_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    matrices, heads, fused_heads, others = [], [], [], []
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if param.ndim < 2 or id(param) in embedding_ids:
            others.append(param)
        elif num_heads and name.endswith("in_proj_weight"):
            fused_heads.append(param)
        elif num_heads and module_name in qk_names and name.endswith("weight"):
            heads.append(param)
        else:
            matrices.append(param)
    groups = [{"params": matrices}, {"params": heads, "num_heads": num_heads},
              {"params": fused_heads, "num_heads": 3 * num_heads if num_heads else None},
              {"params": others, "algorithm": "adamw"}]
    return [{**group, **overrides} for group in groups if group["params"]]
