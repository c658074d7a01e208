"""ASGO and DASGO as torch.optim optimizers; the math and the plumbing are asgo_core's.

Framework-specific here: the torch.optim.Optimizer subclass with its param groups, closures and
an all-or-nothing step; load_state_dict in torch.optim's hook order; buckets whose state tensors
are reused from step to step (torch.compile) and written with _foreach ops; AdamW through
torch's functional adamw; asgo_param_groups. User guide: docs/torch.md.
"""

from __future__ import annotations

from collections import defaultdict

import array_api_compat.torch as torch_xp
import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_functional

from asgo_core import ASGOState, DASGOState, init_state, matrix_stack_shape, needs_root_refresh, step_terms
from asgo_core.buckets import Bucket, Member, plan_buckets
from asgo_core.checkpoint import (PortableCheckpoint, arrays_from_entry, identity_from_group,
                                  stacked_state_entries, stacked_state_from_entries)
from asgo_core.config import fail
from asgo_core.keyed import nonfinite_keys
from asgo_core.layout import PermutedStack, check_batch_dims_value
from asgo_core.options import (OptionsSignature, adamw_options, algorithm_of, batch_dims_for_path,
                               bound_options, check_group_options, check_learning_rate, check_param_shape,
                               group_config, loaded_groups)
from asgo_core.precision import rounding_seed, rounds_stochastically, stochastic_round
from asgo_core.saved_state import loaded_state
from asgo_core.state_codec import member_states, stacked_state

__all__ = ["ASGO", "DASGO", "asgo_param_groups"]


