"""Side-by-side table of held-out-suite results (the JSON files `heldout_suite.py` writes).

Usage::

    python benchmarks/compare_heldout.py default=docs/heldout/heldout.json \\
        wide=docs/heldout/candidates/default-wide.json

Prints a Markdown table: each task's loss at the suite's step for every optimizer, Adam(1e-3) and
per-task tuned Adam, then the wins against both for each optimizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=path/to/heldout.json")
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"write each run as NAME=PATH, got {spec!r}")
        runs[name] = {r["task"]: r for r in json.loads(Path(path).read_text())["results"]}
    first = next(iter(runs.values()))
    tasks = list(first)
    names = list(runs)
    print("| task | " + " | ".join(names) + " | Adam(1e-3) | tuned Adam |")
    print("| --- |" + " --- |" * (len(names) + 2))
    for task in tasks:
        ref = first[task]
        cells = [f"{runs[n][task]['lstm']:.4g}" if task in runs[n] else "-" for n in names]
        print(f"| {task} | " + " | ".join(cells) + f" | {ref['adam_1e-3']:.4g} | {ref['adam_tuned']:.4g} |")
    wins = []
    for n in names:
        rows = list(runs[n].values())
        beat = sum(r["lstm"] < r["adam_1e-3"] for r in rows)
        beat_tuned = sum(r["lstm"] < r["adam_tuned"] for r in rows)
        diverged = sum(r["lstm_10x_diverged"] for r in rows)
        wins.append(f"{beat}/{len(rows)}, {beat_tuned}/{len(rows)}, {diverged} diverged")
    print("| wins vs Adam(1e-3), vs tuned Adam; long run | " + " | ".join(wins) + " | | |")


if __name__ == "__main__":
    main()
