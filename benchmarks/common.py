"""Pieces the benchmark scripts share: the thread setting and the machine line of their reports."""

from __future__ import annotations

import argparse
import os
import platform

import torch


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as the recorded results; two suites at once "
                             "with more threads than cores each run several times slower)")


def machine_line() -> str:
    """The machine as the reports name it, e.g. ``x86_64, 2 cores, torch 2.13.0+cpu, 1 threads``."""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
