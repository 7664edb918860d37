"""The package as users install it: a wheel (non-editable) carries the shipped weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("learnedopt-*.whl")
    return whl


def test_wheel_contains_shipped_weights_and_training(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.parent.name for p in (ROOT / "pretrained").glob("*/config.json")]
    assert shipped, "no shipped pretrained optimizers found in pretrained/"
    for name in shipped:
        for filename in ("config.json", "model.safetensors", "README.md"):
            assert f"learnedopt/pretrained/{name}/{filename}" in names
    assert "learnedopt/training/meta_train.py" in names
    assert "learnedopt/csrc/lstm_step.cpp" in names  # the native kernel is compiled from it on first use
    # no generic top-level module named `training` or `pretrained`
    assert not any(n.startswith(("training/", "pretrained/")) for n in names)


def test_installed_wheel_loads_default_outside_repo(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import learnedopt, torch; "
        "assert learnedopt.__file__.startswith(%r), learnedopt.__file__; "
        "print(sorted(learnedopt.list_pretrained())); "
        "m = torch.nn.Linear(3, 2); opt = learnedopt.LSTMOptimizer(m.parameters(), impl=%r); "
        "m(torch.randn(4, 3)).sum().backward(); opt.step(); print('ok')"
    ) % (str(target), "native" if shutil.which(os.environ.get("CXX", "g++")) else "batched")
    env = dict(os.environ, PYTHONPATH=str(target), LEARNEDOPT_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "'default'" in result.stdout and result.stdout.strip().endswith("ok")
