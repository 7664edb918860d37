"""LSTMOptimizer against the torch.optim.Optimizer contract (as PyTorch's TestOptimRenewed checks it),
roles, and bad input.

Every optimizer here runs on freshly initialised networks from the ``make_networks`` fixture
(conftest.py), never on the shipped pretrained weights.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

from learnedopt import LSTMOptimizer, init_state, lstm_update

SHAPES = {"conv": (3, 2, 3, 3), "dense": (4, 5), "bias": (4,)}
NONFINITE_MESSAGE = "the gradient has non-finite values (NaN or Inf)"


# ---------------------------------------------------------------------- helpers
def make_params(shapes=tuple(SHAPES.values()), *, dtype=torch.float32, seed=1) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def fill_grads(params, t: int = 0) -> None:
    """Deterministic gradients that depend on the parameters' values (so trajectories diverge if
    any update differs), varied per tensor and per step."""
    for i, p in enumerate(params):
        x = p.detach()
        p.grad = torch.sin(2.0 * x + 0.3 * t + i) + 0.05 * x


def quadratic_loss(params) -> torch.Tensor:
    return sum(((p - 0.25) ** 2).sum() * (i + 1) for i, p in enumerate(params))


def run_steps(opt, params, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        fill_grads(params, t)
        opt.step()


def assert_params_equal(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x.detach(), y.detach())


def assert_states_equal(opt_a, params_a, opt_b, params_b) -> None:
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]), key


def assert_nested_equal(a, b) -> None:
    """Structural equality of state dicts; tensors compared exactly, dtypes included."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_nested_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------------- construction
def test_construct_from_iterable_of_tensors(make_networks):
    params = make_params()
    opt = LSTMOptimizer(iter(params), networks=make_networks())  # a one-shot generator
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["params"] == params
    assert (group["lr"], group["weight_decay"], group["maximize"], group["role"]) == (1.0, 0.0, False, None)
    assert opt.defaults == {"lr": 1.0, "weight_decay": 0.0, "maximize": False, "role": None}


def test_construct_from_named_parameters(make_networks):
    model = nn.Linear(3, 2)
    opt = LSTMOptimizer(model.named_parameters(), networks=make_networks())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_construct_from_groups_with_overrides(make_networks):
    conv, dense, bias = make_params()
    opt = LSTMOptimizer(
        [
            {"params": [conv], "lr": 0.1, "weight_decay": 0.01, "maximize": True, "role": "dense"},
            {"params": [dense, bias]},
        ],
        lr=0.5,
        weight_decay=0.2,
        networks=make_networks(("conv", "dense", "bias")),
    )
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["weight_decay"], g0["maximize"], g0["role"]) == (0.1, 0.01, True, "dense")
    assert (g1["lr"], g1["weight_decay"], g1["maximize"], g1["role"]) == (0.5, 0.2, False, None)
    assert g1["params"] == [dense, bias]


def test_add_param_group_later(make_networks):
    conv, dense, bias = make_params()
    opt = LSTMOptimizer([conv], networks=make_networks(), lr=0.3)
    opt.add_param_group({"params": dense, "lr": 0.7})  # a bare tensor is fine inside a group
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.7]
    assert opt.param_groups[1]["params"] == [dense]


@pytest.mark.parametrize(
    "make_arg, error, message",
    [
        (lambda ps: ps[0], TypeError,
         "params argument given to the optimizer should be an iterable of Tensors or dicts, but got torch.FloatTensor"),
        (lambda ps: [], ValueError, "optimizer got an empty parameter list"),
        (lambda ps: [{"params": set(ps[:1])}], TypeError, "optimizer parameters need to be organized in ordered collections"),
        (lambda ps: [{"params": [ps[0], ps[1]]}, {"params": [ps[1]]}], ValueError,
         "some parameters appear in more than one parameter group"),
        (lambda ps: [ps[0], 3.0], TypeError, "optimizer can only optimize Tensors, but one of the params is float"),
        (lambda ps: [ps[0] * 2], ValueError, "can't optimize a non-leaf Tensor"),
    ],
    ids=["bare-tensor", "empty-list", "set", "overlapping-groups", "non-tensor", "non-leaf"],
)
def test_rejects_bad_params(make_networks, make_arg, error, message):
    with pytest.raises(error, match=re.escape(message)):
        LSTMOptimizer(make_arg(make_params()), networks=make_networks())


def test_duplicate_params_in_one_group_are_rejected(make_networks):
    # torch.optim only warns (and plans to error); a learned optimizer would update it twice per step
    p = make_params()[0]
    with pytest.raises(ValueError, match="lists the same parameter more than once"):
        LSTMOptimizer([p, p], networks=make_networks())


