"""Portable, framework-neutral optimizer checkpoints.

A *portable state* is a plain dict every adapter can export to and import from:

    {"format": "asgo-portable-state", "version": 1,
     "params": [                         # one entry per parameter, in the optimizer's order
        {"name": str, "algorithm": "asgo" | "dasgo" | "adamw", "shape": [int, ...],
         "step": int,                    # steps this parameter has taken
         "batch_dims": int,              # asgo/dasgo: dims that index independent matrices
         "config": {option: value},      # the core config's fields; AdamW: betas, eps, ...
         "arrays": {key: numpy.ndarray}},  # per-parameter state, keys per algorithm below
        ...]}

Array keys: asgo: "momentum" (m, n), "gram/<g>" and "root/<g>" (blocks, size, size) per block
group g of asgo_core.layout, "skipped" (), "fallbacks" (3,); dasgo: "momentum",
"second_moment" (n,), "skipped"; adamw: "exp_avg", "exp_avg_sq" (the parameter's shape).

Stacked matrices. An asgo/dasgo parameter holds count = prod(shape[:batch_dims]) matrices of
shape (m, n) = asgo_core.matrix_view_shape(shape[batch_dims:]) (torch and NumPy/CuPy: the
`batch_dims` option; optax: the leaf's batch axes, those neither reduction nor output axes).
When count > 1 the per-matrix arrays gain a leading axis of length count, the matrices in
row-major order of the batch dims: "momentum" (count, m, n), "skipped" (count,), "fallbacks"
(count, 3), "second_moment" (count, n); "gram/<g>" and "root/<g>" hold the blocks of every
matrix, matrix-major: (count·blocks, size, size). One flat count axis (not the batch shape)
is what every adapter's core stack holds, and it makes a leaf with any batch axes (optax)
and a parameter with batch_dims (torch) exchange state when their matrices agree. An entry
without "batch_dims" (files written before it was recorded) reads as 0; adamw entries ignore it.

On disk it is one .npz file (a zip archive): the arrays as "<index>/<key>" members and the rest
as JSON in a "metadata.json" member. The zip format stores a CRC-32 of every member, so a
corrupted file fails its check, and a truncated one loses its central directory; `load_state`
reads and verifies every member before returning anything, so it never loads partially, and
whatever is wrong with a file (a flipped bit in a zip header reads as encryption or an unknown
compression method) comes out as CheckpointError.
safetensors was the other candidate: it keeps no checksum and needs an extra dependency.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

from asgo_core.config import fail
from asgo_core.layout import check_batch_dims
from asgo_core.options import checkpoint_config
from asgo_core.state_codec import named_arrays, split_named, state_from_named

FORMAT = "asgo-portable-state"
VERSION = 1
ALGORITHM_ARRAYS = {
    "asgo": ("momentum", "skipped", "fallbacks"),  # plus gram/<g> and root/<g>
    "dasgo": ("momentum", "second_moment", "skipped"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}
_METADATA_MEMBER = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or one that does not fit the optimizer."""