class _MatrixOptimizer(PortableCheckpoint, OptionsSignature, torch.optim.Optimizer):
    """Shared machinery of ASGO and DASGO; subclasses set the matrix algorithm."""

    matrix_algorithm: str
    positional_options = ("params", "lr", "betas")

    def __init__(self, *args, **kwargs):
        """(params, lr, betas, *, every other option of the algorithm: options_signature())."""
        options = bound_options(self.options_signature(), type(self).__name__, args, kwargs)
        super().__init__(options.pop("params"), options)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def algorithm_of(self, param: torch.Tensor, group: dict) -> str:
        """"asgo", "dasgo" or "adamw": what steps `param` as a member of `group`."""
        return algorithm_of(param.ndim, group, self.matrix_algorithm)

    def _validate_group(self, group: dict, group_index: int) -> None:
        """The constructor's checks of one group (options, then every parameter under them);
        load_state_dict runs them on the saved options too."""
        check_group_options(group, check_lr=check_learning_rate)
        check_batch_dims_value(group["batch_dims"])
        for index, param in enumerate(group["params"]):
            try:
                self._validate_param(param, group)
            except ValueError as error:
                raise ValueError(f"{_param_label(group_index, index, param)}: {error}") from None

    def _validate_param(self, param: torch.Tensor, group: dict) -> None:
        if not param.is_floating_point():
            fail("dtype", param.dtype, f"a floating-point dtype ({type(self).__name__} cannot step "
                 "integer, bool or complex parameters)")
        check_param_shape(param.shape, group, self.algorithm_of(param, group))

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; closure (optional) re-evaluates the model and returns the loss.
        All or nothing: gradients are checked first, and with nonfinite="raise" in some group
        every matrix update is computed before anything is written."""
        loss = evaluate_closure(closure)
        self._check_gradients()
        buckets = self.plan_buckets()
        deferred = any(self._bucket_group(bucket)[0]["nonfinite"] == "raise" for bucket in buckets)
        computed = []
        for bucket in buckets:
            computed.append((bucket, self._bucket_terms(bucket, in_place=not deferred)))
            if not deferred:
                self._commit_bucket(*computed.pop())
        for group in self.param_groups:
            self._adamw_step(group)
        for bucket, terms in computed:
            self._commit_bucket(bucket, terms)
        return loss

    def _check_gradients(self) -> None:
        """Refuse, before anything changes, a gradient step() cannot use. nonfinite="raise"
        covers the group's AdamW parameters too (one host read each); with "skip" they follow
        torch.optim.AdamW, which does not look at gradient values."""
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                label = _param_label(group_index, index, param)
                _check_grad(param, label)
                if (group["nonfinite"] == "raise" and self.algorithm_of(param, group) == "adamw"
                        and not bool(torch.isfinite(param.grad).all())):
                    raise _nonfinite_error(label)

    def plan_buckets(self) -> list[Bucket]:
        """This step's buckets (asgo_core.buckets, parameters as the members' handles): the
        matrices with a gradient, by matrix shape, group, algorithm, dtype, device and step
        count, in order of first appearance in the param groups (docs/torch.md)."""
        members, kinds = [], {}
        for group_index, group in enumerate(self.param_groups):
            for param in _params_with_grad(group):
                algorithm = self.algorithm_of(param, group)
                if algorithm != "adamw":
                    view = PermutedStack.outputs_first(param.shape, group["batch_dims"])
                    members.append(Member(param, view))
                    kinds[param] = (group_index, algorithm, param.dtype, param.device,
                                    self.state[param].get("step", 0))
        return plan_buckets(members, lambda member: kinds[member.handle])

    def _bucket_group(self, bucket: Bucket) -> tuple[dict, str]:
        """(param group, algorithm) of a bucket of plan_buckets."""
        return self.param_groups[bucket.key[1]], bucket.key[2]

    def _bucket_terms(self, bucket: Bucket, in_place: bool):
        """The core's (direction, scale, new_state) of a bucket. in_place=False computes on
        stacked copies of the state, so nothing the optimizer holds changes here; in_place=True
        lets the core update the state where it lies, when its tensors are still the
        back-to-back views of one stack (eager mode: no copy in, less to copy back)."""
        group, algorithm = self._bucket_group(bucket)
        config = group_config(group, algorithm)
        grads = _stacked([p.grad for p in bucket.handles], bucket.matrix_shape, reuse_storage=False)
        if group["maximize"]:
            grads = grads.neg_()
        step_count = self.state[bucket.handles[0]].get("step", 0)
        if step_count == 0:
            core_state = init_state(grads, config)
        else:
            states = [self.state[p] for p in bucket.handles]
            reuse = in_place and not torch.compiler.is_compiling()
            core_state = _stack_state(states, group["batch_dims"], step_count, reuse_storage=reuse)
        refresh = algorithm == "asgo" and needs_root_refresh(step_count, config)
        try:
            return step_terms(grads, core_state, config, refresh_root=refresh, overwrite_state=True)
        except FloatingPointError:  # nonfinite="raise"; reading the gradients again is fine now
            bad = nonfinite_keys(bucket.handles, {param: param.grad for param in bucket.handles})
            labels = {param: _param_label(g, i, param) for g, group in enumerate(self.param_groups)
                      for i, param in enumerate(group["params"])}
            raise _nonfinite_error(", ".join(labels[param] for param in bad)) from None

    def _commit_bucket(self, bucket: Bucket, terms) -> None:
        """Write a bucket's new state (in place, into the tensors the state already holds) and
        its parameter update."""
        direction, scale, new_state = terms
        group, algorithm = self._bucket_group(bucket)
        params, states = bucket.handles, [self.state[p] for p in bucket.handles]
        step_count = states[0].get("step", 0)
        _store_state(states, _split_state(new_state, params, group["batch_dims"]))
        for state in states:
            state["step"] = step_count + 1
        weight_decay = group_config(group, algorithm).weight_decay
        if rounds_stochastically(group["param_rounding"], params[0].dtype, torch_xp):
            generator = self._rounding_generator(params[0], step_count)
            _write_rounded_update(params, group["batch_dims"], direction, scale, group["lr"], weight_decay,
                                  generator)
        else:
            _write_update(params, group["batch_dims"], direction, scale, group["lr"], weight_decay)

    def _rounding_generator(self, param, step_count: int) -> torch.Generator:
        """The seeded generator of a stochastically rounded write to param (and the parameters
        stepped with it) at step_count."""
        stream = next(index for index, (other, _) in enumerate(self._params_and_groups()) if other is param)
        return torch.Generator(device=param.device).manual_seed(rounding_seed(step_count, stream))

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in _params_with_grad(group)
                  if self.algorithm_of(p, group) == "adamw"]
        if not params:
            return
        rounding = group["param_rounding"]
        nearest = [p for p in params if not rounds_stochastically(rounding, p.dtype, torch_xp)]
        if nearest:
            states = [self._adamw_state(p) for p in nearest]
            _adamw(nearest, [p.grad for p in nearest], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group)
        for param in params:
            if rounds_stochastically(rounding, param.dtype, torch_xp):
                self._rounded_adamw_step(param, group)

    def _rounded_adamw_step(self, param, group: dict) -> None:
        """torch.optim.AdamW's step computed in float32 on a 16-bit parameter, the result rounded
        stochastically into the parameter; the moments keep the parameter's dtype (rounded to
        nearest), as torch.optim.AdamW keeps them."""
        state = self._adamw_state(param)
        generator = self._rounding_generator(param, int(state["step"]))
        wide = [t.float() for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        _adamw([wide[0]], [wide[1]], [wide[2]], [wide[3]], [state["step"]], group)
        state["exp_avg"].copy_(wide[2])
        state["exp_avg_sq"].copy_(wide[3])
        param.copy_(_stochastically_rounded(wide[0], param.dtype, generator))

    def _adamw_state(self, param: torch.Tensor) -> dict:
        """torch.optim.AdamW's state layout, so its arithmetic is reproduced bit for bit."""
        state = self.state[param]
        if not state:
            state.update(_fresh_adamw_state(param))
        return state

    # ---- state_dict ------------------------------------------------------------------------
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, in its order: pre-hooks (which may return a
        replacement), a check of the whole dict that changes nothing when it fails (ValueError
        naming the parameter and field), the load, post-hooks. Details: docs/torch.md."""
        if not isinstance(state_dict, dict):
            fail("state_dict", type(state_dict).__name__, "a dict with 'state' and 'param_groups'")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replacement = pre_hook(self, state_dict)
            state_dict = state_dict if replacement is None else replacement
        param_states, groups = self._checked_states(state_dict)
        saved_ids = {saved_id for saved in state_dict["param_groups"] for saved_id in saved["params"]}
        state = defaultdict(dict, {key: value for key, value in state_dict["state"].items()
                                   if key not in saved_ids})
        state.update(param_states)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_states(self, state_dict: dict) -> tuple[dict, list]:
        """({param: the state to load}, the groups to load: this optimizer's groups with
        copies of the saved options over them) after every check of load_state_dict."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            fail("state_dict", type(state_dict).__name__, "a dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        groups = loaded_groups(self.param_groups, saved_groups, self._validate_group)
        new_states = {}
        for group_index, (group, saved) in enumerate(zip(groups, saved_groups)):
            for index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                entry = saved_state.get(saved_id)
                if entry:
                    label = _param_label(group_index, index, param)
                    new_states[param] = self._checked_state(param, group, entry, label)
        return new_states, groups

    def _checked_state(self, param, group: dict, entry: dict, label: str) -> dict:
        """A saved state checked and converted; AdamW's "step" (a number in older files, else a
        tensor) becomes the CPU tensor torch.optim.AdamW keeps."""
        algorithm, convert = self.algorithm_of(param, group), _converter_to(param.device)
        if algorithm == "adamw":
            template = _fresh_adamw_state(param)
            state = loaded_state(entry, _moments(template), algorithm, label, array_type=torch.Tensor,
                                 convert=convert, integer_step=False)
            return _adamw_state_from(state, state["step"], template)
        return loaded_state(entry, self._state_template(param, group, algorithm), algorithm, label,
                            array_type=torch.Tensor, convert=convert)

    def _state_template(self, param, group: dict, algorithm: str) -> dict:
        """The matrix state a parameter holds, as meta tensors (shapes and dtypes only)."""
        core_state = self._fresh_core_state(param, group, algorithm, device="meta")
        return _split_state(core_state, (param,), group["batch_dims"])[0]

    # ---- portable checkpoints (asgo_core.checkpoint.PortableCheckpoint) ----------------------
    def _portable_arrays(self) -> tuple:
        steps, arrays = zip(*(self._entry_arrays(param, group) for param, group in self._params_and_groups()))
        return list(arrays), list(steps)

    def _load_entries(self, entries: list) -> None:
        pairs = self._params_and_groups()
        new_states = [self._state_from_entry(*pair, entry) for pair, entry in zip(pairs, entries)]
        for (param, _), state in zip(pairs, new_states):
            self.state[param] = state

    def _params_and_groups(self) -> list:
        return [(param, group) for group in self.param_groups for param in group["params"]]

    def _identities(self) -> list:
        """Each parameter's checkpoint identity, named "<group>.<index>", in param-group order."""
        return [identity_from_group(f"{g}.{i}", group, self.algorithm_of(param, group), param.shape)
                for g, group in enumerate(self.param_groups) for i, param in enumerate(group["params"])]

    def _entry_arrays(self, param, group) -> tuple:
        """(step, {key: NumPy array}) of a parameter's state, for its checkpoint entry."""
        algorithm, state = self.algorithm_of(param, group), self.state[param]
        if algorithm == "adamw":
            state = state or _fresh_adamw_state(param)
            return state["step"], {key: _numpy(value) for key, value in _moments(state).items()}
        step = state.get("step", 0)
        core_state = (_stack_state([state], group["batch_dims"], step, reuse_storage=False) if step
                      else self._fresh_core_state(param, group, algorithm))
        counts = _matrix_counts([param], group["batch_dims"])
        return step, stacked_state_entries(core_state, counts, _numpy)[0]

    def _fresh_core_state(self, param, group, algorithm, device=None):
        """The core's zero state of the parameter's (matrices, m, n) stack, on `device` (default:
        the parameter's)."""
        stack = torch.empty(matrix_stack_shape(param.shape, group["batch_dims"]), dtype=param.dtype,
                            device=device or param.device)
        return init_state(stack, group_config(group, algorithm))

    def _state_from_entry(self, param, group, entry) -> dict:
        convert = _converter_to(param.device)
        if entry["algorithm"] == "adamw":
            template = self.state[param] or _fresh_adamw_state(param)
            return _adamw_state_from(arrays_from_entry(entry, _moments(template), convert), entry["step"],
                                     template)
        template = self._fresh_core_state(param, group, entry["algorithm"])
        counts = _matrix_counts([param], group["batch_dims"])
        core_state = stacked_state_from_entries(template, [entry], counts, convert)
        return {**_split_state(core_state, (param,), group["batch_dims"])[0], "step": int(entry["step"])}


