"""Meta-training with truncated backpropagation through time (minimal trainer).

The optimizer's update is :func:`learnedopt.lstm_update`, the same function that
``LSTMOptimizer.step`` calls; here gradients flow through it into the update networks.

Each of ``meta_batch`` task slots holds a task, its current parameters and optimizer state. An
outer step unrolls every slot for ``unroll`` inner steps, sums the (initial-loss-normalised)
losses along the way, backpropagates into the networks, and takes one meta-optimizer (Adam) step.
The parameters and states are then detached (the truncation), so only one truncation's graph is
alive at a time; a slot whose task has reached ``horizon`` steps draws a new task.

Command line::

    python -m learnedopt.training.meta_train --family default-mix --out runs/default --outer-steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learnedopt import LSTMOptimizer, UpdateNetworkConfig, UpdateNetworks, init_state, lstm_update

from .tasks import MixtureFamily, MLPFamily, QuadraticFamily, Task, TaskFamily

__all__ = [
    "MetaTrainConfig",
    "truncated_unroll",
    "meta_train",
    "evaluate",
    "compare_with_adam",
    "FAMILIES",
    "main",
]


@dataclass
class MetaTrainConfig:
    """Settings of a meta-training run (every field is a command-line flag)."""

    outer_steps: int = 1000
    meta_batch: int = 4
    horizon: int = 100
    unroll: int = 20
    meta_lr: float = 3e-3
    grad_clip: float = 1.0
    second_order: bool = False
    seed: int = 0
    max_nonfinite: int = 20
    eval_every: int = 0
    log_every: int = 10
    networks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("outer_steps", "meta_batch", "horizon", "unroll"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.horizon % self.unroll:
            raise ValueError(f"horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")


def _default_mix(data_dir: str | None) -> TaskFamily:
    """Quadratics, Fashion-MNIST MLPs (the paper's and variants) and MLPs on generated data."""
    return MixtureFamily(
        [
            QuadraticFamily(),
            MLPFamily("fashion_mnist", hidden=((20,),), activations=("sigmoid",), data_dir=data_dir),
            MLPFamily(
                "fashion_mnist", hidden=((20,), (32,), (16, 16)), activations=("relu", "tanh"),
                batch_sizes=(64, 128), data_dir=data_dir,
            ),
            MLPFamily("synthetic", hidden=((32,), (16, 16)), activations=("sigmoid", "relu", "tanh")),
        ],
        weights=[1.0, 1.0, 1.0, 1.0],
    )


#: Built-in task families by command-line name; each takes the data directory.
FAMILIES: dict[str, Callable[[str | None], TaskFamily]] = {
    "quadratic": lambda data_dir: QuadraticFamily(),
    "mlp": lambda data_dir: MLPFamily("fashion_mnist", data_dir=data_dir),
    "mlp-synthetic": lambda data_dir: MLPFamily("synthetic", hidden=((32,),), activations=("sigmoid", "relu")),
    "default-mix": _default_mix,
}


# ---------------------------------------------------------------------- the unroll
@dataclass
class _Slot:
    task: Task
    params: list[Tensor]
    states: list[dict[str, Tensor]] | None
    roles: list[str]
    step: int
    scale: float


def truncated_unroll(
    networks: UpdateNetworks,
    task: Task,
    params: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]] | None,
    roles: Sequence[str],
    start: int,
    length: int,
    *,
    second_order: bool = False,
) -> tuple[Tensor, list[Tensor], list[dict[str, Tensor]]]:
    """Unroll ``length`` inner steps from ``start``; return the summed loss along the way.

    The meta-loss is ``sum_{k=1..length} f(θ_{start+k})``; its graph reaches the networks'
    weights through every update. The optimizee's gradient is treated as an input (detached)
    unless ``second_order``.

    Returns:
        ``(meta_loss, params, states)`` with the graph still attached (detach to truncate).
    """
    params = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    meta_loss = params[0].new_zeros(())
    for k in range(length + 1):
        loss = task.loss(params, start + k)
        if loss.dim() != 0:
            raise ValueError(f"task {task.name!r} returned a loss of shape {tuple(loss.shape)}; it must be a scalar")
        if k > 0:
            meta_loss = meta_loss + loss
        if k == length:
            break
        grads = torch.autograd.grad(loss, params, create_graph=second_order, retain_graph=True)
        if not second_order:
            grads = [g.detach() for g in grads]
        if states is None:
            states = [init_state(g, networks.config) for g in grads]
        deltas, states = lstm_update(params, grads, states, networks, roles)
        params = [p + d for p, d in zip(params, deltas)]
    return meta_loss, params, list(states)


