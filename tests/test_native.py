"""The native (fused C++) step against the reference implementation, and its failure modes."""

from __future__ import annotations

import os
import platform
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import learnedopt.optimizer as optimizer_module
from learnedopt import LSTMOptimizer, init_state, lstm_update, native

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on this machine"
)

CONFIGS = {
    "paper-features": {},
    "rms-features": {"features": ["grad_rms", "momentum_rms"], "momentum_betas": [0.9]},
    "logsign-only-1-layer": {"features": ["grad_logsign"], "num_layers": 1},
    "3-layers-hidden-8": {"num_layers": 3, "hidden_size": 8, "update_clip": None},
    "tensor-rms": {"features": ["grad_logsign", "tensor_rms"], "momentum_betas": [0.5, 0.9]},
    "nominal-momentum": {"nominal_momentum": 0.9},
    "nominal-logsign-only": {"nominal_momentum": 0.5, "features": ["grad_logsign"]},
    "nominal-scale": {"nominal_momentum": 0.9, "nominal_correction": "scale"},
    "nominal-scale-schedule": {"nominal_momentum": 0.9, "nominal_correction": "scale", "schedule": "inverse_time"},
}


def _grads(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g) * torch.logspace(-9, 1, n) if n > 1 else torch.randn(1, generator=g)
    if n > 8:
        grad[3], grad[5], grad[-1] = float("nan"), float("inf"), 0.0
    return grad


@needs_compiler
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lstm_dtype", [None, torch.bfloat16])
def test_functional_native_matches_reference(make_networks, name, lstm_dtype):
    """Several steps of impl="native" (pure, on copies) against the textbook per-tensor cell."""
    networks = make_networks(("conv", "dense"), **CONFIGS[name])
    sizes = [1, 15, 16, 17, 1000, 4099]
    params = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    roles = ["conv" if i % 2 else "dense" for i in range(len(sizes))]
    ref_p, nat_p = [p.clone() for p in params], [p.clone() for p in params]
    ref_s = [init_state(_grads(n, 0), networks.config, lstm_dtype) for n in sizes]
    nat_s = [{k: v.clone() for k, v in s.items()} for s in ref_s]
    for step in range(4):
        grads = [_grads(n, step + 1) for n in sizes]
        kw = dict(lr=[0.5] * 3 + [2.0] * 3, weight_decay=0.01, maximize=step == 2, step=[step] * 5 + [step + 7])
        with torch.no_grad():
            ref_d, ref_s = lstm_update(ref_p, grads, ref_s, networks, roles, impl="reference", **kw)
            nat_d, nat_s = lstm_update(nat_p, grads, nat_s, networks, roles, impl="native", **kw)
        # bf16 state: an ulp of difference in float32 can round to a neighbouring bf16 value
        # (0.4% apart), which the next step then sees; float32 state must agree to float32 noise
        dtol = dict(rtol=1e-2, atol=1e-4) if lstm_dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        for i in range(len(sizes)):
            torch.testing.assert_close(nat_d[i], ref_d[i], **dtol)
            assert nat_s[i]["lstm"].dtype == ref_s[i]["lstm"].dtype
            tol = dict(rtol=1e-2, atol=1e-2) if lstm_dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nat_s[i]["lstm"].float(), ref_s[i]["lstm"].float(), **tol)
            if "moments" in ref_s[i]:
                torch.testing.assert_close(nat_s[i]["moments"], ref_s[i]["moments"], rtol=1e-5, atol=1e-12)
            ref_p[i] = ref_p[i] + ref_d[i]
            nat_p[i] = nat_p[i] + nat_d[i]


@needs_compiler
def test_native_leaves_inputs_untouched(make_networks):
    networks = make_networks()
    p, g = torch.randn(40), torch.randn(40)
    state = init_state(g, networks.config)
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        lstm_update([p], [g], [state], networks, ["dense"], impl="native")
    for key in before:
        assert torch.equal(state[key], before[key])