def _matrix_counts(params, batch_dims: int) -> list:
    """Matrices of each parameter, read from its shape (DistributedASGO steps a rank's part of a
    stack in its place)."""
    return [matrix_stack_shape(param.shape, batch_dims)[0] for param in params]


def _fresh_adamw_state(param: torch.Tensor) -> dict:
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return {"step": torch.tensor(0.0, dtype=scalar_dtype),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def _numpy(tensor: torch.Tensor):
    """A state tensor for a portable checkpoint: NumPy has no bfloat16, so bfloat16 state is
    written as float32 (exactly) and cast back to the optimizer's dtype on load."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def evaluate_closure(closure):
    """closure() with gradients enabled (step runs under no_grad), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _param_label(group_index: int, index: int, param) -> str:
    return f"param_groups[{group_index}]['params'][{index}] (shape {tuple(param.shape)})"


def _nonfinite_error(labels: str) -> FloatingPointError:
    return FloatingPointError(f"non-finite gradient in {labels} (nonfinite='raise'); "
                              "no parameter or state was changed")


def _check_grad(param: torch.Tensor, label: str) -> None:
    grad = param.grad
    if grad.layout != torch.strided:
        raise RuntimeError(f"{label}: a {grad.layout} gradient; ASGO/DASGO need dense gradients "
                           "(e.g. nn.Embedding(sparse=False))")
    if grad.dtype != param.dtype or grad.shape != param.shape or grad.device != param.device:
        raise RuntimeError(f"{label}: gradient of dtype {grad.dtype}, shape {tuple(grad.shape)} on "
                           f"{grad.device}; accepted: the parameter's dtype {param.dtype}, shape and "
                           f"device {param.device}")


def _write_update(params, batch_dims: int, direction, scale, lr, weight_decay: float) -> None:
    """W ← W·(1 − lr·weight_decay) − lr·scale·D for each matrix: two passes over W, no
    update-sized temporary. A skipped matrix (scale 0) is neither moved nor decayed. The
    factors are in the statistics dtype (float64 for float64 params); a tensor lr (e.g. a
    scheduler's) works as a float does."""
    counts = _matrix_counts(params, batch_dims)
    if weight_decay != 0.0:
        decay = 1.0 - (lr * weight_decay) * (scale != 0).to(scale.dtype)
        torch._foreach_mul_(params, _per_param_factors(decay, params, counts, batch_dims))
    directions = [part.reshape(p.shape) for part, p in zip(direction.split(counts), params)]
    torch._foreach_addcmul_(params, directions, _per_param_factors(scale * -lr, params, counts, batch_dims))


def _per_param_factors(values, params, counts, batch_dims: int) -> list:
    """(matrices, 1, 1) factors → one tensor per parameter (counts[i] matrices), broadcastable to it."""
    return [part.view(p.shape[:batch_dims] + (1,) * (p.ndim - batch_dims))
            for part, p in zip(values.split(counts), params)]


def _write_rounded_update(params, batch_dims: int, direction, scale, lr, weight_decay: float,
                          generator) -> None:
    """_write_update's W·(1 − lr·weight_decay) − lr·scale·D computed in the statistics dtype and
    rounded stochastically into each 16-bit parameter."""
    counts = _matrix_counts(params, batch_dims)
    factors = _per_param_factors(scale, params, counts, batch_dims)
    for param, part, factor in zip(params, direction.split(counts), factors):
        decay = 1.0 - (lr * weight_decay) * (factor != 0).to(factor.dtype)
        value = param.to(factor.dtype) * decay - (lr * factor) * part.reshape(param.shape)
        param.copy_(_stochastically_rounded(value, param.dtype, generator))


def _stochastically_rounded(value: torch.Tensor, dtype, generator) -> torch.Tensor:
    uniform = torch.rand(value.shape, generator=generator, dtype=value.dtype, device=value.device)
    return stochastic_round(value, dtype, uniform, torch_xp)


def _adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict) -> None:
    """torch.optim.AdamW's functional step with a group's adamw_* options.

    Compiled for an accelerator it takes torch's capturable path, as torch.compile makes
    torch.optim.AdamW do: the other path feeds CPU step counts to the accelerator's foreach
    kernels, which torch.compile fails to trace. The counts stay on the CPU (the state_dict
    format): the kernels get copies on the device, and the counts are advanced here."""
    options = adamw_options(group)
    beta1, beta2 = options["betas"]
    capturable = _takes_capturable_path(params)
    kernel_steps = [s.to(p.device, copy=True) for s, p in zip(steps, params)] if capturable else steps
    adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], kernel_steps, amsgrad=False, beta1=beta1,
                     beta2=beta2, lr=options["lr"], weight_decay=options["weight_decay"], eps=options["eps"],
                     maximize=group["maximize"], capturable=capturable)
    if capturable:
        torch._foreach_add_(steps, 1)


