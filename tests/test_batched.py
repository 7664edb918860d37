"""Stacked (batched) tasks give each task exactly its own gradient, update and meta-loss term."""

from __future__ import annotations

import torch

from learnedopt import UpdateNetworkConfig, UpdateNetworks
from learnedopt.training import MLPFamily, truncated_unroll
from learnedopt.training.batched import StackedMLPTask


def _tasks(n: int):
    family = MLPFamily("synthetic", hidden=((8,),), activations=("tanh",), synthetic_dims=(12,), batch_sizes=(16,))
    generator = torch.Generator().manual_seed(0)
    tasks = [family.sample(generator) for _ in range(n)]
    return tasks, [float(t.loss(t.init_params(), 0)) for t in tasks]


def test_stacked_meta_gradient_equals_one_task_at_a_time() -> None:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"], hidden_size=6))
    tasks, scales = _tasks(3)

    plain_params = []
    for task, scale in zip(tasks, scales):
        params = task.init_params()
        roles = [nets.resolve_role(None, p) for p in params]
        loss, final, _ = truncated_unroll(nets, task, params, None, roles, 0, 4)
        (loss / scale).backward()
        plain_params.append(final)
    plain = [p.grad.clone() for p in nets.parameters()]

    nets.zero_grad()
    stacked = StackedMLPTask(tasks, scales)
    params = stacked.init_params()
    roles = [nets.resolve_role(None, p[0]) for p in params]
    assert roles == ["dense", "bias", "dense", "bias"]
    loss, final, _ = truncated_unroll(nets, stacked, params, None, roles, 0, 4)
    loss.backward()
    for a, b in zip(plain, (p.grad for p in nets.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for i, per_task in enumerate(plain_params):  # and every task's parameters moved the same way
        for p_plain, p_stacked in zip(per_task, final):
            torch.testing.assert_close(p_plain, p_stacked[i], rtol=1e-5, atol=1e-6)
