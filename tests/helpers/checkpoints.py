"""Checks shared by the checkpoint tests and the adversarial suite's file cases."""

from __future__ import annotations

import numpy as np

from asgo_core import CheckpointError, load_state


def assert_same_state(loaded, original):
    assert [{k: v for k, v in e.items() if k != "arrays"} for e in loaded["params"]] == \
        [{k: v for k, v in e.items() if k != "arrays"} for e in original["params"]]
    for after, before in zip(loaded["params"], original["params"]):
        assert after["arrays"].keys() == before["arrays"].keys()
        for key, value in before["arrays"].items():
            assert after["arrays"][key].dtype == value.dtype and np.array_equal(after["arrays"][key], value)


def loads_with_one_bit_flipped(path, bits):
    """For each bit index, load_state of the file at `path` with that one bit flipped: the
    loaded state, or None where it raised CheckpointError (any other exception propagates).
    The file is left flipped at the last bit."""
    content = path.read_bytes()
    for bit in bits:
        flipped = bytearray(content)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            yield load_state(path)
        except CheckpointError:
            yield None
