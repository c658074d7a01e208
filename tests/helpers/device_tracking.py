"""A check that a step creates every tensor on an explicit device: on this CPU-only machine
every tensor lands on the CPU anyway, so a factory called without `device=` (which on a GPU
would put state on the CPU next to CUDA parameters) is caught by recording the call itself."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

_FACTORIES = {"zeros", "ones", "empty", "full", "scalar_tensor", "arange"}


class DevicelessFactories(TorchDispatchMode):
    """Records the tensor factories called without an explicit device while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _FACTORIES and kwargs.get("device") is None:
            self.calls.append(str(func))
        return func(*args, **kwargs)