def save_state(path, optimizer_or_state) -> None:
    """Write a portable checkpoint: an adapter's optimizer (anything with `portable_state()`)
    or a portable-state dict. The file is written to a temporary name and renamed into place,
    so an interrupted save never leaves a half-written checkpoint at `path` (a previous one
    stays intact) and removes the temporary file."""
    import numpy as np

    portable = _as_portable(optimizer_or_state)
    validate_portable_state(portable)
    metadata = {"format": FORMAT, "version": VERSION, "params": []}
    arrays = {}
    for index, entry in enumerate(portable["params"]):
        metadata["params"].append({key: value for key, value in entry.items() if key != "arrays"})
        for key, value in entry["arrays"].items():
            arrays[f"{index}/{key}"] = np.asarray(value)
    metadata["members"] = sorted(arrays)  # zip member names carry no checksum; the metadata does
    arrays[_METADATA_MEMBER] = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    temporary = f"{os.fspath(path)}.partial"
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    except BaseException:  # disk full, KeyboardInterrupt, ...: the previous checkpoint stays
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_state(path) -> dict:
    """Read a portable checkpoint written by save_state; raises CheckpointError when the file
    is truncated, corrupted or not an asgo checkpoint. Hand the result to an adapter's
    `load_portable_state` (torch, cupy) or `asgo_core.adapters.optax.state_from_portable`."""
    members = _read_verified_members(path)
    if _METADATA_MEMBER not in members:
        raise CheckpointError(f"{path}: not an asgo checkpoint (no {_METADATA_MEMBER})")
    metadata = _parse_metadata(path, members.pop(_METADATA_MEMBER))
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {metadata.get('format')!r} version "
                              f"{metadata.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    expected_members = metadata.pop("members", None)  # absent in files of earlier saves
    if expected_members is not None and sorted(members) != expected_members:
        raise CheckpointError(f"{path}: array members {sorted(members)} differ from the recorded "
                              f"{expected_members} (a corrupted member name)")
    for index, entry in enumerate(metadata["params"]):
        prefix = f"{index}/"
        entry["arrays"] = {name[len(prefix):]: members.pop(name) for name in list(members)
                           if name.startswith(prefix)}
    if members:
        raise CheckpointError(f"{path}: arrays that belong to no parameter: {sorted(members)}")
    validate_portable_state(metadata)
    return metadata


# What the zip and .npy readers raise on a damaged file: a flipped bit in a header can read
# as encryption (RuntimeError), an unsupported compression method or zip version
# (NotImplementedError), a broken deflate stream (zlib.error) or a short header (struct.error).
_UNREADABLE = (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError, RuntimeError,
               NotImplementedError, zlib.error, struct.error)


def _read_verified_members(path) -> dict:
    import numpy as np

    try:
        with open(path, "rb") as handle:
            content = handle.read()
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            bad_member = archive.testzip()  # reads every member and checks its CRC-32
            if bad_member is not None:
                raise CheckpointError(f"{path}: member {bad_member!r} fails its CRC check (corrupted)")
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except _UNREADABLE as error:
        raise CheckpointError(f"{path}: unreadable asgo checkpoint (truncated or corrupted): {error}") from error


def _parse_metadata(path, member) -> dict:
    try:
        metadata = json.loads(member.tobytes().decode())
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: {_METADATA_MEMBER} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict) or not isinstance(metadata.get("params"), list):
        raise CheckpointError(f"{path}: {_METADATA_MEMBER} is not an asgo checkpoint's metadata")
    return metadata


def validate_portable_state(portable: dict) -> None:
    """Check the structure of a portable-state dict; raises CheckpointError naming what is wrong."""
    entries = portable.get("params")
    if not isinstance(entries, list):
        raise CheckpointError("portable state: 'params' must be a list of per-parameter entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("arrays"), dict):
            raise CheckpointError(f"portable state: parameter {index} must be a dict with an 'arrays' dict")
        missing = {"name", "algorithm", "shape", "step", "config", "arrays"} - set(entry)
        if missing:
            raise CheckpointError(f"portable state: parameter {index} lacks {sorted(missing)}")
        algorithm = entry["algorithm"]
        if algorithm not in ALGORITHM_ARRAYS:
            raise CheckpointError(f"portable state: parameter {index} has algorithm={algorithm!r}; "
                                  f"accepted: {' | '.join(ALGORITHM_ARRAYS)}")
        absent = set(ALGORITHM_ARRAYS[algorithm]) - set(entry["arrays"])
        if absent:
            raise CheckpointError(f"portable state: parameter {index} ({entry['name']}) lacks arrays {sorted(absent)}")
        if algorithm != "adamw":
            _check_batch_dims_field(index, entry)


def _entry_batch_dims(entry: dict) -> int:
    """The entry's batch_dims; 0 for files written before the field was recorded."""
    return entry.get("batch_dims", 0)


def _check_batch_dims_field(index: int, entry: dict) -> None:
    try:
        check_batch_dims(entry["shape"], _entry_batch_dims(entry))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"portable state: parameter {index} ({entry['name']}): {error}") from None