@pytest.mark.parametrize(
    "kwargs, groups, message",
    [
        ({"lr": -1.0}, None, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, None, "Invalid learning rate: nan"),
        ({"lr": "0.1"}, None, "Invalid learning rate: 0.1"),
        ({"lr": torch.tensor([1.0, 2.0])}, None, "Tensor lr must be 1-element"),
        ({"weight_decay": -0.1}, None, "Invalid weight_decay value: -0.1"),
        ({}, {"lr": -0.5}, "Invalid learning rate: -0.5"),
        ({}, {"weight_decay": -2.0}, "Invalid weight_decay value: -2.0"),
        ({"impl": "fused"}, None, "Invalid impl: 'fused'; choose one of ('auto', 'batched', 'compiled', 'native', 'reference')"),
        ({"pretrained": "default"}, None, "pass either pretrained= or networks=, not both"),
    ],
    ids=["lr<0", "lr-nan", "lr-str", "lr-tensor-2", "wd<0", "group-lr<0", "group-wd<0", "impl", "both-networks"],
)
def test_invalid_hyperparameters(make_networks, kwargs, groups, message):
    params = make_params()
    arg = params if groups is None else [{"params": params, **groups}]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LSTMOptimizer(arg, networks=make_networks(), **kwargs)


def test_valid_tensor_lr(make_networks):
    opt = LSTMOptimizer(make_params(), lr=torch.tensor(0.5), networks=make_networks())
    run_steps(opt, opt.param_groups[0]["params"], 1)


def test_networks_must_be_update_networks(make_networks):
    with pytest.raises(TypeError, match="networks must be an UpdateNetworks, got Linear"):
        LSTMOptimizer(make_params(), networks=nn.Linear(2, 2))


# ---------------------------------------------------------------------- step
def test_step_returns_closure_loss(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = quadratic_loss(params)
        loss.backward()
        return loss

    expected = quadratic_loss([p.detach() for p in params])
    first = opt.step(closure)
    assert calls == [True]  # called once, with gradients enabled even though step is no_grad
    assert isinstance(first, torch.Tensor) and torch.equal(first.detach(), expected)
    expected = quadratic_loss([p.detach() for p in params])  # after the first update
    second = opt.step(closure)
    assert calls == [True, True]
    assert torch.equal(second.detach(), expected) and second.item() != first.item()
    assert opt.step() is None  # no closure: returns None


def test_training_loop_runs_and_stays_finite(make_networks):
    # the whole zero_grad/backward/step loop composes (random networks are not trained optimizers,
    # so the loss is not expected to fall)
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks(), lr=1.0)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = quadratic_loss(params)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in params)


def test_params_without_grad_do_not_move(make_networks):
    conv, dense, bias = make_params()
    opt = LSTMOptimizer([conv, dense, bias], networks=make_networks())
    before = dense.detach().clone()
    for t in range(2):
        fill_grads([conv, bias], t)
        opt.step()
    assert torch.equal(dense, before)
    assert dense not in opt.state or len(opt.state[dense]) == 0
    assert set(opt.state[conv]) >= {"step", "lstm", "moments"}
    assert opt.state[conv]["step"].item() == 2


