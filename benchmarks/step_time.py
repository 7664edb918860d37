"""Step time of LSTMOptimizer against torch.optim.Adam(foreach=True), measured side by side.

Usage::

    python benchmarks/step_time.py                 # 100k, 1M and 10M parameters, table
    python benchmarks/step_time.py --params 100000 --reps 20 --json out.json

Reports the median wall time of ``optimizer.step()`` (gradients fixed, so only the optimizer is
timed) for each implementation (``native``, ``compiled``, ``batched``; the last two only up to
``--pytorch-max-params``, they take seconds per step beyond), the ratio to Adam, the achieved FLOP
rate against a 2048^3 float32 matmul measured in the same run, the optimizer state in bytes per
parameter, and the peak memory that one ``step()`` adds on top of it.

Peak memory is measured in a fresh subprocess per case, with glibc told to serve every
allocation above 64 KB by mmap (so freed temporaries leave the resident set): the resident
high-water mark is reset just before a step and read just after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_step_memory_child(target_params: int, impl: str) -> None:
    """(Subprocess) print the resident-memory growth of one step after the state exists."""
    torch.manual_seed(0)
    model = make_model(target_params)
    model(torch.randn(64, 784)).pow(2).mean().backward()
    n = sum(p.numel() for p in model.parameters())
    networks = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"]))
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True) if impl == "adam"
           else LSTMOptimizer(model.parameters(), networks=networks, impl=impl))
    opt.step()  # creates the state (and compiles, for impl="compiled")
    opt.step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kb("VmRSS")
    opt.step()
    growth = (_status_kb("VmHWM") - before) * 1024
    print(json.dumps({"peak_step_bytes_per_param": growth / n}))


def peak_step_memory(target_params: int, impl: str) -> float | None:
    """Peak memory added by one ``step()``, bytes per parameter (``None`` where not measurable)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, __file__, "--peak-child", str(target_params), impl],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"peak-memory measurement for {impl} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return round(json.loads(proc.stdout.strip().splitlines()[-1])["peak_step_bytes_per_param"], 1)


def run(target_params: int, reps: int, impls: list[str], memory: bool = True) -> dict:
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
    del opts, adam
    if memory:
        for impl in [*impls, "adam"]:
            value = peak_step_memory(target_params, impl)
            if impl == "adam":
                result["adam_peak_step_bytes_per_param"] = value
            else:
                result[impl]["peak_step_bytes_per_param"] = value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--impl", nargs="+", default=["native", "compiled", "batched"],
                        choices=["native", "batched", "compiled", "reference"])
    parser.add_argument("--pytorch-max-params", type=int, default=2_000_000,
                        help="time the PyTorch implementations only up to this size")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_step_memory_child(int(args.peak_child[0]), args.peak_child[1])
        return
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    rates = [matmul_gflops()]
    results = []
    for n in args.params:  # the matmul is measured again after each size: the best rate is the reference
        results.append(run(n, args.reps, [i for i in args.impl if i == "native" or n <= args.pytorch_max_params],
                           args.memory))
        rates.append(matmul_gflops())
    print(f"machine: {machine}")
    ref = max(rates)
    print(f"2048^3 float32 matmul: {', '.join(f'{r:.1f}' for r in rates)} GFLOP/s (before, then after each size); "
          f"% matmul is against the best, {ref:.1f}")
    print(f"{'params':>10} {'impl':>9} {'step ms':>9} {'Adam ms':>8} {'x Adam':>7} {'GFLOP/s':>8} {'% matmul':>9} "
          f"{'state B/p':>9} {'step peak B/p':>13}")
    for r in results:
        for impl in args.impl:
            if impl not in r:
                continue
            x = r[impl]
            mem = x.get("peak_step_bytes_per_param")
            print(f"{r['params']:>10} {impl:>9} {x['step_ms']:>9.1f} {r['adam_foreach_step_ms']:>8.2f} "
                  f"{x['ratio_to_adam']:>6.0f}x {x['gflops']:>8.2f} {100 * x['gflops'] / ref:>8.1f}% "
                  f"{x['state_bytes_per_param']:>9.0f} {'-' if mem is None else f'{mem:.1f}':>13}")
    print(f"Adam state: {results[0]['adam_state_bytes_per_param']:.0f} B/param; "
          f"LSTM FLOPs per parameter per step: {results[0]['lstm_flops_per_param']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "matmul_gflops": rates, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
