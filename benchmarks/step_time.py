"""Optimizer step time on a GPT-2-style model in PyTorch: AdamW, Muon, ASGO (τ = 1, 10), DASGO,
and a naive per-parameter re-implementation of the reference ASGO code.

The model has d_model 384 and 6 layers: per layer qkv 1152×384, attention projection 384×384,
MLP fc 1536×384, MLP projection 384×1536 (nn.Linear's (out, in) weights), two LayerNorms and
the biases; plus a token embedding (vocab × 384; vocab 8192 by default instead of GPT-2's 50257
to keep the run short — it goes to AdamW in every optimizer, so it weighs the same in all),
learned positions (256 × 384) and a final LayerNorm. Gradients are fixed random tensors.

"bf16mm" rows run ASGO with matmul_dtype="bfloat16": bf16 inputs to the Gram and apply GEMMs,
statistics and root in float32 — the precision torch.optim.Muon uses for its whole iteration.
"Muon fp32" is Muon's update with its iteration in float32, for comparison at equal precision.
"ASGO τ=1 floor" runs only the GEMMs and eigh a τ=1 step needs, batched (no checks, no
fallback): how close the library's step is to what this machine allows.

Embeddings, positions and <2-D parameters go to AdamW in Muon, ASGO, DASGO and the reference
baseline alike. Time is measured in rounds of τ steps (one root period; τ = 1 for the others)
after a warm-up step; the table shows the median over rounds of the mean step time per round,
so ASGO τ = 10 pays its root refresh. All optimizers run in this one process.

Matched precision. By default the script prints the rows that compare like with like and says
which case it detected: on a device with native bf16 matmuls (a CPU with the avx512_bf16 or
amx_bf16 flag in /proc/cpuinfo, or, without /proc/cpuinfo, a 256×256 bf16 matmul timed faster
than 2× float32; CUDA with bf16 support) ASGO with matmul_dtype="bfloat16" against
torch.optim.Muon's bf16 iteration; elsewhere (bf16 emulated, e.g. AVX2-only CPUs) both in
float32: ASGO's default against "Muon fp32". AdamW is printed in both for scale. --all times
every row, --only NAME... the named ones.

    python benchmarks/step_time.py [--device cpu|cuda] [--rounds 5] [--threads 2] [--all] [--json PATH]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import harness  # benchmarks/, the script's own directory
from asgo_core.adapters.torch import ASGO, DASGO, asgo_param_groups
from asgo_core.solvers import inverse_root
from reference_asgo import ReferenceStyleASGO
from train_lm import bfloat16_matmul_slowdown

LR = 1e-2


class Block(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)


class GPT(nn.Module):
    """Only the parameters of a GPT-2-style model (no forward pass is needed here)."""

    def __init__(self, vocab: int, d_model: int = 384, layers: int = 6, positions: int = 256):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(positions, d_model)
        self.blocks = nn.ModuleList(Block(d_model) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)


def _is_hidden_matrix(model: GPT, param) -> bool:
    return param.ndim >= 2 and param is not model.wte.weight and param is not model.wpe.weight


class MuonFloat32(torch.optim.Optimizer):
    """torch.optim.Muon's update with its Newton–Schulz iteration in float32 instead of
    bfloat16: Muon at the precision ASGO's statistics use, for comparison only."""

    def __init__(self, params, lr=LR, momentum=0.95, weight_decay=0.1, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        a, b, c = 3.4445, -4.7750, 2.0315
        for group in self.param_groups:
            for p in group["params"]:
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.lerp_(p.grad, 1 - group["momentum"])
                X = p.grad.lerp(buffer, group["momentum"])
                X = X.T if p.shape[0] > p.shape[1] else X
                X = X / X.norm().clamp(min=1e-7)
                for _ in range(group["ns_steps"]):
                    A = X @ X.T
                    X = a * X + (b * A + c * A @ A) @ X
                X = X.T if p.shape[0] > p.shape[1] else X
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(X, alpha=-group["lr"])


class AsgoFloor(torch.optim.Optimizer):
    """The arithmetic an ASGO τ=1 step cannot avoid, and nothing else: per stack of same-shaped
    matrices the momentum EMA, the Gram EMA (one baddbmm), the eigh root (asgo's own
    `inverse_root`, so the same CPU eigh fast path), the apply, the RMS scale and the parameter
    write. No finiteness check, fallback chain, damping norm or state bookkeeping: a lower bound
    on ASGO τ=1 on this machine, for reading how far the library's step is from it. Not a usable
    optimizer."""

    def __init__(self, params, lr=LR, betas=(0.9, 0.8), weight_decay=0.1, update_rms=0.2):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      update_rms=update_rms))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            stacks = {}
            for p in group["params"]:
                stacks.setdefault(tuple(p.shape), []).append(p)
            for params in stacks.values():
                self._step_stack(params, group)

    def _step_stack(self, params, group):
        beta1, beta2 = group["betas"]
        state = self.state[params[0]]
        tall = params[0].shape[0] > params[0].shape[1]
        grads = torch.stack([p.grad for p in params])
        grads = grads.mT if tall else grads  # the small side first, as ASGO's side="auto"
        if not state:
            k = grads.shape[1]
            state["momentum"] = torch.zeros_like(grads)
            state["gram"] = grads.new_zeros(len(params), k, k)
        momentum = state["momentum"].lerp_(grads, 1 - beta1)
        state["gram"] = torch.baddbmm(state["gram"], grads, grads.mT, beta=beta2, alpha=1 - beta2)
        root = inverse_root(state["gram"], method="eigh", eps=1e-12, damping="absolute")
        direction = torch.matmul(root, momentum)
        direction = direction.mT if tall else direction
        scale = group["update_rms"] * math.sqrt(params[0].numel()) / direction.norm(dim=(1, 2))
        for param, update, factor in zip(params, direction, scale.unbind(0)):
            param.mul_(1 - group["lr"] * group["weight_decay"]).addcmul_(update, factor, value=-group["lr"])


