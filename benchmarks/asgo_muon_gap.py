"""Where does ASGO lose to Muon on train_lm? One-change-at-a-time variants of both recipes.

Each variant trains train_lm's model (same data, initialisation, batches, schedule and clipping
as `train_lm.py`) with one seed and prints its final validation loss. Muon variants change
torch.optim.Muon's momentum recipe or its AdamW companion's lr; ASGO variants change one option
of `ASGO` (the rest at the defaults, lr 0.01, AdamW companion at the same lr). The reference code's own optimizer is `train_lm.py --optimizers asgo_reference`.

    python benchmarks/asgo_muon_gap.py                    # every variant, quick config, 1 thread
    python benchmarks/asgo_muon_gap.py --full --variants muon asgo asgo_beta2_0
"""

from __future__ import annotations

import argparse

import torch

import train_lm  # benchmarks/, the script's own directory
from asgo_core.adapters.torch import ASGO, asgo_param_groups

# Fixed lrs, the same for both configs: the full config's sweep choices for muon and asgo_tau1
# (benchmarks/lr_choices.json, "full"). train_lm --quick itself trains at the regime map's 300-step
# choices instead (docs/regime_map/summary.json: muon 0.015, asgo_tau1 0.01).
MUON_LR, ASGO_LR = 0.03, 0.01


def muon(matrix_lr: float, adamw_lr: float, **muon_options):
    return lambda model, _lr: train_lm.muon_with_adamw(model, matrix_lr, adamw_lr, **muon_options)


def asgo(**asgo_options):
    return lambda model, _lr: [ASGO(asgo_param_groups(model), lr=ASGO_LR, **asgo_options)]


VARIANTS = {
    "muon": muon(MUON_LR, MUON_LR),
    "muon_momentum_0.9_no_nesterov": muon(MUON_LR, MUON_LR, momentum=0.9, nesterov=False),
    "muon_adamw_lr_0.01": muon(MUON_LR, ASGO_LR),
    "asgo": asgo(),
    "asgo_adamw_lr_0.03": asgo(adamw_lr=MUON_LR),
    "asgo_beta1_0.95": asgo(betas=(0.95, 0.8)),
    "asgo_beta2_0": asgo(betas=(0.9, 0.0)),
    "asgo_beta2_0.95": asgo(betas=(0.9, 0.95)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="train_lm's full config (default quick)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    run_args = train_lm.parse_args([] if args.full else ["--quick"])
    torch.set_num_threads(args.threads)
    data, _ = train_lm.load_corpus(None, run_args.max_bytes)
    split = int(len(data) * (1 - train_lm.VAL_FRACTION))
    val_batches = train_lm.fixed_val_batches(data[split:], run_args.block_size,
                                             run_args.batch_size, run_args.eval_batches)
    print(f"config {run_args.config_name}: {train_lm.model_config(run_args)}, "
          f"{run_args.steps} steps, seed {args.seed}")
    for name in args.variants:
        train_lm.OPTIMIZER_FACTORIES[name] = VARIANTS[name]
        run = train_lm.train_run(run_args, name, float("nan"), args.seed, run_args.steps,
                                 data[:split], val_batches)
        print(f"{name:32s} final val loss {run['final_val_loss']:.4f}  "
              f"train loss {run['final_train_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
