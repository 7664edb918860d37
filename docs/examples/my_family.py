"""A user-defined task family: noisy linear regression with a random design.

Meta-train an optimizer on it from the command line (run from this folder, or put it on PYTHONPATH):

    learnedopt-train --task-family my_family:LinearRegressionFamily --out runs/linreg \
        --outer-steps 200 --meta-batch 4 --horizon 40 --unroll 10

or from Python:

    from learnedopt.training import meta_train
    from my_family import LinearRegressionFamily
    networks = meta_train(LinearRegressionFamily(), "runs/linreg", outer_steps=200, horizon=40, unroll=10)
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnedopt.training import Task, TaskFamily


class LinearRegressionTask(Task):
    name = "linear-regression"

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed

    def init_params(self) -> list[Tensor]:
        # a weight matrix and a bias: the optimizer picks the 'dense' and 'bias' networks by shape
        return [torch.zeros(1, self.x.shape[1]), torch.zeros(1)]

    def loss(self, params: list[Tensor], step: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + step)  # the minibatch is a function of the step
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=g)
        w, b = params
        return ((self.x[idx] @ w.T + b).squeeze(1) - self.y[idx]).pow(2).mean()

    def eval_loss(self, params: list[Tensor]) -> Tensor:
        w, b = params
        return ((self.x @ w.T + b).squeeze(1) - self.y).pow(2).mean()


class LinearRegressionFamily(TaskFamily):
    """Tasks differ in dimension, true weights, input scale and noise."""

    name = "linear-regression"

    def __init__(self, dims: tuple[int, ...] = (8, 16, 32), batch_size: int = 32) -> None:
        self.dims, self.batch_size = dims, batch_size

    def sample(self, generator: torch.Generator) -> LinearRegressionTask:
        d = self.dims[int(torch.randint(len(self.dims), (1,), generator=generator))]
        scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=generator))
        x = torch.randn(512, d, generator=generator) * scale
        w_true = torch.randn(d, generator=generator)
        y = x @ w_true + 0.1 * torch.randn(512, generator=generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        return LinearRegressionTask(x, y, self.batch_size, seed)
