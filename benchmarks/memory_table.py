"""Optimizer-state memory: bytes of state per byte of parameters, and the peak RSS of one step.

Models: GPT-2 small's shapes (12 layers, d_model 768, vocabulary 50,257, context 1,024; tied
head) and train_lm's quick model (benchmarks/train_lm.py). Optimizers, each as train_lm routes
parameters (torch.optim.Muon and the ASGO adapters send embeddings, norms and biases to AdamW):
torch.optim.AdamW, torch.optim.Muon + AdamW, ASGO (tau 1; with and without max_precond_dim),
DASGO, with float32 or bfloat16 parameters and with or without bfloat16 state (mu_dtype,
precond_dtype).

How the state is counted: the bytes of every tensor in optimizer.state after one step.
GPT-2 small's state is built on the meta device (no memory, no arithmetic): AdamW, Muon and
DASGO take a real step there; ASGO's root solve reads values (its fallback chain branches on
them), so its state is the adapter's own state template (asgo_core.init_state per parameter,
the tensors a step stores; load_state_dict checks a saved state against the same template).
On train_lm's model every optimizer takes a real CPU step, and the script checks that the
template gives the same bytes as the real step.

Peak RSS: each optimizer runs one training step of train_lm's model in a fresh process; the
table gives the process's peak RSS and its growth during the optimizer step (ru_maxrss after
the step minus the RSS before it).

    python benchmarks/memory_table.py          # prints the markdown tables, writes results/memory_table.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import harness  # benchmarks/, the script's own directory
import train_lm
from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups

GPT2_SMALL = dict(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab=50257)
MAX_PRECOND_DIM = 256
LOW_STATE = dict(mu_dtype="bfloat16", precond_dtype="bfloat16")
# name → (optimizer factory key, options); the ASGO adapter's options apply to asgo/dasgo only
CONFIGURATIONS = {
    "AdamW": ("adamw", {}),
    "Muon (+ AdamW)": ("muon", {}),
    "ASGO": ("asgo", {}),
    f"ASGO, max_precond_dim={MAX_PRECOND_DIM}": ("asgo", {"max_precond_dim": MAX_PRECOND_DIM}),
    "DASGO": ("dasgo", {}),
    "ASGO + bf16 state": ("asgo", LOW_STATE),
    f"ASGO, max_precond_dim={MAX_PRECOND_DIM} + bf16 state": (
        "asgo", {"max_precond_dim": MAX_PRECOND_DIM, **LOW_STATE}),
    "DASGO + bf16 state": ("dasgo", {"mu_dtype": "bfloat16"}),
}


class GPT2Shapes(nn.Module):
    """GPT-2 small's parameters (names as train_lm's GPT, so the same routing applies)."""

    def __init__(self, n_layer, n_head, d_model, block_size, vocab):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(train_lm.Block(d_model, n_head) for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(d_model)


def make_optimizer(kind: str, options: dict, model: nn.Module) -> list:
    if kind == "adamw":
        return train_lm.make_adamw(model, 1e-3)
    if kind == "muon":
        return train_lm.muon_with_adamw(model, 1e-3, 1e-3)
    make = ASGO if kind == "asgo" else DASGO
    return [make(asgo_param_groups(model), lr=1e-3, **options)]


def state_bytes(optimizers: list) -> int:
    total = 0
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                tensors = value if isinstance(value, list) else [value]
                total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def template_bytes(optimizer) -> int:
    """The bytes of the ASGO/DASGO adapter's state template of every parameter (see docstring)."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            matrix = param.ndim >= 2 and group["algorithm"] != "adamw"
            algorithm = optimizer.matrix_algorithm if matrix else "adamw"
            if algorithm == "adamw":
                total += 2 * param.numel() * param.element_size() + 4  # exp_avg, exp_avg_sq, step
                continue
            template = optimizer._state_template(param, group, algorithm)
            total += sum(t.numel() * t.element_size() for value in template.values()
                         for t in (value if isinstance(value, list) else [value]))
    return total


