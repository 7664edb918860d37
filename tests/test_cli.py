"""The `learnedopt` command (README's main job) and the shipped pretrained optimizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import learnedopt
from learnedopt import LSTMOptimizer, UpdateNetworkConfig, list_pretrained
from learnedopt.cli import main
from learnedopt.serialization import load_from_directory, pretrained_dir

SHIPPED = sorted(list_pretrained())
#: Shipped optimizers whose validation loss is below every tuned baseline's (README says so).
BEATS_TUNED_BASELINES = {"default", "l2l-quadratic", "l2l-mlp", "l2l-conv"}


def test_default_and_paper_quadratic_are_shipped() -> None:
    assert {"default", "l2l-quadratic"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_optimizer_loads_and_records_how_it_was_made(name: str) -> None:
    folder = pretrained_dir() / name
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == learnedopt.FORMAT_VERSION
    assert config["description"] and list_pretrained()[name] == config["description"]
    training = config["training"]
    assert training["command"].startswith("learnedopt-train ")
    assert f"--out pretrained/{name}" in training["command"]
    settings = training["settings"]  # a real run: its configured length is >= 20,000 inner steps
    assert settings["outer_steps"] * settings["unroll"] * settings["meta_batch"] >= 20_000
    # every recorded comparison is a real measurement that beats Adam(lr=1e-3) on average
    for family, result in training["results_vs_adam"].items():
        assert result["lstm"] < result["adam_lr0.001"], (family, result)
    card = (folder / "README.md").read_text()
    assert training["command"] in card and "Adam(lr=1e-3)" in card
    assert (folder / "train_log.jsonl").read_text().count("\n") >= training["settings"]["outer_steps"]
    validation = training["validation"]
    best_baseline = min(b["final_loss"] for b in validation["baselines"].values())
    if name in BEATS_TUNED_BASELINES:  # the claim README and the model card make
        assert validation["lstm_final_loss"] < best_baseline
    nets = load_from_directory(folder)
    assert nets.config == UpdateNetworkConfig.from_dict(config)
    assert all(torch.isfinite(p).all() for p in nets.parameters())


def test_default_optimizer_uses_the_shipped_default() -> None:
    model = torch.nn.Linear(3, 2)
    opt = LSTMOptimizer(model.parameters())
    shipped = load_from_directory(pretrained_dir() / "default")
    for (k, a), (_, b) in zip(opt.networks.state_dict().items(), shipped.state_dict().items()):
        assert torch.equal(a, b), k


def test_main_job_trains_and_beats_adam_on_its_small_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--steps", "60", "--every", "30"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "30", "60"]
    lstm_final, adam_final = float(rows[-1][1]), float(rows[-1][2])
    assert float(rows[0][1]) == float(rows[0][2])  # same model, same start
    assert lstm_final < adam_final < float(rows[0][1])


def test_main_job_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert main(["--steps", "5", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_job_lists_pretrained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from importlib.metadata import entry_points; "
         "print([e.value for e in entry_points(group='console_scripts') if e.name == 'learnedopt'])"],
        capture_output=True, text=True, check=True,
    )
    assert "learnedopt.cli:main" in result.stdout