def test_step_without_any_grad_is_a_no_op(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    before = [p.detach().clone() for p in params]
    assert opt.step() is None
    assert_params_equal(params, before)
    assert len(opt.state) == 0


def test_lr_zero_freezes_a_group(make_networks):
    conv, dense, bias = make_params()
    opt = LSTMOptimizer(
        [{"params": [conv, bias], "lr": 0.0, "weight_decay": 0.5}, {"params": [dense]}],
        networks=make_networks(),
    )
    frozen = [conv.detach().clone(), bias.detach().clone()]
    moving = dense.detach().clone()
    run_steps(opt, [conv, dense, bias], 3)
    assert_params_equal([conv, bias], frozen)
    assert not torch.equal(dense, moving)


@pytest.mark.parametrize("impl", ["batched", "reference"])
def test_maximize_equals_minimizing_negated_loss(make_networks, impl):
    networks = make_networks(("conv", "dense", "bias"))
    params_max = make_params()
    params_min = clone_params(params_max)
    opt_max = LSTMOptimizer(params_max, networks=networks, maximize=True, impl=impl)
    opt_min = LSTMOptimizer(params_min, networks=networks, impl=impl)
    for _ in range(3):
        for opt, params, sign in ((opt_max, params_max, 1.0), (opt_min, params_min, -1.0)):
            opt.zero_grad()
            (sign * quadratic_loss(params)).backward()
            opt.step()
    assert_params_equal(params_max, params_min)
    assert_states_equal(opt_max, params_max, opt_min, params_min)


@pytest.mark.parametrize("lr, weight_decay", [(1.0, 0.1), (0.5, 0.3), (0.2, 1.0)])
def test_decoupled_weight_decay_formula(make_networks, lr, weight_decay):
    # same networks, same (fixed) gradients: the LSTM directions agree, so the two trajectories
    # differ in each step exactly by the decay term  -lr * weight_decay * p
    networks = make_networks(dtype=torch.float64)
    params_wd = make_params(dtype=torch.float64)
    params_0 = clone_params(params_wd)
    opt_wd = LSTMOptimizer(params_wd, lr=lr, weight_decay=weight_decay, networks=networks)
    opt_0 = LSTMOptimizer(params_0, lr=lr, networks=networks)
    grads = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params_wd)]
    for _ in range(2):
        old_wd = [p.detach().clone() for p in params_wd]
        old_0 = [p.detach().clone() for p in params_0]
        for params in (params_wd, params_0):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt_wd.step()
        opt_0.step()
        for p_wd, p_0, o_wd, o_0 in zip(params_wd, params_0, old_wd, old_0):
            delta_wd, delta_0 = p_wd.detach() - o_wd, p_0.detach() - o_0
            torch.testing.assert_close(delta_wd - delta_0, -lr * weight_decay * o_wd, rtol=1e-9, atol=1e-12)
        assert_states_equal(opt_wd, params_wd, opt_0, params_0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(make_networks, set_to_none):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    fill_grads(params)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=set_to_none)
    for p, g in zip(params, grads):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g  # zeroed in place
            assert torch.count_nonzero(p.grad) == 0


# ---------------------------------------------------------------------- hooks
def test_step_hooks_fire(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    log = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o is opt, params[0].detach().clone())))
    post = opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o is opt, params[0].detach().clone())))
    before = params[0].detach().clone()
    run_steps(opt, params, 1)
    assert [(name, same) for name, same, _ in log] == [("pre", True), ("post", True)]
    assert torch.equal(log[0][2], before)  # pre hook runs before the update
    assert torch.equal(log[1][2], params[0].detach())  # post hook after it
    pre.remove()
    post.remove()
    run_steps(opt, params, 1, start=1)
    assert len(log) == 2


def test_state_dict_hooks_fire(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    run_steps(opt, params, 1)
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append("pre"))

    def post_hook(o, sd):
        log.append("post")
        sd["extra"] = 42
        return sd

    opt.register_state_dict_post_hook(post_hook)
    sd = opt.state_dict()
    assert log == ["pre", "post"]
    assert sd["extra"] == 42
    assert "update_networks" in sd


