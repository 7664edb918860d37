"""What the LSTM's correction adds to a nominal Nesterov step: an optimizer with and without it.

Loads update networks with ``nominal_momentum`` (a pretrained name or directory, or a trainer
checkpoint's ``networks`` / ``best_networks``), samples the meta-trainer's validation tasks of a
family (the same seed as ``learnedopt-train --seed``), and prints the mean final loss with the
LSTM's head as trained, without its learned schedule (if it has one), with the head at zero
(the Nesterov step alone at the learned step size and schedule), and, with ``--step-sizes``,
plain Nesterov momentum (``torch.optim.SGD(nesterov=True)``) at those learning rates. ``--seed``
and ``--tasks`` pick other draws (e.g. a selection set that no run validated on).

Usage::

    python benchmarks/ablate_correction.py --networks runs/l2l-mlp-scale/checkpoint.pt:best_networks \\
        --family mlp --data-dir ../shared/data --step-sizes 0.3
    python benchmarks/ablate_correction.py --networks pretrained/l2l-mlp --data-dir ../shared/data \\
        --seed 1 --tasks 20 --steps 100,200 --step-sizes 0.316
"""

from __future__ import annotations

import argparse
import math

import torch

from learnedopt import UpdateNetworkConfig, UpdateNetworks
from learnedopt.training import resolve_family
from learnedopt.training.trainer import _final_score, learned_curves, validation_tasks

from common import add_threads_argument
from reproduce_l2l import with_config, without_correction, without_schedule


def load(spec: str) -> UpdateNetworks:
    if ".pt:" in spec:
        path, key = spec.rsplit(":", 1)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        networks = UpdateNetworks(UpdateNetworkConfig(**checkpoint["config"]["networks"]))
        networks.load_state_dict(checkpoint[key])
        return networks
    return UpdateNetworks.from_pretrained(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", required=True, help="pretrained name/dir, or CHECKPOINT.pt:networks|best_networks")
    parser.add_argument("--family", default="mlp")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[100],
                        help="report the mean loss at these steps, e.g. 100,200")
    parser.add_argument("--seed", type=int, default=0, help="the meta-training run's --seed (validation tasks)")
    parser.add_argument("--step-sizes", type=lambda s: [float(x) for x in s.split(",")], default=[],
                        help="also plain Nesterov (torch SGD, momentum as trained) at these learning rates")
    add_threads_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    networks = load(args.networks)
    config = networks.config
    if config.nominal_momentum is None:
        parser.error("these networks have no nominal step (nominal_momentum is null)")
    family = resolve_family(args.family, {}, args.data_dir)
    tasks = validation_tasks(family, args.seed, args.tasks)
    mu = config.nominal_momentum

    def sgd_lr(nets: UpdateNetworks) -> float:
        return (1 - mu) * math.exp(float(nets.network(nets.roles[0]).nominal_log_lr.detach()))

    def report(label: str, nets: UpdateNetworks) -> None:
        curves = learned_curves(nets, tasks, max(args.steps))
        print(f"{label}: " + ", ".join(f"{_final_score([c[: t + 1] for c in curves]):.4f}" for t in args.steps))

    print(f"{args.tasks} validation tasks (seed {args.seed}) of {args.family!r}, mean loss at steps {args.steps}")
    report(f"as trained (SGD-equivalent step size {sgd_lr(networks):.4g})", networks)
    if config.schedule != "constant":
        rate = math.exp(float(networks.network(networks.roles[0]).schedule_log_rate.detach()))
        report(f"schedule off (every step at the initial step size; learned decay 1/(1 + {rate:.4g} t))",
               without_schedule(networks))
    bare = without_correction(networks)
    report(f"head at zero: Nesterov alone at the learned step size {sgd_lr(bare):.4g}"
           + (" and schedule" if config.schedule != "constant" else ""), bare)
    # no schedule, no update clip: exactly torch.optim.SGD(nesterov=True) (tested equal)
    plain = with_config(bare, schedule="constant", update_clip=None)
    for lr in args.step_sizes:
        with torch.no_grad():
            for role in plain.roles:
                plain.network(role).nominal_log_lr.fill_(math.log(lr / (1 - mu)))
        report(f"Nesterov at constant step size {lr:.4g} (torch SGD, momentum {mu})", plain)


if __name__ == "__main__":
    main()
