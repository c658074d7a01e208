"""The optax adapter on real data: an MLP on scikit-learn's digits, ASGO/DASGO vs AdamW and Muon.

Data: sklearn.datasets.load_digits (1797 8×8 images, shipped with scikit-learn), pixels / 16,
a stratified 80/20 train/validation split with a fixed seed. Model: 64 → 256 → 256 → 10 MLP
with ReLU, weights stored (in, out). Training: minibatches of 64 drawn in a per-seed order,
--epochs epochs, the reference recipe's schedule (linear warmup over 10% of the steps, cosine
to 2% of peak) and gradient clipping at global norm 1.0. Every optimizer sends the biases to
AdamW (betas 0.9/0.95) and decays the matrices by 0.1:
    adamw       optax.adamw(b1=0.9, b2=0.95, weight_decay=0.1), one lr for all leaves.
    muon        optax.contrib.muon(consistent_rms=0.2, weight_decay=0.1) (update RMS 0.2 like ASGO).
    asgo_tau1   asgo_core.adapters.optax.asgo, root every step.
    asgo_tau10  the same with precondition_frequency=10.
    dasgo       asgo_core.adapters.optax.dasgo.
Initialisation, data order and step count are identical across optimizers for a given seed.

Learning rates come from benchmarks/lr_choices_jax.json, written by --sweep: each optimizer is
trained with seed 0 at every lr of its grid (the same grids as benchmarks/train_lm.py) and the lr
with the lowest final validation loss is stored.
    adamw                          3e-4, 1e-3, 3e-3, 1e-2
    muon, asgo_tau1, asgo_tau10    1e-3, 3e-3, 1e-2, 3e-2, 1e-1
    dasgo                          3e-4, 1e-3, 3e-3, 1e-2, 3e-2

--sensitivity trains adamw, muon, asgo_tau1 and asgo_tau10 with seed 0 at the stored lr times
1/4, 1/2, 1, 2, 4 and writes the final validation loss by lr to
OUT/mlp_jax_lr_sensitivity.json (OUT defaults to docs/regime_map; benchmarks/regime_map.py
--report turns it into the band of lrs within 2% of the best, docs/regime_map.md).

Usage:
    python benchmarks/train_mlp_jax.py --sweep          # fill lr_choices_jax.json
    python benchmarks/train_mlp_jax.py --seeds 3        # results/train_mlp_jax/{results.json, *.png}
    python benchmarks/train_mlp_jax.py --sensitivity    # docs/regime_map/mlp_jax_lr_sensitivity.json
"""

from __future__ import annotations

import os

# jaxlib's CPU eigh runs in OpenBLAS; one BLAS thread per call avoids oversubscribing the cores
# when XLA runs several eigh calls at once (see benchmarks/step_time_jax.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import harness  # noqa: E402  (benchmarks/, the script's own directory)
from asgo_core.adapters.optax import asgo, dasgo  # noqa: E402
from lr_grids import LR_GRIDS  # noqa: E402

LR_CHOICES_PATH = Path(__file__).with_name("lr_choices_jax.json")
HIDDEN, BATCH = 256, 64
SENSITIVITY_OPTIMIZERS = ["adamw", "muon", "asgo_tau1", "asgo_tau10"]
SENSITIVITY_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def load_data(split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        (data.data / 16.0).astype(np.float32), data.target, test_size=0.2,
        stratify=data.target, random_state=split_seed)
    return (jnp.asarray(x_train), jnp.asarray(y_train)), (jnp.asarray(x_val), jnp.asarray(y_val))


def init_mlp(key) -> dict:
    sizes = [(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 10)]
    keys = jax.random.split(key, len(sizes))
    return {f"layer{i}": {"w": jax.random.normal(k, shape) / np.sqrt(shape[0]), "b": jnp.zeros(shape[1])}
            for i, (k, shape) in enumerate(zip(keys, sizes))}


def logits_of(params, x):
    for i in range(3):
        x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        x = jax.nn.relu(x) if i < 2 else x
    return x