def check_entry_matches(entry: dict, *, name: str, algorithm: str, shape, config: dict,
                        batch_dims: int = 0) -> None:
    """Raise CheckpointError unless a checkpoint entry fits a parameter of this optimizer:
    the same algorithm, shape, batch_dims (asgo/dasgo) and math-changing options (an adapter
    calls this for every parameter before it changes anything, so a mismatch leaves the
    optimizer untouched)."""
    where = f"checkpoint parameter {entry['name']!r} vs. optimizer parameter {name!r}"
    if entry["algorithm"] != algorithm:
        raise CheckpointError(f"{where}: algorithm {entry['algorithm']!r} != {algorithm!r}")
    if list(entry["shape"]) != list(shape):
        raise CheckpointError(f"{where}: shape {tuple(entry['shape'])} != {tuple(shape)}")
    if algorithm != "adamw" and _entry_batch_dims(entry) != batch_dims:
        raise CheckpointError(f"{where}: batch_dims {_entry_batch_dims(entry)!r} != {batch_dims!r}")
    differing = {key: (entry["config"].get(key), value) for key, value in config.items()
                 if _normalise(entry["config"].get(key)) != _normalise(value)}
    if differing:
        details = ", ".join(f"{key}: checkpoint {old!r} != optimizer {new!r}" for key, (old, new) in differing.items())
        raise CheckpointError(f"{where}: config differs ({details})")


def _normalise(value):
    """JSON turns tuples into lists; compare both as lists."""
    return list(value) if isinstance(value, tuple) else value


def _as_portable(optimizer_or_state) -> dict:
    if isinstance(optimizer_or_state, dict):
        return optimizer_or_state
    export = getattr(optimizer_or_state, "portable_state", None)
    if export is None:
        raise TypeError("save_state takes a portable-state dict or an asgo optimizer with "
                        f"portable_state(); got {type(optimizer_or_state).__name__}")
    return export()


# ---- helpers shared by the adapters ----------------------------------------------------------
# Per-matrix arrays lose their leading matrix axis when a parameter is one matrix (count 1,
# see "Stacked matrices" above); gram/root always keep their block axis.
_PER_MATRIX_KEYS = ("momentum", "second_moment", "skipped", "fallbacks")


def entries_in_order(portable: dict, names) -> list:
    """The checkpoint entries for the optimizer's parameter `names`, in that order; raises
    CheckpointError when a name has no entry or an entry belongs to no parameter."""
    validate_portable_state(portable)
    by_name = {entry["name"]: entry for entry in portable["params"]}
    if len(by_name) != len(portable["params"]) or len(set(names)) != len(names):
        raise CheckpointError("portable state: parameter names must be unique on both sides")
    missing = [name for name in names if name not in by_name]
    unused = [name for name in by_name if name not in set(names)]
    if missing or unused:
        raise CheckpointError(f"checkpoint does not fit the optimizer: no entry for {missing}, "
                              f"entries for no parameter {unused} (pass names= to line them up)")
    return [by_name[name] for name in names]


def entry_names(names, defaults: list, per: str) -> list:
    """The entry names an adapter exports or loads: `names` given by the caller (one `per`
    item, checked), or the adapter's `defaults`."""
    if names is None:
        return defaults
    names = [str(name) for name in names]
    if len(names) != len(defaults):
        fail("names", f"{len(names)} names", f"one per {per} ({len(defaults)})")
    return names


