"""learnedopt-train: user families, interrupt-safe resume, data-parallel runs, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learnedopt import LSTMOptimizer
from learnedopt.training import MetaTrainConfig, QuadraticFamily, meta_train, resolve_family
from learnedopt.training.meta_train import main
from learnedopt.training.trainer import ConfigMismatchError, MetaTrainer, RunExistsError

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SMALL = ["--outer-steps", "12", "--meta-batch", "4", "--horizon", "20", "--unroll", "10", "--eval-every", "6",
         "--eval-tasks", "2", "--checkpoint-every", "1", "--final-eval-tasks", "2", "--baseline-lrs", "0.01,0.1",
         "--no-progress", "--hidden-size", "8"]


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(EXAMPLES), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "learnedopt.training.meta_train", *args],
                          env=full_env, capture_output=True, text=True, **kw)


def test_user_family_from_the_command_line_beats_adam(tmp_path: Path) -> None:
    out = tmp_path / "linreg"
    result = _cli(["--task-family", "my_family:LinearRegressionFamily", "--out", str(out), *SMALL])
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "README.md", "train_log.jsonl", "checkpoint.pt", "DONE"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["command"].startswith("learnedopt-train --task-family my_family:LinearRegressionFamily")
    (result_vs_adam,) = config["training"]["results_vs_adam"].values()
    assert result_vs_adam["lstm"] < result_vs_adam["adam_lr0.001"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in log if "meta_loss" in r] == list(range(12))
    assert sum("eval_final_loss" in r for r in log) == 2
    # the result is a pretrained directory
    model = torch.nn.Linear(8, 1)
    LSTMOptimizer(model.parameters(), pretrained=str(out))


def test_user_family_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from my_family import LinearRegressionFamily

    nets = meta_train(LinearRegressionFamily(), tmp_path / "py", outer_steps=4, meta_batch=2, horizon=20, unroll=10,
                      eval_every=0, eval_tasks=2, baseline_lrs=[0.1], final_eval_tasks=2, progress=False,
                      networks={"hidden_size": 8})
    assert (tmp_path / "py" / "model.safetensors").is_file()
    assert nets.config.training["task_family"] == "my_family:LinearRegressionFamily"


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    args = ["--task-family", "quadratic", *SMALL, "--outer-steps", "30"]
    reference = _cli([*args, "--out", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "learnedopt.training.meta_train", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-run, once a few checkpoints have been written
        if log.is_file() and log.read_text().count("meta_loss") >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists(), "the run finished before it could be killed"
    resumed = _cli([*args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["outer_step"] for line in log.read_text().splitlines() if "meta_loss" in line]
    assert steps == list(range(30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path: Path) -> None:
    args = ["--task-family", "quadratic", *SMALL, "--outer-steps", "6", "--checkpoint-every", "3"]
    single = _cli([*args, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES), OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "learnedopt.training.meta_train", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert "2 process(es)" in config["training"]["machine"]


# ---------------------------------------------------------------------- bad input
def test_family_that_cannot_be_imported() -> None:
    with pytest.raises(ImportError, match="cannot import module 'no_such_module'"):
        resolve_family("no_such_module:Family")
    with pytest.raises(ImportError, match="module 'json' has no attribute 'Nope'"):
        resolve_family("json:Nope")
    with pytest.raises(ValueError, match="unknown task family 'nope'; built-in families"):
        resolve_family("nope")
    result = _cli(["--task-family", "no_such_module:Family", "--out", "unused"])
    assert result.returncode == 2 and "cannot import module 'no_such_module'" in result.stderr


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    args = ["--task-family", "quadratic", *SMALL, "--outer-steps", "2", "--out", str(tmp_path / "run")]
    assert _cli(args).returncode == 0
    again = _cli(args)
    assert again.returncode == 2 and "already holds a meta-training run; pass --resume" in again.stderr
    assert _cli([*args, "--overwrite"]).returncode == 0


def test_resume_with_a_different_configuration_is_refused(tmp_path: Path) -> None:
    config = MetaTrainConfig(task_family="quadratic", outer_steps=2, meta_batch=2, horizon=20, unroll=10,
                             eval_every=0, eval_tasks=1, baseline_lrs=[0.1])
    MetaTrainer(config, tmp_path, progress=False).run()
    changed = MetaTrainConfig(**{**config.to_dict(), "meta_lr": 0.01, "unroll": 5})
    with pytest.raises(ConfigMismatchError, match=r"meta_lr: checkpoint 0.003 vs now 0.01; unroll: checkpoint 10 vs now 5"):
        MetaTrainer(changed, tmp_path, resume=True, progress=False)
    with pytest.raises(RunExistsError):
        MetaTrainer(config, tmp_path, progress=False)


class _NaNFamily(QuadraticFamily):
    def sample(self, generator):
        task = super().sample(generator)
        task.loss = lambda params, step: (task.w @ params[0] - task.y).pow(2).sum() * float("nan")
        return task


def test_nonfinite_meta_loss_stops_with_a_clear_message_and_no_poisoned_checkpoint(tmp_path: Path) -> None:
    config = MetaTrainConfig(task_family="quadratic", outer_steps=10, meta_batch=2, horizon=20, unroll=10,
                             eval_every=0, eval_tasks=1, baseline_lrs=[0.1], max_nonfinite=3, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="3 outer steps in a row had a non-finite meta-loss"):
        MetaTrainer(config, tmp_path, family=_NaNFamily(), progress=False).run()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # written after skipped steps
    assert all(torch.isfinite(v).all() for v in saved["networks"].values())
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_nonfinite", False) for r in log) == 3


def test_loss_that_is_not_differentiable_is_reported(tmp_path: Path) -> None:
    class Detached(QuadraticFamily):
        def sample(self, generator):
            task = super().sample(generator)
            task.loss = lambda params, step: (task.w @ params[0].detach() - task.y).pow(2).sum()
            return task

    config = MetaTrainConfig(task_family="quadratic", outer_steps=1, meta_batch=1, horizon=10, unroll=10,
                             eval_every=0, eval_tasks=1, baselines=[])
    with pytest.raises(ValueError, match="does not depend on its parameters differentiably"):
        MetaTrainer(config, tmp_path, family=Detached(), progress=False).run()


def test_config_file_supplies_every_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('task_family = "quadratic"\nouter_steps = 3\nmeta_batch = 2\nhorizon = 20\nunroll = 10\n'
                   'eval_every = 0\neval_tasks = 1\nbaseline_lrs = [0.1]\nfinal_eval_tasks = 1\n'
                   f'out = "{tmp_path / "from-file"}"\nhidden_size = 6\n')
    assert main(["--config", str(cfg), "--no-progress", "--outer-steps", "2"]) == 0
    config = json.loads((tmp_path / "from-file" / "config.json").read_text())
    assert config["hidden_size"] == 6 and config["training"]["settings"]["outer_steps"] == 2


def test_nominal_step_size_learns_faster_than_the_weights() -> None:
    from learnedopt import UpdateNetworkConfig, UpdateNetworks
    from learnedopt.training.trainer import NOMINAL_META_LR_SCALE, _meta_param_groups

    networks = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"], nominal_momentum=0.9))
    groups = _meta_param_groups(networks, 1e-3)
    assert [p is networks.dense.nominal_log_lr or p is networks.bias.nominal_log_lr for p in groups[1]["params"]] == [True, True]
    assert groups[1]["lr"] == pytest.approx(1e-3 * NOMINAL_META_LR_SCALE)
    assert len(groups[0]["params"]) + 2 == len(list(networks.parameters()))
    assert len(_meta_param_groups(UpdateNetworks(), 1e-3)) == 1
    scheduled = UpdateNetworks(UpdateNetworkConfig(nominal_momentum=0.9, schedule="inverse_time"))
    fast = _meta_param_groups(scheduled, 1e-3)[1]["params"]
    assert fast[0] is scheduled.dense.nominal_log_lr and fast[1] is scheduled.dense.schedule_log_rate
