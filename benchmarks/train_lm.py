"""Character-level GPT training: AdamW vs Muon vs ASGO (tau 1, tau 10) vs DASGO.

The text is the running interpreter's own standard library (.py files under
sysconfig.get_paths()["stdlib"], sorted by path, site-packages and test folders skipped), so the
benchmark needs no download; --text PATH trains on any other file instead. Tokens are raw bytes
(vocabulary 256); the last 10% of the bytes are the validation split.

Every optimizer sees the same model initialisation (the model is rebuilt from the seed for each
run), the same batches in the same order, the same number of steps, the same schedule (linear
warmup over the first 10% of steps, cosine decay to 2% of the peak lr, applied to every param group
by a LambdaLR) and gradient-norm clipping at 1.0.

Optimizers (one peak lr each; it is shared by the matrix optimizer and its AdamW companion):
    adamw       torch.optim.AdamW, betas (0.9, 0.95), weight decay 0.1 on 2-D params (including
                the tied embedding), 0 on biases and norm gains.
    muon        torch.optim.Muon on the 2-D matrices inside the blocks (momentum 0.95, Nesterov,
                weight decay 0.1, adjust_lr_fn="match_rms_adamw" so its update RMS is 0.2, like
                ASGO's) + AdamW (betas (0.9, 0.95), no weight decay) on the embeddings, norms and
                biases, as ASGO's reference training code routes them.
    asgo_tau1   asgo_core.adapters.torch.ASGO, inverse root recomputed every step.
    asgo_tau10  the same with precondition_frequency=10.
    dasgo       asgo_core.adapters.torch.DASGO (diagonal preconditioner).
    asgo_reference   (only when named in --optimizers) the reference code's ASGO as written
                there (benchmarks/reference_asgo.py) on the block matrices + the same AdamW as
                muon's, at asgo_tau1's lr: a check that asgo_tau1 trains like the reference.
The ASGO optimizers take asgo_param_groups(model), which sends the embeddings / tied head and the
non-matrix params to the optimizer's built-in AdamW.

Learning rates: with --quick, an optimizer the regime map covers (adamw, muon, asgo_tau1,
asgo_tau10; asgo_reference takes asgo_tau1's) trains at the map's choice for the run's length and
batch size (docs/regime_map/summary.json, written by benchmarks/regime_map.py --report: the lowest
seed-0 final val loss of its lr grid; 300 steps and batch 32 by default). Every other lr comes
from benchmarks/lr_choices.json, written by --sweep: each optimizer is trained with seed 0 for
--sweep-steps steps (half the run by default) at every lr of its grid, and the lr with the lowest
final validation loss is stored under the config name ("quick": only dasgo, which the map does
not cover; "full"). The run prints where each lr came from.
Grids (peak lr):
    adamw               3e-4, 1e-3, 3e-3, 1e-2
    muon, asgo_tau1, asgo_tau10          1e-3, 3e-3, 1e-2, 3e-2, 1e-1
    dasgo                                3e-4, 1e-3, 3e-3, 1e-2, 3e-2
(Muon with match_rms_adamw and ASGO/DASGO with their update RMS 0.2 take the same lr scale; the
ASGO reference uses 1e-2. DASGO's grid sits one step lower because its quick-sweep optimum was
at 1e-3, the bottom of the shared grid.)
--lr NAME=VALUE overrides a stored choice (or stands in for a missing one).

Usage:
    python benchmarks/train_lm.py --quick --sweep --optimizers dasgo   # lr_choices.json["quick"]
    python benchmarks/train_lm.py --quick                      # 5 optimizers, 1 seed, < 3 min
    python benchmarks/regime_map.py    # 300 / 1200 / 4800 steps, lr per horizon: docs/regime_map.md
    python benchmarks/train_lm.py --sweep && python benchmarks/train_lm.py   # full: 3 seeds
    python benchmarks/train_lm.py --quick --optimizers adamw muon --lr adamw=3e-3 --lr muon=1e-2

Outputs (--out, default results/train_lm_quick or results/train_lm_full): results.json,
val_loss_vs_step.png and val_loss_vs_time.png (mean over seeds, shaded min..max).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import harness  # benchmarks/, the script's own directory
from lr_grids import LR_GRIDS

PRESETS = {
    "quick": dict(n_layer=2, n_head=4, d_model=128, block_size=64, batch_size=32,
                  steps=300, eval_every=25, seeds=1),
    "full": dict(n_layer=4, n_head=4, d_model=128, block_size=128, batch_size=32,
                 steps=600, eval_every=50, seeds=3),
}
DEFAULT_OPTIMIZERS = list(LR_GRIDS)
# Optimizers that are not swept: they train at another optimizer's chosen lr.
SAME_LR_AS = {"asgo_reference": "asgo_tau1"}
ALL_OPTIMIZERS = DEFAULT_OPTIMIZERS + list(SAME_LR_AS)
BF16_SLOWDOWN_LIMIT = 4.0
ASGO_OPTIMIZERS = {"asgo_tau1", "asgo_tau10", "dasgo"}
LR_CHOICES_PATH = Path(__file__).with_name("lr_choices.json")
REGIME_MAP_SUMMARY = Path(__file__).resolve().parent.parent / "docs" / "regime_map" / "summary.json"
VOCAB_SIZE = 256
VAL_FRACTION = 0.1
VAL_BATCH_SEED = 1234
WARMUP_FRACTION = 0.1
FINAL_LR_RATIO = 0.02
GRAD_CLIP = 1.0
REGIME_MAP_NOTE = ("one run length of a larger picture: docs/regime_map.md compares these optimizers "
                   "at 300, 1200 and 4800 steps with the lr tuned at each (python "
                   "benchmarks/regime_map.py)")
ADAM_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


# ----------------------------------------------------------------------------------------- data

def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skipped & set(p.relative_to(root).parts))


def load_corpus(text_path: str | None, max_bytes: int) -> tuple[torch.Tensor, str]:
    """The training text as a uint8 tensor of at most max_bytes, and where it came from."""
    if text_path:
        raw = Path(text_path).read_bytes()[:max_bytes]
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), text_path
    chunks, total = [], 0
    for path in stdlib_source_files():
        if total >= max_bytes:
            break
        chunk = path.read_text(encoding="utf-8", errors="replace").encode("utf-8")
        chunks.append(chunk)
        total += len(chunk)
    raw = b"".join(chunks)[:max_bytes]
    source = f"python {platform.python_version()} stdlib ({sysconfig.get_paths()['stdlib']})"
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), source


def sample_batch(data: torch.Tensor, block_size: int, batch_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    windows = data[starts[:, None] + torch.arange(block_size + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def fixed_val_batches(val_data: torch.Tensor, block_size: int, batch_size: int,
                      count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(VAL_BATCH_SEED)
    return [sample_batch(val_data, block_size, batch_size, generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
                 for t in self.qkv(x).split(width, dim=2))
        attended = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Pre-norm decoder-only transformer; the output head is the token embedding (tied)."""

    def __init__(self, n_layer: int, n_head: int, d_model: int, block_size: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.token_embedding = nn.Embedding(VOCAB_SIZE, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(d_model)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # residual-branch outputs shrink with depth (GPT-2)
            for residual_out in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.final_norm(x), self.token_embedding.weight)


def build_model(args: argparse.Namespace, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(args.n_layer, args.n_head, args.d_model, args.block_size)
    return model.to(args.device)


# ----------------------------------------------------------------------------------- optimizers

def make_adamw(model: GPT, lr: float) -> list[torch.optim.Optimizer]:
    """Weight decay on the 2-D params only."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS)]


def split_hidden_matrices(model: GPT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The 2-D matrices inside the blocks, and every other parameter."""
    hidden_matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    hidden_ids = {id(p) for p in hidden_matrices}
    return hidden_matrices, [p for p in model.parameters() if id(p) not in hidden_ids]


def companion_adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The AdamW that takes the non-matrix parameters beside Muon or the reference ASGO."""
    return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=0.0)


def muon_with_adamw(model: GPT, matrix_lr: float, adamw_lr: float,
                    **muon_options) -> list[torch.optim.Optimizer]:
    hidden_matrices, rest = split_hidden_matrices(model)
    return [torch.optim.Muon(hidden_matrices, lr=matrix_lr, weight_decay=WEIGHT_DECAY,
                             adjust_lr_fn="match_rms_adamw", **muon_options),
            companion_adamw(rest, adamw_lr)]


def make_muon(model: GPT, lr: float) -> list[torch.optim.Optimizer]:
    return muon_with_adamw(model, lr, lr)


def make_reference_asgo(model: GPT, lr: float) -> list[torch.optim.Optimizer]:
    from reference_asgo import ReferenceStyleASGO
    hidden_matrices, rest = split_hidden_matrices(model)
    return [ReferenceStyleASGO(hidden_matrices, lr=lr, weight_decay=WEIGHT_DECAY),
            companion_adamw(rest, lr)]


def import_asgo_adapter():
    try:
        from asgo_core.adapters import torch as adapter
        return adapter.ASGO, adapter.DASGO, adapter.asgo_param_groups
    except ImportError as error:
        raise SystemExit(
            f"the ASGO optimizers ({', '.join(sorted(ASGO_OPTIMIZERS))}) need "
            f"`from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups`, which "
            f"failed: {error}. Install the project (pip install -e .) or leave them out with "
            f"--optimizers adamw muon.") from error


def make_asgo(precondition_frequency: int,
              **asgo_options) -> Callable[[GPT, float], list[torch.optim.Optimizer]]:
    def factory(model: GPT, lr: float) -> list[torch.optim.Optimizer]:
        asgo, _, asgo_param_groups = import_asgo_adapter()
        return [asgo(asgo_param_groups(model), lr=lr,
                     precondition_frequency=precondition_frequency, **asgo_options)]
    return factory


def make_dasgo(model: GPT, lr: float) -> list[torch.optim.Optimizer]:
    _, dasgo, asgo_param_groups = import_asgo_adapter()
    return [dasgo(asgo_param_groups(model), lr=lr)]


OPTIMIZER_FACTORIES = {
    "adamw": make_adamw,
    "muon": make_muon,
    "asgo_tau1": make_asgo(1),
    "asgo_tau10": make_asgo(10),
    "dasgo": make_dasgo,
    "asgo_reference": make_reference_asgo,
}


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr: linear warmup, then cosine decay to FINAL_LR_RATIO."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ------------------------------------------------------------------------------------- training

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: GPT, val_batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).item()
              for x, y in val_batches]
    model.train()
    return statistics.fmean(losses)


def train_run(args: argparse.Namespace, name: str, lr: float, seed: int, steps: int,
              train_data: torch.Tensor, val_batches: list) -> dict:
    """One optimizer, one seed. The curve's times are cumulative training seconds (no eval)."""
    device = torch.device(args.device)
    model = build_model(args, seed)
    optimizers = OPTIMIZER_FACTORIES[name](model, lr)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
                  for opt in optimizers]
    batches = torch.Generator().manual_seed(seed)
    curve, step_times, optimizer_times, interval_losses = [], [], [], []
    train_seconds, diverged = 0.0, False
    progress = tqdm(range(1, steps + 1), desc=f"{name} lr={lr:g} seed={seed}", leave=False)

    def optimizer_steps():
        for opt in optimizers:
            opt.step()

    for step in progress:
        synchronize(device)
        with harness.Stopwatch() as step_clock:
            x, y = (t.to(device) for t in sample_batch(train_data, args.block_size, args.batch_size,
                                                       batches))
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer_times.append(harness.sample(optimizer_steps, sync=lambda: synchronize(device)).wall_s)
            for opt, scheduler in zip(optimizers, schedulers):
                opt.zero_grad(set_to_none=True)
                scheduler.step()
            interval_losses.append(loss.item())
        step_times.append(step_clock.wall_s)
        train_seconds += step_times[-1]
        diverged = not math.isfinite(interval_losses[-1])
        if step % args.eval_every == 0 or step == steps or diverged:
            val_loss = evaluate(model, val_batches, device)
            curve.append({"step": step, "seconds": train_seconds,
                          "train_loss": statistics.fmean(interval_losses), "val_loss": val_loss})
            interval_losses = []
            progress.set_postfix(val=f"{val_loss:.3f}")
        if diverged:
            break
    return {"seed": seed, "lr": lr, "curve": curve, "diverged": diverged,
            "final_train_loss": curve[-1]["train_loss"], "final_val_loss": curve[-1]["val_loss"],
            "median_step_seconds": statistics.median(step_times),
            "median_optimizer_step_seconds": statistics.median(optimizer_times),
            "train_seconds": train_seconds}


# ------------------------------------------------------------------------------ learning rates

def read_lr_choices() -> dict:
    return json.loads(LR_CHOICES_PATH.read_text()) if LR_CHOICES_PATH.exists() else {}


def run_sweep(args: argparse.Namespace, train_data: torch.Tensor, val_batches: list) -> None:
    choices = read_lr_choices()
    config_choices = choices.setdefault(args.config_name, {})
    mapped = regime_map_lrs(args)
    for name in args.optimizers:
        if name in SAME_LR_AS:
            raise SystemExit(f"{name} is not swept: it trains at {SAME_LR_AS[name]}'s lr")
        if name in mapped:
            raise SystemExit(f"{name} is not swept with --quick: its lr comes from the regime map "
                             f"({REGIME_MAP_SUMMARY}); python benchmarks/regime_map.py sweeps it")
        val_by_lr = {}
        for lr in LR_GRIDS[name]:
            run = train_run(args, name, lr, 0, args.sweep_steps, train_data, val_batches)
            val_by_lr[lr] = run["final_val_loss"]
            tqdm.write(f"sweep {name:11s} lr={lr:<8g} final val loss {run['final_val_loss']:.4f}")
        best_lr = min(val_by_lr, key=lambda lr: val_by_lr[lr]
                      if math.isfinite(val_by_lr[lr]) else math.inf)
        config_choices[name] = {"lr": best_lr, "sweep_steps": args.sweep_steps, "seed": 0,
                                "final_val_loss_by_lr": {f"{lr:g}": loss
                                                         for lr, loss in val_by_lr.items()},
                                "model": model_config(args)}
        harness.write_json(LR_CHOICES_PATH, choices, indent=2)
        at_edge = best_lr in (LR_GRIDS[name][0], LR_GRIDS[name][-1])
        print(f"{name}: chose lr {best_lr:g} (written to {LR_CHOICES_PATH})"
              + (" -- at the edge of the grid, consider widening it" if at_edge else ""))


def regime_map_lrs(args: argparse.Namespace) -> dict[str, float]:
    """The regime map's lr choices for a --quick run of its model at the run's length and batch
    size (its columns: 300, 1200, 4800 steps at batch 32; 300 at batch 256); {} otherwise."""
    preset = PRESETS["quick"]
    same_model = all(getattr(args, k) == preset[k] for k in ("n_layer", "n_head", "d_model",
                                                             "block_size"))
    if not (args.quick and same_model and REGIME_MAP_SUMMARY.exists()):
        return {}
    column = str(args.steps) + ("" if args.batch_size == preset["batch_size"]
                                else f"_b{args.batch_size}")
    rows = json.loads(REGIME_MAP_SUMMARY.read_text())["horizons"].get(column, {})
    return {name: row["lr"] for name, row in rows.items() if name in ALL_OPTIMIZERS}


def resolve_lrs(args: argparse.Namespace) -> dict[str, float]:
    stored = read_lr_choices().get(args.config_name, {})
    mapped = regime_map_lrs(args)
    lrs, sources = {}, {}
    for name in args.optimizers:
        lr_source = SAME_LR_AS.get(name, name)
        if name in args.lr_overrides:
            lrs[name], sources[name] = args.lr_overrides[name], "--lr"
        elif lr_source in mapped:
            lrs[name] = mapped[lr_source]
            sources[name] = (f"regime map, {args.steps} steps, batch {args.batch_size} "
                             f"({REGIME_MAP_SUMMARY.relative_to(REGIME_MAP_SUMMARY.parents[2])})")
        elif lr_source in stored:
            lrs[name] = stored[lr_source]["lr"]
            sources[name] = (f"{stored[lr_source]['sweep_steps']}-step sweep "
                             f"({LR_CHOICES_PATH.relative_to(LR_CHOICES_PATH.parents[1])})")
        else:
            raise SystemExit(
                f"no learning rate stored for {name!r} under config {args.config_name!r} in "
                f"{LR_CHOICES_PATH}: run this script with --sweep first "
                f"(e.g. {'--quick ' if args.quick else ''}--sweep --optimizers {name}), "
                f"or pass --lr {name}=VALUE")
    for name in args.optimizers:
        print(f"lr {name:14s} {lrs[name]:<8g} from {sources[name]}"
              + (f", {SAME_LR_AS[name]}'s" if name in SAME_LR_AS and sources[name] != "--lr"
                 else ""))
    return lrs


# ------------------------------------------------------------------------------------ reporting

def mean_curve(runs: list[dict]) -> dict[str, list[float]]:
    """Mean/min/max over seeds at each eval point that every seed reached."""
    length = min(len(run["curve"]) for run in runs)
    points = [[run["curve"][i] for run in runs] for i in range(length)]
    return {"step": [p[0]["step"] for p in points],
            "seconds": [statistics.fmean(q["seconds"] for q in p) for p in points],
            "val_mean": [statistics.fmean(q["val_loss"] for q in p) for p in points],
            "val_min": [min(q["val_loss"] for q in p) for p in points],
            "val_max": [max(q["val_loss"] for q in p) for p in points]}


def seconds_to_reach(curve: dict[str, list[float]], target: float) -> float | None:
    for seconds, val in zip(curve["seconds"], curve["val_mean"]):
        if val <= target:
            return seconds
    return None


def summarize(runs_by_optimizer: dict[str, list[dict]]) -> dict[str, dict]:
    curves = {name: mean_curve(runs) for name, runs in runs_by_optimizer.items()}
    adamw_target = curves["adamw"]["val_mean"][-1] if "adamw" in curves else None
    summary = {}
    for name, runs in runs_by_optimizer.items():
        finals = [run["final_val_loss"] for run in runs]
        summary[name] = {
            "lr": runs[0]["lr"],
            "final_train_loss_mean": statistics.fmean(run["final_train_loss"] for run in runs),
            "final_val_loss_mean": statistics.fmean(finals),
            "final_val_loss_spread": (max(finals) - min(finals)) / 2,
            "median_step_seconds": statistics.median(r["median_step_seconds"] for r in runs),
            "median_optimizer_step_seconds": statistics.median(
                r["median_optimizer_step_seconds"] for r in runs),
            "train_seconds_mean": statistics.fmean(run["train_seconds"] for run in runs),
            "seconds_to_adamw_final_val": (seconds_to_reach(curves[name], adamw_target)
                                           if adamw_target is not None else None),
            "mean_curve": curves[name],
        }
    return summary


def print_table(summary: dict[str, dict], has_adamw: bool) -> None:
    header = (f"{'optimizer':14s} {'lr':>8s} {'train loss':>10s} {'val loss (± half-range)':>23s} "
              f"{'step ms':>8s} {'opt ms':>8s} {'wall s':>8s} {'s to AdamW final val':>21s}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in summary.items():
        reach = row["seconds_to_adamw_final_val"]
        reach_text = ("n/a (no adamw run)" if not has_adamw
                      else "never" if reach is None else f"{reach:.1f}")
        val_text = f"{row['final_val_loss_mean']:.4f} ± {row['final_val_loss_spread']:.4f}"
        print(f"{name:14s} {row['lr']:>8g} {row['final_train_loss_mean']:>10.4f} {val_text:>23s} "
              f"{1e3 * row['median_step_seconds']:>8.1f} "
              f"{1e3 * row['median_optimizer_step_seconds']:>8.2f} "
              f"{row['train_seconds_mean']:>8.1f} {reach_text:>21s}")


def plot_curves(summary: dict[str, dict], out_dir: Path) -> list[Path]:
    plt = harness.pyplot()
    written = []
    for x_key, x_label, file_name in (("step", "step", "val_loss_vs_step.png"),
                                      ("seconds", "training wall-clock seconds (no eval)",
                                       "val_loss_vs_time.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name, row in summary.items():
            curve = row["mean_curve"]
            axes.plot(curve[x_key], curve["val_mean"], label=f"{name} (lr {row['lr']:g})")
            axes.fill_between(curve[x_key], curve["val_min"], curve["val_max"], alpha=0.2)
        axes.set_ylim(top=zoomed_top(summary))
        axes.set_xlabel(x_label)
        axes.set_ylabel("validation loss (nats/byte)")
        axes.grid(alpha=0.3)
        axes.legend()
        written.append(harness.save_figure(figure, out_dir / file_name))
    return written


def zoomed_top(summary: dict[str, dict]) -> float:
    """A y-limit that skips the first fifth of each curve, where the loss falls steeply."""
    tails = [v for row in summary.values()
             for v in row["mean_curve"]["val_max"][len(row["mean_curve"]["val_max"]) // 5:]
             if math.isfinite(v)]
    return max(tails) if tails else math.log(VOCAB_SIZE)


def machine_info() -> dict:
    """The machine, its load now and torch's thread count (harness.machine)."""
    return harness.machine("torch", torch_threads=torch.get_num_threads())


def model_config(args: argparse.Namespace) -> dict:
    keys = ("n_layer", "n_head", "d_model", "block_size", "batch_size")
    return {key: getattr(args, key) for key in keys}


# ------------------------------------------------------------------------------------------ cli

def parse_lr_override(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in ALL_OPTIMIZERS or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME in {ALL_OPTIMIZERS}")
    return name, float(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1 seed, a few minutes")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep each optimizer's lr grid, write lr_choices.json, then exit")
    parser.add_argument("--optimizers", nargs="+", choices=ALL_OPTIMIZERS,
                        help=f"default: {' '.join(DEFAULT_OPTIMIZERS)} (--quick on a CPU without "
                             "native bfloat16 matmuls: without muon, see quick_optimizers)")
    parser.add_argument("--lr", action="append", type=parse_lr_override, default=[],
                        metavar="NAME=VALUE", help="peak lr override; repeatable")
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--n-head", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sweep-steps", type=int, help="steps per sweep run (default steps/2)")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3, or 1 with --quick)")
    parser.add_argument("--text", help="train on this file instead of the stdlib sources")
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.config_name = "quick" if args.quick else "full"
    for key, value in PRESETS[args.config_name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sweep_steps = args.sweep_steps or args.steps // 2
    args.lr_overrides = dict(args.lr)
    args.out = args.out or Path("results") / f"train_lm_{args.config_name}"
    return args


def quick_optimizers(device: torch.device) -> list[str]:
    """--quick's default list: every optimizer, except torch.optim.Muon on a CPU that emulates
    bfloat16 matmuls (Muon's Newton–Schulz runs in bf16; on an AVX2-only CPU a bf16 matmul was
    60× slower than float32, which made Muon alone take longer than the rest of the demo)."""
    slowdown = bfloat16_matmul_slowdown(device)
    if slowdown < BF16_SLOWDOWN_LIMIT:
        return DEFAULT_OPTIMIZERS
    print(f"muon left out of --quick: a bfloat16 matmul is {slowdown:.0f}× slower than float32 on "
          f"this CPU, and torch.optim.Muon iterates in bfloat16; add it with --optimizers")
    return [name for name in DEFAULT_OPTIMIZERS if name != "muon"]


def bfloat16_matmul_slowdown(device: torch.device) -> float:
    """Time of a 256×256 bfloat16 matmul over a float32 one (1 on GPUs)."""
    if device.type != "cpu":
        return 1.0
    matrix = torch.randn(256, 256)

    def seconds(dtype: torch.dtype) -> float:
        a = matrix.to(dtype)
        a @ a  # warm-up
        return harness.sample(lambda: [a @ a for _ in range(3)]).wall_s
    return seconds(torch.bfloat16) / seconds(torch.float32)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.optimizers is None:
        args.optimizers = (quick_optimizers(torch.device(args.device)) if args.quick
                           else DEFAULT_OPTIMIZERS)
    if ASGO_OPTIMIZERS & set(args.optimizers):
        import_asgo_adapter()
    lrs = None if args.sweep else resolve_lrs(args)
    data, source = load_corpus(args.text, args.max_bytes)
    split = int(len(data) * (1 - VAL_FRACTION))
    train_data, val_data = data[:split], data[split:]
    val_batches = fixed_val_batches(val_data, args.block_size, args.batch_size, args.eval_batches)
    print(f"text: {source}, {len(data):,} bytes ({len(train_data):,} train / "
          f"{len(val_data):,} val); config {args.config_name}: {model_config(args)}, "
          f"{args.steps} steps, {args.seeds} seed(s), {torch.get_num_threads()} threads")
    harness.warn_if_busy()
    if args.sweep:
        run_sweep(args, train_data, val_batches)
        return

    runs_by_optimizer = {name: [train_run(args, name, lrs[name], seed, args.steps, train_data,
                                          val_batches) for seed in range(args.seeds)]
                         for name in args.optimizers}
    summary = summarize(runs_by_optimizer)
    results = {
        "config": {"name": args.config_name, **model_config(args), "steps": args.steps,
                   "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                   "seeds": args.seeds, "warmup_fraction": WARMUP_FRACTION,
                   "final_lr_ratio": FINAL_LR_RATIO, "grad_clip": GRAD_CLIP,
                   "device": args.device},
        "python_version": sys.version, "torch_version": torch.__version__,
        "text_source": source, "byte_count": len(data), "machine": machine_info(),
        "chosen_lrs": lrs, "summary": summary, "runs": runs_by_optimizer,
    }
    harness.write_json(args.out / "results.json", results)
    print_table(summary, has_adamw="adamw" in summary)
    print(f"\n{REGIME_MAP_NOTE}")
    plots = plot_curves(summary, args.out)
    print(f"\nresults: {args.out / 'results.json'}\nplots: {', '.join(map(str, plots))}")


if __name__ == "__main__":
    main()
