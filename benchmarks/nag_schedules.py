"""Why a learned schedule: Nesterov momentum with a constant learning rate against inverse-time
decay ``lr_t = c / (1 + t / tau)``, on fresh problems of the paper's MLP family.

A constant learning rate tuned for step 100 is not the best at step 200 (and the reverse); a
decaying one can do well at both. This is the motivation for ``UpdateNetworkConfig.schedule``.

Usage::

    python benchmarks/nag_schedules.py --data-dir ../shared/data --problems 8
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from learnedopt.training import resolve_family
from learnedopt.training.trainer import evaluate

from common import add_threads_argument, machine_line


def mean_losses(tasks, schedule, at: list[int]) -> list[float]:
    """Mean full-data loss at the steps ``at`` (multiples of ``at[0]``) of
    ``torch.optim.SGD(nesterov=True)`` whose learning rate at step ``t`` is ``schedule(t)``."""

    def make(params):
        opt = torch.optim.SGD(params, lr=1.0, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        opt.register_step_post_hook(lambda *_: scheduler.step())
        return opt

    curves = [evaluate(task, make, max(at), every=at[0]) for task in tasks]
    return [statistics.fmean(c[t // at[0]] for c in curves) for t in at]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--seed", type=int, default=777)
    add_threads_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = resolve_family("mlp", {}, args.data_dir)
    generator = torch.Generator().manual_seed(args.seed)
    tasks = [family.sample(generator) for _ in range(args.problems)]
    at = [100, 200]
    print(f"{args.problems} MLP problems (seed {args.seed}), {machine_line()}; mean loss at steps {at}")
    print("| learning rate at step t | step 100 | step 200 |\n| --- | --- | --- |")
    for lr in (0.2, 0.316, 0.5):
        print(f"| {lr} (constant) | " + " | ".join(f"{v:.4f}" for v in mean_losses(tasks, lambda t: lr, at)) + " |")
    for c, tau in itertools.product((0.5, 0.8, 1.2), (25, 50, 100)):
        losses = mean_losses(tasks, lambda t: c / (1 + t / tau), at)
        print(f"| {c} / (1 + t/{tau}) | " + " | ".join(f"{v:.4f}" for v in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
