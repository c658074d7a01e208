"""docs/gpu.md's GPU install, resolved by pip's dry run on the GPU machines' platform (Linux
x86-64, glibc 2.28, CPython 3.12). The resolution is network-bound (about 4 minutes, 10 s of CPU),
so the suite starts it in the background when it is collected (tests/conftest.py) and the test
that checks it waits for it at its turn: the minutes overlap the other tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The documented command: pip install torch==X -e ".[extras]"
DOCUMENTED = re.compile(r'^pip install (torch==\S+) -e "\.\[([\w,-]+)\]"', re.MULTILINE)
# manylinux wheels a glibc-2.28 machine accepts (pip takes the list as given, no older tags)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]
RESOLVE_TIMEOUT_S = 1400

_started: dict = {}


def documented_torch_pin() -> str:
    return DOCUMENTED.search((ROOT / "docs" / "gpu.md").read_text()).group(1)


def documented_requirements() -> list[str]:
    """The documented install without its `test` extra (pure-Python and CPU packages that no
    CUDA pin touches, and the slowest part to resolve)."""
    torch_pin, extras = DOCUMENTED.search((ROOT / "docs" / "gpu.md").read_text()).groups()
    gpu_extras = ",".join(extra for extra in extras.split(",") if extra != "test")
    return [torch_pin, f"{ROOT}[{gpu_extras}]"]


def start_resolution() -> None:
    """Start pip's dry run of the documented install, once per process."""
    if _started:
        return
    workdir = Path(tempfile.mkdtemp(prefix="asgo-gpu-install-"))
    report = workdir / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(workdir / "target"), "--only-binary=:all:", "--use-feature=fast-deps",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
               *(f"--platform={tag}" for tag in PLATFORMS), "--report", str(report),
               *documented_requirements()]
    log = (workdir / "pip.log").open("w")
    _started.update(process=subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True),
                    report=report, log=workdir / "pip.log")


def resolved_versions() -> dict:
    """{package name: version} of the documented install, waiting for the dry run to end."""
    start_resolution()
    returncode = _started["process"].wait(timeout=RESOLVE_TIMEOUT_S)
    assert returncode == 0, _started["log"].read_text()[-6000:]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(_started["report"].read_text())["install"]}