@needs_compiler
@pytest.mark.parametrize("name", ["paper-features", "3-layers-hidden-8", "nominal-momentum", "nominal-scale",
                                  "nominal-scale-schedule"])
def test_meta_gradient_native_matches_reference(make_networks, name):
    """Under autograd, impl="native" (fused LSTM pointwise kernel, forward and backward) gives the
    meta-gradient of the textbook per-tensor cell: three unrolled steps on a small quadratic."""
    networks = make_networks(("dense", "bias"), **CONFIGS[name])
    target = torch.randn(5000)
    grads_by_impl = {}
    for impl in ("native", "reference"):
        networks.zero_grad()
        params = [torch.zeros(5000, requires_grad=True), torch.zeros(7, requires_grad=True)]
        states = None
        meta_loss = 0.0
        for step in range(3):
            loss = ((params[0] - target) ** 2).mean() + (params[1] ** 2).sum()
            grads = [g.detach() for g in torch.autograd.grad(loss, params, retain_graph=True)]
            if states is None:
                states = [init_state(g, networks.config) for g in grads]
            deltas, states = lstm_update(params, grads, states, networks, ["dense", "bias"], impl=impl, step=step)
            params = [p + d for p, d in zip(params, deltas)]
            meta_loss = meta_loss + ((params[0] - target) ** 2).mean() + (params[1] ** 2).sum()
        meta_loss.backward()
        grads_by_impl[impl] = [p.grad.clone() for p in networks.parameters()]
    for nat, ref in zip(grads_by_impl["native"], grads_by_impl["reference"]):
        torch.testing.assert_close(nat, ref, rtol=1e-4, atol=1e-6)


@needs_compiler
def test_pointwise_kernel_matches_torch():
    """The fused LSTM pointwise function and its backward against PyTorch ops, with a strided c_prev."""
    torch.manual_seed(0)
    n, h = 333, 6
    gates = torch.randn(n, 4 * h, requires_grad=True)
    state = torch.randn(n, 3 * h, requires_grad=True)
    c_prev = state[:, h : 2 * h]  # a column slice of the packed state: rows are 3h floats apart
    hn, cn = native.lstm_pointwise(gates, c_prev)
    i, f, g, o = gates.chunk(4, dim=1)
    c_ref = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    torch.testing.assert_close(hn, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cn, c_ref, rtol=1e-5, atol=1e-6)
    w1, w2 = torch.randn(n, h), torch.randn(n, h)
    got = torch.autograd.grad((hn * w1).sum() + (cn * w2).sum(), [gates, state])
    want = torch.autograd.grad((h_ref * w1).sum() + (c_ref * w2).sum(), [gates, state])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.LayerNorm(5),
        torch.nn.Linear(5, 2),
    )


