"""docs/gpu.md's GPU install resolves on the GPU machines' platform (Linux x86-64, glibc 2.28,
CPython 3.12) to one CUDA major: pip's dry run over the package index, the way the documented
command would install it there (tests/helpers/gpu_install.py). pip reads each wheel's metadata
with HTTP range requests, never whole wheels; the resolution is network-bound and takes minutes,
so the suite starts it in the background at collection (tests/conftest.py) and this test waits
for its result. It carries the `install` marker, which runs by default and lets a quick run
leave it out (-m "not install")."""

from __future__ import annotations

import re

import pytest
from helpers.gpu_install import documented_torch_pin, resolved_versions


@pytest.mark.install
@pytest.mark.timeout(1500)
def test_the_documented_gpu_install_resolves_to_cuda_13_builds():
    resolved = resolved_versions()
    assert resolved["torch"] == documented_torch_pin().split("==")[1]
    assert resolved["cupy-cuda13x"].startswith("14.")
    assert resolved["jax-cuda13-plugin"] == resolved["jax"] == resolved["jaxlib"]
    assert resolved["cuda-toolkit"].startswith("13.")
    assert not [name for name in resolved if re.search(r"cu(da)?12", name)]
