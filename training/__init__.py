"""Meta-training for learnedopt (installed as ``learnedopt.training``).

Example:
    >>> from learnedopt.training import meta_train
    >>> networks = meta_train("quadratic", "runs/quad", outer_steps=20, meta_batch=2, horizon=20,
    ...                       unroll=10, eval_every=0, eval_tasks=2)  # doctest: +SKIP
"""

from .meta_train import compare_with_adam, main, meta_train
from .tasks import (
    FAMILIES,
    ConvFamily,
    MixtureFamily,
    MLPFamily,
    ModuleTask,
    QuadraticFamily,
    Task,
    TaskFamily,
    resolve_family,
)
from .trainer import MetaTrainConfig, MetaTrainer, evaluate, truncated_unroll, tune_baselines

__all__ = [
    "meta_train",
    "main",
    "compare_with_adam",
    "MetaTrainConfig",
    "MetaTrainer",
    "truncated_unroll",
    "evaluate",
    "tune_baselines",
    "Task",
    "TaskFamily",
    "QuadraticFamily",
    "MLPFamily",
    "ConvFamily",
    "MixtureFamily",
    "ModuleTask",
    "FAMILIES",
    "resolve_family",
]