@needs_compiler
@pytest.mark.parametrize("name", ["paper-features", "nominal-scale-schedule"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_optimizer_native_matches_reference(make_networks, state_dtype, name, monkeypatch):
    """LSTMOptimizer(impl="native") updates in place exactly what impl="reference" computes (with
    weight decay, and with a learned schedule); a float64 tensor in the same optimizer falls back
    to the PyTorch path."""
    calls = []
    real_step = native.step_
    monkeypatch.setattr(native, "step_", lambda *a, **k: calls.append(len(a[1])) or real_step(*a, **k))
    networks = make_networks(("conv", "dense", "bias"), **CONFIGS[name])
    if name != "paper-features":
        with torch.no_grad():
            for role in networks.roles:
                networks.network(role).schedule_log_rate.fill_(-1.0)  # a strong decay over the 5 steps
    models = {impl: _model() for impl in ("native", "reference")}
    start = torch.randn(7, dtype=torch.float64)
    extra = {impl: torch.nn.Parameter(start.clone()) for impl in models}
    opts = {
        impl: LSTMOptimizer(
            [{"params": list(models[impl].parameters())[:4], "weight_decay": 0.1},
             {"params": list(models[impl].parameters())[4:] + [extra[impl]], "lr": 0.3}],
            networks=networks, impl=impl, state_dtype=state_dtype,
        )
        for impl in models
    }
    x = torch.randn(6, 1, 4, 4)
    for _ in range(5):
        for impl, model in models.items():
            opts[impl].zero_grad()
            (model(x).pow(2).mean() + extra[impl].pow(2).sum()).backward()
            opts[impl].step()
    tol = dict(rtol=1e-3, atol=1e-4) if state_dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for p_nat, p_ref in zip(models["native"].parameters(), models["reference"].parameters()):
        torch.testing.assert_close(p_nat, p_ref, **tol)
        st_nat, st_ref = opts["native"].state[p_nat], opts["reference"].state[p_ref]
        assert float(st_nat["step"]) == float(st_ref["step"]) == 5.0
        torch.testing.assert_close(st_nat["lstm"].float(), st_ref["lstm"].float(), **(tol if state_dtype is None else dict(rtol=2e-2, atol=2e-2)))
    torch.testing.assert_close(extra["native"], extra["reference"])
    assert calls == [8] * 5  # the eight float32 tensors went through the kernel at every step


@needs_compiler
def test_threads_split_large_tensors_identically(make_networks, monkeypatch):
    networks = make_networks()
    packed = native.PackedNetwork(networks.network("dense"), networks.config)
    g = _grads(5000, 1)
    runs = []
    for threads in (1, 3):
        monkeypatch.setattr(native, "MIN_COORDS_PER_THREAD", 16)
        p = torch.linspace(-1, 1, 5000)
        state = init_state(_grads(5000, 0), networks.config)
        bad = native.step_([packed], [p], [g], [state], [1.0], [0.0], threads=threads)
        runs.append((bad, p, state))
    assert runs[0][0] == runs[1][0] == 2  # one NaN and one Inf coordinate
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2]["lstm"], runs[1][2]["lstm"])


@needs_compiler
def test_nonfinite_gradient_keeps_coordinate_and_warns(make_networks):
    p = torch.nn.Parameter(torch.ones(20))
    opt = LSTMOptimizer([p], networks=make_networks(), impl="native")
    p.grad = torch.ones(20)
    opt.step()
    before = opt.state[p]["lstm"][4].clone(), p.detach()[4].clone()
    p.grad = torch.ones(20)
    p.grad[4] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(opt.state[p]["lstm"][4], before[0]) and p.detach()[4] == before[1]
    assert torch.isfinite(p).all()


@needs_compiler
def test_wrong_state_shape_is_reported(make_networks):
    networks = make_networks()
    packed = native.PackedNetwork(networks.network("dense"), networks.config)
    state = init_state(torch.ones(10), networks.config)
    message = ("optimizer state of a tensor with 12 elements has the wrong shape (lstm (10, 24), moments (10, 4)); "
               "was it loaded from a different architecture?")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        native.step_([packed], [torch.zeros(12)], [torch.ones(12)], [state], [1.0], [0.0])


