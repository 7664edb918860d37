"""The functional core: ``lstm_update`` implementations agree, chunking is invisible, the update is
differentiable and pure, and the features follow the paper's formula.

Networks come from the ``make_networks`` fixture (conftest.py): random weights, never the shipped ones.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import learnedopt.functional as functional
from learnedopt import LSTMOptimizer, UpdateNetwork, UpdateNetworkConfig, compute_features, init_state, lstm_update

# mixed shapes: conv kernels, dense matrices, biases and a scalar
SHAPES = [(2, 3, 3, 3), (4, 5), (5,), (3, 4), (), (2, 2, 4)]

CONFIGS = {
    "default": {},
    "logsign-1-layer": {"features": ["grad_logsign"], "num_layers": 1},
    "rms-3-layers": {"features": ["grad_rms", "momentum_rms"], "num_layers": 3, "momentum_betas": [0.9]},
    "all-features-clipped": {"features": ["grad_logsign", "grad_rms", "momentum_rms"], "update_clip": 0.01},
    "no-update-clip": {"update_clip": None, "output_scale": 1.0},
    "tensor-rms": {"features": ["grad_logsign", "tensor_rms"], "momentum_betas": [0.5, 0.95]},
}


def make_tensors(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def gradient(p: torch.Tensor, t: int, i: int) -> torch.Tensor:
    return torch.sin(2.0 * p + 0.3 * t + i) * (1.5 ** (i - 2)) + 0.05 * p


def assert_close_tight(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------- batched vs reference
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_functional_batched_matches_reference(make_networks, config):
    networks = make_networks(("conv", "dense", "bias"), dtype=torch.float64, **CONFIGS[config])
    params = {"batched": make_tensors(), "reference": make_tensors()}
    states: dict[str, list] = {"batched": [None] * len(SHAPES), "reference": [None] * len(SHAPES)}
    roles = [networks.resolve_role(None, p) for p in params["batched"]]
    assert set(roles) == {"conv", "dense", "bias"}
    lrs = [0.5, 1.0, 0.0, 0.7, 1.0, 0.0]  # two frozen tensors
    wds = [0.1, 0.0, 0.2, 0.0, 0.05, 0.0]
    for t in range(4):
        active = [i for i in range(len(SHAPES)) if i != t % len(SHAPES)]  # one tensor has no grad
        results = {}
        for impl in ("batched", "reference"):
            ps = params[impl]
            grads = [gradient(ps[i], t, i) for i in active]
            sts = [states[impl][i] or init_state(g, networks.config) for i, g in zip(active, grads)]
            deltas, new_states = lstm_update(
                [ps[i] for i in active], grads, sts, networks, [roles[i] for i in active],
                lr=[lrs[i] for i in active], weight_decay=[wds[i] for i in active],
                maximize=(t == 2), impl=impl,
            )
            for j, i in enumerate(active):
                ps[i] = ps[i] + deltas[j]
                states[impl][i] = new_states[j]
            results[impl] = deltas
        for j, i in enumerate(active):
            assert_close_tight(results["batched"][j], results["reference"][j])
            if lrs[i] == 0.0:
                assert (results["batched"][j] == 0).all()
        assert any(d.abs().max() > 1e-4 for d in results["batched"])
    for i in range(len(SHAPES)):
        assert_close_tight(params["batched"][i], params["reference"][i])
        for key in states["batched"][i]:
            assert states["batched"][i][key].dtype == torch.float64
            assert_close_tight(states["batched"][i][key], states["reference"][i][key])


@pytest.mark.parametrize("config", ["default", "logsign-1-layer", "all-features-clipped"])
def test_optimizer_batched_matches_reference(make_networks, config):
    networks = make_networks(("conv", "dense", "bias"), dtype=torch.float64, **CONFIGS[config])
    params = {impl: [nn.Parameter(p) for p in make_tensors()] for impl in ("batched", "reference")}
    opts = {}
    for impl, ps in params.items():
        opts[impl] = LSTMOptimizer(
            [
                {"params": [ps[0], ps[1]], "lr": 0.7, "weight_decay": 0.1},
                {"params": [ps[2], ps[4]], "lr": 0.0},  # frozen
                {"params": [ps[3]], "maximize": True, "role": "conv"},
                {"params": [ps[5]], "role": "bias"},
            ],
            networks=networks,
            impl=impl,
        )
    frozen = [params["batched"][2].detach().clone(), params["batched"][4].detach().clone()]
    for t in range(4):
        for impl, ps in params.items():
            for i, p in enumerate(ps):
                p.grad = None if i == (t + 1) % len(ps) else gradient(p.detach(), t, i)
            opts[impl].step()
    assert opts["batched"].impl == "batched" and opts["reference"].impl == "reference"
    for pb, pr in zip(params["batched"], params["reference"]):
        assert_close_tight(pb.detach(), pr.detach())
        sb, sr = opts["batched"].state[pb], opts["reference"].state[pr]
        assert sb.keys() == sr.keys()
        for key in sb:
            assert_close_tight(sb[key], sr[key])
    assert torch.equal(params["batched"][2].detach(), frozen[0])
    assert torch.equal(params["batched"][4].detach(), frozen[1])


# ---------------------------------------------------------------------- chunking
def _count_coordinate_steps(monkeypatch):
    calls = []
    original = functional._coordinate_step

    def counting(net, config, g, *args, **kwargs):
        calls.append(g.numel())
        return original(net, config, g, *args, **kwargs)

    monkeypatch.setattr(functional, "_coordinate_step", counting)
    return calls


def _run_update(networks, tensors, steps=3):
    roles = [networks.resolve_role(None, p) for p in tensors]
    states = None
    all_deltas = []
    for t in range(steps):
        grads = [gradient(p, t, i) for i, p in enumerate(tensors)]
        if states is None:
            states = [init_state(g, networks.config) for g in grads]
        deltas, states = lstm_update(tensors, grads, states, networks, roles, lr=0.8, weight_decay=0.1)
        tensors = [p + d for p, d in zip(tensors, deltas)]
        all_deltas += deltas
    return all_deltas, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_path_matches_unchunked(make_networks, monkeypatch, dtype):
    networks = make_networks(("conv", "dense"), dtype=dtype)
    tensors = make_tensors(dtype)
    with torch.no_grad():
        monkeypatch.setattr(functional, "CHUNK_SIZE", 10**9)
        calls = _count_coordinate_steps(monkeypatch)
        whole, whole_states = _run_update(networks, tensors)
        assert len(calls) == 3 * 2  # one call per role and step
        monkeypatch.setattr(functional, "CHUNK_SIZE", 7)
        calls.clear()
        chunked, chunked_states = _run_update(networks, tensors)
    assert max(calls) <= 7 and len(calls) > 3 * 2  # chunking really happened (ragged last chunk too)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, **tol)
    for sa, sb in zip(chunked_states, whole_states):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **tol)


def test_no_chunking_when_autograd_needs_the_graph(make_networks, monkeypatch):
    networks = make_networks(("dense",), dtype=torch.float64)
    monkeypatch.setattr(functional, "CHUNK_SIZE", 4)
    calls = _count_coordinate_steps(monkeypatch)
    tensors = make_tensors()
    deltas, _ = _run_update(networks, tensors, steps=2)
    assert len(calls) == 2  # one call for all coordinates, per step
    sum(d.sum() for d in deltas).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in networks.parameters())


# ---------------------------------------------------------------------- the network itself
@pytest.mark.parametrize("input_size, hidden_size, num_layers", [(5, 3, 1), (5, 6, 2), (2, 4, 3), (1, 20, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_network_forward_matches_reference(input_size, hidden_size, num_layers, dtype):
    torch.manual_seed(0)
    net = UpdateNetwork(input_size, hidden_size, num_layers).to(dtype)
    x = torch.randn(17, input_size, dtype=dtype)
    state = torch.randn(17, net.state_size, dtype=dtype)
    out, new_state = net(x, state)
    ref_out, ref_state = net.forward_reference(x, state)
    assert out.shape == (17,) and new_state.shape == (17, 2 * num_layers * hidden_size)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(new_state, ref_state, **tol)


def test_network_state_layout():
    # state is [h_1..h_L, c_1..c_L]; with zero weights the gates are 0.5, so c = 0.5*c_prev + 0.5*tanh(0)
    net = UpdateNetwork(2, 3, 2).double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    state = torch.arange(12, dtype=torch.float64)[None] / 10
    _, new_state = net(torch.zeros(1, 2, dtype=torch.float64), state)
    c = 0.5 * state[:, 6:]
    h = 0.5 * torch.tanh(c)
    torch.testing.assert_close(new_state, torch.cat([h, c], dim=1))


# ---------------------------------------------------------------------- differentiability
class _Unroll(nn.Module):
    """Two steps of lstm_update as a module, so functional_call can swap in the network weights."""

    def __init__(self, networks, impl):
        super().__init__()
        self.networks = networks
        self.impl = impl

    def forward(self, params, grads_per_step, roles):
        states = [init_state(g, self.networks.config) for g in grads_per_step[0]]
        outs = []
        for grads in grads_per_step:
            deltas, states = lstm_update(params, grads, states, self.networks, roles, lr=0.9, weight_decay=0.1,
                                          impl=self.impl)
            params = [p + d for p, d in zip(params, deltas)]
            outs += [d.reshape(-1) for d in deltas]
        return torch.cat(outs)


@pytest.mark.parametrize("impl", ["batched", "reference"])
def test_lstm_update_is_differentiable(make_networks, impl):
    networks = make_networks(("dense", "bias"), dtype=torch.float64, hidden_size=3)
    unroll = _Unroll(networks, impl)
    params = [torch.randn(2, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(2)]
    roles = ["dense", "bias"]
    names = [f"networks.{k}" for k, _ in networks.named_parameters()]
    weights = tuple(p.detach().clone().requires_grad_(True) for _, p in networks.named_parameters())

    def fn(*ws):
        return torch.func.functional_call(unroll, dict(zip(names, ws)), (params, grads_per_step, roles))

    assert torch.autograd.gradcheck(fn, weights, eps=1e-6, atol=1e-6, rtol=1e-4)
    # a scalar of the deltas: every weight tensor gets a finite, non-zero gradient
    scalar = (fn(*weights) ** 2).sum() + fn(*weights).sum()
    grads = torch.autograd.grad(scalar, weights)
    for name, g in zip(names, grads):
        assert torch.isfinite(g).all(), name
        assert g.abs().max() > 0, name


def test_gradients_flow_into_the_optimizee_gradient(make_networks):
    # grads are inputs: keeping their graph allows second-order meta-gradients
    networks = make_networks(dtype=torch.float64)
    p = torch.randn(4, dtype=torch.float64)
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    deltas, _ = lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"])
    (grad_g,) = torch.autograd.grad(deltas[0].sum(), g)
    assert torch.isfinite(grad_g).all() and grad_g.abs().max() > 0


# ---------------------------------------------------------------------- purity and errors
def test_lstm_update_does_not_modify_inputs(make_networks):
    networks = make_networks(("conv", "dense", "bias"))
    params = make_tensors(torch.float32)
    grads = [gradient(p, 0, i) for i, p in enumerate(params)]
    grads[1][0, 0] = float("nan")  # exercise the non-finite masking too
    states = [init_state(g, networks.config) for g in grads]
    roles = [networks.resolve_role(None, p) for p in params]
    with torch.no_grad():  # a non-trivial state
        _, states = lstm_update(params, [g.nan_to_num() for g in grads], states, networks, roles)
    snapshot = copy.deepcopy((params, grads, states, networks.state_dict()))
    for impl in ("batched", "reference"):
        deltas, new_states = lstm_update(
            params, grads, states, networks, roles, lr=0.5, weight_decay=0.1, maximize=True, impl=impl
        )
        for a, b in zip(params + grads, snapshot[0] + snapshot[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        for s, s0 in zip(states, snapshot[2]):
            for key in s0:
                assert torch.equal(s[key], s0[key])
        for k, v in networks.state_dict().items():
            assert torch.equal(v, snapshot[3][k])
        assert all(torch.isfinite(d).all() for d in deltas)
        assert all(new is not old for new, old in zip(new_states, states))


@pytest.mark.parametrize(
    "n_grads, n_states, n_roles, kwargs, message",
    [
        (1, 2, 2, {}, "params, grads, states and roles must have the same length, got 2, 1, 2, 2"),
        (2, 2, 3, {}, "params, grads, states and roles must have the same length, got 2, 2, 2, 3"),
        (2, 2, 2, {"impl": "fast"}, "impl must be one of ('auto', 'batched', 'compiled', 'native', 'reference'), got 'fast'"),
        (2, 2, 2, {"lr": [1.0]}, "lr has 1 entries but there are 2 parameters"),
        (2, 2, 2, {"weight_decay": [0.1, 0.1, 0.1]}, "weight_decay has 3 entries but there are 2 parameters"),
    ],
    ids=["grads", "roles", "impl", "lr", "weight_decay"],
)
def test_lstm_update_errors(make_networks, n_grads, n_states, n_roles, kwargs, message):
    networks = make_networks()
    params = [torch.zeros(3), torch.zeros(2)]
    grads = [torch.ones(3), torch.ones(2)][:n_grads]
    states = [init_state(torch.ones(3), networks.config), init_state(torch.ones(2), networks.config)]
    states = (states * 2)[:n_states]
    roles = ["dense"] * n_roles
    with pytest.raises(ValueError) as info:
        lstm_update(params, grads, states, networks, roles, **kwargs)
    assert str(info.value) == message


def test_maximize_flips_the_gradient(make_networks):
    networks = make_networks(dtype=torch.float64)
    params = make_tensors()
    grads = [gradient(p, 0, i) for i, p in enumerate(params)]
    states = [init_state(-g, networks.config) for g in grads]
    roles = ["dense"] * len(params)
    up, up_states = lstm_update(params, grads, states, networks, roles, maximize=True, weight_decay=0.1)
    down, down_states = lstm_update(params, [-g for g in grads], states, networks, roles, weight_decay=0.1)
    for a, b in zip(up, down):
        assert torch.equal(a, b)
    for a, b in zip(up_states, down_states):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_tensor_lr_and_tensor_lr(make_networks):
    networks = make_networks(dtype=torch.float64)
    params = make_tensors()[:3]
    grads = [gradient(p, 0, i) for i, p in enumerate(params)]
    states = [init_state(g, networks.config) for g in grads]
    roles = ["dense"] * 3
    base, _ = lstm_update(params, grads, states, networks, roles, lr=1.0)
    scaled, _ = lstm_update(params, grads, states, networks, roles, lr=[0.5, torch.tensor(0.25, dtype=torch.float64), 0.0])
    for b, s, factor in zip(base, scaled, (0.5, 0.25, 0.0)):
        assert torch.equal(s, factor * b)


# ---------------------------------------------------------------------- state and features
@pytest.mark.parametrize(
    "dtype, state_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
def test_init_state(make_networks, dtype, state_dtype):
    config = make_networks(momentum_betas=[0.5, 0.9]).config
    g = torch.tensor([[1.0, -2.0], [float("nan"), 0.5]], dtype=dtype)
    state = init_state(g, config)
    assert state["lstm"].dtype == state_dtype and state["lstm"].shape == (4, 2 * 2 * 6)
    assert (state["lstm"] == 0).all()
    g_flat = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=state_dtype)
    expected = torch.stack([g_flat, g_flat, g_flat * g_flat], dim=1)
    assert state["moments"].dtype == state_dtype and torch.equal(state["moments"], expected)
    assert "moments" not in init_state(g, UpdateNetworkConfig(features=["grad_logsign"]))


def test_moments_follow_their_running_averages(make_networks):
    networks = make_networks(dtype=torch.float64, momentum_betas=[0.5, 0.9], rms_beta=0.99)
    g0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.5, 4.0, float("inf")], dtype=torch.float64)
    state = init_state(g0, networks.config)
    _, (new,) = lstm_update([torch.zeros(3, dtype=torch.float64)], [g1], [state], networks, ["dense"])
    m = new["moments"]
    for k, beta in enumerate([0.5, 0.9]):
        torch.testing.assert_close(m[:2, k], beta * g0[:2] + (1 - beta) * g1[:2], rtol=1e-15, atol=0)
    torch.testing.assert_close(m[:2, 2], 0.99 * g0[:2] ** 2 + 0.01 * g1[:2] ** 2, rtol=1e-15, atol=0)
    assert torch.equal(m[2], state["moments"][2])  # the infinite coordinate keeps its moments


def _paper_logsign(g: float, p: float) -> tuple[float, float]:
    """Andrychowicz et al. 2016: (log|g|/p, sign g) if |g| >= e^-p, else (-1, e^p g)."""
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g)
    return -1.0, math.exp(p) * g


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_grad_logsign_matches_paper(p):
    config = UpdateNetworkConfig(features=["grad_logsign"], preprocess_p=p)
    threshold = math.exp(-p)
    values = [
        1.0, -1.0, 3.0, -math.e**2, 1e3,  # well above e^-p
        threshold, 2 * threshold, -1.5 * threshold,  # at and just above the threshold
        0.5 * threshold, -0.25 * threshold, 1e-12, -1e-20,  # below: the linear branch
        0.0,
    ]
    g = torch.tensor(values, dtype=torch.float64)
    features = compute_features(g, None, config)
    assert features.shape == (len(values), 2) and config.input_size == 2
    expected = torch.tensor([_paper_logsign(v, p) for v in values], dtype=torch.float64)
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-15)
    # spot checks written out by hand
    torch.testing.assert_close(features[0], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(features[3], torch.tensor([2.0 / p, -1.0], dtype=torch.float64))
    torch.testing.assert_close(features[8], torch.tensor([-1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(features[12], torch.tensor([-1.0, 0.0], dtype=torch.float64))
    # both branches meet at the threshold: the feature is continuous there
    assert abs(features[5, 0].item() + 1.0) < 1e-12 and features[5, 1].item() == 1.0


def test_rms_features_match_formula():
    config = UpdateNetworkConfig(
        features=["grad_rms", "momentum_rms"], momentum_betas=[0.5, 0.9], rms_eps=1e-8, feature_clip=10.0
    )
    g = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    moments = torch.tensor(
        [[0.1, 0.2, 0.04], [-1.0, 5.0, 1e-6], [0.0, -0.5, 4.0]], dtype=torch.float64
    )
    features = compute_features(g, moments, config)
    rms = moments[:, 2].sqrt() + 1e-8
    expected = torch.stack(
        [(g / rms).clamp(-10, 10), (moments[:, 0] / rms).clamp(-10, 10), (moments[:, 1] / rms).clamp(-10, 10)],
        dim=1,
    )
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=0)
    assert features[1].tolist() == [-10.0, -10.0, 10.0]  # clipped
    torch.testing.assert_close(features[0], torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64), rtol=1e-7, atol=0)


# ---------------------------------------------------------------------- compiled path
def test_compiled_matches_reference_with_chunks(make_networks, monkeypatch):
    """impl="compiled" (torch.compile of the per-chunk step) against the per-tensor reference."""
    monkeypatch.setattr(functional, "CHUNK_SIZE", 40)  # several chunks of different sizes
    networks = make_networks(("conv", "dense", "bias"), dtype=torch.float64)
    params = {impl: [nn.Parameter(p) for p in make_tensors()] for impl in ("compiled", "reference")}
    opts = {
        impl: LSTMOptimizer(
            [{"params": ps[:3], "lr": 0.7, "weight_decay": 0.1}, {"params": ps[3:], "lr": 0.0}],
            networks=networks, impl=impl,
        )
        for impl, ps in params.items()
    }
    for t in range(3):
        for impl, ps in params.items():
            for i, p in enumerate(ps):
                p.grad = None if i == (t + 1) % len(ps) else gradient(p.detach(), t, i)
            with torch.no_grad():
                opts[impl].step()
    for pc, pr in zip(params["compiled"], params["reference"]):
        assert_close_tight(pc.detach(), pr.detach())
        for key in opts["reference"].state[pr]:
            assert_close_tight(opts["compiled"].state[pc][key], opts["reference"].state[pr][key])


def test_compiled_is_differentiable_like_batched(make_networks):
    networks = make_networks(("dense",), dtype=torch.float64)
    p = torch.randn(30, dtype=torch.float64)
    g = torch.randn(30, dtype=torch.float64)
    grads = {}
    for impl in ("batched", "compiled"):
        networks.zero_grad()
        deltas, _ = lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"], impl=impl)
        deltas[0].pow(2).sum().backward()
        grads[impl] = [w.grad.clone() for w in networks.parameters()]
    for a, b in zip(grads["batched"], grads["compiled"]):
        assert_close_tight(a, b)


# ---------------------------------------------------------------------- nominal momentum step
@pytest.mark.parametrize("schedule", ["constant", "inverse_time"])
@pytest.mark.parametrize("correction", ["add", "scale"])
@pytest.mark.parametrize("impl", ["reference", "batched", "native", "optimizer"])
def test_nominal_momentum_with_a_silent_network_is_torch_nesterov(make_networks, impl, correction, schedule):
    """With the LSTM's head at zero, ``nominal_momentum=mu`` is ``torch.optim.SGD`` with Nesterov
    momentum ``mu`` and learning rate ``(1 - mu) * exp(nominal_log_lr)``; ``schedule="inverse_time"``
    is that SGD under ``LambdaLR(lambda t: 1 / (1 + t * exp(schedule_log_rate)))``."""
    if impl == "native":
        from learnedopt import native

        if not native.available():
            pytest.skip("native kernel unavailable")
    networks = make_networks(nominal_momentum=0.9, nominal_correction=correction, update_clip=None,
                             schedule=schedule)
    net = networks.dense
    with torch.no_grad():
        net.head_weight.zero_()
        net.head_bias.zero_()
        net.nominal_log_lr.fill_(math.log(3.0))
        if schedule != "constant":
            net.schedule_log_rate.fill_(math.log(0.25))  # a third of the step size by step 8
    target = torch.linspace(-2.0, 2.0, 50)

    def loss_of(p):
        return ((p - target) ** 2).sum() + 0.1 * (p ** 4).sum()

    expected = torch.zeros(50, requires_grad=True)
    sgd = torch.optim.SGD([expected], lr=0.1 * float(net.nominal_log_lr.detach().exp()), momentum=0.9, nesterov=True)
    decay = 0.25 if schedule != "constant" else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda t: 1.0 / (1.0 + t * decay))
    for _ in range(8):
        sgd.zero_grad()
        loss_of(expected).backward()
        sgd.step()
        scheduler.step()

    p = torch.zeros(50, requires_grad=True)
    if impl == "optimizer":
        opt = LSTMOptimizer([p], networks=networks)
        for _ in range(8):
            opt.zero_grad()
            loss_of(p).backward()
            opt.step()
    else:
        state = None
        for t in range(8):
            (g,) = torch.autograd.grad(loss_of(p), [p])
            state = state or init_state(g, networks.config)
            with torch.no_grad():
                (d,), (state,) = lstm_update([p], [g], [state], networks, ["dense"], impl=impl, step=t)
                p = (p + d).requires_grad_(True)
    torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_nominal_step_size_gets_a_meta_gradient(make_networks):
    networks = make_networks(nominal_momentum=0.5)
    p, g = torch.randn(30), torch.randn(30)
    (d,), _ = lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"], impl="batched")
    ((p + d) ** 2).sum().backward()
    assert networks.dense.nominal_log_lr.grad is not None and networks.dense.nominal_log_lr.grad.abs() > 0


def test_schedule_rate_gets_a_meta_gradient(make_networks):
    networks = make_networks(nominal_momentum=0.5, schedule="inverse_time")
    p, g = torch.randn(30), torch.randn(30)
    (d,), _ = lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"], impl="batched", step=5)
    ((p + d) ** 2).sum().backward()
    assert networks.dense.schedule_log_rate.grad is not None and networks.dense.schedule_log_rate.grad.abs() > 0


def test_schedule_needs_the_step_count(make_networks):
    networks = make_networks(schedule="inverse_time")
    p, g = torch.randn(5), torch.randn(5)
    with pytest.raises(ValueError, match=r"learned step-size schedule .*pass step="):
        lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"])
    for bad in (-1, float("nan"), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"step must be a non-negative number"):
            lstm_update([p], [g], [init_state(g, networks.config)], networks, ["dense"], step=bad)


def test_schedule_factor_is_exactly_one_at_step_zero_and_never_nan(make_networks):
    net = make_networks(schedule="inverse_time").dense
    with torch.no_grad():
        for rate in (-5.0, 0.0, 100.0):  # exp(100) overflows float32
            net.schedule_log_rate.fill_(rate)
            assert float(net.schedule_factor(0)) == 1.0
            assert 0.0 <= float(net.schedule_factor(torch.tensor(3.0))) < 1.0


def test_schedule_decays_the_whole_update_like_lr(make_networks):
    """Without a nominal step, the schedule multiplies the LSTM's update (and weight decay) as a
    smaller ``lr`` would, in every implementation."""
    networks = make_networks(schedule="inverse_time", update_clip=None)
    with torch.no_grad():
        factor = float(networks.dense.schedule_factor(7))
    assert factor == pytest.approx(1 / (1 + 7 * 0.01))
    p, g = torch.randn(40), torch.randn(40)
    state = init_state(g, networks.config)
    for impl in ("reference", "batched", "native"):
        if impl == "native":
            from learnedopt import native

            if not native.available():
                continue
        with torch.no_grad():
            (d,), _ = lstm_update([p], [g], [state], networks, ["dense"], lr=0.5, weight_decay=0.1, impl=impl, step=7)
            (expected,), _ = lstm_update([p], [g], [state], networks, ["dense"], lr=0.5 * factor, weight_decay=0.1,
                                         impl=impl, step=0)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-7)
