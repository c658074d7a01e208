"""ASGO and DASGO stepping NumPy (CPU) or CuPy (GPU) arrays in place; the plumbing is asgo_core's
(keyed params and grads, options, buckets, checkpoint).

Framework-specific here: in-place writes (CuPy's fused kernels, asgo_core.backends), stochastic
rounding from NumPy/CuPy generators, host/device moves and the state_dict format of array
stores. User guide: docs/cupy.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import array_api_compat

from asgo_core import adamw, init_state, needs_root_refresh, statistics_dtype
from asgo_core import step as core_step
from asgo_core.backends import backend_for
from asgo_core.buckets import Member, plan_buckets
from asgo_core.checkpoint import (PortableCheckpoint, arrays_from_entry, common_step, identity_from_group,
                                  stacked_state_entries, stacked_state_from_entries)
from asgo_core.config import fail
from asgo_core.keyed import check_finite, check_param, keyed_grads, nonfinite_keys, split_groups
from asgo_core.layout import PermutedStack
from asgo_core.options import (OptionsSignature, algorithm_of, check_keywords, check_param_shape, defaults,
                               group_config, group_settings, layout_of)
from asgo_core.precision import rounding_seed, rounds_stochastically, stochastic_round

__all__ = ["ASGO", "DASGO"]

# A saved param group leaves out the options whose value is None; a state_dict saved before an
# option existed lacks it too, and reads it as the value it had then.
_ABSENT_OPTIONS = {"batch_dims": 0, "param_rounding": "nearest"}
_OWN_COUNTERS = ("skipped",)  # AdamW state of this adapter beyond the portable format's


@dataclass
class _AdamWSlot:
    """One array on the built-in AdamW: state exp_avg, exp_avg_sq, skipped."""
    group_index: int
    key: object
    state: dict


class _ArrayOptimizer(PortableCheckpoint, OptionsSignature):
    """Shared machinery of ASGO and DASGO; subclasses set the matrix algorithm."""

    matrix_algorithm: str
    matrix_algorithms: tuple  # what a group's algorithm option may name besides "adamw"
    positional_options = ("params", "lr")
    portable_entry = "array"

    def __init__(self, params, lr=defaults("asgo")["lr"], **options):
        self.defaults = defaults(self.matrix_algorithm)
        check_keywords(type(self).__name__, options, self.defaults)
        self.defaults.update(options, lr=lr)
        self.param_groups = [dict(self.defaults, **overrides, params=arrays)
                             for overrides, arrays in split_groups(params)]
        self._params = {key: array for group in self.param_groups
                        for key, array in group["params"].items()}
        for index, group in enumerate(self.param_groups):
            self._with_group_context(index, self._validate_group, group)
        self._layouts = [layout_of(group) for group in self.param_groups]
        self._buckets, self._adamw_slots = self._build_state()
        self._step_count = 0

    # ---- public API -------------------------------------------------------------------
    def step(self, grads) -> None:
        """One step: grads (dict by key or list by position, like params) updates in place."""
        grads = keyed_grads(grads, self._params)
        settings = [self._with_group_context(i, group_settings, g, self.matrix_algorithms)
                    for i, g in enumerate(self.param_groups)]
        planned = [self._plan_bucket(bucket, grads, settings) for bucket in self._buckets]
        check_finite([slot.key for slot in self._adamw_slots
                      if self.param_groups[slot.group_index]["nonfinite"] == "raise"], grads)
        for stream, (bucket, (update, new_state)) in enumerate(zip(self._buckets, planned)):
            self._apply_matrix_update(bucket, update, self.param_groups[bucket.key[1]]["lr"], stream)
            bucket.state = new_state
        for stream, slot in enumerate(self._adamw_slots, start=len(self._buckets)):
            self._apply_adamw(slot, grads[slot.key], settings[slot.group_index]["adamw"], stream)
        self._step_count += 1

    def state_dict(self) -> dict:
        """{"step": int, "param_groups": [options + "params": keys], "state": {str(key): {...}}}
        of copies of the arrays, options whose value is None left out (format: docs/cupy.md)."""
        state = {}
        for bucket in self._buckets:
            per_key = stacked_state_entries(bucket.state, bucket.counts, _copy)
            for key, arrays in zip(bucket.handles, per_key):
                state[str(key)] = _native_names(arrays) | {"count": _copy(bucket.state.count)}
        for slot in self._adamw_slots:
            state[str(slot.key)] = {name: _copy(value) for name, value in slot.state.items()}
        groups = [{name: value for name, value in group.items() if name != "params" and value is not None}
                  | {"params": [str(key) for key in group["params"]]} for group in self.param_groups]
        return {"step": self._step_count, "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() (also after a round trip through numpy.savez); all checks run
        before anything changes."""
        groups = self._loaded_groups(state_dict["param_groups"])
        bucket_states, slot_states = self._states_from(self._saved_entries(state_dict["state"]))
        for group, options in zip(self.param_groups, groups):
            group.update(options)
        self._set_states(bucket_states, slot_states, int(_to_python(state_dict["step"])))

    # ---- portable checkpoints (asgo_core.checkpoint.PortableCheckpoint) ----------------------
    def _portable_arrays(self) -> tuple:
        arrays = {}
        for bucket in self._buckets:
            arrays.update(zip(bucket.handles, stacked_state_entries(bucket.state, bucket.counts, _to_numpy)))
        for slot in self._adamw_slots:
            arrays[slot.key] = {name: _to_numpy(value) for name, value in slot.state.items()}
        return [arrays[key] for key in self._params], self._step_count

    def _load_entries(self, entries: list) -> None:
        bucket_states, slot_states = self._states_from(dict(zip(self._params, entries)))
        self._set_states(bucket_states, slot_states, common_step(entries))

    def _identities(self) -> list:
        """Each array's checkpoint identity, named str(key), in key order."""
        return [identity_from_group(str(key), group, algorithm_of(array.ndim, group, self.matrix_algorithm),
                                    array.shape)
                for group in self.param_groups for key, array in group["params"].items()]

    def _states_from(self, entries: dict) -> tuple:
        """(bucket states, AdamW slot states) converted from checkpoint entries by key, every
        array checked (shape, kind) before the caller writes anything."""
        bucket_states = [stacked_state_from_entries(bucket.state, [entries[key] for key in bucket.handles],
                                                    bucket.counts, _converted_like)
                         for bucket in self._buckets]
        slot_states = [arrays_from_entry(entries[slot.key], slot.state, _converted_like, _OWN_COUNTERS)
                       for slot in self._adamw_slots]
        return bucket_states, slot_states

    def _set_states(self, bucket_states, slot_states, step_count: int) -> None:
        for bucket, state in zip(self._buckets, bucket_states):
            bucket.state = state
        for slot, state in zip(self._adamw_slots, slot_states):
            slot.state = state
        self._step_count = step_count

    # ---- construction -----------------------------------------------------------------
    def _with_group_context(self, index, function, group, *args):
        """function(group, *args), a ValueError naming the group where there are several."""
        try:
            return function(group, *args)
        except ValueError as error:
            if len(self.param_groups) == 1:
                raise
            raise ValueError(f"param_groups[{index}]: {error}") from None

    def _validate_group(self, group: dict) -> None:
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            fail("param_groups", sorted(unknown), "option names of " + type(self).__name__)
        group_settings(group, self.matrix_algorithms)
        for key, array in group["params"].items():
            check_param(key, array)
            try:
                check_param_shape(array.shape, group, algorithm_of(array.ndim, group, self.matrix_algorithm))
            except ValueError as error:
                raise ValueError(f"params[{key!r}]: {error}") from None

    def _build_state(self):
        members, slots, placement = [], [], {}
        for group_index, group in enumerate(self.param_groups):
            for key, array in group["params"].items():
                algorithm = algorithm_of(array.ndim, group, self.matrix_algorithm)
                if algorithm == "adamw":
                    xp = array_api_compat.array_namespace(array)
                    slots.append(_AdamWSlot(group_index, key, adamw.zero_state(array, xp)))
                    continue
                placement[key] = (group_index, algorithm, *_array_identity(array))
                members.append(Member(key, PermutedStack.outputs_first(array.shape, group["batch_dims"])))
        buckets = plan_buckets(members, lambda member: placement[member.handle])
        for bucket in buckets:
            config = group_config(self.param_groups[bucket.key[1]], bucket.key[2])
            bucket.state = init_state(self._stacked(bucket, self._params), config)
        return buckets, slots

    # ---- one step -----------------------------------------------------------------------
    @staticmethod
    def _stacked(bucket, arrays_by_key):
        """The bucket's (matrices, m, n) stack of one array per key (params or grads)."""
        arrays = [arrays_by_key[key] for key in bucket.handles]
        return bucket.gather(arrays, array_api_compat.array_namespace(arrays[0]))

    def _plan_bucket(self, bucket, grads, settings):
        """(update, new_state) of one bucket; nothing is written yet."""
        group_index, algorithm = bucket.key[1:3]
        group = self.param_groups[group_index]
        config = settings[group_index]["configs"][algorithm]
        if layout_of(group) != self._layouts[group_index]:
            fail("param_groups", "a changed side / max_precond_dim / num_heads / batch_dims",
                 "the layout options the state was built with")
        G = self._stacked(bucket, grads)
        if group["maximize"]:
            G = -G
        W = self._stacked(bucket, self._params) if config.weight_decay != 0.0 else None
        refresh = algorithm == "asgo" and needs_root_refresh(self._step_count, config)
        # a stochastically rounded write needs the update before it is rounded to a 16-bit param
        xp = array_api_compat.array_namespace(G)
        update_dtype = statistics_dtype(G.dtype, xp) if self._rounds(group_index, G) else None
        try:
            return core_step(G, bucket.state, W, config, refresh_root=refresh, update_dtype=update_dtype)
        except FloatingPointError:
            raise FloatingPointError(f"non-finite gradient for {nonfinite_keys(bucket.handles, grads)} "
                                     "(nonfinite='raise'); no state was changed") from None

    def _rounds(self, group_index: int, param) -> bool:
        """Whether writes to param (or an array of its dtype) are rounded stochastically."""
        xp = array_api_compat.array_namespace(param)
        return rounds_stochastically(self.param_groups[group_index]["param_rounding"], param.dtype, xp)

    def _uniform(self, like, stream: int):
        """Uniform numbers in [0, 1) shaped and typed like `like`, from a NumPy (CuPy) generator
        seeded by this step and the stream."""
        module = importlib.import_module("cupy" if array_api_compat.is_cupy_array(like) else "numpy")
        generator = module.random.default_rng(rounding_seed(self._step_count, stream))
        return generator.random(like.shape, dtype=like.dtype)

    def _apply_matrix_update(self, bucket, update, lr, stream: int) -> None:
        xp = array_api_compat.array_namespace(update)
        fused = getattr(backend_for(xp), "apply_update", None)
        for key, step_update in zip(bucket.handles, bucket.scatter(update, xp)):
            param = self._params[key]
            if self._rounds(bucket.key[1], param):
                value = xp.astype(param, update.dtype) - lr * step_update
                param[...] = stochastic_round(value, param.dtype, self._uniform(value, stream), xp)
            elif fused is not None:
                fused(param, step_update, lr)
            else:
                param -= lr * step_update

    def _apply_adamw(self, slot, grad, options: dict, stream: int) -> None:
        param, state = self._params[slot.key], slot.state
        xp = array_api_compat.array_namespace(param)
        if self.param_groups[slot.group_index]["maximize"]:
            grad = -grad
        hyper = adamw.hyperparameters(step=self._step_count + 1, **options)
        rounds = self._rounds(slot.group_index, param)
        fused = getattr(backend_for(xp), "adamw_update", None)
        if fused is not None and not rounds:
            fused(param, grad, state, **hyper)
            return
        uniform = self._uniform(state["exp_avg"], stream) if rounds else None
        param[...], slot.state = adamw.adamw_step(param, grad, state, xp, uniform=uniform, **hyper)

    # ---- loading --------------------------------------------------------------------------
    def _loaded_groups(self, saved_groups) -> list:
        if len(saved_groups) != len(self.param_groups):
            fail("state_dict", f"{len(saved_groups)} param groups", f"{len(self.param_groups)}")
        loaded = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_keys = [str(_to_python(key)) for key in _to_python(saved["params"])]
            if saved_keys != [str(key) for key in group["params"]]:
                fail("state_dict", f"param_groups[{index}] keys {saved_keys}", "the optimizer's keys")
            options = {name: _to_python(saved.get(name, _ABSENT_OPTIONS.get(name))) for name in self.defaults}
            candidate = dict(group, **options)
            self._with_group_context(index, group_settings, candidate, self.matrix_algorithms)
            if layout_of(candidate) != self._layouts[index]:
                fail("state_dict", f"param_groups[{index}] layout options", "the optimizer's")
            loaded.append(options)
        return loaded

    def _saved_entries(self, saved: dict) -> dict:
        """{key: a checkpoint entry} of a state_dict's "state": portable array names on the
        host, and a matrix's step "count" as the entry's step."""
        matrix_keys = {key for bucket in self._buckets for key in bucket.handles}
        entries = {}
        for key in self._params:
            if str(key) not in saved:
                fail("state_dict", f"no state for {key!r}", "an entry per param key")
            entry = {"name": str(key), "arrays": {_portable_name(name): _to_numpy(value)
                                                  for name, value in saved[str(key)].items()}}
            if key in matrix_keys:
                if "count" not in entry["arrays"]:
                    fail("state_dict", f"no step 'count' in the state of {key!r}",
                         "the entries state_dict() writes")
                entry["step"] = int(_to_python(entry["arrays"].pop("count")))
            entries[key] = entry
        return entries