def _takes_capturable_path(params) -> bool:
    return torch.compiler.is_compiling() and bool(params) and params[0].device.type != "cpu"


def _params_with_grad(group: dict):
    return (param for param in group["params"] if param.grad is not None)


def _stack_state(states: list[dict], batch_dims: int, step_count: int, reuse_storage: bool):
    """Per-parameter state → the core's state of the stacked bucket: new tensors, or with
    reuse_storage the stack the per-parameter tensors are views of, where they still are."""
    state_type = DASGOState if "second_moment" in states[0] else ASGOState
    count = torch.tensor(step_count, dtype=torch.int32)
    return stacked_state(state_type, states, batch_dims, count,
                         lambda tensors, item_shape: _stacked(tensors, item_shape, reuse_storage))


def _stacked(tensors: list, item_shape, reuse_storage: bool) -> torch.Tensor:
    """The tensors (any memory format) as one (items, *item_shape) stack: a new tensor, or with
    reuse_storage the stack they are back-to-back views of, where they are."""
    if reuse_storage:
        base = _reassembled_base(tensors, item_shape)
        if base is not None:
            return base
    return torch.cat([t.reshape(-1, *item_shape) for t in tensors])


def _reassembled_base(tensors: list, item_shape) -> torch.Tensor | None:
    """The contiguous stack whose in-order, back-to-back slices the tensors are (what a
    parameter's first step stores, see _store_state), or None."""
    base = tensors[0]._base
    if base is None or not base.is_contiguous() or tuple(base.shape[1:]) != tuple(item_shape):
        return None
    offset = base.storage_offset()
    for tensor in tensors:
        if tensor._base is not base or not tensor.is_contiguous() or tensor.storage_offset() != offset:
            return None
        offset += tensor.numel()
    return base if offset == base.storage_offset() + base.numel() else None