def common_step(entries: list) -> int:
    """The one step count of entries that an adapter steps together."""
    steps = {int(entry["step"]) for entry in entries}
    if len(steps) > 1:
        raise CheckpointError(f"checkpoint parameters stepped together have different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def portable(entries: list) -> dict:
    """A portable-state dict of per-parameter entries (see the module docstring)."""
    return {"format": FORMAT, "version": VERSION, "params": entries}


def stacked_state_entries(state, matrices_per_param, to_numpy) -> list:
    """Split a core state whose stack holds the matrices of several parameters (in order,
    `matrices_per_param` each) into one portable `arrays` dict per parameter."""
    per_param = split_named(named_arrays(state), matrices_per_param)
    return [{key: _squeezed(_widened(to_numpy(part)), key, count) for key, part in arrays.items()}
            for arrays, count in zip(per_param, matrices_per_param)]


def _squeezed(array, key: str, count: int):
    return array[0] if count == 1 and key in _PER_MATRIX_KEYS else array


def _widened(array):
    """ml_dtypes' bfloat16 (state stored with mu_dtype / precond_dtype) as float32, exactly: a
    checkpoint holds dtypes every framework reads; loading casts back to the optimizer's dtype."""
    return array.astype("float32") if array.dtype.kind == "V" else array


def _check_kind(name, key: str, array) -> None:
    """Counters are integers, everything else floating point (kind "V": ml_dtypes' bfloat16);
    a cast would silently drop a complex part or make counts of floats."""
    counter = key in ("skipped", "fallbacks")
    if array.dtype.kind not in ("iu" if counter else "fV"):
        raise CheckpointError(f"checkpoint parameter {name!r}: {key} has dtype {array.dtype}, expected "
                              + ("an integer dtype" if counter else "a floating-point dtype"))


def stacked_state_from_entries(template, entries, matrices_per_param, convert):
    """The inverse of stacked_state_entries: a core state shaped like `template` (a fresh
    init_state of the stack) filled from the entries' arrays; convert(numpy_array, like)
    gives an array of like's kind, dtype and device. Raises CheckpointError on a wrong shape."""
    import numpy as np

    total = sum(matrices_per_param)
    values = {}
    for key, like in named_arrays(template).items():
        rows = like.shape[0] // total
        parts = []
        for entry, count in zip(entries, matrices_per_param):
            if key not in entry["arrays"]:
                raise CheckpointError(f"checkpoint parameter {entry['name']!r} lacks array {key!r}")
            part = np.asarray(entry["arrays"][key])
            part = part[None] if count == 1 and key in _PER_MATRIX_KEYS else part
            expected = (count * rows, *like.shape[1:])
            if part.shape != expected:
                raise CheckpointError(f"checkpoint parameter {entry['name']!r}: {key} has shape "
                                      f"{part.shape}, expected {expected}")
            _check_kind(entry["name"], key, part)
            parts.append(part)
        values[key] = convert(np.concatenate(parts), like)
    count = convert(np.asarray(common_step(entries)), template.count)
    return state_from_named(type(template), values, count)


# ---- export and import: what every adapter's portable_state / load_portable_state runs --------
@dataclass(frozen=True)
class ParamIdentity:
    """One parameter as its checkpoint entry records it, less its step and arrays: the entry
    name it has unless the caller passes names, and what an entry must match to load into it."""
    name: str
    algorithm: str
    shape: tuple
    config: dict          # the math-changing options (checkpoint_config); lr is left out
    batch_dims: int = 0   # asgo/dasgo only; AdamW parameters are not matrices


def identity_from_group(name: str, group: dict, algorithm: str, shape) -> ParamIdentity:
    """The identity of a parameter of a param group with the torch-named options (the torch
    and NumPy/CuPy adapters)."""
    batch_dims = 0 if algorithm == "adamw" else group["batch_dims"]
    return ParamIdentity(name, algorithm, tuple(shape), checkpoint_config(group, algorithm), batch_dims)


def export_portable(params: list, arrays: list, steps, names=None, per: str = "parameter") -> dict:
    """The portable-state dict of an optimizer: params (ParamIdentity, in the optimizer's order),
    arrays (one {key: NumPy array} per param: stacked_state_entries for a matrix), steps (one
    int for all, or one per param). names: the caller's entry names (one per `per`), None: the
    params' own."""
    import numpy as np

    steps = steps if isinstance(steps, list) else [steps] * len(params)
    entries = []
    for param, name, param_arrays, step in zip(params, _names_of(params, names, per), arrays, steps):
        entries.append({"name": name, "algorithm": param.algorithm, "shape": list(param.shape),
                        "step": int(step), "batch_dims": param.batch_dims, "config": param.config,
                        "arrays": {key: _widened(np.asarray(value)) for key, value in param_arrays.items()}})
    return portable(entries)


def import_entries(portable_state: dict, params: list, names=None, per: str = "parameter") -> list:
    """The checkpoint entries for params (ParamIdentity), in their order, after every check
    that needs no array of the optimizer: the header, the structure, one entry per name, and
    each entry's algorithm, shape, batch_dims and options against its param. Raises
    CheckpointError (a names argument of the wrong length: ValueError) before the adapter
    changes anything; the arrays are checked where they are converted (stacked_state_from_entries,
    arrays_from_entry), which the adapter does before it writes."""
    _check_header(portable_state)
    entries = entries_in_order(portable_state, _names_of(params, names, per))
    for entry, param in zip(entries, params):
        check_entry_matches(entry, name=entry["name"], algorithm=param.algorithm, shape=param.shape,
                            config=param.config, batch_dims=param.batch_dims)
    return entries


def arrays_from_entry(entry: dict, templates: dict, convert, optional=()) -> dict:
    """{key: convert(array, like)} for each key of templates (the state an adapter keeps
    unstacked: AdamW's), shape and dtype kind checked. A key in `optional` (an adapter's own
    counter, "skipped") may be absent from the entry and then starts at zero."""
    import numpy as np

    values = {}
    for key, like in templates.items():
        if key not in entry["arrays"] and key not in optional:
            raise CheckpointError(f"checkpoint parameter {entry['name']!r} lacks array {key!r}")
        array = np.asarray(entry["arrays"][key]) if key in entry["arrays"] else np.zeros(tuple(like.shape))
        if array.shape != tuple(like.shape):
            raise CheckpointError(f"checkpoint parameter {entry['name']!r}: {key} has shape "
                                  f"{array.shape}, expected {tuple(like.shape)}")
        if key in entry["arrays"]:
            _check_kind(entry["name"], key, array)
        values[key] = convert(array, like)
    return values


class PortableCheckpoint:
    """portable_state / load_portable_state of an optimizer object (the torch, NumPy/CuPy and
    Keras adapters), written once. The adapter supplies _identities() (a ParamIdentity per
    entry, in its order), _portable_arrays() ((arrays, steps) as export_portable takes them),
    _load_entries(entries) (convert every entry, which checks its arrays, then write) and
    portable_entry (what one entry stands for, in messages)."""

    portable_entry = "parameter"

    def portable_state(self, names=None) -> dict:
        """This optimizer's state in the framework-neutral format of asgo_core.checkpoint (a host
        read of every state array). names: one entry name per entry, in the optimizer's order;
        None: the adapter's own names (docs/checkpoints.md)."""
        identities = self._identities()
        arrays, steps = self._portable_arrays()
        return export_portable(identities, arrays, steps, names, per=self.portable_entry)

    def load_portable_state(self, portable: dict, names=None) -> None:
        """Resume from a portable state (asgo_core.load_state(path) or any adapter's export);
        names as in portable_state. Every entry (algorithm, shape, options, arrays) is checked
        before anything changes; a mismatch raises CheckpointError."""
        self._load_entries(import_entries(portable, self._identities(), names, per=self.portable_entry))


def _names_of(params: list, names, per: str) -> list:
    return entry_names(names, [param.name for param in params], per)


def _check_header(portable_state: dict) -> None:
    """A dict built by hand may leave the header out (save_state writes it); a different one
    is another format."""
    header = (portable_state.get("format", FORMAT), portable_state.get("version", VERSION))
    if header != (FORMAT, VERSION):
        raise CheckpointError(f"portable state: format {header[0]!r} version {header[1]!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