def test_load_state_dict_hooks_fire(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    run_steps(opt, params, 1)
    sd = opt.state_dict()
    target = LSTMOptimizer(clone_params(params), networks=make_networks(seed=5))
    log = []

    def pre_hook(o, state_dict):
        log.append("pre")
        assert "state" in state_dict and "param_groups" in state_dict

    target.register_load_state_dict_pre_hook(pre_hook)
    target.register_load_state_dict_post_hook(lambda o: log.append("post"))
    target.load_state_dict(sd)
    assert log == ["pre", "post"]


def test_load_state_dict_post_hook_sees_loaded_optimizer(make_networks):
    params = make_params(dtype=torch.bfloat16)
    opt = LSTMOptimizer(params, networks=make_networks())
    run_steps(opt, params, 1)
    sd = opt.state_dict()
    target_params = clone_params(params)
    target = LSTMOptimizer(target_params, networks=make_networks(seed=5))
    seen = {}

    def post_hook(o):
        seen["weights"] = all(
            torch.equal(v, sd["update_networks"]["weights"][k]) for k, v in o.networks.state_dict().items()
        )
        seen["lstm_dtype"] = o.state[target_params[0]]["lstm"].dtype

    target.register_load_state_dict_post_hook(post_hook)
    target.load_state_dict(sd)
    assert seen == {"weights": True, "lstm_dtype": torch.float32}


# ---------------------------------------------------------------------- copies
def _pickle_round_trip(opt):
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickle_round_trip], ids=["deepcopy", "pickle"])
def test_copy_continues_identically(make_networks, copier):
    networks = make_networks(("conv", "dense", "bias"))
    params = make_params()
    opt = LSTMOptimizer(
        [{"params": params[:2], "lr": 0.7, "weight_decay": 0.1}, {"params": params[2:], "maximize": True}],
        networks=networks,
    )
    run_steps(opt, params, 2)
    clone = copier(opt)
    clone_params_ = [p for g in clone.param_groups for p in g["params"]]
    assert clone.networks is not opt.networks  # the networks travel with the copy
    assert clone.networks.roles == networks.roles and clone.impl == opt.impl
    for (k, v), (k2, v2) in zip(networks.state_dict().items(), clone.networks.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert_params_equal(clone_params_, params)
    assert_states_equal(opt, params, clone, clone_params_)
    run_steps(opt, params, 3, start=2)
    run_steps(clone, clone_params_, 3, start=2)
    assert_params_equal(clone_params_, params)
    assert_states_equal(opt, params, clone, clone_params_)
    # the copy owns its networks: changing the original's weights does not change the copy
    with torch.no_grad():
        networks.dense.head_bias.add_(1.0)
    assert not torch.equal(clone.networks.dense.head_bias, networks.dense.head_bias)


# ---------------------------------------------------------------------- LR schedulers
@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5),
    ],
    ids=["StepLR", "LambdaLR", "MultiStepLR"],
)
def test_lr_scheduler_scales_update(make_networks, make_scheduler):
    networks = make_networks(dtype=torch.float64)
    params = make_params(dtype=torch.float64)
    ref_params = clone_params(params)
    opt = LSTMOptimizer(params, networks=networks)  # lr = 1.0
    ref = LSTMOptimizer(ref_params, networks=networks)
    scheduler = make_scheduler(opt)
    run_steps(opt, params, 1)
    run_steps(ref, ref_params, 1)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert_params_equal(params, ref_params)  # first step taken at lr 1.0 by both
    old = [p.detach().clone() for p in params]
    run_steps(opt, params, 1, start=1)
    run_steps(ref, ref_params, 1, start=1)
    for p, r, o in zip(params, ref_params, old):
        delta, ref_delta = p.detach() - o, r.detach() - o
        assert delta.abs().max() > 0
        torch.testing.assert_close(delta, 0.5 * ref_delta, rtol=1e-12, atol=1e-15)
    assert_states_equal(opt, params, ref, ref_params)  # lr does not enter the LSTM state


def test_lr_scales_update_exactly(make_networks):
    # lr multiplies the learned update: with the same state and gradient, lr=0.5 gives exactly
    # half of the lr=1.0 update (multiplying by 0.5 is exact in floating point)
    networks = make_networks(dtype=torch.float64)
    params = make_params(dtype=torch.float64)
    grads = [torch.sin(3 * p.detach()) for p in params]
    states = [init_state(g, networks.config) for g in grads]
    roles = ["dense"] * len(params)
    full, _ = lstm_update(params, grads, states, networks, roles, lr=1.0)
    half, _ = lstm_update(params, grads, states, networks, roles, lr=0.5)
    for f, h in zip(full, half):
        assert f.abs().max() > 0
        assert torch.equal(h, 0.5 * f)


