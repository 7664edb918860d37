"""The meta-trainer: truncated BPTT, checkpoints that survive SIGKILL, data-parallel over processes.

:class:`MetaTrainer` runs meta-training for one :class:`MetaTrainConfig` into an output directory:

- each of ``meta_batch`` task *slots* has its own ``torch.Generator`` (seeded from the run's seed
  and the slot's index), so the tasks a slot sees do not depend on how slots are spread over
  processes: two processes with 4 slots each see the tasks of one process with 8;
- an outer step unrolls every slot for ``unroll`` inner steps (:func:`truncated_unroll`),
  backpropagates the meta-loss into the update networks, all-reduces the meta-gradient across
  processes, clips it and takes one Adam step; only one truncation's graph is alive at a time;
- every ``eval_every`` outer steps the networks are evaluated on held-out tasks (fixed seed) next
  to tuned baselines, and the best networks so far are kept (early stopping);
- every ``checkpoint_every`` outer steps rank 0 writes a checkpoint atomically (temporary file and
  rename) holding everything the next step depends on: networks, meta-optimizer, slot generators,
  the slots' parameters and optimizer states, the step, the best-so-far. Resuming reproduces an
  uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learnedopt import LSTMOptimizer, UpdateNetworkConfig, UpdateNetworks, init_state, lstm_update
from learnedopt.functional import IMPLEMENTATIONS
from learnedopt.serialization import atomic_write

from .batched import StackedMLPTask
from .tasks import MLPTask, Task, TaskFamily, resolve_family

__all__ = [
    "MetaTrainConfig",
    "MetaTrainer",
    "truncated_unroll",
    "evaluate",
    "tune_baselines",
    "ConfigMismatchError",
    "RunExistsError",
    "BASELINES",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
EVAL_NAME = "eval.json"
DONE_NAME = "DONE"
#: The networks' scalar step-size parameters (the nominal step's log step size, the schedule's
#: log decay rate) learn this many times faster than the network weights.
NOMINAL_META_LR_SCALE = 10.0
_SCALAR_PARAMETERS = ("nominal_log_lr", "schedule_log_rate")

#: Baseline optimizers for validation; the learning rate is tuned on ``baseline_lrs``.
BASELINES: dict[str, Callable[[list[Tensor], float], torch.optim.Optimizer]] = {
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "nag": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
}


class ConfigMismatchError(ValueError):
    """``--resume`` on a directory written with a different configuration."""


class RunExistsError(FileExistsError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class MetaTrainConfig:
    """Settings of a meta-training run; every field is also a command-line flag.

    Attributes:
        task_family: Built-in family name (see ``learnedopt.training.tasks.FAMILIES``) or
            ``"module.path:ClassName"`` of a user's :class:`TaskFamily` subclass.
        family_kwargs: Keyword arguments for the family's constructor.
        data_dir: Folder holding data sets (``fashion-mnist/``); default ``$LEARNEDOPT_DATA_DIR``.
        outer_steps: Meta-optimizer steps.
        meta_batch: Task slots per outer step (in total, over all processes).
        horizon: Inner steps before a slot draws a new task.
        unroll: Inner steps per truncation (the horizon is cut into ``horizon / unroll`` pieces).
        curriculum_start: Horizon at the start; it doubles every ``curriculum_every`` outer steps
            until it reaches ``horizon`` (``0``: no curriculum).
        curriculum_every: Outer steps between horizon doublings.
        meta_lr: Adam learning rate for the network weights (the nominal step's log step size,
            ``UpdateNetworkConfig.nominal_momentum``, and the schedule's log decay rate,
            ``UpdateNetworkConfig.schedule``, learn ``NOMINAL_META_LR_SCALE`` times faster: scalars
            that must travel a few units of log scale while the weights move little).
        grad_clip: Bound on the meta-gradient's global norm.
        second_order: Differentiate through the optimizee's gradient (default: first order).
        seed: Seeds networks, tasks and evaluation.
        max_nonfinite: Stop after this many outer steps in a row with a non-finite meta-loss.
        eval_every: Outer steps between validations (``0``: only at the end).
        eval_tasks: Held-out tasks per validation.
        baselines: Baselines reported next to the learned optimizer.
        baseline_lrs: Learning-rate grid on which each baseline is tuned (best mean final loss).
        checkpoint_every: Outer steps between checkpoints.
        impl: Implementation of the update (see :func:`learnedopt.lstm_update`; ``"auto"``: the
            fused native LSTM kernels where they can be built). A speed setting: it may change
            between resumes.
        networks: Keyword arguments of :class:`learnedopt.UpdateNetworkConfig`.
        stack_tasks: Unroll slots whose tasks are MLPs of one architecture, at the same inner step,
            as one stacked task (:class:`~learnedopt.training.batched.StackedMLPTask`): the same
            meta-gradient, in fewer and larger operations. A speed setting (first order only); off by
            default: on a 2-core CPU it is slower for the paper's MLP (benchmarks/meta_training_throughput.py).
        meta_objective: ``"loss"``: the meta-loss is the sum of the losses along each truncation,
            divided by the task's initial loss (the paper's); ``"log"``: the mean of their logs,
            so that late progress (small losses) counts as much as early progress.
        init_from: Start from these pretrained networks (a shipped name, a directory or a Hub
            repo id) instead of a random initialisation: fine-tunes an optimizer on a new family.
            Its architecture is used; ``networks`` may only repeat it.
    """

    task_family: str = "mlp"
    family_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    outer_steps: int = 1000
    meta_batch: int = 4
    horizon: int = 100
    unroll: int = 20
    curriculum_start: int = 0
    curriculum_every: int = 200
    meta_lr: float = 3e-3
    grad_clip: float = 1.0
    second_order: bool = False
    seed: int = 0
    max_nonfinite: int = 10
    eval_every: int = 100
    eval_tasks: int = 8
    baselines: list[str] = field(default_factory=lambda: ["adam", "rmsprop", "sgd", "nag"])
    baseline_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])
    checkpoint_every: int = 50
    impl: str = "auto"
    networks: dict[str, Any] = field(default_factory=dict)
    stack_tasks: bool = False
    meta_objective: str = "loss"
    init_from: str = ""

    def __post_init__(self) -> None:
        for name in ("outer_steps", "meta_batch", "horizon", "unroll", "eval_tasks", "checkpoint_every",
                     "max_nonfinite", "curriculum_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_every < 0 or self.curriculum_start < 0:
            raise ValueError("eval_every and curriculum_start must be >= 0")
        if self.horizon % self.unroll:
            raise ValueError(f"horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")
        for name in self.baselines:
            if name not in BASELINES:
                raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
        if not self.meta_lr > 0 or not self.grad_clip > 0:
            raise ValueError("meta_lr and grad_clip must be positive")
        UpdateNetworkConfig(**self.networks)  # validates the network settings early
        if self.meta_objective not in ("loss", "log"):
            raise ValueError(f"meta_objective must be 'loss' or 'log', got {self.meta_objective!r}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")

    def horizon_at(self, outer_step: int) -> int:
        """The horizon in force at ``outer_step`` (a multiple of ``unroll``)."""
        if not self.curriculum_start:
            return self.horizon
        h = self.curriculum_start * 2 ** (outer_step // self.curriculum_every)
        h = max(self.unroll, (h // self.unroll) * self.unroll)
        return min(h, self.horizon)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown meta-training settings {unknown}; known: {sorted(known)}")
        return cls(**data)


# ---------------------------------------------------------------------- the unroll
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
    impl: str = "auto",
    meta_objective: str = "loss",
) -> tuple[Tensor, list[Tensor], list[dict[str, Tensor]]]:
    """Unroll ``length`` inner steps from step ``start``; return the summed loss along the way.

    The meta-loss is ``sum_{k=1..length} f(θ_{start+k})`` (``meta_objective="log"``: the sum of
    ``log f``, which weighs a halving of the loss the same early and late in training); its graph
    reaches the networks' weights through every update (:func:`learnedopt.lstm_update`, the
    function that ``LSTMOptimizer.step`` runs). The optimizee's gradient is an input (detached)
    unless ``second_order``.

    Returns:
        ``(meta_loss, params, states)`` with the graph still attached (detach to truncate).
    """
    params = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    meta_loss = params[0].new_zeros(())
    for k in range(length + 1):
        loss, meta_term = task.losses(params, start + k)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"task {task.name!r} returned a loss of shape {shape}; it must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(
                f"task {task.name!r} returned a loss that does not depend on its parameters "
                "differentiably (no grad_fn); compute it from the `params` passed to loss()"
            )
        if k > 0:
            if meta_objective == "log":
                if not bool(meta_term.detach() > 0):
                    raise ValueError(
                        f"meta_objective='log' needs positive losses, but task {task.name!r} returned "
                        f"{float(meta_term):.4g}; use meta_objective='loss' for this family"
                    )
                meta_term = meta_term.log()
            meta_loss = meta_loss + meta_term
        if k == length:
            break
        grads = torch.autograd.grad(loss, params, create_graph=second_order, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if not second_order:
            grads = [g.detach() for g in grads]
        if states is None:
            states = [init_state(g, networks.config) for g in grads]
        deltas, states = lstm_update(params, grads, states, networks, roles, impl=impl, step=start + k)
        params = [p + d for p, d in zip(params, deltas)]
    return meta_loss, params, list(states)


# ---------------------------------------------------------------------- evaluation
def evaluate(task: Task, make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int,
             every: int = 1) -> list[float]:
    """Train ``task`` for ``steps`` with a torch optimizer; the eval loss before every ``every``-th
    step and after the last (``curve[i]`` is the loss at step ``i * every``; ``every`` must divide
    ``steps``)."""
    if every < 1 or steps % every:
        raise ValueError(f"every ({every}) must be a positive divisor of steps ({steps})")
    params = [p.clone().requires_grad_() for p in task.init_params()]
    opt = make_optimizer(params)
    curve = []
    for t in range(steps):
        if t % every == 0:
            with torch.no_grad():
                curve.append(float(task.eval_loss(params)))
        opt.zero_grad()
        task.loss(params, t).backward()
        opt.step()
    with torch.no_grad():
        curve.append(float(task.eval_loss(params)))
    return curve


def _final_score(curves: list[list[float]]) -> float:
    """Mean final loss; a diverged run (non-finite) counts as +inf."""
    finals = [c[-1] if math.isfinite(c[-1]) else math.inf for c in curves]
    return sum(finals) / len(finals)


def tune_baselines(
    tasks: Sequence[Task], names: Sequence[str], lrs: Sequence[float], steps: int
) -> dict[str, dict[str, Any]]:
    """For each baseline, the learning rate on ``lrs`` with the best mean final loss, and its curves."""
    out = {}
    for name in names:
        best = None
        for lr in lrs:
            curves = [evaluate(t, lambda ps, lr=lr: BASELINES[name](ps, lr), steps) for t in tasks]
            score = _final_score(curves)
            if best is None or score < best["final"]:
                best = {"lr": lr, "final": score, "curve": _mean_curve(curves)}
        out[name] = best
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]


def lstm_optimizer_for(
    networks: UpdateNetworks, task: Task, **options: Any
) -> Callable[[list[Tensor]], LSTMOptimizer]:
    """A factory making an ``LSTMOptimizer`` over a task's parameters, each with the task's role."""

    def make(params: list[Tensor]) -> LSTMOptimizer:
        groups = [{"params": [p], "role": r} for p, r in zip(params, task.roles)]
        return LSTMOptimizer(groups, networks=networks, **options)

    return make


def validation_tasks(family: TaskFamily, seed: int, count: int) -> list[Task]:
    """The held-out tasks a run with this ``seed`` validates on (disjoint from its training draws)."""
    generator = torch.Generator().manual_seed(10_000_019 + seed)
    return [family.sample(generator) for _ in range(count)]


def learned_curves(networks: UpdateNetworks, tasks: Sequence[Task], steps: int) -> list[list[float]]:
    return [evaluate(t, lstm_optimizer_for(networks, t), steps) for t in tasks]


# ---------------------------------------------------------------------- distributed helpers
class _Dist:
    """Rank and world size, and the collectives the trainer needs (no-ops on one process)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                self.dist.all_reduce(t)

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        self.dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()


