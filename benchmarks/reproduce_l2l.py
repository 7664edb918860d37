"""Reproduce the L2L paper's comparisons (Andrychowicz et al. 2016, Figure 4 protocol).

For each problem setting, ``--problems`` fresh problems are sampled (seed 2024, never used in
meta-training); SGD, NAG (momentum 0.9), RMSprop and Adam each get the learning rate, from a log
grid, with the best mean final loss at the evaluated horizon; the learned optimizer runs with its
shipped weights and no tuning. Curves are the mean (and standard deviation) over problems of the
full-data training loss.

Usage::

    python benchmarks/reproduce_l2l.py --suite quadratic --problems 20 --out docs/results
    python benchmarks/reproduce_l2l.py --suite mlp --data-dir ../shared/data --out docs/results
    python benchmarks/reproduce_l2l.py --suite generalization --data-dir ../shared/data --also default --out docs/results
    python benchmarks/reproduce_l2l.py --suite long --data-dir ../shared/data --out docs/results
    python benchmarks/reproduce_l2l.py --suite conv --data-dir ../shared/data --shared runs/conv-shared --out docs/results

Each suite writes ``<out>/<suite>.json``, ``<out>/<suite>.md`` (the table) and ``<out>/<suite>.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from learnedopt import UpdateNetworkConfig, UpdateNetworks
from learnedopt.training.tasks import MLPFamily, QuadraticFamily, TaskFamily
from learnedopt.training.trainer import BASELINES, evaluate, lstm_optimizer_for

from common import add_threads_argument, machine_line

LR_GRID = [10 ** (k / 2) for k in range(-8, 3)]  # 1e-4 ... 10, half-decades


def curves_for(make, tasks, steps, every=1):
    return [evaluate(t, make(t), steps, every) for t in tasks]


def summarize(curves: list[list[float]], at: list[int], every: int = 1) -> dict:
    """Mean and spread at the steps ``at``; curves hold the loss every ``every`` steps."""
    finite = [c for c in curves if all(math.isfinite(v) for v in c)]
    out = {"diverged": len(curves) - len(finite)}
    for t in at:
        values = [c[t // every] if math.isfinite(c[t // every]) else math.inf for c in curves]
        out[f"mean@{t}"] = statistics.fmean(values)
        out[f"std@{t}"] = statistics.pstdev(values) if all(math.isfinite(v) for v in values) else math.inf
    n = len(curves[0])
    out["mean_curve"] = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    out["std_curve"] = [statistics.pstdev([c[i] for c in curves]) for i in range(n)]
    return out


def without_correction(networks: UpdateNetworks) -> UpdateNetworks:
    """A copy whose LSTM heads output zero: what is left is the nominal momentum step alone, at the
    learned step size (the ablation that shows what the LSTM's correction adds)."""
    bare = copy.deepcopy(networks)
    with torch.no_grad():
        for role in bare.roles:
            bare.network(role).head_weight.zero_()
            bare.network(role).head_bias.zero_()
    return bare


def with_config(networks: UpdateNetworks, **fields) -> UpdateNetworks:
    """A copy under a config with ``fields`` changed, keeping the weights the new config has."""
    changed = UpdateNetworks(UpdateNetworkConfig.from_dict({**networks.config.to_dict(), **fields}))
    wanted = changed.state_dict().keys()
    changed.load_state_dict({k: v for k, v in networks.state_dict().items() if k in wanted})
    return changed


def without_schedule(networks: UpdateNetworks) -> UpdateNetworks:
    """A copy with the learned schedule removed (``schedule="constant"``): every step at the
    initial step size (the ablation that shows what the schedule adds)."""
    return with_config(networks, schedule="constant")


def run_setting(name: str, family: TaskFamily, networks: UpdateNetworks, problems: int, steps: int,
                tune_at: int, report_at: list[int], bf16_state: bool = False,
                extra: dict[str, UpdateNetworks] | None = None, every: int = 1) -> dict:
    generator = torch.Generator().manual_seed(2024)
    tasks = [family.sample(generator) for _ in range(problems)]
    result = {"setting": name, "problems": problems, "steps": steps, "tuned_at": tune_at, "report_at": report_at,
              "every": every, "optimizers": {}}
    started = time.time()
    lstm = curves_for(lambda t: lstm_optimizer_for(networks, t), tasks, steps, every)
    result["optimizers"]["LSTM"] = {"lr": None, **summarize(lstm, report_at, every)}
    for label, other in (extra or {}).items():
        curves = curves_for(lambda t: lstm_optimizer_for(other, t), tasks, steps, every)
        result["optimizers"][f"LSTM, {label}"] = {"lr": None, **summarize(curves, report_at, every)}
    if bf16_state:
        lstm16 = curves_for(lambda t: lstm_optimizer_for(networks, t, state_dtype=torch.bfloat16), tasks, steps, every)
        result["optimizers"]["LSTM, bf16 state"] = {"lr": None, **summarize(lstm16, report_at, every)}
    for baseline in ("sgd", "nag", "rmsprop", "adam"):
        best = None
        for lr in LR_GRID:
            curves = curves_for(lambda t, lr=lr: (lambda ps: BASELINES[baseline](ps, lr)), tasks, steps, every)
            finals = [c[tune_at // every] if math.isfinite(c[tune_at // every]) else math.inf for c in curves]
            score = statistics.fmean(finals)
            if best is None or score < best[0]:
                best = (score, lr, curves)
        result["optimizers"][baseline] = {"lr": best[1], **summarize(best[2], report_at, every)}
    result["wall_s"] = round(time.time() - started, 1)
    print(f"{name}: {result['wall_s']} s", flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        report_at = r["report_at"]
        lines.append(f"**{r['setting']}** ({r['problems']} problems; baselines' lr tuned for step {r['tuned_at']})\n")
        head = "| optimizer | lr | " + " | ".join(f"loss at step {t} (mean ± std)" for t in report_at) + " | diverged |"
        lines += [head, "|" + " --- |" * (len(report_at) + 3)]
        best_baseline = {t: min(v[f"mean@{t}"] for k, v in r["optimizers"].items() if not k.startswith("LSTM"))
                         for t in report_at}
        for k, v in r["optimizers"].items():
            cells = []
            for t in report_at:
                cell = f"{v[f'mean@{t}']:.4f} ± {v[f'std@{t}']:.4f}"
                if k.startswith("LSTM"):
                    cell += " (best)" if v[f"mean@{t}"] < best_baseline[t] else ""
                cells.append(cell)
            lr = "-" if v["lr"] is None else f"{v['lr']:.3g}"
            lines.append(f"| {k} | {lr} | " + " | ".join(cells) + f" | {v['diverged']} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for k, v in r["optimizers"].items():
            mean, std = v["mean_curve"], v["std_curve"]
            xs = [i * r.get("every", 1) for i in range(len(mean))]
            label = k if v["lr"] is None else f"{k} (lr {v['lr']:.3g})"
            ax.plot(xs, mean, label=label, lw=2 if k.startswith("LSTM") else 1)
            ax.fill_between(xs, [max(m - s, 1e-8) for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.12)
        ax.set_yscale("log")
        ax.set_title(r["setting"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean ± std over problems)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["quadratic", "mlp", "generalization", "long", "conv"], required=True)
    parser.add_argument("--shared", default=None,
                        help="conv suite: a single-network optimizer meta-trained like l2l-conv, for comparison")
    parser.add_argument("--also", action="append", default=[], metavar="NAME",
                        help="also run this pretrained optimizer (name or directory), untuned; repeatable")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pretrained", default=None, help="default: l2l-quadratic / l2l-mlp")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--bf16-state", action="store_true", help="also run the LSTM with bfloat16 state")
    add_threads_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.suite == "quadratic":
        nets = UpdateNetworks.from_pretrained(args.pretrained or "l2l-quadratic")
        settings = [("quadratic 10-d, 100 steps", QuadraticFamily(), 100, 100, [100])]
    elif args.suite == "mlp":
        nets = UpdateNetworks.from_pretrained(args.pretrained or "l2l-mlp")
        base = MLPFamily("fashion_mnist", data_dir=args.data_dir)
        settings = [("MLP 20 sigmoid, Fashion-MNIST, 200 steps (trained on 100)", base, 200, 100, [100, 200])]
    elif args.suite == "generalization":
        nets = UpdateNetworks.from_pretrained(args.pretrained or "l2l-mlp")
        settings = [
            ("40 hidden units", MLPFamily("fashion_mnist", hidden=((40,),), data_dir=args.data_dir), 100, 100, [100]),
            ("2 hidden layers", MLPFamily("fashion_mnist", hidden=((20, 20),), data_dir=args.data_dir), 100, 100, [100]),
            ("ReLU", MLPFamily("fashion_mnist", activations=("relu",), data_dir=args.data_dir), 100, 100, [100]),
        ]
    elif args.suite == "conv":
        from learnedopt.training.tasks import ConvFamily

        nets = UpdateNetworks.from_pretrained(args.pretrained or "l2l-conv")
        settings = [("conv net, Fashion-MNIST 14x14, 100 steps", ConvFamily(data_dir=args.data_dir), 100, 100, [100])]
    else:  # long: 10x the meta-training horizon; the full-data loss every 10 steps keeps it affordable
        nets = UpdateNetworks.from_pretrained(args.pretrained or "l2l-mlp")
        settings = [("1000 steps (trained on 100)", MLPFamily("fashion_mnist", data_dir=args.data_dir), 1000, 1000,
                     [100, 1000])]
    every = 10 if args.suite == "long" else 1
    extra = {"one shared network": UpdateNetworks.from_pretrained(args.shared)} if args.shared else {}
    for name in args.also:
        extra[f"`{name}` instead (pretrained, untuned)"] = UpdateNetworks.from_pretrained(name)
    scheduled = nets.config.schedule != "constant"
    if nets.config.nominal_momentum is not None:
        label = "head off: its Nesterov step alone, at the learned step size" + (" and schedule" if scheduled else "")
        extra[label] = without_correction(nets)
    if scheduled:
        extra["schedule off: every step at the initial step size"] = without_schedule(nets)
    results = [run_setting(name, fam, nets, args.problems, steps, tune_at, at, args.bf16_state, extra, every)
               for name, fam, steps, tune_at, at in settings]
    machine = machine_line()
    flags = (" --bf16-state" if args.bf16_state else "") + (f" --shared {args.shared}" if args.shared else "")
    flags += "".join(f" --also {name}" for name in args.also)
    md = [f"Generated by `python benchmarks/reproduce_l2l.py --suite {args.suite} --problems {args.problems}{flags}` "
          f"on {machine}.\n", table(results)]
    (out / f"{args.suite}.md").write_text("\n".join(md))
    (out / f"{args.suite}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    plot(results, out / f"{args.suite}.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