# ---------------------------------------------------------------------- state_dict
def _save_load(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


STATE_DICT_CASES = {
    "single-role": dict(roles=("dense",), fields={}, impl="batched"),
    "three-roles-groups": dict(roles=("conv", "dense", "bias"), fields={}, impl="batched"),
    "logsign-only-1-layer": dict(roles=("conv", "dense"), fields={"features": ["grad_logsign"], "num_layers": 1}, impl="batched"),
    "rms-features-reference": dict(roles=("dense",), fields={"features": ["grad_rms", "momentum_rms"]}, impl="reference"),
}


@pytest.mark.parametrize("case", list(STATE_DICT_CASES), ids=list(STATE_DICT_CASES))
def test_state_dict_round_trip_is_bit_identical(make_networks, case):
    spec = STATE_DICT_CASES[case]
    params = make_params()

    def groups(ps):
        return [
            {"params": ps[:1], "lr": 0.5, "weight_decay": 0.05},
            {"params": ps[1:], "maximize": case == "three-roles-groups"},
        ]

    opt = LSTMOptimizer(groups(params), networks=make_networks(spec["roles"], **spec["fields"]), impl=spec["impl"])
    run_steps(opt, params, 2)
    loaded = _save_load(opt.state_dict())

    # a fresh optimizer with *different* random networks of the same architecture
    new_params = clone_params(params)
    new = LSTMOptimizer(
        groups(new_params), networks=make_networks(spec["roles"], seed=99, **spec["fields"]), impl=spec["impl"]
    )
    assert not torch.equal(new.networks.state_dict()[f"{spec['roles'][0]}.weight_0"],
                           opt.networks.state_dict()[f"{spec['roles'][0]}.weight_0"])
    new.load_state_dict(loaded)
    for (k, v), (k2, v2) in zip(opt.networks.state_dict().items(), new.networks.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert_states_equal(opt, params, new, new_params)
    assert [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]
    assert_continue_identically(opt, params, new, new_params, 3)


def assert_continue_identically(opt, params, new, new_params, steps):
    """Both optimizers take ``steps`` more steps on the same gradients and stay identical."""
    run_steps(opt, params, steps, start=2)
    run_steps(new, new_params, steps, start=2)
    assert_params_equal(new_params, params)
    assert_states_equal(opt, params, new, new_params)


def test_state_dict_contents(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks(("conv", "dense")))
    run_steps(opt, params, 1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "update_networks"}
    assert set(sd["state"]) == {0, 1, 2}
    config = opt.networks.config
    n = params[0].numel()
    assert sd["state"][0]["lstm"].shape == (n, 2 * config.num_layers * config.hidden_size)
    assert sd["state"][0]["moments"].shape == (n, config.num_moments)
    assert sd["update_networks"]["architecture"] == config.architecture()
    assert set(sd["update_networks"]["weights"]) == set(opt.networks.state_dict())


def test_load_state_dict_does_not_mutate_argument(make_networks):
    params = make_params(dtype=torch.bfloat16)  # exercises the float32 re-read of the LSTM state
    opt = LSTMOptimizer(params, networks=make_networks())
    run_steps(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(sd)
    new_params = clone_params(params)
    new = LSTMOptimizer(new_params, networks=make_networks(seed=3))
    new.load_state_dict(sd)
    assert_nested_equal(sd, snapshot)
    # the loaded LSTM state is the optimizer's own copy: stepping does not write into the argument
    run_steps(new, new_params, 1, start=2)
    for pid in sd["state"]:
        for key in ("lstm", "moments"):
            assert torch.equal(sd["state"][pid][key], snapshot["state"][pid][key])
    assert sd["update_networks"]["weights"] is not None
    assert_nested_equal(sd["update_networks"], snapshot["update_networks"])


@pytest.mark.parametrize(
    "saved, mine, expected",
    [
        (dict(roles=("dense",), hidden_size=4), dict(roles=("dense",), hidden_size=6),
         "hidden_size: saved 4 vs this optimizer 6"),
        (dict(roles=("conv", "dense")), dict(roles=("dense",)),
         "roles: saved ['conv', 'dense'] vs this optimizer ['dense']"),
        (dict(roles=("dense",), features=["grad_logsign"]), dict(roles=("dense",)),
         "features: saved ['grad_logsign'] vs this optimizer ['grad_logsign', 'momentum_rms']"),
    ],
    ids=["hidden_size", "roles", "features"],
)
def test_load_state_dict_rejects_other_architecture(make_networks, saved, mine, expected):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks(**saved))
    run_steps(opt, params, 1)
    sd = _save_load(opt.state_dict())
    target_params = clone_params(params)
    target = LSTMOptimizer(target_params, networks=make_networks(seed=7, **mine))
    run_steps(target, target_params, 1)
    weights_before = copy.deepcopy(target.networks.state_dict())
    state_before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        target.load_state_dict(sd)
    assert "cannot load an optimizer state saved with other update networks" in str(info.value)
    # nothing was half-loaded
    assert_nested_equal(dict(target.networks.state_dict()), dict(weights_before))
    assert_nested_equal(target.state_dict(), state_before)


@pytest.mark.parametrize(
    "dtype, state_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_state_dtype_and_round_trip(make_networks, dtype, state_dtype):
    params = make_params(dtype=dtype)
    opt = LSTMOptimizer(params, networks=make_networks())
    run_steps(opt, params, 2)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert opt.state[p]["lstm"].dtype == state_dtype
        assert opt.state[p]["moments"].dtype == state_dtype
    new_params = clone_params(params)
    new = LSTMOptimizer(new_params, networks=make_networks(seed=11))
    new.load_state_dict(_save_load(opt.state_dict()))
    assert_states_equal(opt, params, new, new_params)  # dtype kept, values exact (no bf16 rounding)
    assert_continue_identically(opt, params, new, new_params, 2)


def test_load_state_dict_casts_state_to_float64_params(make_networks):
    # state saved from float32 params loaded into float64 params becomes float64 (torch's policy)
    params32 = make_params()
    opt = LSTMOptimizer(params32, networks=make_networks())
    run_steps(opt, params32, 1)
    params64 = [nn.Parameter(p.detach().double()) for p in params32]
    new = LSTMOptimizer(params64, networks=make_networks())
    new.load_state_dict(opt.state_dict())
    for p in params64:
        assert new.state[p]["lstm"].dtype == torch.float64
    run_steps(new, params64, 1, start=1)


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_compiled_step_matches_eager(make_networks):
    torch._dynamo.reset()
    networks = make_networks(("conv", "dense", "bias"))
    params = make_params()
    compiled_params = clone_params(params)
    initial = [p.detach().clone() for p in params]
    eager = LSTMOptimizer(params, networks=networks, weight_decay=0.01)
    compiled = LSTMOptimizer(compiled_params, networks=networks, weight_decay=0.01)
    # aot_eager traces through dynamo and AOTAutograd without inductor's slow C++ codegen
    compiled_step = torch.compile(compiled.step, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            fill_grads(params, t)
            fill_grads(compiled_params, t)
            eager.step()
            compiled_step()
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured graphs
    assert all(not torch.equal(q.detach(), i) for q, i in zip(compiled_params, initial))
    for p, q in zip(params, compiled_params):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-6)
    for p, q in zip(params, compiled_params):
        for key in ("lstm", "moments"):
            torch.testing.assert_close(compiled.state[q][key], eager.state[p][key], rtol=0, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- roles
@pytest.mark.parametrize(
    "roles, shape, expected",
    [
        (("conv", "dense", "bias"), (3, 2, 3, 3), "conv"),
        (("conv", "dense", "bias"), (3, 2, 5), "conv"),
        (("conv", "dense", "bias"), (4, 5), "dense"),
        (("conv", "dense", "bias"), (4,), "bias"),
        (("conv", "dense", "bias"), (), "bias"),
        (("conv", "dense"), (4,), "dense"),
        (("conv", "dense"), (3, 2, 3, 3), "conv"),
        (("dense", "bias"), (3, 2, 3, 3), "dense"),
        (("dense", "bias"), (7,), "bias"),
        (("dense",), (3, 2, 3, 3), "dense"),
        (("dense",), (4,), "dense"),
        (("conv",), (4, 5), "conv"),  # a single network serves everything
    ],
)
def test_automatic_roles(make_networks, roles, shape, expected):
    networks = make_networks(roles)
    assert networks.resolve_role(None, torch.zeros(shape)) == expected


def test_automatic_role_without_dense_fallback_raises(make_networks):
    networks = make_networks(("conv", "bias"))
    with pytest.raises(ValueError, match=re.escape("shape (4, 5)")):
        LSTMOptimizer([torch.zeros(4, 5, requires_grad=True)], networks=networks)
    # an explicit role makes it usable
    LSTMOptimizer([{"params": [torch.zeros(4, 5, requires_grad=True)], "role": "conv"}], networks=networks)


def test_explicit_role_the_bundle_lacks_raises(make_networks):
    networks = make_networks(("conv", "dense"))
    message = (
        "Invalid role: 'bias'; these update networks have roles ['conv', 'dense']. "
        "Use one of them, or load a pretrained optimizer that has this role."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LSTMOptimizer([{"params": make_params()[:1], "role": "bias"}], networks=networks)
    with pytest.raises(TypeError, match="param group 'role' must be a string or None"):
        LSTMOptimizer([{"params": make_params()[:1], "role": 3}], networks=networks)


def test_default_role_the_bundle_lacks_raises(make_networks):
    with pytest.raises(ValueError, match="'bias'"):
        LSTMOptimizer(make_params(), networks=make_networks(("conv", "dense")), role="bias")


@pytest.mark.parametrize(
    "group",
    [
        lambda: {"params": [torch.zeros(3, dtype=torch.long)]},
        lambda: {"params": [torch.zeros(4, 5, requires_grad=True)]},  # no network for a dense shape
    ],
    ids=["integer", "no-role"],
)
def test_rejected_param_group_is_not_added(make_networks, group):
    opt = LSTMOptimizer(make_params()[:1], networks=make_networks(("conv", "bias")))
    with pytest.raises((TypeError, ValueError)):
        opt.add_param_group(group())
    assert len(opt.param_groups) == 1


def test_explicit_role_selects_network(make_networks):
    # a dense-shaped tensor given role "conv" is updated exactly as the conv network would
    networks = make_networks(("conv", "dense"))
    p = make_params([(4, 5)])[0]
    q = nn.Parameter(p.detach().clone())
    opt = LSTMOptimizer([{"params": [p], "role": "conv"}, {"params": [q]}], networks=networks)
    grad = torch.sin(3 * p.detach())
    p.grad, q.grad = grad.clone(), grad.clone()
    old = p.detach().clone()
    opt.step()
    expected, _ = lstm_update([old], [grad], [init_state(grad, networks.config)], networks, ["conv"])
    assert torch.equal(p.detach(), old + expected[0])
    assert not torch.equal(p, q)  # the dense network gives another update


@pytest.mark.parametrize("perturbed", ["conv", "dense", "bias"])
def test_roles_use_different_networks(make_networks, perturbed):
    roles = ("conv", "dense", "bias")
    nets_a = make_networks(roles)
    nets_b = copy.deepcopy(nets_a)
    with torch.no_grad():
        nets_b.network(perturbed).weight_0.add_(0.5)
    names = list(SHAPES)  # conv, dense, bias, in the order of make_params
    params_a = make_params()
    params_b = clone_params(params_a)
    opt_a = LSTMOptimizer(params_a, networks=nets_a)
    opt_b = LSTMOptimizer(params_b, networks=nets_b)
    for t in range(2):
        fill_grads(params_a, t)
        fill_grads(params_b, t)
        opt_a.step()
        opt_b.step()
    for name, pa, pb in zip(names, params_a, params_b):
        if name == perturbed:
            assert not torch.equal(pa, pb), name
        else:
            assert torch.equal(pa, pb), name


def test_single_network_serves_all_shapes_and_roles(make_networks):
    networks = make_networks(("dense",))
    conv, dense, bias = make_params()
    opt = LSTMOptimizer([{"params": [conv, dense]}, {"params": [bias], "role": "anything"}], networks=networks)
    grads = [torch.cos(p.detach()) for p in (conv, dense, bias)]
    old = [p.detach().clone() for p in (conv, dense, bias)]
    for p, g in zip((conv, dense, bias), grads):
        p.grad = g.clone()
    opt.step()
    expected, _ = lstm_update(
        old, grads, [init_state(g, networks.config) for g in grads], networks, ["dense"] * 3
    )
    for p, o, e in zip((conv, dense, bias), old, expected):
        torch.testing.assert_close(p.detach(), o + e, rtol=0, atol=1e-7)
        assert not torch.equal(p.detach(), o)


# ---------------------------------------------------------------------- bad input
def test_sparse_gradients_raise(make_networks):
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = LSTMOptimizer(embedding.parameters(), networks=make_networks())
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_integer_params_raise(make_networks):
    with pytest.raises(TypeError, match=re.escape(
        "LSTMOptimizer can only optimize floating-point or complex tensors, got torch.int64"
    )):
        LSTMOptimizer([torch.zeros(3, dtype=torch.long)], networks=make_networks())


@pytest.mark.parametrize("maximize", [False, True])
def test_complex_params_are_optimized_as_real_view(make_networks, maximize):
    networks = make_networks(("dense",))
    gen = torch.Generator().manual_seed(0)
    z = nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())  # the equivalent real tensor (5, 2)
    opt_z = LSTMOptimizer([z], networks=networks, maximize=maximize, weight_decay=0.1, lr=0.5)
    opt_r = LSTMOptimizer([r], networks=networks, maximize=maximize, weight_decay=0.1, lr=0.5)
    for t in range(3):
        g = torch.complex(torch.sin(z.real.detach() + t), torch.cos(z.imag.detach() * 2))
        z.grad = g
        r.grad = torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert opt_z.state[z]["lstm"].shape[0] == 10  # real and imaginary part are two coordinates
    for key in ("lstm", "moments"):
        assert torch.equal(opt_z.state[z][key], opt_r.state[r][key])
    # and the state dict round-trips for complex params
    z2 = nn.Parameter(z.detach().clone())
    new = LSTMOptimizer([z2], networks=make_networks(("dense",), seed=4), maximize=maximize, weight_decay=0.1, lr=0.5)
    new.load_state_dict(_save_load(opt_z.state_dict()))
    g = torch.complex(torch.sin(z.real.detach()), torch.cos(z.imag.detach()))
    z.grad, z2.grad = g.clone(), g.clone()
    opt_z.step()
    new.step()
    assert torch.equal(z, z2)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_coordinates_are_skipped(make_networks, bad_value):
    networks = make_networks()
    p = make_params([(8,)])[0]
    ref = nn.Parameter(p.detach().clone())
    opt = LSTMOptimizer([p], networks=networks)
    ref_opt = LSTMOptimizer([ref], networks=networks)
    bad = torch.tensor([1, 5])
    good = torch.tensor([0, 2, 3, 4, 6, 7])

    # a clean first step so that the state is not trivial
    fill_grads([p])
    fill_grads([ref])
    opt.step()
    ref_opt.step()

    for t in (1, 2):  # two bad steps: one warning each
        lstm_before = opt.state[p]["lstm"].clone()
        moments_before = opt.state[p]["moments"].clone()
        p_before = p.detach().clone()
        fill_grads([p], t)
        fill_grads([ref], t)
        p.grad[bad] = bad_value
        ref.grad[bad] = 0.0
        ref_before = ref.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        ref_opt.step()
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1
        assert NONFINITE_MESSAGE in str(runtime[0].message)
        assert torch.isfinite(p).all()
        # bad coordinates: no update, state untouched
        assert torch.equal(p.detach()[bad], p_before[bad])
        assert torch.equal(opt.state[p]["lstm"][bad], lstm_before[bad])
        assert torch.equal(opt.state[p]["moments"][bad], moments_before[bad])
        # good coordinates: updated, finite, and exactly what they would get with any finite
        # gradient at the bad coordinates (the LSTM is coordinate-wise)
        delta = p.detach()[good] - p_before[good]
        assert torch.isfinite(delta).all() and (delta != 0).all()
        torch.testing.assert_close(delta, ref.detach()[good] - ref_before[good], rtol=0, atol=1e-7)
        assert not torch.equal(opt.state[p]["lstm"][good], lstm_before[good])
    assert opt.state[p]["step"].item() == 3


def test_clean_step_does_not_warn(make_networks):
    params = make_params()
    opt = LSTMOptimizer(params, networks=make_networks())
    fill_grads(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_nonfinite_gradient_on_first_step(make_networks):
    p = make_params([(6,)])[0]
    opt = LSTMOptimizer([p], networks=make_networks())
    before = p.detach().clone()
    fill_grads([p])
    p.grad[2] = float("nan")
    with pytest.warns(RuntimeWarning, match=re.escape(NONFINITE_MESSAGE)):
        opt.step()
    assert torch.isfinite(p).all()
    assert p[2] == before[2]
    state = opt.state[p]
    assert torch.isfinite(state["lstm"]).all() and torch.isfinite(state["moments"]).all()
    assert (state["lstm"][2] == 0).all() and (state["moments"][2] == 0).all()  # fresh state kept
    assert (p.detach() != before).sum() == 5


# ---------------------------------------------------------------------- reduced-precision state
def test_bfloat16_lstm_state_halves_memory_and_tracks_float32(make_networks):
    networks = make_networks(("dense", "bias"))
    torch.manual_seed(1)
    base = [torch.randn(40, 30), torch.randn(40)]
    runs = {}
    for dtype in (None, torch.bfloat16):
        ps = [nn.Parameter(p.clone()) for p in base]
        opt = LSTMOptimizer(ps, networks=networks, state_dtype=dtype)
        for t in range(5):
            for i, p in enumerate(ps):
                p.grad = torch.sin(p.detach() * (i + 1) + t)
            opt.step()
        runs[dtype] = (ps, opt)
    (p32, o32), (p16, o16) = runs[None], runs[torch.bfloat16]
    for start, a, b in zip(base, p32, p16):
        assert o16.state[b]["lstm"].dtype == torch.bfloat16 and o32.state[a]["lstm"].dtype == torch.float32
        assert o16.state[b]["moments"].dtype == torch.float32
        moved = (a.detach() - start).abs().max()
        assert (a.detach() - b.detach()).abs().max() < 0.05 * moved  # bf16 rounding of the state only
    lstm_bytes = {k: sum(o.state[p]["lstm"].nbytes for p in ps) for k, (ps, o) in runs.items()}
    assert lstm_bytes[torch.bfloat16] * 2 == lstm_bytes[None]
    # a state_dict round trip keeps the bf16 state bit for bit
    fresh = [nn.Parameter(p.detach().clone()) for p in p16]
    loaded = LSTMOptimizer(fresh, networks=networks, state_dtype=torch.bfloat16)
    loaded.load_state_dict(o16.state_dict())
    for a, b in zip(p16, fresh):
        assert loaded.state[b]["lstm"].dtype == torch.bfloat16
        assert torch.equal(loaded.state[b]["lstm"], o16.state[a]["lstm"])


def test_invalid_state_dtype(make_networks):
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.int8"):
        LSTMOptimizer(make_params(), networks=make_networks(), state_dtype=torch.int8)