def loss_and_accuracy(params, x, y):
    logits = logits_of(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def make_optimizer(name: str, lr: float, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total_steps // 10), total_steps,
                                                  end_value=0.02 * lr)
    adam = dict(adam_b1=0.9, adam_b2=0.95)
    optimizers = {
        "adamw": lambda: optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1),
        "muon": lambda: optax.contrib.muon(schedule, weight_decay=0.1, consistent_rms=0.2, **adam),
        "asgo_tau1": lambda: asgo(schedule, precondition_frequency=1, **adam),
        "asgo_tau10": lambda: asgo(schedule, precondition_frequency=10, **adam),
        "dasgo": lambda: dasgo(schedule, **adam),
    }
    return optax.chain(optax.clip_by_global_norm(1.0), optimizers[name]())


def train_run(name: str, lr: float, seed: int, epochs: int, data) -> dict:
    (x_train, y_train), (x_val, y_val) = data
    steps_per_epoch = len(x_train) // BATCH
    tx = make_optimizer(name, lr, epochs * steps_per_epoch)
    params = init_mlp(jax.random.PRNGKey(seed))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, x, y):
        (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_and_accuracy)
    order_rng = np.random.default_rng(seed)
    history = {"step": [], "wall_seconds": [], "train_loss": [], "val_loss": [], "val_accuracy": []}
    wall, step = 0.0, 0
    for _ in range(epochs):
        order = order_rng.permutation(len(x_train))
        epoch_losses = []
        for b in range(steps_per_epoch):
            batch = order[b * BATCH:(b + 1) * BATCH]
            with harness.Stopwatch() as clock:
                params, state, loss = jax.block_until_ready(
                    train_step(params, state, x_train[batch], y_train[batch]))
            wall += clock.wall_s
            epoch_losses.append(float(loss))
            step += 1
        val_loss, val_accuracy = evaluate(params, x_val, y_val)
        for key, value in (("step", step), ("wall_seconds", wall), ("train_loss", np.mean(epoch_losses)),
                           ("val_loss", val_loss), ("val_accuracy", val_accuracy)):
            history[key].append(float(value))
    return {"optimizer": name, "lr": lr, "seed": seed, "history": history,
            "final_val_loss": history["val_loss"][-1], "final_val_accuracy": history["val_accuracy"][-1]}


def run_sweep(names, epochs: int, data) -> None:
    choices = json.loads(LR_CHOICES_PATH.read_text()) if LR_CHOICES_PATH.exists() else {}
    for name in names:
        losses = {lr: train_run(name, lr, 0, epochs, data)["final_val_loss"] for lr in LR_GRIDS[name]}
        best = min(losses, key=losses.get)
        choices[name] = {"lr": best, "seed": 0, "epochs": epochs,
                         "final_val_loss_by_lr": {f"{lr:g}": loss for lr, loss in losses.items()}}
        edge = " (at the edge of the grid)" if best in (LR_GRIDS[name][0], LR_GRIDS[name][-1]) else ""
        print(f"sweep {name:<11} " + "  ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items())
              + f"  -> lr {best:g}{edge}", flush=True)
    harness.write_json(LR_CHOICES_PATH, choices, indent=2)
    print(f"wrote {LR_CHOICES_PATH}")


def run_sensitivity(epochs: int, data, out: Path) -> None:
    """Final val loss (seed 0) at the stored lr times SENSITIVITY_FACTORS, per optimizer."""
    choices = json.loads(LR_CHOICES_PATH.read_text())
    by_lr = {}
    for name in SENSITIVITY_OPTIMIZERS:
        lrs = [float(f"{choices[name]['lr'] * f:.3g}") for f in SENSITIVITY_FACTORS]
        by_lr[name] = {f"{lr:g}": train_run(name, lr, 0, epochs, data)["final_val_loss"]
                       for lr in lrs}
        print(f"sensitivity {name:<11} " + "  ".join(f"{lr}: {v:.4f}"
                                                     for lr, v in by_lr[name].items()), flush=True)
    meta = {"python": harness.versions()["python"], "jax": jax.__version__,
            "optax": optax.__version__, "machine": harness.machine("jax", "jaxlib", "optax"),
            "epochs": epochs, "seed": 0, "factors": list(SENSITIVITY_FACTORS),
            "centre": {name: choices[name]["lr"] for name in SENSITIVITY_OPTIMIZERS},
            "command": f"python benchmarks/train_mlp_jax.py --sensitivity --epochs {epochs}"}
    path = harness.write_json(out / "mlp_jax_lr_sensitivity.json",
                              {"meta": meta, "final_val_loss_by_lr": by_lr})
    print(f"wrote {path}")


