"""The default optimizer on problems it never saw, against Adam(lr=1e-3) and per-task tuned Adam.

Usage::

    pip install scikit-learn        # the bundled data sets
    python benchmarks/heldout_suite.py --data-dir ../shared/data --out docs/heldout

Eight tasks outside `default`'s meta-training mixture (other data sets, architectures and losses):
logistic regression (breast cancer), linear regression (diabetes), a ReLU MLP on the digits data
set, a GELU MLP on wine, a Fashion-MNIST autoencoder, a conv net with batch norm on Fashion-MNIST,
a character-level language model, and the 2-d Rosenbrock function. For each task: the learned
optimizer without tuning, Adam(lr=1e-3), and Adam with the learning rate from a half-decade grid
(1e-4 ... 1) that gives the lowest final loss; ``--steps`` inner steps (default 100, the default
optimizer's meta-training horizon) and, for the learned optimizer, a run of 10x that many steps
to check that it does not diverge past its horizon.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnedopt import UpdateNetworks
from learnedopt.training.data import load_fashion_mnist
from learnedopt.training.tasks import ModuleTask, Task
from learnedopt.training.trainer import evaluate, lstm_optimizer_for

from common import add_threads_argument, machine_line

ADAM_GRID = [10 ** (k / 2) for k in range(-8, 1)]  # 1e-4 ... 1


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int):
    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 7919 + step)
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        return x[idx], y[idx]

    return batch


def _standardize(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-8)


def _module_task(name: str, module: nn.Module, x: Tensor, y: Tensor, loss_fn, batch_size: int) -> ModuleTask:
    return ModuleTask(module, _batches(x, y, batch_size, 0), loss_fn, (x, y), name=name)


def sklearn_tasks() -> list[Task]:
    from sklearn import datasets

    torch.manual_seed(0)
    tasks = []
    bc = datasets.load_breast_cancer()
    x, y = _standardize(torch.tensor(bc.data, dtype=torch.float32)), torch.tensor(bc.target, dtype=torch.float32)
    tasks.append(_module_task("logistic regression, breast cancer", nn.Linear(x.shape[1], 1), x, y,
                              lambda out, t: F.binary_cross_entropy_with_logits(out.squeeze(1), t), 64))
    db = datasets.load_diabetes()
    x, y = _standardize(torch.tensor(db.data, dtype=torch.float32)), torch.tensor(db.target, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    tasks.append(_module_task("linear regression, diabetes", nn.Linear(x.shape[1], 1), x, y,
                              lambda out, t: F.mse_loss(out.squeeze(1), t), 64))
    dg = datasets.load_digits()
    x, y = torch.tensor(dg.data, dtype=torch.float32) / 16.0, torch.tensor(dg.target)
    tasks.append(_module_task("MLP 64-64-64-10 ReLU, digits",
                              nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                              x, y, F.cross_entropy, 64))
    wn = datasets.load_wine()
    x, y = _standardize(torch.tensor(wn.data, dtype=torch.float32)), torch.tensor(wn.target)
    tasks.append(_module_task("MLP 13-16-3 GELU, wine", nn.Sequential(nn.Linear(13, 16), nn.GELU(), nn.Linear(16, 3)),
                              x, y, F.cross_entropy, 32))
    return tasks


def fashion_tasks(data_dir: str | None) -> list[Task]:
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train", data_dir)
    x, y = x[:8192], y[:8192]
    auto = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 784))
    autoencoder = ModuleTask(auto, _batches(x, x, 128, 1), F.mse_loss, (x[:2048], x[:2048]), name="autoencoder 784-32-784, Fashion-MNIST")
    images = F.adaptive_avg_pool2d(x.view(-1, 1, 28, 28), 14)
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 10))
    convnet = ModuleTask(conv, _batches(images, y, 64, 2), F.cross_entropy, (images[:2048], y[:2048]),
                         name="conv net with batch norm, Fashion-MNIST 14x14")
    return [autoencoder, convnet]


class CharLM(nn.Module):
    """Embedding of an 8-character context, one tanh hidden layer, next-character logits."""

    def __init__(self, vocab: int, context: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.hidden = nn.Linear(16 * context, 64)
        self.out = nn.Linear(64, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(x).flatten(1))))


def char_lm_task() -> Task:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this  # a small real text bundled with every Python
    text = codecs.decode(this.s, "rot13") * 4
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    context = 8
    x = torch.stack([ids[i : i + context] for i in range(len(ids) - context)])
    y = ids[context:]
    torch.manual_seed(0)
    return ModuleTask(CharLM(len(vocab), context), _batches(x, y, 64, 3), F.cross_entropy, (x, y),
                      name="character-level language model, Zen of Python")


class Rosenbrock(Task):
    name = "Rosenbrock 2-d from (-1.5, 2)"

    def init_params(self) -> list[Tensor]:
        return [torch.tensor([-1.5, 2.0])]

    def loss(self, params, step: int) -> Tensor:
        x = params[0]
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    @property
    def roles(self):
        return ["dense"]


def run(task: Task, networks: UpdateNetworks, steps: int, long_steps: int) -> dict:
    started = time.time()
    lstm = evaluate(task, lstm_optimizer_for(networks, task), steps)
    adam = evaluate(task, lambda ps: torch.optim.Adam(ps, lr=1e-3), steps)
    tuned = None
    for lr in ADAM_GRID:
        curve = evaluate(task, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), steps)
        final = curve[-1] if math.isfinite(curve[-1]) else math.inf
        if tuned is None or final < tuned[0]:
            tuned = (final, lr, curve)
    long = evaluate(task, lstm_optimizer_for(networks, task), long_steps)
    return {
        "task": task.name,
        "initial": lstm[0],
        "lstm": lstm[-1],
        "adam_1e-3": adam[-1],
        "adam_tuned": tuned[0],
        "adam_tuned_lr": tuned[1],
        "lstm_10x_final": long[-1],
        "lstm_10x_diverged": not (math.isfinite(long[-1]) and long[-1] < long[0]),
        "curves": {"lstm": lstm, "adam_1e-3": adam, "adam_tuned": tuned[2], "lstm_10x": long},
        "wall_s": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--long-steps", type=int, help="steps of the stability run (default 10x --steps); "
                        "use 10x the optimizer's meta-training horizon")
    parser.add_argument("--out", default="docs/heldout")
    add_threads_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    long_steps = args.long_steps or 10 * args.steps
    networks = UpdateNetworks.from_pretrained(args.pretrained)
    tasks = [*sklearn_tasks(), *fashion_tasks(args.data_dir), char_lm_task(), Rosenbrock()]
    results = []
    for task in tasks:
        results.append(run(task, networks, args.steps, long_steps))
        r = results[-1]
        print(f"{r['task']}: LSTM {r['lstm']:.4g}, Adam(1e-3) {r['adam_1e-3']:.4g}, tuned Adam {r['adam_tuned']:.4g} "
              f"(lr {r['adam_tuned_lr']:.3g}); 10x steps: {r['lstm_10x_final']:.4g} ({r['wall_s']} s)", flush=True)
    machine = machine_line()
    wins = sum(r["lstm"] < r["adam_1e-3"] for r in results)
    wins_tuned = sum(r["lstm"] < r["adam_tuned"] for r in results)
    diverged = sum(r["lstm_10x_diverged"] for r in results)
    lines = [
        f"Generated by `python benchmarks/heldout_suite.py --pretrained {args.pretrained} --steps {args.steps} "
        f"--long-steps {long_steps}` on {machine}.",
        "",
        f"`{args.pretrained}` beats Adam(lr=1e-3) on {wins}/{len(results)} tasks and per-task tuned Adam on "
        f"{wins_tuned}/{len(results)}; over {long_steps} steps it diverges on {diverged}/{len(results)} "
        "(diverged: final loss not finite or not below the initial loss).",
        "",
        f"| task | initial | LSTM ({args.pretrained}) | Adam(1e-3) | LSTM / Adam(1e-3) | tuned Adam (lr) | LSTM / tuned | LSTM after {long_steps} steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['initial']:.4g} | {r['lstm']:.4g} | {r['adam_1e-3']:.4g} | {r['lstm'] / r['adam_1e-3']:.2f} | "
            f"{r['adam_tuned']:.4g} ({r['adam_tuned_lr']:.3g}) | {r['lstm'] / r['adam_tuned']:.2f} | "
            f"{r['lstm_10x_final']:.4g}{' (diverged)' if r['lstm_10x_diverged'] else ''} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.md").write_text("\n".join(lines) + "\n")
    (out / "heldout.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
