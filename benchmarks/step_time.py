"""Step time of LSTMOptimizer against torch.optim.Adam(foreach=True), measured side by side.

Usage::

    python benchmarks/step_time.py                 # ~1M-parameter MLP, table + JSON
    python benchmarks/step_time.py --params 100000 --reps 20 --json out.json

Reports the median wall time of ``optimizer.step()`` (gradients fixed, so only the optimizer is
timed) for each implementation (``batched``, ``compiled``), the ratio to Adam, the achieved FLOP
rate against a 2048^3 float32 matmul measured in the same run, and the optimizer state in bytes
per parameter.
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


def lstm_flops_per_coordinate(config: UpdateNetworkConfig) -> int:
    """Multiply-adds x 2 of the gate matmuls and the head, per coordinate per step."""
    h, flops, fan_in = config.hidden_size, 0, config.input_size
    for _ in range(config.num_layers):
        flops += 2 * 4 * h * (fan_in + h)
        fan_in = h
    return flops + 2 * h


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(target_params: int, reps: int, impls: list[str]) -> dict:
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

    networks = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"]))
    opts = {impl: LSTMOptimizer(fresh(), networks=networks, impl=impl) for impl in impls}
    adam = torch.optim.Adam(fresh(), lr=1e-3, foreach=True)
    times: dict[str, list[float]] = {name: [] for name in [*impls, "adam"]}
    for _ in range(3):  # interleaved, so that machine noise hits all alike
        for impl, opt in opts.items():
            times[impl] += time_steps(opt, max(1, reps // 3))
        times["adam"] += time_steps(adam, max(1, reps // 3) * 5)
    adam_ms = statistics.median(times["adam"]) * 1e3
    flops = lstm_flops_per_coordinate(networks.config) * n
    result = {"params": n, "adam_foreach_step_ms": round(adam_ms, 4),
              "adam_state_bytes_per_param": round(state_bytes(adam) / n, 1), "lstm_flops_per_param": flops // n}
    for impl, opt in opts.items():
        ms = statistics.median(times[impl]) * 1e3
        result[impl] = {
            "step_ms": round(ms, 2),
            "ratio_to_adam": round(ms / adam_ms, 1),
            "gflops": round(flops / (ms / 1e3) / 1e9, 2),
            "state_bytes_per_param": round(state_bytes(opt) / n, 1),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--impl", nargs="+", default=["batched", "compiled"], choices=["batched", "compiled", "reference"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    peak = matmul_gflops()
    results = [run(n, args.reps, args.impl) for n in args.params]
    peak_after = matmul_gflops()
    print(f"machine: {machine}")
    print(f"2048^3 float32 matmul: {peak:.1f} GFLOP/s before, {peak_after:.1f} after the step timings")
    print(f"{'params':>10} {'impl':>9} {'step ms':>9} {'Adam ms':>8} {'x Adam':>7} {'GFLOP/s':>8} {'% matmul':>9} {'B/param':>8}")
    for r in results:
        for impl in args.impl:
            x = r[impl]
            print(f"{r['params']:>10} {impl:>9} {x['step_ms']:>9.1f} {r['adam_foreach_step_ms']:>8.2f} "
                  f"{x['ratio_to_adam']:>6.0f}x {x['gflops']:>8.2f} {100 * x['gflops'] / peak:>8.1f}% "
                  f"{x['state_bytes_per_param']:>8.0f}")
    print(f"Adam state: {results[0]['adam_state_bytes_per_param']:.0f} B/param; "
          f"LSTM FLOPs per parameter per step: {results[0]['lstm_flops_per_param']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "matmul_gflops": [peak, peak_after], "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
