"""Portable checkpoint files: round trip, and truncated / corrupted / foreign files rejected whole."""

from __future__ import annotations

import numpy as np
import pytest

from asgo_core import CheckpointError, load_state, save_state
from asgo_core.checkpoint import check_entry_matches
from helpers.checkpoints import assert_same_state, loads_with_one_bit_flipped


def portable_state():
    rng = np.random.default_rng(0)
    return {"params": [
        {"name": "layer.weight", "algorithm": "asgo", "shape": [4, 6], "step": 3,
         "config": {"beta2": 0.8, "side": "auto"},
         "arrays": {"momentum": rng.standard_normal((4, 6)), "gram/0": rng.standard_normal((1, 4, 4)),
                    "root/0": rng.standard_normal((1, 4, 4)), "skipped": np.array(0),
                    "fallbacks": np.array([0, 1, 0])}},
        {"name": "layer.bias", "algorithm": "adamw", "shape": [4], "step": 3,
         "config": {"betas": [0.9, 0.95]},
         "arrays": {"exp_avg": rng.standard_normal(4).astype(np.float32),
                    "exp_avg_sq": rng.random(4).astype(np.float32)}},
    ]}


def test_round_trip_keeps_every_value_and_dtype(tmp_path):
    original = portable_state()
    save_state(tmp_path / "state.npz", original)
    loaded = load_state(tmp_path / "state.npz")
    assert [e["name"] for e in loaded["params"]] == ["layer.weight", "layer.bias"]
    for before, after in zip(original["params"], loaded["params"]):
        assert after["step"] == before["step"] and after["config"] == before["config"]
        assert set(after["arrays"]) == set(before["arrays"])
        for key, value in before["arrays"].items():
            assert after["arrays"][key].dtype == np.asarray(value).dtype
            assert np.array_equal(after["arrays"][key], value)


def test_truncated_file_raises(tmp_path):
    path = tmp_path / "state.npz"
    save_state(path, portable_state())
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_state(path)


def test_corrupted_array_bytes_fail_the_crc_check(tmp_path):
    path = tmp_path / "state.npz"
    save_state(path, portable_state())
    content = bytearray(path.read_bytes())
    position = content.index(b"\x93NUMPY") + 200  # inside the first array's data
    content[position] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError):
        load_state(path)


def test_a_plain_npz_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.ones(3))
    with pytest.raises(CheckpointError, match="not an asgo checkpoint"):
        load_state(tmp_path / "other.npz")


def test_incomplete_entry_is_rejected_before_writing(tmp_path):
    state = portable_state()
    del state["params"][0]["arrays"]["momentum"]
    with pytest.raises(CheckpointError, match="momentum"):
        save_state(tmp_path / "state.npz", state)
    assert not (tmp_path / "state.npz").exists()


def test_entry_mismatch_names_the_difference():
    entry = portable_state()["params"][0]
    check_entry_matches(entry, name="w", algorithm="asgo", shape=(4, 6), config={"beta2": 0.8, "side": "auto"})
    with pytest.raises(CheckpointError, match="shape"):
        check_entry_matches(entry, name="w", algorithm="asgo", shape=(6, 4), config={})
    with pytest.raises(CheckpointError, match="beta2"):
        check_entry_matches(entry, name="w", algorithm="asgo", shape=(4, 6), config={"beta2": 0.9})
    with pytest.raises(CheckpointError, match="algorithm"):
        check_entry_matches(entry, name="w", algorithm="dasgo", shape=(4, 6), config={})


def tiny_portable_state():
    """One AdamW entry: a file of under 1 KB, so every bit of it can be flipped in a test."""
    return {"params": [{"name": "bias", "algorithm": "adamw", "shape": [2], "step": 1, "config": {},
                        "arrays": {"exp_avg": np.array([1.0, -2.0], np.float32),
                                   "exp_avg_sq": np.array([3.0, 4.0], np.float32)}}]}


def test_every_single_bit_flip_loads_the_same_state_or_raises_checkpoint_error(tmp_path):
    """Flips in the zip headers read as encryption, an unknown compression method or zip
    version, ...: all of it must come out as CheckpointError; a flip the format does not
    protect (a timestamp) must still load the original values."""
    original = tiny_portable_state()
    path = tmp_path / "state.npz"
    save_state(path, original)
    bits = range(8 * path.stat().st_size)
    loaded_states = [loaded for loaded in loads_with_one_bit_flipped(path, bits) if loaded is not None]
    for loaded in loaded_states:
        assert_same_state(loaded, original)
    assert len(bits) - len(loaded_states) > len(bits) / 2  # most flips are caught (data, names, sizes, CRCs)


def test_every_truncation_raises_checkpoint_error(tmp_path):
    path = tmp_path / "state.npz"
    save_state(path, tiny_portable_state())
    content = path.read_bytes()
    for length in range(len(content)):
        path.write_bytes(content[:length])
        with pytest.raises(CheckpointError):
            load_state(path)


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_partial_file(
        tmp_path, monkeypatch, interruption):
    path = tmp_path / "state.npz"
    previous = tiny_portable_state()
    save_state(path, previous)

    def write_half_then_fail(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise interruption

    monkeypatch.setattr(np, "savez", write_half_then_fail)
    newer = portable_state()
    with pytest.raises(type(interruption)):
        save_state(path, newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]
    assert_same_state(load_state(path), previous)


@pytest.mark.parametrize("metadata", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b'{"params": 3}'])
def test_a_zip_with_bad_metadata_raises_checkpoint_error(tmp_path, metadata):
    path = tmp_path / "state.npz"
    np.savez(path, **{"metadata.json": np.frombuffer(metadata, dtype=np.uint8)})
    with pytest.raises(CheckpointError, match="metadata"):
        load_state(path)


