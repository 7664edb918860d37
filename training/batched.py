"""Batched tasks: several tasks of one architecture stacked into one, so one unroll trains them all.

Meta-training spends most of its time in many small operations (a 784-20-10 MLP forward, backward
and LSTM update per task per inner step). Stacking ``B`` tasks that share an architecture turns
those into ``B``-times larger operations (batched matmuls, one LSTM call over all coordinates)
with the same Python overhead as one task. The stacked task's loss is the sum of the tasks' own
normalised losses, so each task's gradient, update and meta-loss term are exactly what they would
be alone (see ``tests/test_batched.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import MLPTask, Task

__all__ = ["StackedMLPTask"]


class StackedMLPTask(Task):
    """``B`` :class:`MLPTask` s with the same layer sizes, activation and batch size, stacked.

    Parameters are ``(B, *shape)`` tensors; the loss is ``sum_b loss_b`` (so each task's gradient
    is its own) and its meta-loss term ``sum_b loss_b / scale_b``. Resolve each
    stacked tensor's role from its unstacked shape (``networks.resolve_role(None, p[0])``): a
    stacked weight matrix is still a dense weight, not a conv kernel.
    """

    def __init__(self, tasks: Sequence[MLPTask], scales: Sequence[float] | None = None) -> None:
        first = tasks[0]
        for t in tasks:
            if t.sizes != first.sizes or t.activation is not first.activation or t.batch_size != first.batch_size:
                raise ValueError("StackedMLPTask needs tasks with the same sizes, activation and batch size")
        self.tasks = list(tasks)
        self.scales = torch.tensor(list(scales) if scales is not None else [1.0] * len(tasks))
        self.name = f"stacked-{len(tasks)}x{first.name}"

    def init_params(self) -> list[Tensor]:
        per_task = [t.init_params() for t in self.tasks]
        return [torch.stack(ps) for ps in zip(*per_task)]

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """``x``: ``(B, N, in)`` -> logits ``(B, N, classes)``."""
        n_layers = len(params) // 2
        act = self.tasks[0].activation
        for layer in range(n_layers):
            w, b = params[2 * layer], params[2 * layer + 1]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if layer < n_layers - 1:
                x = act(x)
        return x

    def _losses(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self.forward(params, x)
        per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return per_example.view(y.shape).mean(dim=1)

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        """Sum of the tasks' losses: each task's gradient is exactly its own."""
        return self.task_losses(params, step).sum()

    def losses(self, params: Sequence[Tensor], step: int) -> tuple[Tensor, Tensor]:
        """The summed loss (for gradients) and ``sum_b loss_b / scale_b`` (for the meta-loss)."""
        per_task = self.task_losses(params, step)
        return per_task.sum(), (per_task / self.scales).sum()

    def task_losses(self, params: Sequence[Tensor], step: int) -> Tensor:
        """Each task's own (unnormalised) loss at ``step``: ``(B,)``."""
        xs, ys = zip(*(t.batch(step) for t in self.tasks))
        return self._losses(params, torch.stack(xs), torch.stack(ys))
