"""Meta-training throughput: batched (stacked) tasks against a plain one-task-at-a-time loop.

Usage::

    python benchmarks/meta_training_throughput.py --data-dir ../shared/data
    python benchmarks/meta_training_throughput.py --data-dir ../shared/data --tasks 8 --reps 3 --json out.json

Family: the paper's MLP (784-20-10, sigmoid, batch 128) on Fashion-MNIST. One outer step =
one truncation of ``--unroll`` inner steps on each of ``--tasks`` tasks, meta-loss backward
included. Reports unrolled inner steps per second for both, their ratio, the largest relative
difference between the two meta-gradients, and peak memory (max RSS) of one truncation against
the unroll length and of a whole horizon (memory stays bounded in the horizon).
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


def plain_meta_gradient(nets, tasks, scales, unroll):
    """The obvious way: one task after the other, each unrolled and backpropagated on its own."""
    for task, scale in zip(tasks, scales):
        params = task.init_params()
        roles = [nets.resolve_role(None, p) for p in params]
        loss, _, _ = truncated_unroll(nets, task, params, None, roles, 0, unroll)
        (loss / scale).backward()


def batched_meta_gradient(nets, tasks, scales, unroll):
    stacked = StackedMLPTask(tasks, scales)
    params = stacked.init_params()
    roles = [nets.resolve_role(None, p[0]) for p in params]
    loss, _, _ = truncated_unroll(nets, stacked, params, None, roles, 0, unroll)
    loss.backward()


def grads_of(nets):
    return torch.cat([p.grad.reshape(-1) for p in nets.parameters()])


def measure(args) -> dict:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"]))
    tasks, scales = sample_tasks(args.tasks, args.data_dir)
    # same meta-gradient?
    nets.zero_grad()
    plain_meta_gradient(nets, tasks, scales, args.unroll)
    g_plain = grads_of(nets).clone()
    nets.zero_grad()
    batched_meta_gradient(nets, tasks, scales, args.unroll)
    g_batched = grads_of(nets).clone()
    rel = float((g_plain - g_batched).abs().max() / g_plain.abs().max())
    timings = {"plain": [], "batched": []}
    for _ in range(args.reps):  # interleaved, so noise hits both alike
        for name, fn in (("plain", plain_meta_gradient), ("batched", batched_meta_gradient)):
            nets.zero_grad()
            t0 = time.perf_counter()
            fn(nets, tasks, scales, args.unroll)
            timings[name].append(time.perf_counter() - t0)
    inner = args.tasks * args.unroll
    plain_sps = inner / min(timings["plain"])
    batched_sps = inner / min(timings["batched"])
    return {
        "tasks": args.tasks,
        "unroll": args.unroll,
        "plain_inner_steps_per_s": round(plain_sps, 1),
        "batched_inner_steps_per_s": round(batched_sps, 1),
        "ratio": round(batched_sps / plain_sps, 2),
        "meta_gradient_max_rel_diff": rel,
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
        loss, params, states = truncated_unroll(nets, stacked, params, states, roles, start, unroll)
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
    print(f"  plain loop : {result['plain_inner_steps_per_s']:8.1f} inner steps/s")
    print(f"  batched    : {result['batched_inner_steps_per_s']:8.1f} inner steps/s  ({result['ratio']}x)")
    print(f"  meta-gradients agree to {result['meta_gradient_max_rel_diff']:.1e} (max abs diff / max abs)")
    print("peak memory growth (RSS sampled every 2 ms) of batched meta-training:")
    for m in memory:
        print(f"  unroll {m['unroll']:>3}, horizon {m['horizon']:>3}: {m['peak_growth_mb']:8.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "throughput": result, "memory": memory}, f, indent=2)


if __name__ == "__main__":
    main()