class Combined:
    """Several optimizers stepped as one (Muon and the reference need AdamW for the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def state(self) -> dict:
        return {param: state for opt in self.optimizers for param, state in opt.state.items()}

    def step(self):
        for opt in self.optimizers:
            opt.step()


def build_optimizers(model: GPT) -> dict:
    matrices = [p for p in model.parameters() if _is_hidden_matrix(model, p)]
    rest = [p for p in model.parameters() if not _is_hidden_matrix(model, p)]
    adamw_rest = lambda: torch.optim.AdamW(rest, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)  # noqa: E731
    return {
        "AdamW": lambda: torch.optim.AdamW(model.parameters(), lr=LR),
        "Muon + AdamW": lambda: Combined(torch.optim.Muon(matrices, lr=LR), adamw_rest()),
        "Muon fp32 + AdamW": lambda: Combined(MuonFloat32(matrices), adamw_rest()),
        "ASGO τ=1": lambda: ASGO(asgo_param_groups(model), lr=LR, precondition_frequency=1),
        "ASGO τ=10": lambda: ASGO(asgo_param_groups(model), lr=LR, precondition_frequency=10),
        "ASGO τ=1 bf16mm": lambda: ASGO(asgo_param_groups(model), lr=LR, precondition_frequency=1,
                                        matmul_dtype="bfloat16"),
        "ASGO τ=10 bf16mm": lambda: ASGO(asgo_param_groups(model), lr=LR, precondition_frequency=10,
                                         matmul_dtype="bfloat16"),
        "DASGO": lambda: DASGO(asgo_param_groups(model), lr=LR),
        "reference-style": lambda: Combined(ReferenceStyleASGO(matrices), adamw_rest()),
        "ASGO τ=1 floor": lambda: Combined(AsgoFloor(matrices), adamw_rest()),
    }


def state_bytes(optimizer) -> int:
    """Bytes of the distinct tensor storages held in the optimizer state."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(list(optimizer.state.values()))
    return sum(storages.values())


def root_period(name: str) -> int:
    return 10 if "τ=10" in name else 1


def time_optimizers(makers: dict, model: GPT, rounds: int, device) -> dict:
    """name → (median over rounds of the mean step wall time over one root period in s, the
    same in CPU s, state bytes).

    The optimizers take turns round by round (harness.interleaved). They share the parameters
    and the fixed random gradients.
    """
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    optimizers = {name: make() for name, make in makers.items()}
    for optimizer in optimizers.values():
        optimizer.step()  # state initialisation is not timed

    def one_period(optimizer, period):
        def steps():
            for _ in range(period):
                optimizer.step()
        return steps
    taken = harness.interleaved(
        {name: one_period(optimizer, root_period(name)) for name, optimizer in optimizers.items()},
        rounds, sync=torch.cuda.synchronize if device.type == "cuda" else harness.no_sync)
    return {name: (harness.median_wall(samples) / root_period(name),
                   harness.median_cpu(samples) / root_period(name), state_bytes(optimizers[name]))
            for name, samples in taken.items()}


