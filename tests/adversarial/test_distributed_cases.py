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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_distributed, "WORKER", WORKER)
        return test_distributed.launch("cases", 2, tmp_path_factory.mktemp("distributed_cases"))


def test_nonfinite_raise_is_refused_or_raised_on_every_rank(ranks):
    results = [rank["raise"] for rank in ranks]
    if not results[0]["constructed"]:
        assert all(not r["constructed"] and "nonfinite" in r["error"] for r in results)
        return
    for result in results:  # every rank raised (none was left waiting in the all-gather) ...
        assert result["outcomes"][0].startswith("FloatingPointError"), result["outcomes"]
        assert result["unchanged"]  # ... before any parameter changed


def test_distributed_dasgo_and_process_group_equal_the_single_process_optimizers(ranks):
    for mode, optimizer_type in (("dasgo", DASGO), ("process_group", ASGO)):
        assert set(ranks[0][mode]["owners"].values()) == {0, 1}  # both ranks own something
        params = worker.make_params()
        worker.train(optimizer_type(list(params.values()), lr=0.05), params, worker.STEPS)
        for rank in ranks:
            for name, param in params.items():
                assert torch.equal(rank[mode]["params"][name], param.detach()), (mode, name)