def _split_state(core_state, params, batch_dims: int) -> list[dict]:
    """The core's stacked state → one state dict per parameter (views of the stacks)."""
    batch_shapes = [p.shape[:batch_dims] for p in params]
    return member_states(core_state, _matrix_counts(params, batch_dims), batch_shapes, torch.Tensor.view)


def _store_state(states: list[dict], new_states: list[dict]) -> None:
    """Copy new state into the tensors each state already holds (one foreach copy), so the
    same tensors persist across steps; what the core updated where it lies needs no copy. A
    parameter's first step stores the new tensors (views of the bucket's stacks) themselves,
    or copies under torch.compile (views of one storage as graph inputs are what
    AOTAutograd's input mutations cannot handle)."""
    compiling = torch.compiler.is_compiling()
    targets, sources = [], []
    for state, new in zip(states, new_states):
        for key, value in new.items():
            if key not in state:
                state[key] = _cloned(value) if compiling else value
            else:
                targets += state[key] if isinstance(value, list) else [state[key]]
                sources += value if isinstance(value, list) else [value]
    if not compiling:
        pairs = [(t, s) for t, s in zip(targets, sources) if t.data_ptr() != s.data_ptr()]
        targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    if targets:
        torch._foreach_copy_(targets, [source.view_as(target) for source, target in zip(sources, targets)])


