"""``learnedopt``: train a small model with LSTMOptimizer next to Adam and print the curves.

Runs on built-in defaults with nothing to download: the data are generated (inputs drawn from a
Gaussian, labels from a random teacher network), the optimizer is a shipped pretrained one.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from . import LSTMOptimizer, __version__, list_pretrained

__all__ = ["main", "make_problem", "train"]


def make_problem(seed: int, dim: int = 32, classes: int = 10, n: int = 4096) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A classifier and a generated data set it can learn (labels from a random teacher MLP)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, 32, generator=g) / math.sqrt(dim)
    y = (torch.tanh(2 * x @ teacher) @ torch.randn(32, classes, generator=g)).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))
    return model, x, y


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int, batch_size: int, seed: int) -> list[float]:
    """Minibatch training; returns the full-data loss before each step and after the last."""
    g = torch.Generator().manual_seed(seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    curve = []
    for _ in range(steps):
        with torch.no_grad():
            curve.append(loss_fn(model(x), y).item())
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        curve.append(loss_fn(model(x), y).item())
    return curve


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="learnedopt",
        description="Train a small MLP on generated data with LSTMOptimizer and with Adam, side by side.",
    )
    parser.add_argument("--pretrained", default="default", help="shipped name, local directory or Hub repo id")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=20, help="print the losses every N steps")
    parser.add_argument("--plot", metavar="PNG", help="also write the curves to this PNG (needs matplotlib)")
    parser.add_argument("--list", action="store_true", help="list the shipped pretrained optimizers and exit")
    parser.add_argument("--version", action="version", version=f"learnedopt {__version__}")
    args = parser.parse_args(argv)

    if args.list:
        for name, description in list_pretrained().items():
            print(f"{name:20s} {description}")
        return 0
    if args.steps < 1 or args.batch_size < 1 or args.every < 1:
        parser.error("--steps, --batch-size and --every must be positive")

    model, x, y = make_problem(args.seed)
    adam_model = copy.deepcopy(model)
    lstm_curve = train(model, LSTMOptimizer(model.parameters(), pretrained=args.pretrained), x, y,
                       args.steps, args.batch_size, args.seed)
    adam_curve = train(adam_model, torch.optim.Adam(adam_model.parameters(), lr=args.adam_lr), x, y,
                       args.steps, args.batch_size, args.seed)

    print(f"MLP 32-64-10 (ReLU) on generated data, batch {args.batch_size}; full-data cross-entropy")
    print(f"{'step':>6} {'LSTMOptimizer':>14} {f'Adam(lr={args.adam_lr:g})':>14}")
    for t in range(0, args.steps + 1):
        if t % args.every == 0 or t == args.steps:
            print(f"{t:>6} {lstm_curve[t]:>14.4f} {adam_curve[t]:>14.4f}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot needs matplotlib: pip install 'learnedopt[plot]'", file=sys.stderr)
            return 1
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lstm_curve, label=f"LSTMOptimizer ({args.pretrained})")
        ax.plot(adam_curve, label=f"Adam(lr={args.adam_lr:g})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (full data)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
