"""One rank of tests/adversarial/test_distributed_cases.py, launched torchrun-style by
tests/test_distributed.py's `launch` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):

    python distributed_cases_worker.py cases OUT_DIR

Every rank sees the same gradients (as under DDP) and saves OUT_DIR/rank{r}.pt with, one launch
for all (starting ranks is most of the time): DistributedDASGO, and DistributedASGO on a new
group of both ranks (process_group=), after STEPS steps each (the test replays the gradients);
then what DistributedASGO(nonfinite="raise") does with a NaN gradient at step 2 (refused at
construction, or raised on every rank with nothing changed). Collectives time out after 20 s,
so a rank left alone in one reports instead of hanging.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from asgo_core.adapters.torch_distributed import DistributedASGO, DistributedDASGO
from distributed_worker import leave_process_group

STEPS = 3
SHAPES = {"w1": (6, 10), "w2": (5, 7), "w3": (6, 10), "bias": (6,)}


def make_params() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=generator)) for name, shape in SHAPES.items()}


def gradients(step: int) -> dict:
    generator = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def train(optimizer, params: dict, steps: int, nan_at=None) -> list:
    """Steps with the shared gradients; returns each step's outcome ("stepped" or the error)."""
    outcomes = []
    for step in range(steps):
        grads = gradients(step)
        if step == nan_at:
            grads["w2"][1, 2] = float("nan")
        for name, param in params.items():
            param.grad = grads[name]
        try:
            optimizer.step()
            outcomes.append("stepped")
        except Exception as error:  # noqa: BLE001  (reported to the test, which judges it)
            outcomes.append(f"{type(error).__name__}: {error}")
            break
    return outcomes


def run_raise(params: dict) -> dict:
    try:
        optimizer = DistributedASGO(list(params.values()), nonfinite="raise")
    except ValueError as error:
        return {"constructed": False, "error": str(error)}
    train(optimizer, params, 1)
    before = {name: p.detach().clone() for name, p in params.items()}
    outcomes = train(optimizer, params, 1, nan_at=0)
    unchanged = all(torch.equal(params[name], value) for name, value in before.items())
    return {"constructed": True, "outcomes": outcomes, "unchanged": unchanged}


def run_equality(optimizer, params: dict) -> dict:
    train(optimizer, params, STEPS)
    return {"params": {name: p.detach() for name, p in params.items()},
            "owners": {name: optimizer._owner[p] for name, p in params.items()}}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    params = make_params()
    result = {"dasgo": run_equality(DistributedDASGO(list(params.values()), lr=0.05), params)}
    params = make_params()
    result["process_group"] = run_equality(
        DistributedASGO(list(params.values()), lr=0.05, process_group=dist.new_group([0, 1])), params)
    result["raise"] = run_raise(make_params())  # last: a rank left alone would time out here
    torch.save(result, f"{out_dir}/rank{dist.get_rank()}.pt")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[2])  # argv[1]: the launcher's mode, one here
