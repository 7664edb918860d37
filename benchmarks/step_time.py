"""Step time of LSTMOptimizer against torch.optim.Adam(foreach=True), measured side by side.

Usage::

    python benchmarks/step_time.py                 # ~1M-parameter MLP, table + JSON
    python benchmarks/step_time.py --params 100000 --reps 20 --json out.json

Reports the median wall time of ``optimizer.step()`` (gradients fixed, so only the optimizer is
timed), the ratio to Adam, and the optimizer state in bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from learnedopt import LSTMOptimizer, UpdateNetworkConfig, UpdateNetworks


def make_model(target_params: int) -> nn.Module:
    """An MLP 784 -> w -> w/4 -> 10 with about ``target_params`` parameters."""
    # 784 w + w + w * w/4 + w/4 + 10 w/4 + 10 = target, solve for w
    a, b, c = 0.25, 784 + 1 + 0.25 + 2.5, 10 - target_params
    w = int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))
    return nn.Sequential(nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w // 4), nn.ReLU(), nn.Linear(w // 4, 10))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def time_steps(opt: torch.optim.Optimizer, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def run(target_params: int, reps: int, impl: str) -> dict:
    torch.manual_seed(0)
    model = make_model(target_params)
    n = sum(p.numel() for p in model.parameters())
    model(torch.randn(64, 784)).pow(2).mean().backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]

    def fresh():
        clones = [p.detach().clone().requires_grad_() for p in params]
        for c, g in zip(clones, grads):
            c.grad = g.clone()
        return clones

    lstm = LSTMOptimizer(fresh(), networks=UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"])), impl=impl)
    adam = torch.optim.Adam(fresh(), lr=1e-3, foreach=True)
    # interleave the two so that machine noise hits both alike
    lstm_t, adam_t = [], []
    for _ in range(3):
        lstm_t += time_steps(lstm, max(1, reps // 3))
        adam_t += time_steps(adam, max(1, reps // 3) * 5)
    lstm_ms = statistics.median(lstm_t) * 1e3
    adam_ms = statistics.median(adam_t) * 1e3
    return {
        "params": n,
        "impl": impl,
        "lstm_step_ms": round(lstm_ms, 3),
        "adam_foreach_step_ms": round(adam_ms, 4),
        "ratio": round(lstm_ms / adam_ms, 1),
        "lstm_state_bytes_per_param": round(state_bytes(lstm) / n, 1),
        "adam_state_bytes_per_param": round(state_bytes(adam) / n, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--impl", default="batched", choices=["batched", "reference"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    results = [run(n, args.reps, args.impl) for n in args.params]
    print(f"machine: {machine}")
    print(f"{'params':>10} {'LSTM step ms':>13} {'Adam ms':>9} {'ratio':>7} {'LSTM B/param':>13} {'Adam B/param':>13}")
    for r in results:
        print(
            f"{r['params']:>10} {r['lstm_step_ms']:>13.1f} {r['adam_foreach_step_ms']:>9.2f} {r['ratio']:>6.0f}x "
            f"{r['lstm_state_bytes_per_param']:>13.0f} {r['adam_state_bytes_per_param']:>13.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