# ---------------------------------------------------------------------- the trainer
@dataclass
class _Slot:
    index: int
    generator: torch.Generator
    task_seed_state: Tensor | None = None
    task: Task | None = None
    params: list[Tensor] | None = None
    states: list[dict[str, Tensor]] | None = None
    roles: list[str] | None = None
    step: int = 0
    scale: float = 1.0


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write({path: lambda tmp: torch.save(obj, tmp)})


def _atomic_text(path: Path, text: str) -> None:
    atomic_write({path: lambda tmp: Path(tmp).write_text(text)})


class MetaTrainer:
    """Meta-trains update networks on a task family into an output directory.

    Example:
        >>> from learnedopt.training import MetaTrainer, MetaTrainConfig
        >>> config = MetaTrainConfig(task_family="quadratic", outer_steps=5, meta_batch=2,
        ...                          horizon=10, unroll=5, eval_every=0, eval_tasks=2)
        >>> networks = MetaTrainer(config, "/tmp/quad-opt", overwrite=True).run()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MetaTrainConfig,
        out_dir: str | Path,
        *,
        family: TaskFamily | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.family = family if family is not None else resolve_family(config.task_family, config.family_kwargs, config.data_dir)
        self.dist = _Dist()
        if config.meta_batch % self.dist.world:
            raise ValueError(
                f"meta_batch ({config.meta_batch}) must be divisible by the number of processes ({self.dist.world})"
            )
        self.progress = progress and self.dist.rank == 0
        self.extra_log = log
        self._prepare_directory(resume, overwrite)

    def _initial_networks(self) -> UpdateNetworks:
        """Fresh networks from ``config.networks``, or a copy of the ``init_from`` networks."""
        config = self.config
        if not config.init_from:
            return UpdateNetworks(UpdateNetworkConfig(**config.networks))
        from learnedopt.serialization import load_networks

        start = load_networks(config.init_from)
        arch = start.config.architecture()
        clashes = {k: (arch[k], v) for k, v in config.networks.items() if k in arch and arch[k] != v}
        if clashes:
            shown = "; ".join(f"{k}: {config.init_from} has {a!r}, settings ask for {b!r}" for k, (a, b) in clashes.items())
            raise ConfigMismatchError(
                f"init_from={config.init_from!r} has a different architecture ({shown}); drop those "
                "network settings to fine-tune it, or leave out init_from to train from scratch"
            )
        networks = UpdateNetworks(UpdateNetworkConfig(**{**config.networks, **arch}))
        networks.load_state_dict(start.state_dict())
        return networks

    # ------------------------------------------------------------------ directory handling
    def _prepare_directory(self, resume: bool, overwrite: bool) -> None:
        ckpt = self.out / CHECKPOINT_NAME
        self.resume_from = None
        if resume and ckpt.is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            diffs = _config_diff(saved["config"], self.config.to_dict())
            if diffs:
                shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
                raise ConfigMismatchError(
                    f"cannot resume {self.out}: it was made with a different configuration ({shown}). "
                    "Rerun with the original settings, or use --overwrite to start afresh."
                )
            self.resume_from = saved
            return
        exists = ckpt.is_file() or (self.out / DONE_NAME).is_file()
        if exists and not overwrite and not resume:
            raise RunExistsError(
                f"{self.out} already holds a meta-training run; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in (CHECKPOINT_NAME, DONE_NAME, LOG_NAME, EVAL_NAME):
                (self.out / name).unlink(missing_ok=True)
        self.dist.barrier()

    # ------------------------------------------------------------------ slots
    def _local_slots(self) -> list[int]:
        per = self.config.meta_batch // self.dist.world
        return list(range(self.dist.rank * per, (self.dist.rank + 1) * per))

    def _new_task(self, slot: _Slot) -> None:
        slot.task_seed_state = slot.generator.get_state()
        self._materialise(slot)
        slot.params = slot.task.init_params()
        slot.states = None
        slot.step = 0
        with torch.no_grad():
            scale = float(slot.task.loss(slot.params, 0))
        slot.scale = scale if math.isfinite(scale) and scale > 0 else 1.0

    def _materialise(self, slot: _Slot) -> None:
        """(Re)sample the slot's task from the generator state saved before it was drawn."""
        slot.generator.set_state(slot.task_seed_state)
        slot.task = self.family.sample(slot.generator)
        params = slot.task.init_params()
        slot.roles = [self.networks.resolve_role(r, p) for r, p in zip(slot.task.roles, params)]

    def _stack_groups(self) -> list[list[_Slot]]:
        """Slots unrolled together: same-architecture MLP tasks at the same step share one unroll."""
        groups: dict[tuple, list[_Slot]] = {}
        for slot in self.slots:
            groups.setdefault(_stack_key(slot, self.config), []).append(slot)
        return list(groups.values())

    def _unroll_group(self, group: list[_Slot]) -> tuple[Tensor, list[tuple[_Slot, list[Tensor], list[dict[str, Tensor]]]]]:
        """One truncation of a group of slots; the meta-loss (normalised per task) and each slot's
        new parameters and states."""
        config = self.config
        norm = config.unroll * config.meta_batch
        if len(group) == 1:
            slot = group[0]
            loss, params, states = truncated_unroll(
                self.networks, slot.task, slot.params, slot.states, slot.roles, slot.step, config.unroll,
                second_order=config.second_order, impl=config.impl, meta_objective=config.meta_objective,
            )
            scale = slot.scale if config.meta_objective == "loss" else 1.0  # log: scale-free already
            return loss / (scale * norm), [(slot, params, states)]
        stacked = StackedMLPTask([s.task for s in group], [s.scale for s in group])
        params = [torch.stack(ps) for ps in zip(*(s.params for s in group))]
        states = None
        if group[0].states is not None:
            states = [{k: torch.cat([s.states[i][k] for s in group]) for k in group[0].states[i]}
                      for i in range(len(params))]
        # the meta-loss term of a stacked task is already sum_b loss_b / scale_b
        loss, params, states = truncated_unroll(
            self.networks, stacked, params, states, group[0].roles, group[0].step, config.unroll, impl=config.impl,
        )
        per_slot = []
        for b, slot in enumerate(group):
            slot_states = [{k: v.chunk(len(group))[b] for k, v in st.items()} for st in states]
            per_slot.append((slot, [p[b] for p in params], slot_states))
        return loss / norm, per_slot

    # ------------------------------------------------------------------ checkpointing
    def _checkpoint(self, outer: int) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "outer_step": outer,
            "networks": self.networks.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "slots": self._gather_slots(),
            "torch_rng": torch.get_rng_state(),
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "best": {"score": self.best_score, "step": self.best_step},
            "best_networks": self.best_weights,
            "baselines": json.dumps(self.baselines),
            "wall_s": self.wall_s + (time.time() - self._session_start),
        }

    def _gather_slots(self) -> list[dict[str, Any]]:
        mine = [
            {
                "index": s.index,
                "generator": s.generator.get_state(),
                "task_seed_state": s.task_seed_state,
                "params": [p.detach().clone() for p in s.params],
                "states": [] if s.states is None else [dict(st) for st in s.states],
                "step": s.step,
                "scale": s.scale,
            }
            for s in self.slots
        ]
        if not self.dist.enabled:
            return mine
        everything: list[Any] = [None] * self.dist.world
        self.dist.dist.all_gather_object(everything, mine)
        return [s for part in everything for s in part]

    def _restore(self, saved: dict[str, Any]) -> int:
        self.networks.load_state_dict(saved["networks"])
        self.meta_opt.load_state_dict(saved["meta_opt"])
        torch.set_rng_state(saved["torch_rng"])
        self.nonfinite_in_row = saved["nonfinite_in_row"]
        self.nonfinite_total = saved["nonfinite_total"]
        self.best_score = saved["best"]["score"]
        self.best_step = saved["best"]["step"]
        self.best_weights = saved["best_networks"]
        self.baselines = json.loads(saved["baselines"])
        self.wall_s = float(saved.get("wall_s", 0.0))
        by_index = {s["index"]: s for s in saved["slots"]}
        for slot in self.slots:
            data = by_index[slot.index]
            slot.task_seed_state = data["task_seed_state"]
            self._materialise(slot)
            slot.generator.set_state(data["generator"])
            slot.params = list(data["params"])
            slot.states = [dict(st) for st in data["states"]] or None
            slot.step = data["step"]
            slot.scale = data["scale"]
        return saved["outer_step"]

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.rank != 0:
            return
        with open(self.out / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.extra_log is not None:
            self.extra_log(record)

    def _truncate_log(self, outer: int) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
        path = self.out / LOG_NAME
        if self.dist.rank != 0 or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("outer_step", -1) < outer:
                keep.append(line)
        _atomic_text(path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ validation
    def _validation_tasks(self) -> list[Task]:
        return validation_tasks(self.family, self.config.seed, self.config.eval_tasks)

    def _validate(self, outer: int) -> float:
        curves = learned_curves(self.networks, self.val_tasks, self.config.horizon)
        score = _final_score(curves)
        record = {"outer_step": outer, "eval_final_loss": score,
                  **{f"{k}_final_loss": v["final"] for k, v in self.baselines.items()}}
        self._log(record)
        self.last_eval = {"lstm": _mean_curve(curves), "outer_step": outer}
        if score < self.best_score:
            self.best_score, self.best_step = score, outer
            self.best_weights = {k: v.detach().clone() for k, v in self.networks.state_dict().items()}
        return score

    # ------------------------------------------------------------------ main loop
    def run(self) -> UpdateNetworks:
        """Meta-train (or continue), save the best networks as a pretrained directory, return them."""
        config = self.config
        torch.manual_seed(config.seed)
        self.networks = self._initial_networks()
        self.meta_opt = torch.optim.Adam(_meta_param_groups(self.networks, config.meta_lr), lr=config.meta_lr)
        self.slots = [_Slot(i, torch.Generator().manual_seed(config.seed * 1_000_003 + i)) for i in self._local_slots()]
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.best_score, self.best_step, self.best_weights = math.inf, -1, None
        self.val_tasks = self._validation_tasks()
        self.last_eval: dict[str, Any] = {}
        self.wall_s, self._session_start = 0.0, time.time()
        if self.resume_from is not None:
            start = self._restore(self.resume_from)
            self._truncate_log(start)
        else:
            start = 0
            for slot in self.slots:
                self._new_task(slot)
            self.baselines = tune_baselines(self.val_tasks, config.baselines, config.baseline_lrs, config.horizon)
        started = time.time()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.outer_steps, initial=start, desc="meta-training", unit="step")
        for outer in range(start, config.outer_steps):
            self._outer_step(outer, started)
            if bar is not None:
                bar.set_postfix(meta_loss=f"{self.last_meta_loss:.4g}")
                bar.update(1)
            done = outer + 1
            if config.eval_every and done % config.eval_every == 0:
                self._validate(done)
            if done % config.checkpoint_every == 0 or done == config.outer_steps:
                if done == config.outer_steps and (not config.eval_every or done % config.eval_every):
                    self._validate(done)
                ckpt = self._checkpoint(done)
                if not all(torch.isfinite(v).all() for v in ckpt["networks"].values()):
                    raise FloatingPointError(
                        f"the update networks hold non-finite weights at outer step {done}; not saving "
                        "them. The last checkpoint is intact: lower --meta-lr and --resume from it."
                    )
                if self.dist.rank == 0:
                    _atomic_torch_save(ckpt, self.out / CHECKPOINT_NAME)
                self.dist.barrier()
        if bar is not None:
            bar.close()
        if start >= config.outer_steps and not self.last_eval:
            self.last_eval = {"outer_step": self.best_step}
        if self.best_weights is not None:
            self.networks.load_state_dict(self.best_weights)
        self.wall_s += time.time() - self._session_start  # over all sessions of a resumed run
        return self.networks

    def _outer_step(self, outer: int, started: float) -> None:
        config = self.config
        horizon = config.horizon_at(outer)
        self.meta_opt.zero_grad()
        total = 0.0
        results = []
        bad = False
        for group in self._stack_groups():
            loss, per_slot = self._unroll_group(group)
            if not torch.isfinite(loss):
                bad = True
                break
            loss.backward()
            total += float(loss.detach())
            results.extend(per_slot)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.networks.parameters()]
        bad = self.dist.any(bad or not all(torch.isfinite(g).all() for g in grads))
        if bad:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            self.meta_opt.zero_grad()
            self._log({"outer_step": outer, "skipped_nonfinite": True, "nonfinite_total": self.nonfinite_total})
            if self.nonfinite_in_row >= config.max_nonfinite:
                raise FloatingPointError(
                    f"{self.nonfinite_in_row} outer steps in a row had a non-finite meta-loss "
                    f"({self.nonfinite_total} in all); stopping without saving them. Lower --meta-lr or "
                    "--unroll, or check the task family's losses. The last checkpoint is intact."
                )
            for slot in self.slots:  # the truncation is skipped; its tasks are redrawn
                self._new_task(slot)
            self.last_meta_loss = math.nan
            return
        self.nonfinite_in_row = 0
        if self.dist.enabled:  # one all-reduce of every meta-gradient and the meta-loss
            stats = torch.cat([*(g.reshape(-1) for g in grads), torch.tensor([total])])
            self.dist.all_reduce_([stats])
            flat, total = stats[:-1], float(stats[-1])
            offset = 0
            for p in self.networks.parameters():
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.networks.parameters(), config.grad_clip)
        self.meta_opt.step()
        for slot, params, states in results:
            # clones: a stacked group's results are views of one tensor, which checkpoints would
            # otherwise save whole once per slot
            slot.params = [p.detach().clone() for p in params]
            slot.states = [{k: v.detach().clone() for k, v in s.items()} for s in states]
            slot.step += config.unroll
            if slot.step >= horizon:
                self._new_task(slot)
        self.last_meta_loss = total
        self._log({"outer_step": outer, "meta_loss": total, "grad_norm": float(grad_norm),
                   "horizon": horizon, "elapsed_s": round(time.time() - started, 2)})


