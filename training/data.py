"""Data sets for meta-training tasks, read from a local directory (nothing is downloaded here)."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATA_ENV", "data_dir", "load_fashion_mnist", "download_fashion_mnist", "FASHION_MNIST_FILES"]

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


#: Where :func:`download_fashion_mnist` fetches the original files from.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def download_fashion_mnist(root: str | None = None, *, timeout: float = 30.0) -> Path:
    """Fetch the four Fashion-MNIST files into ``<data dir>/fashion-mnist/`` (needs internet)."""
    import urllib.request

    from learnedopt.serialization import atomic_write

    folder = data_dir(root) / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name in (n for pair in FASHION_MNIST_FILES.values() for n in pair):
        if (folder / name).is_file():
            continue
        url = FASHION_MNIST_URL + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except OSError as err:
            raise FileNotFoundError(
                f"could not download {url} ({err}). Without internet, copy the four Fashion-MNIST "
                f".gz files into {folder} yourself (e.g. from Debian's dataset-fashion-mnist)."
            ) from None
        atomic_write({folder / name: lambda tmp, payload=payload: Path(tmp).write_bytes(payload)})
    return folder


@lru_cache(maxsize=4)
def load_fashion_mnist(
    split: str = "train", root: str | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``(N, 784)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Looks in ``<data dir>/fashion-mnist/`` (see :func:`data_dir`) for the four original IDX ``.gz``
    files; with ``download=True`` missing files are fetched first (needs internet).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = data_dir(root) / "fashion-mnist"
    images_name, labels_name = FASHION_MNIST_FILES[split]
    missing = [n for n in (images_name, labels_name) if not (folder / n).is_file()]
    if missing and download:
        download_fashion_mnist(root)
        missing = []
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {folder}. Put the original IDX .gz files "
            f"there (from https://github.com/zalandoresearch/fashion-mnist or Debian's "
            f"dataset-fashion-mnist), point --data-dir / ${DATA_ENV} at a folder holding "
            "fashion-mnist/, or download them with --family-kwargs '{\"download\": true}' (needs internet)."
        )
    images = _read_idx(folder / images_name)
    labels = _read_idx(folder / labels_name)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
