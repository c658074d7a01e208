"""The backend seam: fast paths keyed by array namespace.

The core asks `backend_for(xp)` for the module that holds a namespace's fast paths and falls
back to its generic array-API code for anything the module does not define. Backend modules
are imported only when arrays of their framework arrive, so a missing framework is never
imported. A backend module may define any of:

    eigh(A) -> (eigenvalues, eigenvectors)          batched symmetric eigendecomposition
    coupled_step(Y, Z, a, b, c) -> (Y, Z)           one step of the coupled root iteration
    gram_update(V, G, beta, alpha) -> V             beta·V + alpha·G·Gᵀ, batched
    masked_ema(mask, old, new, beta, overwrite)     where(mask, beta·old + (1 − beta)·new, old);
                                                    free to skip the where when the mask is all
                                                    true and reading it costs no device sync,
                                                    and to write into old when overwrite is True
    select(mask, if_true, if_false) -> array         where(mask, if_true, if_false) for same-shaped
                                                    arrays; free to return one of them as it is
                                                    when the mask is uniform and reading it costs
                                                    no device sync
    choose_root_method(k, dtype, device) -> str     what root_method="auto" resolves to
    run_if(predicate, compute, otherwise) -> value  compute() only where predicate (a 0-d
                                                    bool array) holds, without host sync
                                                    where the framework allows
"""

from __future__ import annotations

import importlib

import array_api_compat

# name → (module under asgo_core.backends, array_api_compat predicate on the namespace)
_REGISTRY = {
    "numpy": ("numpy", array_api_compat.is_numpy_namespace),
    "torch": ("torch", array_api_compat.is_torch_namespace),
    "jax": ("jax", array_api_compat.is_jax_namespace),
    "cupy": ("cupy", array_api_compat.is_cupy_namespace),
}

_loaded: dict[str, object] = {}


def backend_name(xp) -> str | None:
    """The registry key for namespace xp, or None when no backend serves it."""
    for name, (_, matches) in _REGISTRY.items():
        if matches(xp):
            return name
    return None


def backend_for(xp):
    """The backend module for namespace xp, or None (the generic array-API code is used)."""
    name = backend_name(xp)
    if name is None:
        return None
    if name not in _loaded:
        module_name = f"{__name__}.{_REGISTRY[name][0]}"
        try:
            _loaded[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            _loaded[name] = None  # entry not written yet: generic code serves this namespace
    return _loaded[name]
