"""Meta-train an LSTMOptimizer on a task family: the Python API and the ``learnedopt-train`` command.

From Python::

    from learnedopt.training import meta_train
    networks = meta_train("quadratic", "runs/quad", outer_steps=500, meta_batch=8, horizon=100, unroll=20)

From the command line (every setting of :class:`MetaTrainConfig` is a flag, and can come from a
JSON or TOML file given with ``--config``)::

    learnedopt-train --task-family quadratic --out runs/quad --outer-steps 500
    learnedopt-train --task-family my_module:MyFamily --out runs/mine --resume

The output directory is a pretrained directory (``LSTMOptimizer(params, pretrained=DIR)``) with the
best networks by validation, a model card with the command and measured results, the JSONL log,
``checkpoint.pt`` (for ``--resume``), and ``curves.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from learnedopt import UpdateNetworks

from .tasks import MixtureFamily, RescaledFamily, TaskFamily, resolve_family
from .trainer import (
    DONE_NAME, EVAL_NAME, LOG_NAME, MetaTrainConfig, MetaTrainer, _atomic_text, evaluate, lstm_optimizer_for,
    truncated_unroll,
)

__all__ = ["meta_train", "compare_with_adam", "main", "MetaTrainConfig", "truncated_unroll", "evaluate"]


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
            lstm.append(evaluate(task, lstm_optimizer_for(networks, task), steps)[-1])
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


def _component_families(family: TaskFamily) -> dict[str, TaskFamily]:
    if isinstance(family, RescaledFamily):  # report on the problems themselves, not rescaled copies
        family = family.family
    if isinstance(family, MixtureFamily):
        return {f"{i}:{getattr(f, 'name', type(f).__name__)}{':' + f.dataset if hasattr(f, 'dataset') else ''}": f
                for i, f in enumerate(family.families)}
    return {getattr(family, "name", type(family).__name__): family}


def meta_train(
    task_family: str | TaskFamily,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    description: str = "A learned optimizer meta-trained with learnedopt.",
    final_eval_tasks: int = 10,
    progress: bool = True,
    command: str | None = None,
    **settings: Any,
) -> UpdateNetworks:
    """Meta-train update networks on ``task_family`` into the pretrained directory ``out``.

    Args:
        task_family: A built-in family name, ``"module.path:ClassName"``, or a :class:`TaskFamily`.
        out: Output directory (a pretrained directory plus checkpoint and logs).
        resume: Continue the run in ``out`` from its checkpoint.
        overwrite: Replace a run already in ``out``.
        name, description: Written to the model card and ``config.json``.
        final_eval_tasks: Fresh tasks per family for the closing comparison with ``Adam(lr=1e-3)``.
        progress: Show a tqdm progress bar.
        **settings: Fields of :class:`MetaTrainConfig` (``outer_steps``, ``horizon``, ...).

    Returns:
        The best networks by validation, also saved in ``out``.
    """
    family_spec = task_family if isinstance(task_family, str) else f"{type(task_family).__module__}:{type(task_family).__qualname__}"
    config = MetaTrainConfig(task_family=family_spec, **settings)
    family = task_family if isinstance(task_family, TaskFamily) else None
    trainer = MetaTrainer(config, out, family=family, resume=resume, overwrite=overwrite, progress=progress)
    networks = trainer.run()
    wall = trainer.wall_s
    if trainer.dist.rank != 0:
        return networks
    out = Path(out)
    results = compare_with_adam(networks, _component_families(trainer.family), tasks_per_family=final_eval_tasks,
                                steps=config.horizon)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {trainer.dist.world} process(es)"
    name = name or out.resolve().name
    command = command or "learnedopt.training.meta_train(...) from Python"
    validation = {
        "best_outer_step": trainer.best_step,
        "lstm_final_loss": trainer.best_score,
        "baselines": {k: {"lr": v["lr"], "final_loss": v["final"]} for k, v in trainer.baselines.items()},
    }
    networks.config.description = description
    networks.config.training = {
        "name": name,
        "command": command,
        "task_family": config.task_family,
        "settings": config.to_dict(),
        "validation": validation,
        "results_vs_adam": results,
        "wall_time_s": round(wall, 1),
        "machine": machine,
    }
    eval_record = {"validation": validation, "lstm_curve": trainer.last_eval.get("lstm"),
                   "baseline_curves": {k: v["curve"] for k, v in trainer.baselines.items()}}
    _atomic_text(out / EVAL_NAME, json.dumps(eval_record, indent=2) + "\n")
    networks.save_pretrained(out, model_card=_model_card(name, description, command, config, results, validation, wall, machine))
    _plot(out)
    (out / DONE_NAME).write_text(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return networks


def _plot(out: Path) -> None:
    """``curves.png``: meta-loss over outer steps, and validation loss curves against the baselines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping curves.png (pip install 'learnedopt[plot]')", file=sys.stderr)
        return
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines() if line]
    steps = [r["outer_step"] for r in records if "meta_loss" in r]
    losses = [r["meta_loss"] for r in records if "meta_loss" in r]
    evals = json.loads((out / EVAL_NAME).read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, losses, lw=0.6)
    a.set_xlabel("outer step")
    a.set_ylabel("meta-loss (normalised)")
    a.set_yscale("log")
    a.set_title("meta-training")
    if evals.get("lstm_curve"):
        b.plot(evals["lstm_curve"], label="LSTMOptimizer", lw=2)
    for k, curve in evals["baseline_curves"].items():
        b.plot(curve, label=f"{k} (lr {evals['validation']['baselines'][k]['lr']:g})")
    b.set_xlabel("inner step")
    b.set_ylabel("validation loss (mean over held-out tasks)")
    b.set_yscale("log")
    b.legend()
    b.set_title("held-out tasks")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- model card
