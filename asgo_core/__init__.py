"""asgo: ASGO (Adaptive Structured Gradient Optimization) written once in array-API code.

The core is framework-free: it imports array_api_compat and the standard library only.
Adapters for PyTorch, optax and CuPy/NumPy live in asgo_core.adapters.
"""

from asgo_core.checkpoint import CheckpointError, load_state, save_state
from asgo_core.config import ASGOConfig, DASGOConfig
from asgo_core.layout import BlockLayout, block_layout, check_batch_dims, matrix_stack_shape, matrix_view_shape
from asgo_core.solvers import inverse_root
from asgo_core.step import (
    FALLBACK_LEVELS,
    ASGOState,
    DASGOState,
    RowShards,
    every_root,
    init_state,
    needs_root_refresh,
    statistics_dtype,
    step,
    step_terms,
)

__all__ = [
    "ASGOConfig",
    "DASGOConfig",
    "ASGOState",
    "DASGOState",
    "RowShards",
    "BlockLayout",
    "CheckpointError",
    "FALLBACK_LEVELS",
    "block_layout",
    "check_batch_dims",
    "every_root",
    "init_state",
    "inverse_root",
    "load_state",
    "matrix_stack_shape",
    "matrix_view_shape",
    "needs_root_refresh",
    "save_state",
    "statistics_dtype",
    "step",
    "step_terms",
]