def large_gram_state():
    """An ASGO entry whose (1, 64, 64) float64 Gram member is far larger than zipfile's 4 KB
    read-ahead, so a read of part of it never reaches the member's end, where zipfile checks
    the CRC by itself."""
    rng = np.random.default_rng(1)
    return {"params": [{"name": "w", "algorithm": "asgo", "shape": [64, 64], "step": 1, "config": {},
                        "arrays": {"momentum": rng.standard_normal((64, 64)),
                                   "gram/0": rng.standard_normal((1, 64, 64)),
                                   "root/0": rng.standard_normal((1, 64, 64)),
                                   "skipped": np.array(0), "fallbacks": np.zeros(4, np.int32)}}]}


def test_a_flipped_digit_in_a_large_members_npy_header_fails_the_crc_check(tmp_path):
    """(1, 64, 64) read as (1, 44, 64) would load 44 rows of a 64-row member: only the
    loader's own CRC check of every member refuses it."""
    path = tmp_path / "state.npz"
    save_state(path, large_gram_state())
    content = bytearray(path.read_bytes())
    member = content.index(b"0/gram/0.npy")
    header = content.index(b"(1, 64, 64)", member)
    content[header + 4] = ord("4")
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="CRC"):
        load_state(path)


def test_a_member_renamed_in_both_zip_headers_is_refused(tmp_path):
    """Zip member names carry no checksum: a name changed in the local and the central header
    alike is caught only by the member names the metadata records."""
    path = tmp_path / "state.npz"
    save_state(path, large_gram_state())
    content = path.read_bytes()
    assert content.count(b"0/gram/0.npy") == 2
    path.write_bytes(content.replace(b"0/gram/0.npy", b"0/gram/1.npy"))
    with pytest.raises(CheckpointError, match="recorded"):
        load_state(path)


# ---- the adapters' export and import routine ----------------------------------------------------
def _identities():
    from asgo_core.checkpoint import ParamIdentity
    return [ParamIdentity("w", "asgo", (4, 6), {"beta2": 0.8}),
            ParamIdentity("b", "adamw", (4,), {"betas": [0.9, 0.95]})]


def _exported(steps=3, names=None):
    from asgo_core.checkpoint import export_portable
    arrays = portable_state()["params"]
    return export_portable(_identities(), [entry["arrays"] for entry in arrays], steps, names)


def test_export_records_each_identity_names_and_steps():
    exported = _exported(steps=[3, 5], names=["layer.weight", "layer.bias"])
    assert exported["format"] == "asgo-portable-state" and exported["version"] == 1
    first, second = exported["params"]
    assert (first["name"], first["algorithm"], first["shape"], first["step"], first["batch_dims"]) == \
        ("layer.weight", "asgo", [4, 6], 3, 0)
    assert (second["name"], second["step"], second["config"]) == ("layer.bias", 5, {"betas": [0.9, 0.95]})
    assert _exported()["params"][1]["step"] == 3  # one int: every entry's step


def test_import_returns_the_entries_in_the_params_order_after_the_identity_checks():
    from asgo_core.checkpoint import import_entries
    exported = _exported()
    exported["params"].reverse()
    assert [entry["name"] for entry in import_entries(exported, _identities())] == ["w", "b"]


def test_import_names_the_entry_and_the_field_that_differs():
    from asgo_core.checkpoint import ParamIdentity, import_entries
    changed = [_identities()[0], ParamIdentity("b", "adamw", (4,), {"betas": [0.9, 0.99]})]
    differs = r"'b'.*betas: checkpoint \[0.9, 0.95\] != optimizer \[0.9, 0.99\]"
    with pytest.raises(CheckpointError, match=differs):
        import_entries(_exported(), changed)
    with pytest.raises(ValueError, match="names='1 names' is invalid; accepted: one per parameter"):
        import_entries(_exported(), _identities(), names=["w"])


def test_import_refuses_another_format_header():
    from asgo_core.checkpoint import import_entries
    exported = _exported()
    exported["version"] = 2
    with pytest.raises(CheckpointError, match="version 2"):
        import_entries(exported, _identities())


def test_arrays_from_entry_checks_shape_and_kind_and_zeroes_an_optional_counter():
    from asgo_core.checkpoint import arrays_from_entry
    entry = _exported()["params"][1]
    templates = {"exp_avg": np.ones(4), "exp_avg_sq": np.ones(4), "skipped": np.ones((), np.int32)}
    convert = lambda array, like: np.asarray(array, dtype=like.dtype)  # noqa: E731
    loaded = arrays_from_entry(entry, templates, convert, optional=("skipped",))
    assert np.array_equal(loaded["exp_avg"], entry["arrays"]["exp_avg"])
    assert loaded["skipped"] == 0 and loaded["skipped"].dtype == np.int32
    with pytest.raises(CheckpointError, match="'b' lacks array 'skipped'"):
        arrays_from_entry(entry, templates, convert)
    with pytest.raises(CheckpointError, match=r"'b': exp_avg has shape \(4,\), expected \(5,\)"):
        arrays_from_entry(entry, {"exp_avg": np.ones(5)}, convert)
    entry["arrays"]["exp_avg"] = entry["arrays"]["exp_avg"].astype(np.int64)
    with pytest.raises(CheckpointError, match="exp_avg has dtype int64"):
        arrays_from_entry(entry, templates, convert, optional=("skipped",))