def _cloned(value):
    return [v.clone() for v in value] if isinstance(value, list) else value.clone()


def _converter_to(device):
    """convert(saved tensor or NumPy array, template) of a load: a copy in the template's dtype
    on device (the templates of a state_dict's checks are meta tensors)."""
    return lambda value, like: torch.as_tensor(value).to(device=device, dtype=like.dtype, copy=True)


def _moments(adamw_state: dict) -> dict:
    return {key: adamw_state[key] for key in ("exp_avg", "exp_avg_sq")}


def _adamw_state_from(moments: dict, step, template: dict) -> dict:
    """torch.optim.AdamW's state of loaded moments: "step" a CPU tensor of the template's dtype."""
    return {**_moments(moments), "step": torch.tensor(float(step), dtype=template["step"].dtype)}


class ASGO(_MatrixOptimizer):
    """ASGO (one-sided Shampoo, asgo_core.ASGOConfig) for matrices, torch.optim.AdamW's step
    for everything else; options: docs/options.md, routing and batch_dims: docs/torch.md."""

    matrix_algorithm = "asgo"


class DASGO(_MatrixOptimizer):
    """DASGO, the diagonal variant (asgo_core.DASGOConfig), with the same AdamW routing as ASGO."""

    matrix_algorithm = "dasgo"


def asgo_param_groups(model: nn.Module, *, num_heads: int | None = None,
                      qk_names=("q_proj", "k_proj", "query", "key", "wq", "wk"), stacked=None, **overrides):
    """Param groups in the reference training recipe's split: AdamW for parameters with fewer
    than 2 dims and nn.Embedding weights, head-wise blocks for the Q/K weights named in qk_names
    (with num_heads), batch_dims by fnmatch pattern (stacked), overrides on every group.
    Details: docs/torch.md."""
    embedding_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    matrices, heads, fused_heads, others = [], [], [], []
    by_batch_dims: dict[int, list] = {}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 2)[-2] if name.count(".") else ""
        batch_dims = batch_dims_for_path(stacked, name, glob=True)
        check_batch_dims_value(batch_dims)
        if param.ndim < 2 or id(param) in embedding_ids:
            others.append(param)
        elif batch_dims:
            by_batch_dims.setdefault(batch_dims, []).append(param)
        elif num_heads and name.endswith("in_proj_weight"):
            fused_heads.append(param)
        elif num_heads and module_name in qk_names and name.endswith("weight"):
            heads.append(param)
        else:
            matrices.append(param)
    groups = [{"params": matrices}, {"params": heads, "num_heads": num_heads},
              {"params": fused_heads, "num_heads": 3 * num_heads if num_heads else None},
              *({"params": params, "batch_dims": dims} for dims, params in by_batch_dims.items()),
              {"params": others, "algorithm": "adamw"}]
    return [{**group, **overrides} for group in groups if group["params"]]
