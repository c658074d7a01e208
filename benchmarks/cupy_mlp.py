"""An MLP trained directly on arrays: ASGO vs AdamW on scikit-learn's handwritten digits.

Runs on CuPy when a CUDA GPU is present, on NumPy otherwise; the model, its forward and
backward passes are written out by hand (no autodiff framework).

Data: sklearn.datasets.load_digits (1797 8×8 images, 10 classes), pixels scaled to [0, 1],
a fixed 80/20 train/test split (seed 0).
Model: 64 → 128 → 128 → 10, ReLU, softmax cross-entropy; He-normal init from seed 0, identical
for every run, and the same mini-batch order (batch 64) for every run.
Optimizers (asgo_core.adapters.cupy):
    asgo   ASGO with its defaults (betas (0.9, 0.8), weight decay 0.1, update RMS 0.2, root every
           step); biases go to its built-in AdamW with the same lr.
    adamw  the same adapter's built-in AdamW (torch.optim.AdamW arithmetic) for every array,
           betas (0.9, 0.95), weight decay 0.1 on the matrices, 0 on the biases.
Learning rate: each optimizer is trained at every lr of the same grid LR_GRID for the same number
of epochs, and the lr with the lowest final training loss is reported with its per-epoch log.

On NumPy, BLAS/LAPACK run single-threaded (threadpoolctl, installed with scikit-learn): for
matrices this small, threads cost more than they gain, and on a loaded machine OpenBLAS's
spinning threads made one 128×128 eigh 300× slower (292 ms instead of 0.9 ms). --blas-threads
changes it; it applies to both optimizers alike.

    python benchmarks/cupy_mlp.py                 # 12 epochs, 4 lrs × 2 optimizers
    python benchmarks/cupy_mlp.py --epochs 20 --grid 1e-3 3e-3 1e-2
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

import harness  # benchmarks/, the script's own directory
from asgo_core.adapters.cupy import ASGO

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
LAYER_SIZES = (64, 128, 128, 10)
BATCH_SIZE = 64


def array_module():
    """CuPy when it imports and sees a GPU, else NumPy."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return np


def load_data(xp):
    digits = load_digits()
    inputs = (digits.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(inputs))
    split = int(0.8 * len(inputs))
    train, test = order[:split], order[split:]
    to_xp = lambda a: xp.asarray(a)  # noqa: E731
    return (to_xp(inputs[train]), to_xp(digits.target[train])), (to_xp(inputs[test]), to_xp(digits.target[test]))


def init_params(xp):
    rng = np.random.default_rng(0)
    params = {}
    for layer, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
        weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
        params[f"W{layer}"] = xp.asarray(weight.astype(np.float32))
        params[f"b{layer}"] = xp.zeros(fan_out, dtype=xp.float32)
    return params


def forward(params, inputs, xp):
    """Logits and the activations the backward pass needs."""
    activations = [inputs]
    hidden = inputs
    layers = len(LAYER_SIZES) - 1
    for layer in range(layers):
        hidden = hidden @ params[f"W{layer}"].T + params[f"b{layer}"]
        if layer < layers - 1:
            hidden = xp.maximum(hidden, 0)
            activations.append(hidden)
    return hidden, activations


def softmax_cross_entropy(logits, labels, xp):
    """Mean loss and its gradient with respect to the logits."""
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    rows = xp.arange(len(labels))
    loss = -xp.mean(log_probs[rows, labels])
    grad = xp.exp(log_probs)
    grad[rows, labels] -= 1
    return loss, grad / len(labels)


def backward(params, activations, grad_logits):
    grads, upstream = {}, grad_logits
    for layer in reversed(range(len(LAYER_SIZES) - 1)):
        grads[f"W{layer}"] = upstream.T @ activations[layer]
        grads[f"b{layer}"] = upstream.sum(axis=0)
        if layer > 0:
            upstream = (upstream @ params[f"W{layer}"]) * (activations[layer] > 0)
    return grads


def make_optimizer(name, params, lr):
    if name == "asgo":
        return ASGO(params, lr=lr)
    matrices = {k: v for k, v in params.items() if k.startswith("W")}
    biases = {k: v for k, v in params.items() if k.startswith("b")}
    return ASGO([{"params": matrices, "adamw_weight_decay": 0.1}, {"params": biases}],
                lr=lr, algorithm="adamw")


def evaluate(params, data, xp):
    inputs, labels = data
    logits, _ = forward(params, inputs, xp)
    loss, _ = softmax_cross_entropy(logits, labels, xp)
    accuracy = xp.mean(xp.argmax(logits, axis=1) == labels)
    return float(loss), float(accuracy)


def train(name, lr, epochs, train_data, test_data, xp):
    """Per-epoch (train loss, train accuracy, test accuracy) of one run."""
    params = init_params(xp)
    optimizer = make_optimizer(name, params, lr)
    inputs, labels = train_data
    shuffle = np.random.default_rng(1)
    history = []
    for _ in range(epochs):
        order = xp.asarray(shuffle.permutation(len(inputs)))
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            logits, activations = forward(params, inputs[batch], xp)
            _, grad_logits = softmax_cross_entropy(logits, labels[batch], xp)
            optimizer.step(backward(params, activations, grad_logits))
        train_loss, train_accuracy = evaluate(params, train_data, xp)
        history.append((train_loss, train_accuracy, evaluate(params, test_data, xp)[1]))
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--grid", type=float, nargs="+", default=LR_GRID)
    parser.add_argument("--blas-threads", type=int, default=1, help="CPU BLAS/LAPACK threads (NumPy)")
    args = parser.parse_args()
    with threadpool_limits(limits=args.blas_threads):
        run(args)


def run(args):
    xp = array_module()
    print(f"arrays: {xp.__name__}; data: load_digits; model {LAYER_SIZES}; {args.epochs} epochs; "
          f"lr grid {list(args.grid)}")
    train_data, test_data = load_data(xp)
    best = {}
    for name in ("asgo", "adamw"):
        for lr in args.grid:
            with harness.Stopwatch() as clock:
                history = train(name, lr, args.epochs, train_data, test_data, xp)
            loss, train_acc, test_acc = history[-1]
            print(f"  {name:5s} lr={lr:<7g} final train loss {loss:.4f}  train acc {train_acc:.3f}  "
                  f"test acc {test_acc:.3f}  ({clock.wall_s:.1f} s)")
            if name not in best or loss < best[name][1][-1][0]:
                best[name] = (lr, history)
    for name, (lr, history) in best.items():
        print(f"\n{name} (chosen lr {lr:g}: lowest final training loss on the grid)")
        print("epoch  train_loss  train_acc  test_acc")
        for epoch, (loss, train_acc, test_acc) in enumerate(history, start=1):
            print(f"{epoch:5d}  {loss:10.4f}  {train_acc:9.3f}  {test_acc:8.3f}")
    asgo_loss, adamw_loss = best["asgo"][1][-1][0], best["adamw"][1][-1][0]
    verdict = "lower" if asgo_loss < adamw_loss else "NOT lower"
    print(f"\nfinal training loss: asgo {asgo_loss:.4f} vs adamw {adamw_loss:.4f} → ASGO is {verdict}")


if __name__ == "__main__":
    main()