class ASGO(_ArrayOptimizer):
    """ASGO (asgo_core.ASGOConfig) on arrays, updated in place; <2-D arrays → built-in AdamW.
    Options: the torch adapter's names and defaults (docs/options.md)."""

    matrix_algorithm = "asgo"
    matrix_algorithms = ("asgo", "dasgo")


class DASGO(_ArrayOptimizer):
    """DASGO, the diagonal variant (asgo_core.DASGOConfig), with ASGO's AdamW routing."""

    matrix_algorithm = "dasgo"
    matrix_algorithms = ("dasgo",)


def _array_identity(array) -> tuple:
    """What arrays stacked together must share besides their matrix shape."""
    return (str(array.dtype), str(array_api_compat.device(array)), array_api_compat.array_namespace(array))


# ---- state_dict and host/device conversion ----------------------------------------------------
def _native_names(arrays: dict) -> dict:
    """Portable array names → state_dict names ("gram/0" → "gram_0": "/" separates the path
    parts of a flattened state_dict)."""
    return {name.replace("/", "_"): value for name, value in arrays.items()}


def _portable_name(name: str) -> str:
    """The inverse of _native_names for one name."""
    return name.replace("_", "/", 1) if name.startswith(("gram_", "root_")) else name


def _copy(value):
    """A copy in the array's own namespace and device."""
    return array_api_compat.array_namespace(value).asarray(value, copy=True)


def _to_numpy(value):
    """A NumPy array on the host; NumPy and CuPy accept each other's arrays only through the
    host, where CuPy arrays come with .get() (save and load time, not a step)."""
    import numpy as np
    return np.asarray(value.get() if array_api_compat.is_cupy_array(value) else value)


def _converted_like(value, like):
    """A host array (a checkpoint's or a state_dict's, its shape checked) as like's namespace,
    dtype and device."""
    xp = array_api_compat.array_namespace(like)
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like), copy=True)


def _to_python(value):
    """Options read back from an array store: 0-d arrays → scalars, 1-d arrays and lists → tuples."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return tuple(value) if isinstance(value, list) else value