def _stack_key(slot: _Slot, config: MetaTrainConfig) -> tuple:
    task = slot.task
    # a stacked task's meta-loss term is a sum over its tasks, which has no per-task log
    if config.stack_tasks and not config.second_order and config.meta_objective == "loss" and type(task) is MLPTask:
        return ("mlp", tuple(task.sizes), task.activation, task.batch_size, slot.step)
    return ("alone", slot.index)


def _meta_param_groups(networks: UpdateNetworks, meta_lr: float) -> list[dict[str, Any]]:
    """Adam parameter groups: the network weights at ``meta_lr``, the scalar step-size parameters
    (log step size, schedule rate) faster."""
    scalars = [p for name, p in networks.named_parameters() if name.endswith(_SCALAR_PARAMETERS)]
    weights = [p for name, p in networks.named_parameters() if not name.endswith(_SCALAR_PARAMETERS)]
    groups: list[dict[str, Any]] = [{"params": weights}]
    if scalars:
        groups.append({"params": scalars, "lr": meta_lr * NOMINAL_META_LR_SCALE})
    return groups


def _config_diff(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    # outer_steps may grow on resume (continue training for longer); settings added to
    # MetaTrainConfig after the checkpoint was written count at their defaults
    defaults = MetaTrainConfig().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = (set(saved) | set(now)) - {"outer_steps", "impl", "stack_tasks"}
    return {k: (saved.get(k), now.get(k)) for k in sorted(keys) if saved.get(k) != now.get(k)}
