"""Bucket planning: the matrices of many parameters stepped as one stack per bucket.

An adapter hands each matrix parameter over as a `Member`: its handle (a key, a leaf index, a
variable: whatever the adapter finds it by) and its `PermutedStack` view, the (count, m, n)
stack its array is read as. Members whose view has the same (m, n) and the same adapter key
(group, algorithm, dtype, device, ...: what else must agree for one core call) form a
`Bucket`, stacked in the order they came: the rows of member i follow those of member i - 1.
Gathering and scattering go through the array namespace (or keras.ops) the caller passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asgo_core.layout import PermutedStack


@dataclass(frozen=True)
class Member:
    handle: Any
    view: PermutedStack

    @property
    def count(self) -> int:
        """Matrices this member adds to its bucket's stack."""
        return self.view.stack_shape[0]


@dataclass
class Bucket:
    key: tuple                      # (m, n) first, then the adapter's key
    members: list = field(default_factory=list)
    state: Any = None               # the core state of the stack, where the adapter keeps it here

    @property
    def matrix_shape(self) -> tuple:
        return self.key[0]

    @property
    def counts(self) -> list:
        return [member.count for member in self.members]

    @property
    def handles(self) -> list:
        return [member.handle for member in self.members]

    @property
    def views(self) -> list:
        return [member.view for member in self.members]

    def only(self, keep) -> "Bucket":
        """A bucket of the same key with the members whose handle keep(handle) accepts (the state
        is not carried)."""
        return Bucket(self.key, [member for member in self.members if keep(member.handle)])

    def mapped(self, handles: dict) -> "Bucket":
        """A bucket of the same key with the members whose handle `handles` maps, each under its
        new handle handles[old] with its old view (the state is not carried)."""
        return Bucket(self.key, [Member(handles[member.handle], member.view) for member in self.members
                                 if member.handle in handles])

    def gather(self, arrays, ops):
        """The (matrices, m, n) stack of one array per member (in member order)."""
        return concat([member.view.to_stack(array, ops) for member, array in zip(self.members, arrays)], ops)

    def scatter(self, stack, ops) -> list:
        """Each member's rows of a (matrices, m, n) stack, in the member's own shape."""
        parts = split_rows(stack, self.counts)
        return [member.view.from_stack(rows, ops) for member, rows in zip(self.members, parts)]


def plan_buckets(members, adapter_key=lambda member: ()) -> list:
    """Buckets of `members` (in first-seen order) by (matrix shape, adapter_key(member)). Keys
    are compared, never hashed: under torch.compile a step count in a key is a symbolic int,
    which hashing would turn into a constant (and so a recompilation at every step)."""
    buckets: list[Bucket] = []
    for member in members:
        key = (member.view.stack_shape[1:], *adapter_key(member))
        bucket = next((bucket for bucket in buckets if bucket.key == key), None)
        if bucket is None:
            bucket = Bucket(key)
            buckets.append(bucket)
        bucket.members.append(member)
    return buckets


def split_rows(array, counts) -> list:
    """`array`'s leading axis cut in proportion to counts: an array with r rows per matrix
    (momentum: 1, a Gram group: its blocks per matrix) gives r·counts[i] rows to member i."""
    rows = array.shape[0] // sum(counts)
    parts, start = [], 0
    for count in counts:
        parts.append(array[start * rows:(start + count) * rows, ...])
        start += count
    return parts


def concat(arrays: list, ops):
    """arrays joined along the first axis (one array: itself, no copy)."""
    if len(arrays) == 1:
        return arrays[0]
    join = getattr(ops, "concat", None) or ops.concatenate
    return join(arrays, axis=0)