def asgo_state_bound(model: GPT) -> int:
    """(params + 2·k² per matrix) × 4 bytes + AdamW's 2 × 4 bytes per other parameter."""
    total = 0
    for p in model.parameters():
        if _is_hidden_matrix(model, p):
            total += 4 * (p.numel() + 2 * min(p.shape) ** 2)
        else:
            total += 8 * p.numel()
    return total


MATCHED_ROWS = {
    True: ["AdamW", "Muon + AdamW", "ASGO τ=1 bf16mm", "ASGO τ=10 bf16mm"],
    False: ["AdamW", "Muon fp32 + AdamW", "ASGO τ=1", "ASGO τ=10"],
}

def native_bf16(device) -> tuple[bool, str]:
    """Whether bfloat16 matmuls run natively on device, and how that was decided."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return native, f"CUDA, torch.cuda.is_bf16_supported() = {native}"
    flags = harness.cpu_flags()
    if flags is not None:
        found = sorted(flags & harness.NATIVE_BF16_FLAGS)
        return bool(found), ("/proc/cpuinfo flags " + ", ".join(found) if found else
                             "no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo")
    ratio = bfloat16_matmul_slowdown(device)
    return ratio < 2.0, f"a 256×256 bf16 matmul took {ratio:.1f}× the float32 time"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--only", nargs="*",
                        help="names of optimizers to time (default: the matched-precision rows)")
    parser.add_argument("--all", action="store_true", help="time every optimizer")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = GPT(args.vocab).to(device)
    args.native_bf16, reason = native_bf16(device)
    print(f"bf16 matmuls: {'native' if args.native_bf16 else 'emulated'} ({reason}); matched "
          f"precision: " + ("ASGO matmul_dtype='bfloat16' vs torch.optim.Muon's bf16 iteration"
                            if args.native_bf16 else "ASGO float32 vs Muon with a float32 iteration"))
    wanted = (None if args.all else args.only if args.only
              else MATCHED_ROWS[args.native_bf16])
    makers = {name: make for name, make in build_optimizers(model).items()
              if wanted is None or name in wanted}
    results = {name: {"step_ms": seconds * 1e3, "step_cpu_ms": cpu_seconds * 1e3, "state_bytes": nbytes}
               for name, (seconds, cpu_seconds, nbytes)
               in time_optimizers(makers, model, args.rounds, device).items()}
    report(results, model, args, device)


def report(results: dict, model: GPT, args, device) -> None:
    params = sum(p.numel() for p in model.parameters())
    print(f"\nstep time, GPT-2-style d_model 384 × 6 layers, {params / 1e6:.1f} M params, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.rounds} rounds, {harness.cpu_model()}, "
          f"load average {harness.load_average()[0]:.1f}\n")
    print(f"{'optimizer':<18}{'step ms':>10}{'× Muon':>9}{'× AdamW':>9}{'ref ÷':>8}{'state MiB':>11}")
    matched_muon = "Muon + AdamW" if args.native_bf16 else "Muon fp32 + AdamW"
    muon = (results.get(matched_muon) or results.get("Muon + AdamW")
            or results.get("Muon fp32 + AdamW") or {}).get("step_ms")
    adamw = results.get("AdamW", {}).get("step_ms")
    reference = results.get("reference-style", {}).get("step_ms")
    ratio = lambda ms, base: f"{ms / base:.2f}" if base else "-"  # noqa: E731
    for name, row in results.items():
        ms = row["step_ms"]
        print(f"{name:<18}{ms:>10.1f}{ratio(ms, muon):>9}{ratio(ms, adamw):>9}"
              f"{ratio(reference, ms) if reference else '-':>8}{row['state_bytes'] / 2**20:>11.2f}")
    print(f"(× Muon: step time over {matched_muon if matched_muon in results else 'Muon'}'s, the "
          f"matched-precision Muon here; × AdamW: over AdamW's; ref ÷: the reference-style step "
          f"time over this one, i.e. the speed-up over it)")
    print(f"\nASGO state bound (params + 2·k² per matrix)·4 B + AdamW state: "
          f"{asgo_state_bound(model) / 2**20:.2f} MiB")
    if args.json:
        harness.write_json(args.json, {
            "device": str(device), "threads": torch.get_num_threads(), "native_bf16": args.native_bf16,
            "torch": torch.__version__, "machine": harness.cpu_model(),
            "machine_details": harness.machine("torch"), "state_bound_bytes": asgo_state_bound(model),
            "results": results}, indent=2)


if __name__ == "__main__":
    main()