def plot(runs: list, out: Path) -> None:
    plt = harness.pyplot()
    for x_key, label, filename in (("step", "step", "val_loss_vs_step.png"),
                                   ("wall_seconds", "wall-clock seconds (training steps only)",
                                    "val_loss_vs_time.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(run["optimizer"] for run in runs):
            histories = [run["history"] for run in runs if run["optimizer"] == name]
            x = np.mean([h[x_key] for h in histories], axis=0)
            losses = np.array([h["val_loss"] for h in histories])
            line, = axes.plot(x, losses.mean(axis=0), label=f"{name} (lr {runs_lr(runs, name):g})")
            axes.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
        axes.set(xlabel=label, ylabel="validation loss", yscale="log",
                 title=f"MLP on digits, mean over {len(histories)} seed(s), band: min..max")
        axes.grid(alpha=0.3)
        axes.legend()
        harness.save_figure(figure, out / filename)


def runs_lr(runs: list, name: str) -> float:
    return next(run["lr"] for run in runs if run["optimizer"] == name)


def summarise(runs: list) -> list:
    rows = []
    for name in dict.fromkeys(run["optimizer"] for run in runs):
        mine = [run for run in runs if run["optimizer"] == name]
        rows.append({"optimizer": name, "lr": mine[0]["lr"],
                     "val_loss_mean": float(np.mean([r["final_val_loss"] for r in mine])),
                     "val_loss_spread": float(np.ptp([r["final_val_loss"] for r in mine])),
                     "val_accuracy_mean": float(np.mean([r["final_val_accuracy"] for r in mine])),
                     "train_seconds_mean": float(np.mean([r["history"]["wall_seconds"][-1] for r in mine]))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="choose each optimizer's lr (seed 0)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="final val loss at the stored lr x 1/4..4 (seed 0), JSON under --out")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--optimizers", nargs="+", default=list(LR_GRIDS), choices=list(LR_GRIDS))
    parser.add_argument("--out", type=Path,
                        help="default results/train_mlp_jax (docs/regime_map with --sensitivity)")
    args = parser.parse_args()
    data = load_data()
    if args.sensitivity:
        run_sensitivity(args.epochs, data, args.out or Path(__file__).resolve().parent.parent
                        / "docs" / "regime_map")
        return
    args.out = args.out or Path("results/train_mlp_jax")
    if args.sweep:
        run_sweep(args.optimizers, args.epochs, data)
        return
    if not LR_CHOICES_PATH.exists():
        raise SystemExit(f"{LR_CHOICES_PATH} is missing: run with --sweep first")
    choices = json.loads(LR_CHOICES_PATH.read_text())
    runs = [train_run(name, choices[name]["lr"], seed, args.epochs, data)
            for name in args.optimizers for seed in range(args.seeds)]
    rows = summarise(runs)
    meta = {"python": harness.versions()["python"], "jax": jax.__version__, "optax": optax.__version__,
            "machine": harness.machine("jax", "jaxlib", "optax"), "epochs": args.epochs,
            "seeds": args.seeds, "command": "python benchmarks/train_mlp_jax.py "
            + f"--seeds {args.seeds} --epochs {args.epochs}"}
    harness.write_json(args.out / "results.json", {"meta": meta, "summary": rows, "runs": runs})
    plot(runs, args.out)
    print(f"{'optimizer':<12}{'lr':>8}{'val loss':>10}{'± spread':>10}{'val acc':>9}{'train s':>9}")
    for row in rows:
        print(f"{row['optimizer']:<12}{row['lr']:>8g}{row['val_loss_mean']:>10.4f}{row['val_loss_spread']:>10.4f}"
              f"{row['val_accuracy_mean']:>9.4f}{row['train_seconds_mean']:>9.2f}")
    print(f"wrote {args.out / 'results.json'}, val_loss_vs_step.png, val_loss_vs_time.png")


if __name__ == "__main__":
    main()
