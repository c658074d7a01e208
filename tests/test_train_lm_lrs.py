"""train_lm --quick trains at the regime map's learning rates: the lr choices in the map's
summary.json are those its runs (docs/regime_map/runs.jsonl) make, and train_lm reads them."""

import pytest

import harness  # benchmarks/ (pyproject.toml: pytest's pythonpath), as the scripts import it
import regime_map
import train_lm

RECORDS = harness.read_jsonl(regime_map.OUT / "runs.jsonl")


def choices_from_runs(horizon: int, batch: int) -> dict[str, float]:
    chosen = {name: regime_map.chosen_lr(RECORDS, horizon, name, batch)
              for name in regime_map.OPTIMIZERS}
    return {name: lr for name, lr in chosen.items() if lr is not None}


@pytest.mark.parametrize("steps, batch", [(300, 32), (1200, 32), (300, 256)])
def test_quick_lrs_are_the_maps_choices_from_its_runs(steps, batch):
    args = train_lm.parse_args(["--quick", "--steps", str(steps), "--batch-size", str(batch)])
    assert train_lm.regime_map_lrs(args) == choices_from_runs(steps, batch)


def test_default_quick_run_resolves_every_lr_from_the_map_or_the_sweep():
    args = train_lm.parse_args(["--quick", "--optimizers", *train_lm.ALL_OPTIMIZERS])
    lrs = train_lm.resolve_lrs(args)
    assert {name: lrs[name] for name in regime_map.OPTIMIZERS} == choices_from_runs(300, 32)
    assert lrs["asgo_reference"] == lrs["asgo_tau1"]
    assert lrs["dasgo"] == train_lm.read_lr_choices()["quick"]["dasgo"]["lr"]


def test_lr_override_wins_over_the_map():
    args = train_lm.parse_args(["--quick", "--optimizers", "adamw", "--lr", "adamw=0.123"])
    assert train_lm.resolve_lrs(args) == {"adamw": 0.123}


def test_another_model_does_not_take_the_maps_lrs():
    args = train_lm.parse_args(["--quick", "--d-model", "64"])
    assert train_lm.regime_map_lrs(args) == {}


def test_quick_sweep_refuses_an_optimizer_the_map_tunes():
    args = train_lm.parse_args(["--quick", "--sweep", "--optimizers", "asgo_tau1"])
    with pytest.raises(SystemExit, match="regime map"):
        train_lm.run_sweep(args, train_data=None, val_batches=[])
