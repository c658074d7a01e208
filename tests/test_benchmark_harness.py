"""benchmarks/harness.py, the benchmark scripts' shared timing, machine description and files,
on a fake clock (no timed assertions)."""

from __future__ import annotations

import json

import numpy as np

import harness  # benchmarks/ (pyproject.toml: pytest's pythonpath)


class FakeClock:
    """Wall and CPU clocks that move only when the test says so."""

    def __init__(self, monkeypatch):
        self.wall = self.cpu = 0.0
        monkeypatch.setattr(harness.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(harness.time, "process_time", lambda: self.cpu)

    def advance(self, wall: float, cpu: float = 0.0) -> None:
        self.wall += wall
        self.cpu += cpu


def test_a_sample_holds_the_call_and_the_sync_after_it_not_the_one_before(monkeypatch):
    clock = FakeClock(monkeypatch)
    taken = harness.sample(lambda: clock.advance(2.0, cpu=0.5), sync=lambda: clock.advance(1.0))
    assert taken == harness.Sample(wall_s=3.0, cpu_s=0.5)


def test_warm_up_calls_run_but_are_left_out(monkeypatch):
    clock = FakeClock(monkeypatch)
    durations = iter([10.0, 1.0, 2.0, 3.0])
    calls = []

    def call():
        calls.append(1)
        clock.advance(next(durations))

    taken = harness.samples(call, 3, warmup=1)
    assert len(calls) == 4 and [s.wall_s for s in taken] == [1.0, 2.0, 3.0]
    assert harness.median_wall(taken) == 2.0


def test_interleaved_calls_take_turns_round_by_round():
    order = []
    taken = harness.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                rounds=2, per_turn=2)
    assert order == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert {name: len(samples) for name, samples in taken.items()} == {"a": 4, "b": 4}


def test_median_cpu_reduces_the_cpu_seconds():
    taken = [harness.Sample(wall_s=9.0, cpu_s=cpu) for cpu in (0.3, 0.1, 0.2)]
    assert harness.median_cpu(taken) == 0.2


def test_stopwatch_times_a_block_and_the_time_since_it_was_made(monkeypatch):
    clock = FakeClock(monkeypatch)
    whole = harness.Stopwatch()
    with harness.Stopwatch() as block:
        clock.advance(4.0, cpu=1.0)
    clock.advance(1.0)
    assert (block.wall_s, block.cpu_s) == (4.0, 1.0)
    assert whole.elapsed() == harness.Sample(wall_s=5.0, cpu_s=1.0)


def test_cpuinfo_reads_a_field_by_its_whole_name(tmp_path):
    listing = tmp_path / "cpuinfo"
    listing.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n"
                       "flags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert harness.cpuinfo("model", listing) == "1"
    assert harness.cpuinfo("model name", listing) == "AMD EPYC 7B13"
    assert harness.cpuinfo("flags", listing) == "fpu avx2" and harness.cpuinfo("bogomips", listing) is None
    assert harness.cpuinfo("model", tmp_path / "missing") is None


def test_machine_names_the_cpu_cores_load_and_installed_versions_only():
    described = harness.machine("numpy", "no-such-distribution-xyz", threads=3)
    assert described["cpu"] and described["cores"] >= 1 and len(described["load_average"]) == 3
    assert described["numpy"] == np.__version__ and "no-such-distribution-xyz" not in described
    assert described["threads"] == 3
    assert set(described["bf16_flags"]) <= harness.NATIVE_BF16_FLAGS | {"amx_tile"}


def test_json_files_make_their_folder_and_write_what_json_has_no_type_for_as_text(tmp_path):
    path = harness.write_json(tmp_path / "new" / "result.json", {"x": np.float32(0.5), "n": 2})
    assert json.loads(path.read_text()) == {"x": "0.5", "n": 2} and path.read_text().endswith("\n")


def test_json_lines_add_up_across_appends_and_a_missing_file_reads_as_empty(tmp_path):
    assert harness.read_jsonl(tmp_path / "runs.jsonl") == []
    harness.append_jsonl(tmp_path / "runs.jsonl", {"run": 1})
    harness.append_jsonl(tmp_path / "runs.jsonl", {"run": 2})
    assert harness.read_jsonl(tmp_path / "runs.jsonl") == [{"run": 1}, {"run": 2}]


def test_a_saved_figure_is_written_and_closed(tmp_path):
    plt = harness.pyplot()
    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    path = harness.save_figure(figure, tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.number not in plt.get_fignums()
