"""How a stack of (m, n) matrices is cut into the square blocks that get one preconditioner each.

The preconditioned side (SPEC §2) is turned into the rows ("canonical" orientation: the
gradient itself for the left side, its transpose for the right side). Those k rows are split
first into `num_heads` equal head blocks (SPEC §4), then each head into blocks of at most
`max_precond_dim` rows: as many full blocks as fit, plus one remainder block. Blocks of equal
size form a group that is processed as one batched array of shape (count, size, other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asgo_core import _xp
from asgo_core.config import ASGOConfig


def matrix_view_shape(shape) -> tuple[int, int]:
    """The (out, rest) matrix an N-D parameter is treated as (conv kernels: out × in·kh·kw)."""
    if len(shape) < 2:
        raise ValueError(f"a parameter of shape {tuple(shape)} is not a matrix; it needs at least 2 dims")
    m, n = int(shape[0]), int(math.prod(shape[1:]))
    if m == 0 or n == 0:
        raise ValueError(f"a parameter of shape {tuple(shape)} has a zero-size matrix view ({m}, {n}); "
                         "ASGO/DASGO need both sides >= 1 (give it algorithm='adamw')")
    return m, n


def check_batch_dims_value(batch_dims) -> None:
    """batch_dims, whatever the parameter: an int >= 0."""
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"batch_dims={batch_dims!r} is invalid; accepted: an integer >= 0")


def check_batch_dims(shape, batch_dims) -> None:
    """batch_dims: an int >= 0 that leaves at least 2 dims for the matrix."""
    check_batch_dims_value(batch_dims)
    if batch_dims > len(shape) - 2:
        raise ValueError(f"batch_dims={batch_dims!r} is invalid for a parameter of shape {tuple(shape)}; "
                         f"accepted: an integer in [0, {max(len(shape) - 2, 0)}] (ndim - 2 at most)")


def matrix_stack_shape(shape, batch_dims: int = 0) -> tuple[int, int, int]:
    """(count, out, rest): the first batch_dims dims of a parameter index independent matrices
    (stacked experts or layers); each is viewed as matrix_view_shape of the remaining dims."""
    check_batch_dims(shape, batch_dims)
    count = int(math.prod(shape[:batch_dims]))
    if count == 0:
        raise ValueError(f"a parameter of shape {tuple(shape)} with batch_dims={batch_dims} stacks no "
                         "matrices (a batch dimension is 0)")
    return (count, *matrix_view_shape(shape[batch_dims:]))


@dataclass(frozen=True)
class PermutedStack:
    """An N-D array as a (matrices, out, rest) stack: its axes put in `permutation` order (batch
    axes, output axes, input axes), then reshaped to `stack_shape`. `ops` is the array namespace
    (or keras.ops) that does it: its permute_dims or numpy-style transpose, and reshape."""
    permutation: tuple
    permuted_shape: tuple
    stack_shape: tuple
    batch_dims: int = 0             # how many leading axes of the permuted array index matrices

    @classmethod
    def outputs_first(cls, shape, batch_dims: int = 0) -> "PermutedStack":
        """The torch layout: batch dims, then the output dim, then the rest (a plain reshape)."""
        stack_shape = matrix_stack_shape(shape, batch_dims)
        return cls(tuple(range(len(shape))), tuple(shape), stack_shape, batch_dims)

    @classmethod
    def from_axes(cls, shape, input_axes, output_axes) -> "PermutedStack":
        """Any layout, named by its axes: `input_axes` and `output_axes` (an int or a tuple each;
        negative ones count from the end) are the matrices' inputs and outputs, every other axis
        indexes matrices, in order. ValueError for fewer than 2 axes, empty or overlapping axis
        sets, or a zero-size stack."""
        shape, ndim = tuple(shape), len(shape)
        if ndim < 2:
            raise ValueError(f"an array of shape {shape} cannot be a matrix (it has fewer than 2 axes)")
        inputs, outputs = _normalized_axes(input_axes, ndim), _normalized_axes(output_axes, ndim)
        if set(inputs) & set(outputs) or not inputs or not outputs:
            raise ValueError(f"input axes {inputs} and output axes {outputs} of shape {shape} are invalid; "
                             "accepted: disjoint, non-empty sets of axes")
        batch = tuple(axis for axis in range(ndim) if axis not in inputs + outputs)
        stack_shape = tuple(math.prod(shape[axis] for axis in axes) for axes in (batch, outputs, inputs))
        if 0 in stack_shape:
            raise ValueError(f"shape {shape} has a zero-size matrix stack {stack_shape} (matrices, outputs, "
                             "inputs); ASGO/DASGO need each >= 1")
        permutation = batch + outputs + inputs
        return cls(permutation, tuple(shape[axis] for axis in permutation), stack_shape, len(batch))

    @classmethod
    def outputs_last(cls, shape, batch_dims: int = 0) -> "PermutedStack":
        """The Keras layout (Dense (in, out), Conv2D (kh, kw, in, out)): the last dim is the
        output, moved after the batch dims."""
        check_batch_dims(shape, batch_dims)
        last = len(shape) - 1
        permutation = (*range(batch_dims), last, *range(batch_dims, last))
        permuted = tuple(shape[axis] for axis in permutation)
        return cls(permutation, permuted, matrix_stack_shape(permuted, batch_dims), batch_dims)

    def to_stack(self, x, ops):
        return ops.reshape(self._permuted(x, self.permutation, ops), self.stack_shape)

    def from_stack(self, stack, ops):
        inverse = tuple(sorted(range(len(self.permutation)), key=self.permutation.__getitem__))
        return self._permuted(ops.reshape(stack, self.permuted_shape), inverse, ops)

    @staticmethod
    def _permuted(x, axes, ops):
        if axes == tuple(range(len(axes))):
            return x
        permute = getattr(ops, "permute_dims", None) or ops.transpose
        return permute(x, axes)


def _normalized_axes(axes, ndim: int) -> tuple:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(axis % ndim for axis in axes)


def resolve_side(m: int, n: int, config: ASGOConfig) -> str:
    """"left" preconditions the m rows, "right" the n columns; "auto" picks the smaller
    (right for a square matrix, as the reference code does); head blocks force the left."""
    if config.side != "auto":
        return config.side
    if config.num_heads is not None:
        return "left"
    return "left" if m < n else "right"


@dataclass(frozen=True)
class BlockLayout:
    side: str
    num_matrices: int          # B, the flattened leading (stack) dimensions
    heads: int
    head_rows: int             # rows of one head block (k / heads)
    block_size: int            # rows of a full block
    full_blocks: int           # full blocks per head
    remainder: int             # rows of the remainder block per head (0: none)
    other: int                 # length of the non-preconditioned side

    @property
    def is_single_block(self) -> bool:
        """One preconditioner per matrix: no heads, no splitting."""
        return self.heads == 1 and self.full_blocks == 1 and not self.remainder

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Block size of each group: the full blocks, then the remainder block if any."""
        sizes = (self.block_size,) if self.full_blocks else ()
        return sizes + ((self.remainder,) if self.remainder else ())

    @property
    def group_counts(self) -> tuple[int, ...]:
        """Blocks per matrix in each group, matching group_sizes."""
        counts = (self.heads * self.full_blocks,) if self.full_blocks else ()
        return counts + ((self.heads,) if self.remainder else ())

    def split(self, stack, xp):
        """(B, m, n) → one (B·blocks, size, other) array per group, in matrix-major order."""
        rows = self._canonical(stack, xp)
        if self.is_single_block:
            return [rows]  # a view: no reshape, which would copy a transposed (right-side) stack
        rows = xp.reshape(rows, (self.num_matrices * self.heads, self.head_rows, self.other))
        groups = []
        full_rows = self.full_blocks * self.block_size
        if self.full_blocks:
            # Flattened first: the blocks are then contiguous (one copy at most) for any B, so a
            # matrix's GEMMs, and so its result, do not depend on how many matrices share its stack.
            full = xp.reshape(rows[:, :full_rows, :], (-1,))
            groups.append(xp.reshape(full, (-1, self.block_size, self.other)))
        if self.remainder:
            groups.append(rows[:, full_rows:, :])
        return groups

    def merge(self, groups, xp):
        """Inverse of split: the per-group block arrays back to the (B, m, n) stack."""
        if self.is_single_block:
            return self._canonical(groups[0], xp)
        rows_per_head = [rows for rows in (self.full_blocks * self.block_size, self.remainder) if rows]
        parts = [xp.reshape(group, (self.num_matrices * self.heads, rows, self.other))
                 for rows, group in zip(rows_per_head, groups)]
        rows = xp.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        rows = xp.reshape(rows, (self.num_matrices, self.heads * self.head_rows, self.other))
        return self._canonical(rows, xp)

    def per_block(self, values, group_index: int, xp):
        """Repeat a per-matrix (B,) array to the blocks of one group."""
        count = self.group_counts[group_index]
        expanded = xp.broadcast_to(values[:, None], (self.num_matrices, count))
        return xp.reshape(expanded, (self.num_matrices * count,))

    def per_matrix_sum(self, values, group_index: int, xp):
        """Sum a per-block array of one group over each matrix's blocks → (B,)."""
        count = self.group_counts[group_index]
        return xp.sum(xp.reshape(values, (self.num_matrices, count)), axis=1, dtype=values.dtype)

    def _canonical(self, stack, xp):
        return stack if self.side == "left" else _xp.transpose(stack, xp)


def block_layout(shape, config: ASGOConfig) -> BlockLayout:
    """The layout of a (..., m, n) stack under config; errors name the offending option."""
    *lead, m, n = shape
    side = resolve_side(m, n, config)
    k, other = (m, n) if side == "left" else (n, m)
    heads = config.num_heads or 1
    if k % heads:
        raise ValueError(f"num_heads={heads} does not divide the preconditioned dimension {k} "
                         f"of a ({m}, {n}) matrix; accepted: a divisor of {k}")
    head_rows = k // heads
    block_size = min(head_rows, config.max_precond_dim or head_rows)
    return BlockLayout(
        side=side, num_matrices=math.prod(lead), heads=heads, head_rows=head_rows,
        block_size=block_size, full_blocks=head_rows // block_size,
        remainder=head_rows % block_size, other=other)