def _model_card(name: str, description: str, command: str, config: MetaTrainConfig,
                results: dict[str, dict[str, float]], validation: dict[str, Any], wall_s: float, machine: str) -> str:
    rows = [
        "| family | tasks | steps | LSTMOptimizer | Adam(lr=1e-3) | LSTM wins |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fam, r in results.items():
        rows.append(f"| {fam} | {r['tasks']} | {r['steps']} | {r['lstm']:.4f} | {r['adam_lr0.001']:.4f} | "
                    f"{r['lstm_wins']}/{r['tasks']} |")
    vrows = ["| optimizer | tuned lr | mean final loss |", "| --- | --- | --- |",
             f"| LSTMOptimizer (best, outer step {validation['best_outer_step']}) | - | {validation['lstm_final_loss']:.4f} |"]
    for k, v in validation["baselines"].items():
        vrows.append(f"| {k} | {v['lr']:g} | {v['final_loss']:.4f} |")
    settings = json.dumps(config.to_dict(), indent=2, sort_keys=True)
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

Meta-trained with truncated BPTT (`learnedopt.training`) on task family `{config.task_family}`,
horizon {config.horizon} inner steps, unroll {config.unroll}, meta-batch {config.meta_batch},
{config.outer_steps} outer steps, meta-optimizer Adam (lr {config.meta_lr}),
{'second' if config.second_order else 'first'}-order. Wall time {wall_s / 60:.1f} min on {machine}.

```
{command}
```

Settings:

```json
{settings}
```

## Results (measured by the run above)

Validation on {config.eval_tasks} held-out tasks of the family after {config.horizon} steps, against
baselines whose learning rate was tuned on the grid {config.baseline_lrs}:

{chr(10).join(vrows)}

Mean full-data training loss after {config.horizon} steps on freshly sampled tasks (seed 12345),
against `torch.optim.Adam(lr=1e-3)`:

{chr(10).join(rows)}

Limits: measured only on the families above; behaviour on other models is not covered here.
"""


# ---------------------------------------------------------------------- command line
_NETWORK_FLAGS = {"roles": str, "hidden_size": int, "features": str, "output_scale": float,
                  "nominal_momentum": float, "nominal_correction": str, "schedule": str}
_RUN_FLAGS = {"name": None, "description": "A learned optimizer meta-trained with learnedopt.",
              "final_eval_tasks": 10, "threads": None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="learnedopt-train", description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--task-family", "--family", dest="task_family",
                   help="built-in family, 'mixture:a=1,b=2', or module.path:ClassName")
    p.add_argument("--out", help="output directory (required)")
    p.add_argument("--config", help="JSON or TOML file with settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--name", help="name for the model card (default: the folder name)")
    p.add_argument("--description", help="one-line description in config.json and the model card")
    p.add_argument("--final-eval-tasks", type=int, help="fresh tasks per family for the closing Adam comparison")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--roles", help="comma-separated network roles, e.g. conv,dense")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--features", help="comma-separated input features (see learnedopt.FEATURES)")
    p.add_argument("--output-scale", type=float)
    p.add_argument("--nominal-momentum", type=float,
                   help="add a Nesterov momentum step of learned size with this momentum, e.g. 0.9")
    p.add_argument("--nominal-correction", choices=["add", "scale"],
                   help="the LSTM's output is added to the nominal step, or scales its size per coordinate")
    p.add_argument("--schedule", choices=["constant", "inverse_time"],
                   help="a learned step-size schedule: the update times 1 / (1 + t * rate), rate learned")
    for f in dataclasses.fields(MetaTrainConfig):
        if f.name in ("task_family", "networks", "family_kwargs", "baselines", "baseline_lrs"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        elif f.name == "data_dir":
            p.add_argument(flag, help="folder holding fashion-mnist/ (default $LEARNEDOPT_DATA_DIR)")
        else:
            p.add_argument(flag, type=type(f.default))
    p.add_argument("--family-kwargs", type=json.loads, help="JSON object of family constructor arguments")
    p.add_argument("--baselines", type=lambda s: s.split(","), help="comma-separated, e.g. adam,rmsprop,sgd,nag")
    p.add_argument("--baseline-lrs", type=lambda s: [float(x) for x in s.split(",")])
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config file {path!r} not found")
    if file.suffix == ".toml":
        import tomllib

        data = tomllib.loads(file.read_text())
    else:
        data = json.loads(file.read_text())
    return {k.replace("-", "_"): v for k, v in data.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = vars(parser.parse_args(argv))
    settings = _read_config_file(args.pop("config")) if "config" in args else {}
    settings.update(args)
    if "out" not in settings or "task_family" not in settings:
        parser.error("--out and --task-family are required (on the command line or in --config)")
    known = {f.name for f in dataclasses.fields(MetaTrainConfig)} | set(_NETWORK_FLAGS) | set(_RUN_FLAGS) | {
        "out", "resume", "overwrite", "progress"}
    unknown = sorted(set(settings) - known)
    if unknown:
        parser.error(f"unknown settings {unknown} in --config")
    networks = dict(settings.pop("networks", {}))
    for key in _NETWORK_FLAGS:
        if key in settings:
            value = settings.pop(key)
            networks[key] = value.split(",") if key in ("roles", "features") and isinstance(value, str) else value
    run = {k: settings.pop(k, default) for k, default in _RUN_FLAGS.items()}
    if run.pop("threads"):
        torch.set_num_threads(int(args["threads"]))
    command = "learnedopt-train " + " ".join(shlex.quote(a) for a in argv)
    try:
        meta_train(
            settings.pop("task_family"), settings.pop("out"), resume=settings.pop("resume", False),
            overwrite=settings.pop("overwrite", False), progress=settings.pop("progress", True),
            command=command, networks=networks, **run, **settings,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, TypeError, FloatingPointError) as err:
        print(f"learnedopt-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
