"""A core state (ASGOState / DASGOState) as named arrays, and back.

The names are the portable checkpoint's (asgo_core.checkpoint): one per field, a tuple field
("gram", "root": one array per block group) as "<field>/<group>"; the step count is kept apart
(adapters count steps their own way). Every named array has the stack's matrices on its leading
axis (r rows per matrix), so the state of a bucket splits into its members' states and joins
back by their matrix counts. A framework that keeps its state in variables makes one variable
per name of `flat_spec`. A parameter-shaped state (optax) keeps one set of named arrays per
parameter with the momentum in the parameter's own shape, seen through its matrix view
(`member_named`, `state_from_member_named`); the torch adapter keeps fields per parameter with
its batch shape in front (`member_states`, `stacked_state`).
"""

from __future__ import annotations

from asgo_core.buckets import concat, split_rows


def named_arrays(state) -> dict:
    """{name: array} of every field but count."""
    named = {}
    for name, value in zip(state._fields, state):
        if name == "count":
            continue
        if isinstance(value, tuple):
            named.update((f"{name}/{group}", array) for group, array in enumerate(value))
        else:
            named[name] = value
    return named


def state_from_named(state_type, named: dict, count):
    """The inverse of named_arrays: a `state_type` of the named arrays and the step count."""
    values = {"count": count}
    for name in state_type._fields:
        if name in named:
            values[name] = named[name]
        elif name != "count":
            groups = sorted(int(key.split("/")[1]) for key in named if key.startswith(f"{name}/"))
            values[name] = tuple(named[f"{name}/{group}"] for group in groups)
    return state_type(**values)


def flat_spec(state) -> tuple:
    """((name, shape, dtype), ...) of named_arrays(state), or of a dict of named arrays (AdamW's
    state): what one variable per array needs."""
    named = state if isinstance(state, dict) else named_arrays(state)
    return tuple((name, tuple(array.shape), array.dtype) for name, array in named.items())


def split_named(named: dict, counts) -> list:
    """The named arrays of a stack of sum(counts) matrices → one dict per member (views)."""
    parts = [{} for _ in counts]
    for name, array in named.items():
        for part, rows in zip(parts, split_rows(array, counts)):
            part[name] = rows
    return parts


def concat_named(parts: list, ops) -> dict:
    """The inverse of split_named."""
    return {name: concat([part[name] for part in parts], ops) for name in parts[0]}


def state_from_member_named(state_type, members: list, views: list, count, ops):
    """A `state_type` of the stack of `views` (asgo_core.layout.PermutedStack, one per member)
    from each member's named arrays, whose momentum is in the member's own shape."""
    stacked = [dict(named, momentum=view.to_stack(named["momentum"], ops))
               for view, named in zip(views, members)]
    return state_from_named(state_type, concat_named(stacked, ops), count)


def member_named(state, views: list, ops) -> list:
    """The inverse of state_from_member_named: each member's named arrays, momentum in its own
    shape."""
    parts = split_named(named_arrays(state), [view.stack_shape[0] for view in views])
    return [dict(named, momentum=view.from_stack(named["momentum"], ops))
            for view, named in zip(views, parts)]


def member_states(state, counts, batch_shapes, reshape) -> list:
    """The core state of a stack → one dict of fields per member, as an adapter that keeps its
    state per parameter holds it: a per-matrix array with the member's batch shape in front
    (momentum (m, n) for one matrix, (E, m, n) for a stack of E), a tuple field (gram, root) as
    the list of its block groups' (matrices·blocks, size, size) arrays. reshape(array, shape)
    should give views, so the members' arrays stay slices of the stack's."""
    members = []
    for named, batch_shape in zip(split_named(named_arrays(state), counts), batch_shapes):
        fields = {}
        for name, array in named.items():
            field, _, group = name.partition("/")
            if group:
                fields.setdefault(field, []).append(array)  # named_arrays lists groups in order
            else:
                fields[field] = reshape(array, (*batch_shape, *array.shape[1:]))
        members.append(fields)
    return members


def stacked_state(state_type, members: list, batch_dims: int, count, join):
    """The inverse of member_states: a `state_type` whose arrays join(arrays, item_shape) stacks
    from one array per member into (rows, *item_shape); other keys of the members are ignored."""
    values = {"count": count}
    for field in state_type._fields:
        first = members[0].get(field)
        if isinstance(first, list):
            values[field] = tuple(join([member[field][group] for member in members], like.shape[1:])
                                  for group, like in enumerate(first))
        elif field != "count":
            values[field] = join([member[field] for member in members], first.shape[batch_dims:])
    return state_type(**values)
