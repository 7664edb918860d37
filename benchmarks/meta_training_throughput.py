"""Meta-training throughput of each implementation against a plain reference written the obvious way.

Usage::

    python benchmarks/meta_training_throughput.py --data-dir ../shared/data
    python benchmarks/meta_training_throughput.py --data-dir ../shared/data --tasks 8 --reps 3 --json out.json

Family: the paper's MLP (784-20-10, sigmoid, batch 128) on Fashion-MNIST. One outer step =
one truncation of ``--unroll`` inner steps on each of ``--tasks`` tasks, meta-loss backward
included. Variants, all timed interleaved in one process:

- ``reference``: the obvious way: one task after the other, the textbook LSTM cell per tensor
  (``impl="reference"``: separate input/recurrent matmuls, one PyTorch op per gate);
- ``batched``: one task at a time, one LSTM call per role in PyTorch ops (``impl="batched"``);
- ``native``: one task at a time, fused LSTM pointwise kernel forward and backward
  (``impl="native"``, what the trainer uses by default);
- ``stacked``: all tasks stacked into one (``StackedMLPTask``) on the native path.

Reports unrolled inner steps per second, the ratio to ``reference``, the largest relative
difference of each meta-gradient from the reference's, and peak memory (max RSS) of one
truncation against the unroll length and of a whole horizon (bounded in the horizon).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from learnedopt import UpdateNetworkConfig, UpdateNetworks
from learnedopt.training.batched import StackedMLPTask
from learnedopt.training.tasks import MLPFamily
from learnedopt.training.trainer import truncated_unroll


def sample_tasks(n: int, data_dir: str | None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    family = MLPFamily("fashion_mnist", data_dir=data_dir)
    tasks = [family.sample(generator) for _ in range(n)]
    scales = [float(t.loss(t.init_params(), 0)) for t in tasks]
    return tasks, scales


def plain_meta_gradient(nets, tasks, scales, unroll, impl):
    """One task after the other, each unrolled and backpropagated on its own."""
    for task, scale in zip(tasks, scales):
        params = task.init_params()
        roles = [nets.resolve_role(None, p) for p in params]
        loss, _, _ = truncated_unroll(nets, task, params, None, roles, 0, unroll, impl=impl)
        (loss / scale).backward()


def stacked_meta_gradient(nets, tasks, scales, unroll, impl="native"):
    stacked = StackedMLPTask(tasks, scales)
    params = stacked.init_params()
    roles = [nets.resolve_role(None, p[0]) for p in params]
    loss, _, _ = truncated_unroll(nets, stacked, params, None, roles, 0, unroll, impl=impl)
    loss.backward()


VARIANTS = {
    "reference": lambda *a: plain_meta_gradient(*a, impl="reference"),
    "batched": lambda *a: plain_meta_gradient(*a, impl="batched"),
    "native": lambda *a: plain_meta_gradient(*a, impl="native"),
    "stacked": stacked_meta_gradient,
}


def grads_of(nets):
    return torch.cat([p.grad.reshape(-1) for p in nets.parameters()])


def measure(args) -> dict:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"]))
    tasks, scales = sample_tasks(args.tasks, args.data_dir)
    grads = {}
    for name, fn in VARIANTS.items():  # same meta-gradient? (also warms every path up)
        nets.zero_grad()
        fn(nets, tasks, scales, args.unroll)
        grads[name] = grads_of(nets).clone()
    ref = grads["reference"]
    timings: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):  # interleaved, so noise hits all alike
        for name, fn in VARIANTS.items():
            nets.zero_grad()
            t0 = time.perf_counter()
            fn(nets, tasks, scales, args.unroll)
            timings[name].append(time.perf_counter() - t0)
    inner = args.tasks * args.unroll
    rates = {name: inner / min(t) for name, t in timings.items()}
    return {
        "tasks": args.tasks,
        "unroll": args.unroll,
        "inner_steps_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_reference": {k: round(v / rates["reference"], 2) for k, v in rates.items()},
        "meta_gradient_max_rel_diff": {k: float((g - ref).abs().max() / ref.abs().max()) for k, g in grads.items()},
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(unroll: int, horizon: int, tasks: int, data_dir: str | None) -> None:
    """Peak resident memory above the starting point while unrolling a whole horizon."""
    import threading

    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"]))
    task_list, scales = sample_tasks(tasks, data_dir)
    stacked = StackedMLPTask(task_list, scales)
    params = stacked.init_params()
    roles = [nets.resolve_role(None, p[0]) for p in params]
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    states = None
    for start in range(0, horizon, unroll):  # truncations: detach between them
        loss, params, states = truncated_unroll(nets, stacked, params, states, roles, start, unroll, impl="native")
        loss.backward()
        params = [p.detach() for p in params]
        states = [{k: v.detach() for k, v in s.items()} for s in states]
    done.set()
    sampler.join()
    print(json.dumps({"unroll": unroll, "horizon": horizon, "peak_growth_mb": round((peak[0] - base) / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child, args.tasks, args.data_dir)
        return
    result = measure(args)
    memory = []
    for unroll, horizon in ((5, 5), (10, 10), (20, 20), (20, 100), (20, 200)):
        cmd = [sys.executable, __file__, "--tasks", str(args.tasks), "--memory-child", str(unroll), str(horizon)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory.append(json.loads(out.strip().splitlines()[-1]))
    machine = {"cpu": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__}
    print(f"machine: {machine}")
    print(f"MLP 784-20-10 sigmoid, batch 128, {args.tasks} tasks x {args.unroll}-step truncation, backward included")
    for name in VARIANTS:
        print(f"  {name:<10}: {result['inner_steps_per_s'][name]:8.1f} inner steps/s  "
              f"({result['ratio_to_reference'][name]:.2f}x reference; meta-gradient rel. diff "
              f"{result['meta_gradient_max_rel_diff'][name]:.1e})")
    print("peak memory growth (RSS sampled every 2 ms) of stacked meta-training (native):")
    for m in memory:
        print(f"  unroll {m['unroll']:>3}, horizon {m['horizon']:>3}: {m['peak_growth_mb']:8.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "throughput": result, "memory": memory}, f, indent=2)


if __name__ == "__main__":
    main()