def step_once(optimizers: list, model: nn.Module) -> None:
    for param in model.parameters():
        param.grad = torch.empty_like(param) if param.device.type == "meta" else torch.randn_like(param)
    for optimizer in optimizers:
        optimizer.step()


def count(model: nn.Module, kind: str, options: dict, real_step: bool) -> int:
    optimizers = make_optimizer(kind, options, model)
    if kind == "asgo" and not real_step:
        return template_bytes(optimizers[0])
    step_once(optimizers, model)
    counted = state_bytes(optimizers)
    if kind in ("asgo", "dasgo"):
        assert counted == template_bytes(optimizers[0]), f"{kind} {options}: template and step disagree"
    return counted


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train_lm_model(dtype):
    args = train_lm.parse_args(["--quick"])
    return train_lm.build_model(args, 0).to(dtype)


def state_table() -> dict:
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            gpt2 = GPT2Shapes(**GPT2_SMALL).to(dtype)
        small = train_lm_model(dtype)
        for name, (kind, options) in CONFIGURATIONS.items():
            rows[f"{name} | {str(dtype).split('.')[-1]} params"] = {
                model_name: count(model, kind, options, real_step=model_name == "train_lm quick")
                / param_bytes(model)
                for model_name, model in (("GPT-2 small", gpt2), ("train_lm quick", small))}
        rows[f"parameters | {str(dtype).split('.')[-1]}"] = {"GPT-2 small": param_bytes(gpt2),
                                                             "train_lm quick": param_bytes(small)}
    return rows


def peak_rss(configuration: str) -> dict:
    """One training step of train_lm's quick model in this process (see --rss-child)."""
    kind, options = CONFIGURATIONS[configuration]
    torch.set_num_threads(1)
    args = train_lm.parse_args(["--quick"])
    model = train_lm.build_model(args, 0)
    optimizers = make_optimizer(kind, options, model)
    tokens = torch.randint(0, train_lm.VOCAB_SIZE, (args.batch_size, args.block_size + 1),
                           generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    before = current_rss_bytes()
    for optimizer in optimizers:
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_mib": peak / 2**20, "step_growth_mib": max(0, peak - before) / 2**20}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/memory_table.json"))
    options = parser.parse_args()
    if options.rss_child:
        print(json.dumps(peak_rss(options.rss_child)))
        return
    rows = state_table()
    rss = {}
    for configuration in ("AdamW", "Muon (+ AdamW)", "ASGO", f"ASGO, max_precond_dim={MAX_PRECOND_DIM}",
                          "DASGO", "ASGO + bf16 state"):
        child = subprocess.run([sys.executable, __file__, "--rss-child", configuration],
                               capture_output=True, text=True, check=True)
        rss[configuration] = json.loads(child.stdout.strip().splitlines()[-1])
    harness.write_json(options.out, {"state_bytes_per_param_byte": rows, "peak_rss": rss,
                                     "machine": train_lm.machine_info(), "torch": torch.__version__})
    print("| optimizer | params | GPT-2 small | train_lm quick |\n|---|---|---|---|")
    for key, values in rows.items():
        name, dtype = key.split(" | ")
        if name == "parameters":
            print(f"| parameter bytes | {dtype} | {values['GPT-2 small'] / 2**20:.0f} MiB | "
                  f"{values['train_lm quick'] / 2**20:.2f} MiB |")
        else:
            gpt2, small = values["GPT-2 small"], values["train_lm quick"]
            print(f"| {name} | {dtype.split()[0]} | {gpt2:.2f} | {small:.2f} |")
    print("\n| optimizer (train_lm quick, float32, 1 step) | peak RSS (MiB) | growth in the step (MiB) |")
    print("|---|---|---|")
    for name, values in rss.items():
        print(f"| {name} | {values['peak_rss_mib']:.0f} | {values['step_growth_mib']:.1f} |")


if __name__ == "__main__":
    main()