def test_odd_hidden_size_uses_pytorch_path(make_networks):
    networks = make_networks(hidden_size=5)
    assert native.unsupported_reason(networks.config) == "hidden_size must be even for the native kernel (got 5)"
    with pytest.raises(native.NativeUnavailable, match=r"^hidden_size must be even for the native kernel \(got 5\)$"):
        LSTMOptimizer([torch.nn.Parameter(torch.ones(3))], networks=networks, impl="native")
    p = torch.nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p], networks=networks)  # auto: quietly the batched path
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert (p != 1).all()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native module as if never loaded, with an empty kernel cache."""
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_ERROR", None)
    monkeypatch.setattr(optimizer_module, "_WARNED_NO_NATIVE", False)
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_turned_off_by_environment(make_networks, fresh_native, monkeypatch):
    monkeypatch.setenv("LEARNEDOPT_NATIVE", "0")
    with pytest.raises(native.NativeUnavailable, match="^the native kernel is turned off by LEARNEDOPT_NATIVE=0$"):
        LSTMOptimizer([torch.nn.Parameter(torch.ones(3))], networks=make_networks(), impl="native")
    p = torch.nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p], networks=make_networks())
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="native kernel is unavailable") as record:
        opt.step()
    assert record[0].filename == __file__  # points at the caller's step(), not at torch's wrappers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not every step
        opt.step()
    assert not list(fresh_native.iterdir())


def test_missing_compiler_is_a_clear_error(fresh_native, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-learnedopt")
    with pytest.raises(native.NativeUnavailable, match="no C.. compiler found.*impl='batched'"):
        native.load_library()
    assert not native.available()


def test_compile_error_is_reported_and_leaves_no_file(fresh_native, monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine")
    with pytest.raises(native.NativeUnavailable, match="compiling bad.cpp .* failed"):
        native.load_library()
    assert list((fresh_native / "native").iterdir()) == []


@needs_compiler
def test_build_is_cached_atomically(fresh_native):
    native.load_library()
    files = list((fresh_native / "native").iterdir())
    assert len(files) == 1 and files[0].suffix == ".so"
    stamp = files[0].stat().st_mtime_ns
    native._LIB = None
    native.load_library()  # second load: no rebuild
    assert files[0].stat().st_mtime_ns == stamp


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64" or "avx2" not in Path("/proc/cpuinfo").read_text(),
                    reason="needs an x86-64 CPU with AVX2")
def test_portable_build_without_avx512_matches_reference(make_networks, fresh_native, monkeypatch):
    """The kernel's generic vector code (what a CPU without AVX-512 compiles) against the reference."""
    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64-v3" if f == "-march=native" else f for f in native.FLAGS))
    native.load_library()
    networks = make_networks(("dense",), features=["grad_logsign", "momentum_rms", "tensor_rms"])
    params = [torch.randn(1000), torch.randn(37)]
    states = [init_state(_grads(p.numel(), 0), networks.config) for p in params]
    grads = [_grads(p.numel(), 1) for p in params]
    with torch.no_grad():
        ref_d, ref_s = lstm_update(params, grads, states, networks, ["dense"] * 2, impl="reference", weight_decay=0.1)
        nat_d, nat_s = lstm_update(params, grads, states, networks, ["dense"] * 2, impl="native", weight_decay=0.1)
    for i in range(2):
        torch.testing.assert_close(nat_d[i], ref_d[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nat_s[i]["lstm"], ref_s[i]["lstm"], rtol=1e-5, atol=1e-5)
    gates, c_prev = torch.randn(50, 24, requires_grad=True), torch.randn(50, 6)
    h, c = native.lstm_pointwise(gates, c_prev)
    i_, f_, g_, o_ = gates.chunk(4, dim=1)
    c_ref = torch.sigmoid(f_) * c_prev + torch.sigmoid(i_) * torch.tanh(g_)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_functional_native_falls_back_per_tensor_with_the_same_update(make_networks):
    """impl="native" on a float32 and a float64 tensor together: the float64 one takes the PyTorch
    path inside the same call, with the same schedule, weight decay and maximize as the kernel."""
    networks = make_networks(("dense",), **CONFIGS["nominal-scale-schedule"])
    params = [torch.randn(40), torch.randn(9, dtype=torch.float64)]
    grads = [torch.randn(40), torch.randn(9, dtype=torch.float64)]
    states = [init_state(g, networks.config) for g in grads]
    kw = dict(lr=[0.5, 0.7], weight_decay=0.1, maximize=True, step=[3, 5])
    with torch.no_grad():
        nat_d, nat_s = lstm_update(params, grads, states, networks, ["dense"] * 2, impl="native", **kw)
        ref_d, ref_s = lstm_update(params, grads, states, networks, ["dense"] * 2, impl="reference", **kw)
    assert nat_d[1].dtype == torch.float64
    for nd, rd, ns, rs in zip(nat_d, ref_d, nat_s, ref_s):
        torch.testing.assert_close(nd, rd, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ns["lstm"], rs["lstm"], rtol=1e-5, atol=1e-6)
