"""docs/gpu.md's GPU install resolves on the GPU machines' platform (Linux x86-64, glibc 2.28,
CPython 3.12) to one CUDA major: pip's dry run over the package index, the way the documented
command would install it there, without the `test` extra (pure-Python and CPU packages that no
CUDA pin touches, and the slowest part to resolve). pip reads each wheel's metadata with HTTP
range requests, never whole wheels; still the slowest test of the suite (network-bound: 4 to
11 minutes on the loaded 2-core development machine), so it carries the `install` marker,
which runs by default and lets a quick run leave it out (-m "not install")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The documented command: pip install torch==X -e ".[extras]"
DOCUMENTED = re.compile(r'^pip install (torch==\S+) -e "\.\[([\w,-]+)\]"', re.MULTILINE)
# manylinux wheels a glibc-2.28 machine accepts (pip takes the list as given, no older tags)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]


def _resolve(requirements, tmp_path) -> dict:
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(tmp_path / "target"), "--only-binary=:all:", "--use-feature=fast-deps",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
               *(f"--platform={tag}" for tag in PLATFORMS), "--report", str(report), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.install
@pytest.mark.timeout(1500)
def test_the_documented_gpu_install_resolves_to_cuda_13_builds(tmp_path):
    torch_pin, extras = DOCUMENTED.search((ROOT / "docs" / "gpu.md").read_text()).groups()
    gpu_extras = ",".join(extra for extra in extras.split(",") if extra != "test")
    resolved = _resolve([torch_pin, f"{ROOT}[{gpu_extras}]"], tmp_path)
    assert resolved["torch"] == torch_pin.split("==")[1]
    assert resolved["cupy-cuda13x"].startswith("14.")
    assert resolved["jax-cuda13-plugin"] == resolved["jax"] == resolved["jaxlib"]
    assert resolved["cuda-toolkit"].startswith("13.")
    assert not [name for name in resolved if re.search(r"cu(da)?12", name)]
