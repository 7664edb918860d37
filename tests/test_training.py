"""The minimal truncated-BPTT meta-trainer and its task families."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from learnedopt import LSTMOptimizer, UpdateNetworkConfig, UpdateNetworks, lstm_update
from learnedopt.training.data import load_fashion_mnist
from learnedopt.training import MetaTrainConfig, MetaTrainer, evaluate, truncated_unroll
from learnedopt.training.trainer import ConfigMismatchError
from learnedopt.training.tasks import MLPFamily, MixtureFamily, QuadraticFamily

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _mean_final_loss(networks: UpdateNetworks, seed: int = 99, tasks: int = 8, steps: int = 20) -> float:
    generator = torch.Generator().manual_seed(seed)
    family = QuadraticFamily()
    finals = []
    for _ in range(tasks):
        task = family.sample(generator)
        finals.append(evaluate(task, lambda ps: LSTMOptimizer(ps, networks=networks), steps)[-1])
    return sum(finals) / len(finals)


def test_meta_training_improves_the_optimizer_on_held_out_quadratics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = UpdateNetworks(UpdateNetworkConfig(roles=["dense"]))
    before = _mean_final_loss(initial)
    config = MetaTrainConfig(task_family="quadratic", outer_steps=60, meta_batch=4, horizon=20, unroll=10,
                             meta_lr=1e-2, seed=0, eval_every=0, eval_tasks=2, baseline_lrs=[0.1],
                             networks={"roles": ["dense"]})
    trained = MetaTrainer(config, tmp_path, progress=False).run()
    after = _mean_final_loss(trained)
    assert after < 0.7 * before, (before, after)


SCHEDULED = {"nominal_momentum": 0.9, "nominal_correction": "scale", "schedule": "inverse_time"}


@pytest.mark.parametrize("fields", [{}, SCHEDULED], ids=["paper", "nominal-schedule"])
def test_truncated_unroll_uses_the_optimizers_update(fields: dict) -> None:
    """The unroll's final parameters equal what LSTMOptimizer.step produces on the same task
    (with a schedule: the unroll's step index and the optimizer's step count agree)."""
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense"], **fields)).double()
    if fields:
        with torch.no_grad():
            nets.dense.schedule_log_rate.fill_(-1.0)  # a strong decay, so an off-by-one would show
    task = QuadraticFamily().sample(torch.Generator().manual_seed(3))
    task.w, task.y, task.theta0 = task.w.double(), task.y.double(), task.theta0.double()
    _, params, states = truncated_unroll(nets, task, task.init_params(), None, ["dense"], 0, 2)
    _, params, _ = truncated_unroll(nets, task, params, states, ["dense"], 2, 3)
    p = task.init_params()[0].requires_grad_()
    opt = LSTMOptimizer([p], networks=nets)
    for t in range(5):
        opt.zero_grad()
        task.loss([p], t).backward()
        opt.step()
    torch.testing.assert_close(params[0].detach(), p.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fields", [{}, SCHEDULED], ids=["paper", "nominal-schedule"])
def test_meta_gradient_reaches_every_network_weight(fields: dict) -> None:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"], **fields))
    task = MLPFamily("synthetic", hidden=((8,),)).sample(torch.Generator().manual_seed(0))
    roles = [nets.resolve_role(None, p) for p in task.init_params()]
    loss, _, _ = truncated_unroll(nets, task, task.init_params(), None, roles, 0, 3)
    loss.backward()
    for name, w in nets.named_parameters():
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0, name


def test_non_scalar_task_loss_is_rejected() -> None:
    class Vector(QuadraticFamily):
        def sample(self, generator):
            task = super().sample(generator)
            task.loss = lambda params, step: task.w @ params[0] - task.y
            return task

    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense"]))
    task = Vector().sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="must be a scalar"):
        truncated_unroll(nets, task, task.init_params(), None, ["dense"], 0, 2)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="horizon \\(30\\) must be a multiple of unroll \\(20\\)"):
        MetaTrainConfig(horizon=30, unroll=20)
    with pytest.raises(ValueError, match="meta_batch must be a positive integer, got 0"):
        MetaTrainConfig(meta_batch=0)
    with pytest.raises(ValueError, match="at least one family"):
        MixtureFamily([])


def test_missing_data_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*LEARNEDOPT_DATA_DIR"):
        load_fashion_mnist("train", str(tmp_path))


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(100))
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("train", str(tmp_path))


@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(), reason="Fashion-MNIST not available")
def test_fashion_mnist_mlp_task_is_the_papers_setup() -> None:
    x, y = load_fashion_mnist("train", str(SHARED_DATA))
    assert x.shape == (60000, 784) and y.shape == (60000,) and 0 <= x.min() and x.max() <= 1
    assert set(y.unique().tolist()) == set(range(10))
    task = MLPFamily("fashion_mnist", data_dir=str(SHARED_DATA)).sample(torch.Generator().manual_seed(0))
    shapes = [tuple(p.shape) for p in task.init_params()]
    assert shapes == [(20, 784), (20,), (10, 20), (10,)]
    assert task.batch(0)[0].shape == (128, 784)
    assert abs(float(task.eval_loss(task.init_params())) - 2.3) < 0.3


def test_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="could not download .*copy the four Fashion-MNIST"):
        load_fashion_mnist("train", str(tmp_path), True)
    assert not list((tmp_path / "fashion-mnist").iterdir())  # nothing half-written


def test_conv_family_trains_conv_and_dense_networks_together() -> None:
    from learnedopt.training import ConvFamily

    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["conv", "dense"], hidden_size=6))
    task = ConvFamily("synthetic", image_size=8, channels=(4,)).sample(torch.Generator().manual_seed(0))
    params = task.init_params()
    roles = [nets.resolve_role(None, p) for p in params]
    assert roles == ["conv", "dense", "conv", "dense", "dense", "dense"]
    loss, _, _ = truncated_unroll(nets, task, params, None, roles, 0, 3)
    loss.backward()
    for role in ("conv", "dense"):
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in getattr(nets, role).parameters()), role


def test_horizon_curriculum_doubles_up_to_the_horizon() -> None:
    config = MetaTrainConfig(horizon=100, unroll=20, curriculum_start=20, curriculum_every=10)
    assert [config.horizon_at(s) for s in (0, 9, 10, 20, 30, 1000)] == [20, 20, 40, 80, 100, 100]
    assert MetaTrainConfig(horizon=100, unroll=20).horizon_at(0) == 100


def test_second_order_meta_gradient_differs_and_is_finite() -> None:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense"], hidden_size=6)).double()
    task = QuadraticFamily().sample(torch.Generator().manual_seed(1))
    task.w, task.y, task.theta0 = task.w.double(), task.y.double(), task.theta0.double()
    grads = {}
    for order in (False, True):
        nets.zero_grad()
        loss, _, _ = truncated_unroll(nets, task, task.init_params(), None, ["dense"], 0, 4, second_order=order)
        loss.backward()
        grads[order] = torch.cat([w.grad.reshape(-1) for w in nets.parameters()])
    assert torch.isfinite(grads[True]).all()
    assert not torch.allclose(grads[False], grads[True])


def _small_mlp_config(**overrides) -> MetaTrainConfig:
    settings = dict(task_family="mlp-synthetic", outer_steps=3, meta_batch=4, horizon=10, unroll=5, seed=0,
                    eval_every=0, eval_tasks=1, baseline_lrs=[0.1], baselines=["adam"],
                    family_kwargs={"hidden": [[8]], "activations": ["tanh"], "synthetic_dims": [12], "batch_sizes": [16]},
                    networks={"roles": ["dense", "bias"], "hidden_size": 6})
    settings.update(overrides)
    return MetaTrainConfig(**settings)


def test_stacked_slots_give_the_same_training(tmp_path: Path) -> None:
    """Slots of one MLP architecture are unrolled as one stacked task: same weights as one by one."""
    stacked_trainer = MetaTrainer(_small_mlp_config(stack_tasks=True), tmp_path / "stacked", progress=False)
    stacked = stacked_trainer.run()
    assert [len(g) for g in stacked_trainer._stack_groups()] == [4]
    alone_trainer = MetaTrainer(_small_mlp_config(), tmp_path / "alone", progress=False)
    alone = alone_trainer.run()
    assert [len(g) for g in alone_trainer._stack_groups()] == [1, 1, 1, 1]
    for a, b in zip(stacked.parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_init_from_fine_tunes_pretrained_networks(tmp_path: Path) -> None:
    start = UpdateNetworks(UpdateNetworkConfig(roles=["dense", "bias"], hidden_size=6))
    start.save_pretrained(tmp_path / "start")
    config = _small_mlp_config(outer_steps=1, networks={}, init_from=str(tmp_path / "start"), meta_lr=1e-12)
    tuned = MetaTrainer(config, tmp_path / "run", progress=False).run()
    assert tuned.config.hidden_size == 6 and tuned.roles == ["dense", "bias"]
    for a, b in zip(start.parameters(), tuned.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # a 1e-12 learning rate barely moves them
    clash = _small_mlp_config(init_from=str(tmp_path / "start"), networks={"hidden_size": 8})
    start_dir = str(tmp_path / "start")
    message = (f"init_from={start_dir!r} has a different architecture (hidden_size: {start_dir} has 6, settings ask "
               "for 8); drop those network settings to fine-tune it, or leave out init_from to train from scratch")
    with pytest.raises(ConfigMismatchError, match=f"^{re.escape(message)}$"):
        MetaTrainer(clash, tmp_path / "clash", progress=False).run()


def test_norm_and_rescaled_families() -> None:
    from learnedopt.training.tasks import NormMLPFamily, RescaledFamily, RescaledTask

    generator = torch.Generator().manual_seed(0)
    family = NormMLPFamily("synthetic", objective=["regression"], norms=["layer"], hidden=[[8]])
    task = family.sample(generator)
    params = task.init_params()
    assert [p.dim() for p in params] == [2, 1, 1, 1, 2, 1]  # linear, LayerNorm scale and shift, linear
    assert torch.isfinite(task.loss(params, 0)) and task.loss(params, 0) > 0
    rescaled = RescaledTask(task, [10.0] * len(params))
    phi = rescaled.init_params()
    torch.testing.assert_close(rescaled.loss(phi, 3), task.loss(params, 3))  # the same problem
    torch.testing.assert_close(phi[0] * 10, params[0])
    always = RescaledFamily(family, probability=1.0, log10_range=1.0)
    assert isinstance(always.sample(generator), RescaledTask)
    with pytest.raises(ValueError, match=re.escape(
            "objective must be a non-empty list from ['classification', 'regression'], got ['ranking']") + "$"):
        NormMLPFamily(objective=["ranking"])
    with pytest.raises(ValueError, match=r"^dataset must be 'fashion_mnist' or 'synthetic', got 'cifar'$"):
        NormMLPFamily(dataset="cifar")
    with pytest.raises(ValueError, match=re.escape("probability must be in [0, 1] and log10_range >= 0") + "$"):
        RescaledFamily(family, probability=2.0)


def test_log_meta_objective_sums_log_losses() -> None:
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["dense"], hidden_size=6))
    task = QuadraticFamily().sample(torch.Generator().manual_seed(1))
    plain, params, _ = truncated_unroll(nets, task, task.init_params(), None, ["dense"], 0, 3)
    logged, params_log, _ = truncated_unroll(nets, task, task.init_params(), None, ["dense"], 0, 3, meta_objective="log")
    torch.testing.assert_close(params[0], params_log[0])  # the objective changes only the meta-loss
    assert logged.requires_grad
    assert float(logged.detach()) < float(plain.detach())  # log of losses > 1 is smaller than the losses
    negative = type("Negative", (type(task),), {"loss": lambda self, ps, step: -(ps[0] ** 2).sum() - 1})(task.w, task.y, task.theta0)
    with pytest.raises(ValueError, match=r"^meta_objective='log' needs positive losses, but task 'quadratic' "
                                         r"returned -[0-9.e+]+; use meta_objective='loss' for this family$"):
        truncated_unroll(nets, negative, negative.init_params(), None, ["dense"], 0, 2, meta_objective="log")
    with pytest.raises(ValueError, match=r"^meta_objective must be 'loss' or 'log', got 'final'$"):
        MetaTrainConfig(meta_objective="final")


def test_evaluate_every_records_a_subsampled_curve() -> None:
    task = QuadraticFamily().sample(torch.Generator().manual_seed(3))
    full = evaluate(task, lambda ps: torch.optim.SGD(ps, lr=0.01), 20)
    sparse = evaluate(task, lambda ps: torch.optim.SGD(ps, lr=0.01), 20, every=5)
    assert sparse == full[::5]
    with pytest.raises(ValueError, match=r"^every \(3\) must be a positive divisor of steps \(20\)$"):
        evaluate(task, lambda ps: torch.optim.SGD(ps, lr=0.01), 20, every=3)
