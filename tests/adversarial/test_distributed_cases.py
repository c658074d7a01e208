"""Distributed cases of the adversarial suite at 2 gloo ranks (the launcher is
tests/test_distributed.py's): DistributedASGO(nonfinite="raise") never desynchronises the ranks,
DistributedDASGO and process_group= equal the single-process optimizers bitwise."""

from __future__ import annotations

import os

import distributed_cases_worker as worker
import pytest
import torch

import test_distributed
from asgo_core.adapters.torch import ASGO, DASGO

WORKER = os.path.join(os.path.dirname(__file__), "distributed_cases_worker.py")


def launch(mode: str, tmp_path) -> list:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_distributed, "WORKER", WORKER)
        return test_distributed.launch(mode, 2, tmp_path)


def test_nonfinite_raise_is_refused_or_raised_on_every_rank(tmp_path):
    ranks = launch("raise", tmp_path)
    if not ranks[0]["constructed"]:
        assert all(not r["constructed"] and "nonfinite" in r["error"] for r in ranks)
        return
    for rank in ranks:  # every rank raised (none was left waiting in the all-gather) ...
        assert rank["outcomes"][0].startswith("FloatingPointError"), rank["outcomes"]
        assert rank["unchanged"]  # ... before any parameter changed


def test_distributed_dasgo_and_process_group_equal_the_single_process_optimizers(tmp_path):
    ranks = launch("equality", tmp_path)
    for mode, optimizer_type in (("dasgo", DASGO), ("process_group", ASGO)):
        assert set(ranks[0][mode]["owners"].values()) == {0, 1}  # both ranks own something
        params = worker.make_params()
        worker.train(optimizer_type(list(params.values()), lr=0.05), params, worker.STEPS)
        for rank in ranks:
            for name, param in params.items():
                assert torch.equal(rank[mode]["params"][name], param.detach()), (mode, name)
