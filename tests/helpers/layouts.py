"""The torch adapter's matrix layout, (out, in) with the input dimensions last, spelt as the optax
adapter's dimension numbers: the tables run optax on the same arrays as torch."""

from __future__ import annotations

import numpy as np


def torch_layout_dimension_numbers(params: dict) -> dict:
    from asgo_core.adapters.optax import MuonDimensionNumbers
    return {name: MuonDimensionNumbers(reduction_axis=tuple(range(1, np.ndim(value))), output_axis=0)
            if np.ndim(value) >= 2 else None for name, value in params.items()}
