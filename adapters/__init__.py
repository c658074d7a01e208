"""Framework adapters: asgo_core.adapters.torch, .optax and .cupy (each imports only its framework)."""
