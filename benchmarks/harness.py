"""What the benchmark scripts share: timing, the machine's description, JSON files and plots.

Imports only the standard library and NumPy (benchmarks/gpu_check.py runs on machines with
little else installed); matplotlib is imported when a figure is made, a framework never: a
script passes its own device synchronisation (`sync`) and names the distributions whose
versions it records.

Timing: `sample` times one call (wall and process CPU seconds, `sync()` before and after so
queued device work or the other ranks are inside), `interleaved` takes turns between several
calls round by round so that a change in machine load affects them alike, `median_wall` /
`median_cpu` reduce the samples; `Stopwatch` times a block inside a loop.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

# /proc/cpuinfo flags that mean native bfloat16 matmuls on a CPU; machine() also lists amx_tile
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# ---------------------------------------------------------------------------------- timing

class Sample(NamedTuple):
    wall_s: float
    cpu_s: float  # this process's CPU time, all its threads


class Stopwatch:
    """Wall and process CPU seconds: since it was made (`elapsed()`), or of a `with` block
    (`with Stopwatch() as clock: ...`, then `clock.wall_s`, `clock.cpu_s`)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def elapsed(self) -> Sample:
        return Sample(time.perf_counter() - self._start[0], time.process_time() - self._start[1])

    def __enter__(self) -> Stopwatch:
        self.restart()
        return self

    def __exit__(self, *exception) -> None:
        self.wall_s, self.cpu_s = self.elapsed()


def no_sync() -> None:
    pass


def sample(call: Callable[[], object], sync: Callable[[], object] = no_sync) -> Sample:
    """One timed call, with `sync()` before it and inside the timing after it."""
    sync()
    clock = Stopwatch()
    call()
    sync()
    return clock.elapsed()


def samples(call: Callable[[], object], times: int, *, warmup: int = 0,
            sync: Callable[[], object] = no_sync) -> list[Sample]:
    """`times` samples of `call` after `warmup` calls run the same way and left out."""
    taken = [sample(call, sync) for _ in range(warmup + times)]
    return taken[warmup:]


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, *, per_turn: int = 1,
                sync: Callable[[], object] = no_sync) -> dict[str, list[Sample]]:
    """name → samples: `rounds` rounds, in each every call takes its turn for `per_turn` samples."""
    taken = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            taken[name] += samples(call, per_turn, sync=sync)
    return taken


def median_wall(taken: list[Sample]) -> float:
    return statistics.median(s.wall_s for s in taken)


def median_cpu(taken: list[Sample]) -> float:
    return statistics.median(s.cpu_s for s in taken)


# --------------------------------------------------------------------------------- machine

def cpuinfo(field: str, path: str | Path = "/proc/cpuinfo") -> str | None:
    """The first processor's `field` in /proc/cpuinfo ("model name", "cpu family", "model",
    "flags"), None where there is no such file or field."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((value.strip() for key, _, value in (line.partition(":") for line in lines)
                 if key.strip() == field), None)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU flags of /proc/cpuinfo (None where there is none)."""
    flags = cpuinfo("flags")
    return None if flags is None else set(flags.split())


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages: other processes on the cores inflate timings."""
    return os.getloadavg()


def warn_if_busy() -> None:
    """Timings mean little when other processes compete for the cores."""
    load = load_average()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before starting; "
              f"step times will be inflated by other processes")


def versions(*distributions: str) -> dict[str, str]:
    """Python's, NumPy's and each installed distribution's version (read from its metadata:
    nothing is imported; one not installed is left out)."""
    found = {"python": platform.python_version(), "numpy": np.__version__}
    for distribution in distributions:
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine(*distributions: str, **extra) -> dict:
    """The CPU (model name, family and model number), its bf16 flags, cores, load average, OS and
    versions, plus `extra`."""
    bf16_flags = (cpu_flags() or set()) & (NATIVE_BF16_FLAGS | {"amx_tile"})
    return {"cpu": cpu_model(), "cpu_family": cpuinfo("cpu family"), "cpu_model_number": cpuinfo("model"),
            "cores": os.cpu_count(), "bf16_flags": sorted(bf16_flags),
            "load_average": load_average(), "platform": platform.platform(),
            **versions(*distributions), **extra}


# ------------------------------------------------------------------------------------ files

def write_json(path: str | Path, data, *, indent: int = 1) -> Path:
    """`data` as JSON at `path` (its folder made), ending in a newline; a value JSON has no type
    for (a NumPy scalar, a path) is written as its str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    return path


def append_jsonl(path: str | Path, record: dict) -> None:
    """One record as a line of `path`: separate runs add up, and a cut run keeps what finished."""
    with Path(path).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ plots

def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out, write and close `figure`."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return Path(path)
