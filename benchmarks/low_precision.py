"""Quality at low precision: train_lm's quick configuration with 16-bit parameters or state.

Variants, for ASGO (tau 1) and AdamW, each at the lr train_lm --quick uses (the regime map's
300-step choice):
    float32          float32 parameters and state (the reference).
    bf16_nearest     bfloat16 parameters, every write rounded to nearest.
    bf16_stochastic  bfloat16 parameters, writes rounded stochastically (param_rounding).
    bf16_momentum    float32 parameters; ASGO's momentum stored in bfloat16 (mu_dtype).
    bf16_state       float32 parameters; ASGO's momentum, Gram and root stored in bfloat16
                     (mu_dtype, precond_dtype). AdamW has neither option here: the built-in
                     AdamW keeps torch.optim.AdamW's state, in the parameter's dtype.
With bfloat16 parameters the forward and backward passes still compute in float32 (each
parameter is cast up for the call, its gradient rounded back to bfloat16): a CPU without native
bfloat16 (AVX2 only) runs bf16 matmuls emulated, many times slower, and what is measured here is
the effect of storing the parameters in 16 bits. AdamW is the adapter's built-in AdamW
(algorithm="adamw": torch.optim.AdamW's arithmetic, plus param_rounding), weight decay 0.1 on
2-D parameters as in train_lm.

    python benchmarks/low_precision.py      # seeds 0 and 1 × 8 runs; 1-2 min a run on an idle core
    python benchmarks/low_precision.py --seeds 1 --optimizers adamw --variants float32 bf16_stochastic

Appends each finished run to results/low_precision/runs.jsonl (so separate invocations add up)
and prints the table of final validation losses over every run in that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

import harness  # benchmarks/, the script's own directory
import train_lm
from asgo_core.adapters.torch import ASGO, asgo_param_groups

VARIANTS = ("float32", "bf16_nearest", "bf16_stochastic", "bf16_momentum", "bf16_state")
STATE_DTYPES = {"bf16_momentum": dict(mu_dtype="bfloat16"),
                "bf16_state": dict(mu_dtype="bfloat16", precond_dtype="bfloat16")}
OPTIMIZERS = ("asgo_tau1", "adamw")


def make_optimizer(name: str, variant: str, model, lr: float) -> ASGO:
    rounding = "stochastic" if variant == "bf16_stochastic" else "nearest"
    if name == "adamw":
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "adamw_weight_decay": train_lm.WEIGHT_DECAY},
                  {"params": [p for p in params if p.ndim < 2], "adamw_weight_decay": 0.0}]
        return ASGO(groups, lr=lr, algorithm="adamw", adamw_betas=train_lm.ADAM_BETAS,
                    param_rounding=rounding)
    return ASGO(asgo_param_groups(model), lr=lr, param_rounding=rounding, **STATE_DTYPES.get(variant, {}))


def applies(name: str, variant: str) -> bool:
    return not (name == "adamw" and variant in STATE_DTYPES)


def train(args, name: str, variant: str, lr: float, seed: int, train_data, val_batches) -> dict:
    model = train_lm.build_model(args, seed)
    if variant in ("bf16_nearest", "bf16_stochastic"):
        model = model.to(torch.bfloat16)
    optimizer = make_optimizer(name, variant, model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_lm.warmup_cosine(args.steps))
    batches = torch.Generator().manual_seed(seed)
    clock = harness.Stopwatch()
    for _ in range(args.steps):
        x, y = train_lm.sample_batch(train_data, args.block_size, args.batch_size, batches)
        loss = F.cross_entropy(float32_forward(model, x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_lm.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    with torch.no_grad():
        val_loss = statistics.fmean(
            F.cross_entropy(float32_forward(model, x).flatten(0, 1), y.flatten()).item() for x, y in val_batches)
    return {"optimizer": name, "variant": variant, "seed": seed, "lr": lr, "final_val_loss": val_loss,
            "seconds": clock.elapsed().wall_s}


def float32_forward(model, tokens):
    """The model's output computed with float32 copies of its parameters (see the docstring)."""
    params = {name: p.float() for name, p in model.named_parameters()}
    return functional_call(model, params, (tokens,))


def table(runs: list, optimizers, variants) -> str:
    lines = ["| optimizer | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name in optimizers:
        cells = []
        for variant in variants:
            losses = [r["final_val_loss"] for r in runs if r["optimizer"] == name and r["variant"] == variant]
            cells.append(" / ".join(f"{loss:.3f}" for loss in losses) if losses else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/low_precision"))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    args = train_lm.parse_args(["--quick", "--optimizers", *options.optimizers])
    lrs = train_lm.resolve_lrs(args)
    data, source = train_lm.load_corpus(args.text, args.max_bytes)
    split = int(len(data) * (1 - train_lm.VAL_FRACTION))
    val_batches = train_lm.fixed_val_batches(data[split:], args.block_size, args.batch_size,
                                             args.eval_batches)
    options.out.mkdir(parents=True, exist_ok=True)
    runs_path = options.out / "runs.jsonl"
    machine = train_lm.machine_info()
    for seed in options.seeds:
        for name in options.optimizers:
            for variant in options.variants:
                if applies(name, variant):
                    run = train(args, name, variant, lrs[name], seed, data[:split], val_batches)
                    run |= {"machine": machine, "threads": options.threads, "text_source": source,
                            "torch_version": torch.__version__}
                    harness.append_jsonl(runs_path, run)
                    print(json.dumps(run), flush=True)
    runs = harness.read_jsonl(runs_path)
    print(f"final validation loss, one figure per seed ({runs_path}):")
    print(table(runs, OPTIMIZERS, VARIANTS))

if __name__ == "__main__":
    main()