def _new_slot(networks: UpdateNetworks, family: TaskFamily, generator: torch.Generator) -> _Slot:
    task = family.sample(generator)
    params = task.init_params()
    roles = [networks.resolve_role(r, p) for r, p in zip(task.roles, params)]
    with torch.no_grad():
        scale = float(task.loss(params, 0))
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0
    return _Slot(task, params, None, roles, 0, scale)


def meta_train(
    family: TaskFamily,
    config: MetaTrainConfig,
    *,
    networks: UpdateNetworks | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> UpdateNetworks:
    """Meta-train update networks on ``family``; returns the trained networks."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if networks is None:
        networks = UpdateNetworks(UpdateNetworkConfig(**config.networks))
    meta_opt = torch.optim.Adam(networks.parameters(), lr=config.meta_lr)
    slots = [_new_slot(networks, family, generator) for _ in range(config.meta_batch)]
    nonfinite_in_row = 0
    start_time = time.time()
    for outer in range(config.outer_steps):
        meta_opt.zero_grad()
        total = 0.0
        next_slots = []
        bad = False
        for slot in slots:
            loss, params, states = truncated_unroll(
                networks, slot.task, slot.params, slot.states, slot.roles, slot.step, config.unroll,
                second_order=config.second_order,
            )
            loss = loss / (slot.scale * config.unroll * config.meta_batch)
            if not torch.isfinite(loss):
                bad = True
                break
            loss.backward()
            total += float(loss.detach())
            next_slots.append(
                _Slot(slot.task, [p.detach() for p in params],
                      [{k: v.detach() for k, v in s.items()} for s in states],
                      slot.roles, slot.step + config.unroll, slot.scale)
            )
        if bad:
            nonfinite_in_row += 1
            meta_opt.zero_grad()
            if nonfinite_in_row >= config.max_nonfinite:
                raise FloatingPointError(
                    f"{nonfinite_in_row} truncations in a row had a non-finite meta-loss; lower "
                    "--meta-lr or --unroll, or check the task family's losses"
                )
            slots = [_new_slot(networks, family, generator) for _ in range(config.meta_batch)]
            continue
        nonfinite_in_row = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(networks.parameters(), config.grad_clip)
        meta_opt.step()
        slots = [
            s if s.step < config.horizon else _new_slot(networks, family, generator) for s in next_slots
        ]
        if log is not None and (outer % config.log_every == 0 or outer == config.outer_steps - 1):
            log({"outer_step": outer, "meta_loss": total, "grad_norm": float(grad_norm),
                 "elapsed_s": round(time.time() - start_time, 1)})
    return networks


# ---------------------------------------------------------------------- evaluation
def evaluate(task: Task, make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int) -> list[float]:
    """Train ``task`` for ``steps`` with a torch optimizer; the eval loss before and after each step."""
    params = [p.clone().requires_grad_() for p in task.init_params()]
    opt = make_optimizer(params)
    curve = []
    for t in range(steps):
        with torch.no_grad():
            curve.append(float(task.eval_loss(params)))
        opt.zero_grad()
        task.loss(params, t).backward()
        opt.step()
    with torch.no_grad():
        curve.append(float(task.eval_loss(params)))
    return curve


def compare_with_adam(
    networks: UpdateNetworks,
    families: dict[str, TaskFamily],
    *,
    tasks_per_family: int = 10,
    steps: int = 100,
    seed: int = 12345,
    adam_lr: float = 1e-3,
) -> dict[str, dict[str, float]]:
    """Mean final eval loss of ``LSTMOptimizer`` and ``Adam(lr)`` on fresh tasks of each family."""
    results = {}
    for name, family in families.items():
        generator = torch.Generator().manual_seed(seed)
        lstm, adam, wins = [], [], 0
        for _ in range(tasks_per_family):
            task = family.sample(generator)
            roles = task.roles

            def make_lstm(params, roles=roles):
                groups = [{"params": [p], "role": r} for p, r in zip(params, roles)]
                return LSTMOptimizer(groups, networks=networks)

            lstm.append(evaluate(task, make_lstm, steps)[-1])
            adam.append(evaluate(task, lambda ps: torch.optim.Adam(ps, lr=adam_lr), steps)[-1])
            wins += lstm[-1] < adam[-1]
        results[name] = {
            "lstm": sum(lstm) / len(lstm),
            f"adam_lr{adam_lr:g}": sum(adam) / len(adam),
            "lstm_wins": wins,
            "tasks": tasks_per_family,
            "steps": steps,
        }
    return results


# ---------------------------------------------------------------------- command line
def _model_card(name: str, description: str, command: str, config: MetaTrainConfig,
                results: dict[str, dict[str, float]], wall_s: float, machine: str) -> str:
    rows = [
        "| family | tasks | steps | LSTMOptimizer | Adam(lr=1e-3) | LSTM wins |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fam, r in results.items():
        rows.append(
            f"| {fam} | {r['tasks']} | {r['steps']} | {r['lstm']:.4f} | {r['adam_lr0.001']:.4f} | "
            f"{r['lstm_wins']}/{r['tasks']} |"
        )
    settings = json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)
    return f"""---
library_name: learnedopt
tags:
- learned-optimizer
- pytorch
---

# {name}

{description}

```python
from learnedopt import LSTMOptimizer
optimizer = LSTMOptimizer(model.parameters(), pretrained="{name}")
```

## How it was made

Meta-trained with truncated BPTT (`learnedopt.training.meta_train`), horizon {config.horizon}
inner steps, unroll {config.unroll}, meta-batch {config.meta_batch}, {config.outer_steps} outer
steps, meta-optimizer Adam (lr {config.meta_lr}), first-order (optimizee gradients as inputs):
{'yes' if not config.second_order else 'no'}. Wall time {wall_s / 60:.1f} min on {machine}.

```
{command}
```

Settings:

```json
{settings}
```

## Results (measured at the end of the run above)

Mean full-data training loss after {next(iter(results.values()))['steps']} steps on freshly sampled
tasks (seed 12345, not seen in meta-training), against `torch.optim.Adam(lr=1e-3)`:

{chr(10).join(rows)}

Limits: measured only on the families above; behaviour on other models is not covered by this
table (see the project README for broader evaluation).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learnedopt.training.meta_train", description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="default-mix", choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True, help="output pretrained directory")
    parser.add_argument("--name", default=None, help="name in the model card (default: the folder name)")
    parser.add_argument("--description", default="A learned optimizer meta-trained with learnedopt.")
    parser.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/")
    parser.add_argument("--roles", default="dense,bias", help="comma-separated network roles")
    parser.add_argument("--hidden-size", type=int, default=20)
    parser.add_argument("--features", default=None, help="comma-separated input features (see learnedopt.FEATURES)")
    parser.add_argument("--output-scale", type=float, default=None)
    parser.add_argument("--eval-tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    for f in dataclasses.fields(MetaTrainConfig):
        if f.name == "networks":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MetaTrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(MetaTrainConfig) if f.name != "networks"},
        networks={
            "roles": args.roles.split(","),
            "hidden_size": args.hidden_size,
            **({"features": args.features.split(",")} if args.features else {}),
            **({"output_scale": args.output_scale} if args.output_scale is not None else {}),
        },
    )
    family = FAMILIES[args.family](args.data_dir)
    out = Path(args.out)
    name = args.name or out.name
    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w")

    def log(record: dict[str, Any]) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        print(json.dumps(record), flush=True)

    started = time.time()
    networks = meta_train(family, config, log=log)
    wall = time.time() - started
    log_file.close()
    eval_families = FAMILIES[args.family](args.data_dir)
    families = (
        {f"{f.name}:{getattr(f, 'dataset', '')}:{i}": f for i, f in enumerate(eval_families.families)}
        if isinstance(eval_families, MixtureFamily) else {args.family: eval_families}
    )
    results = compare_with_adam(networks, families, tasks_per_family=args.eval_tasks, steps=config.horizon)
    print(json.dumps(results, indent=2))
    command = "python -m learnedopt.training.meta_train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    networks.config.description = args.description
    networks.config.training = {
        "name": name,
        "command": command,
        "family": args.family,
        "settings": dataclasses.asdict(config),
        "results_vs_adam": results,
        "wall_time_s": round(wall, 1),
        "machine": machine,
    }
    card = _model_card(name, args.description, command, config, results, wall, machine)
    networks.save_pretrained(out, model_card=card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
