"""Data sets for meta-training tasks, read from a local directory (nothing is downloaded here)."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATA_ENV", "data_dir", "load_fashion_mnist", "FASHION_MNIST_FILES"]

#: Environment variable naming the data directory (overridden by an explicit argument).
DATA_ENV = "LEARNEDOPT_DATA_DIR"

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path``, else ``$LEARNEDOPT_DATA_DIR``, else ``~/.cache/learnedopt/data``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "learnedopt" / "data"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "train", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``(N, 784)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Looks in ``<data dir>/fashion-mnist/`` (see :func:`data_dir`) for the four original IDX ``.gz``
    files.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = data_dir(root) / "fashion-mnist"
    images_name, labels_name = FASHION_MNIST_FILES[split]
    missing = [n for n in (images_name, labels_name) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {folder}. Put the original IDX .gz files "
            f"there (from https://github.com/zalandoresearch/fashion-mnist or Debian's "
            f"dataset-fashion-mnist), or point --data-dir / ${DATA_ENV} at a folder holding "
            "fashion-mnist/."
        )
    images = _read_idx(folder / images_name)
    labels = _read_idx(folder / labels_name)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
