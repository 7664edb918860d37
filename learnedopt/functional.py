"""The functional core: the learned update as a pure, differentiable function.

:class:`~learnedopt.LSTMOptimizer` calls :func:`lstm_update` under ``torch.no_grad()``; the
meta-trainer calls the very same function with gradients flowing into the network weights.

Per-coordinate state of a tensor is a dict of flat tensors:

- ``"lstm"``: ``(numel, 2 * num_layers * hidden_size)`` hidden and cell states;
- ``"moments"`` (only when the update uses them): ``(numel, K)`` running gradient means, one per
  ``momentum_betas`` (when the features read them), then the nominal step's (with
  ``nominal_momentum``), then the running second moment.

Two implementations compute the same update:

- ``"batched"`` (default): per role, every coordinate of every tensor goes through one LSTM call
  (in chunks when no gradient is needed, to bound the memory of temporaries);
- ``"compiled"``: the batched path with the per-chunk step compiled by ``torch.compile``
  (elementwise gate math fused into a few kernels; the first call compiles, taking seconds);
- ``"native"``: the fused C++ kernels of :mod:`learnedopt.native` (float32 CPU tensors; others
  go through ``"batched"``). Without autograd, the whole step is one kernel
  (:class:`~learnedopt.LSTMOptimizer` runs it in place; here it works on copies, so the function
  stays pure); with autograd (meta-training), the batched path with the fused LSTM pointwise
  kernel, forward and backward;
- ``"auto"``: ``"native"`` where the kernel can be built, else ``"batched"``;
- ``"reference"``: one tensor at a time, with the textbook LSTM cell. Slow; the parity reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import UpdateNetworkConfig
from .network import UpdateNetwork, UpdateNetworks

__all__ = ["init_state", "compute_features", "tensor_rms", "lstm_update", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "batched", "compiled", "native", "reference")

#: Coordinates per chunk in the no-grad batched path: large enough for efficient matmuls, small
#: enough that the gate temporaries (about 200 floats per coordinate) stay within a few MB.
CHUNK_SIZE = 32768

#: Under autograd, tensors with at least this many coordinates are not concatenated with others.
SEPARATE_SIZE = 4096

State = dict[str, Tensor]


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """State is float64 for float64 parameters and float32 otherwise (also for bf16/fp16)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def init_state(grad: Tensor, config: UpdateNetworkConfig, lstm_dtype: torch.dtype | None = None) -> State:
    """Fresh state for a tensor whose first gradient is ``grad``.

    The LSTM state starts at zero, stored in ``lstm_dtype`` (default: float32, or float64 for
    float64 parameters; ``torch.bfloat16`` halves its memory while the math stays in float32).
    The running moments start at the first gradient (means) and its square (second moment), so
    that no bias correction is needed, except the nominal step's mean, which starts at zero as
    SGD's momentum buffer does; non-finite entries start at 0.
    """
    dtype = state_dtype(grad.dtype)
    g = grad.detach().reshape(-1).to(dtype)
    g = torch.where(torch.isfinite(g), g, torch.zeros((), dtype=dtype, device=g.device))
    n = g.numel()
    state: State = {
        "lstm": torch.zeros(
            n, 2 * config.num_layers * config.hidden_size, dtype=lstm_dtype or dtype, device=g.device
        )
    }
    if config.uses_moments:
        cols = [g[:, None].expand(n, config.feature_means)]
        if config.nominal_index is not None:
            cols.append(torch.zeros(n, 1, dtype=dtype, device=g.device))
        state["moments"] = torch.cat([*cols, (g * g)[:, None]], dim=1).contiguous()
    return state


def _update_moments(g: Tensor, moments: Tensor, config: UpdateNetworkConfig) -> Tensor:
    means = config.num_moments - 1
    betas = torch.tensor([*config.moment_betas, config.rms_beta], dtype=moments.dtype, device=moments.device)
    target = torch.cat([g[:, None].expand(-1, means), (g * g)[:, None]], dim=1)
    return betas * moments + (1 - betas) * target


def tensor_rms(state: State, config: UpdateNetworkConfig) -> Tensor:
    """The ``tensor_rms`` feature's divisor for one tensor: the root of the mean of its running
    second moment (as stored, i.e. before this step's update) plus ``rms_eps``; a 0-d tensor."""
    v = state["moments"][:, -1]
    if v.numel() == 0:
        return v.new_ones(())
    return v.mean().sqrt() + config.rms_eps


def compute_features(
    g: Tensor, moments: Tensor | None, config: UpdateNetworkConfig, tensor_scale: Tensor | None = None
) -> Tensor:
    """Input features ``(N, config.input_size)`` from flat gradients ``g`` and *updated* moments;
    ``tensor_scale`` (``(N,)``: :func:`tensor_rms` of each coordinate's tensor) for ``tensor_rms``."""
    cols: list[Tensor] = []
    rms = None
    if config.uses_moments:
        assert moments is not None
        rms = moments[:, -1].sqrt() + config.rms_eps
    clip = config.feature_clip
    for name in config.features:
        if name == "grad_logsign":
            p = config.preprocess_p
            absg = g.abs()
            big = absg >= math.exp(-p)
            # clamp before log so that gradients of the unused branch stay finite
            log_part = torch.where(big, absg.clamp_min(math.exp(-p)).log() / p, -torch.ones_like(g))
            sign_part = torch.where(big, torch.sign(g), g * math.exp(p))
            cols += [log_part, sign_part]
        elif name == "grad_rms":
            cols.append((g / rms).clamp(-clip, clip))
        elif name == "momentum_rms":
            means = len(config.momentum_betas)
            cols.extend((moments[:, :means] / rms[:, None]).clamp(-clip, clip).unbind(1))
        elif name == "tensor_rms":
            if tensor_scale is None:
                raise ValueError("feature 'tensor_rms' needs tensor_scale (see learnedopt.functional.tensor_rms)")
            means = len(config.momentum_betas)
            cols.append((g / tensor_scale).clamp(-clip, clip))
            cols.extend((moments[:, :means] / tensor_scale[:, None]).clamp(-clip, clip).unbind(1))
        else:  # validated by the config; kept for safety against hand-edited configs
            raise ValueError(f"unknown feature {name!r}")
    return torch.stack(cols, dim=1)


def _coordinate_step(
    net: UpdateNetwork,
    config: UpdateNetworkConfig,
    g: Tensor,
    lstm: Tensor,
    moments: Tensor | None,
    *,
    reference: bool,
    pointwise: str = "torch",
    tensor_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Update direction and new state for flat coordinates; non-finite gradients are masked out."""
    finite = torch.isfinite(g)
    # in eager mode, skip the masking when every gradient is finite (the usual case); a compiled
    # graph keeps it (no data-dependent branch)
    all_finite = not torch.compiler.is_compiling() and bool(finite.all())
    g_safe = g if all_finite else torch.where(finite, g, torch.zeros_like(g))
    new_moments = _update_moments(g_safe, moments, config) if moments is not None else None
    x = compute_features(g_safe, new_moments, config, tensor_scale)
    if reference:
        out, new_lstm = net.forward_reference(x.to(net.head_weight.dtype), lstm.to(net.head_weight.dtype))
    else:
        out, new_lstm = net(x.to(net.head_weight.dtype), lstm.to(net.head_weight.dtype), pointwise=pointwise)
    out = out.to(g.dtype) * config.output_scale
    if config.nominal_index is not None:  # plus a Nesterov momentum step of learned size
        mu = config.nominal_momentum
        direction = (1 - mu) * g_safe + mu * new_moments[:, config.nominal_index]
        if config.nominal_correction == "scale":
            out = -(net.nominal_log_lr.to(g.dtype) + out).exp() * direction
        else:
            out = out - net.nominal_log_lr.exp().to(g.dtype) * direction
    if config.update_clip is not None:
        out = out.clamp(-config.update_clip, config.update_clip)
    if all_finite:
        return out, new_lstm.to(lstm.dtype), new_moments
    # coordinates with a non-finite gradient: no update, state untouched
    out = torch.where(finite, out, torch.zeros_like(out))
    new_lstm = torch.where(finite[:, None], new_lstm.to(lstm.dtype), lstm)
    if new_moments is not None:
        new_moments = torch.where(finite[:, None], new_moments, moments)
    return out, new_lstm, new_moments


def _as_list(value: float | Tensor | Sequence[float | Tensor], n: int, name: str) -> list:
    if isinstance(value, (int, float, Tensor)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} parameters")
    return values


def lstm_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[State],
    networks: UpdateNetworks,
    roles: Sequence[str],
    *,
    lr: float | Tensor | Sequence[float | Tensor] = 1.0,
    weight_decay: float | Sequence[float] = 0.0,
    maximize: bool = False,
    impl: str = "batched",
    step: int | Tensor | Sequence[int | Tensor] | None = None,
) -> tuple[list[Tensor], list[State]]:
    """Compute the learned update of every tensor; pure and differentiable.

    Args:
        params: Real floating-point tensors (any shapes).
        grads: Their gradients, same shapes. Treated as inputs: detach them for first-order
            meta-training, keep their graph for second order.
        states: Per-tensor state dicts (:func:`init_state` for fresh ones).
        networks: The update networks; ``roles[i]`` picks the one for ``params[i]``.
        roles: One role name per tensor (see :meth:`UpdateNetworks.resolve_role`).
        lr: Multiplies the learned update (and the weight decay); a float or one per tensor.
        weight_decay: Decoupled weight decay, ``p <- p - lr * weight_decay * p``; one or per tensor.
        maximize: Ascend instead of descend (the gradient's sign is flipped before the network).
        impl: ``"auto"``, ``"batched"``, ``"compiled"``, ``"native"`` or ``"reference"``; they
            compute the same result. ``"native"`` raises
            :class:`learnedopt.native.NativeUnavailable` where the kernel cannot be built.
        step: Updates each tensor has had before this one (one or per tensor); needed, and only
            read, when the networks have a learned schedule (``config.schedule``), which then
            multiplies ``lr`` (see :meth:`UpdateNetwork.schedule_factor`).

    Returns:
        ``(deltas, new_states)``: add ``deltas[i]`` to ``params[i]``; ``new_states[i]`` replaces
        ``states[i]``. Nothing passed in is modified.

    Example:
        >>> nets = UpdateNetworks()
        >>> p = torch.zeros(3); g = torch.tensor([1.0, -2.0, 0.5])
        >>> deltas, states = lstm_update([p], [g], [init_state(g, nets.config)], nets, ["dense"])
        >>> deltas[0].shape
        torch.Size([3])
    """
    n = len(params)
    if not (len(grads) == len(states) == len(roles) == n):
        raise ValueError(
            f"params, grads, states and roles must have the same length, got "
            f"{n}, {len(grads)}, {len(states)}, {len(roles)}"
        )
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    lrs = _as_list(lr, n, "lr")
    wds = _as_list(weight_decay, n, "weight_decay")
    lrs = scheduled_lrs(networks, roles, lrs, step)
    flat_grads = [(-g if maximize else g).reshape(-1).to(state_dtype(p.dtype)) for g, p in zip(grads, params)]
    return _update(params, flat_grads, states, networks, roles, lrs, wds, impl)


def scheduled_lrs(
    networks: UpdateNetworks, roles: Sequence[str], lrs: list, step: int | Tensor | Sequence[int | Tensor] | None
) -> list:
    """``lrs`` times each tensor's learned schedule factor at its ``step`` (see
    :meth:`UpdateNetwork.schedule_factor`); ``lrs`` itself when the networks have no schedule."""
    config = networks.config
    if config.schedule == "constant":
        return lrs
    if step is None:
        raise ValueError(
            f"these networks have a learned step-size schedule (config schedule {config.schedule!r}); "
            "pass step= (the number of updates each tensor has had, e.g. LSTMOptimizer's state['step'])"
        )
    steps = _as_list(step, len(lrs), "step")
    for t in steps:
        if (isinstance(t, Tensor) and t.numel() != 1) or not float(t) >= 0:
            raise ValueError(f"step must be a non-negative number (updates each tensor has had), got {t!r}")
    return [lr * networks.network(role).schedule_factor(t) for lr, role, t in zip(lrs, roles, steps)]


def _update(params, flat_grads, states, networks, roles, lrs, wds, impl) -> tuple[list[Tensor], list[State]]:
    """:func:`lstm_update` on flat gradients (sign and dtype already set) and per-tensor ``lrs``
    (schedule already applied) and ``wds``."""
    n = len(params)
    config = networks.config
    pointwise = "torch"
    if impl in ("native", "auto"):
        from . import native

        grad_mode = torch.is_grad_enabled() and (
            any(g.requires_grad for g in flat_grads) or any(p.requires_grad for p in networks.parameters())
            or any(s["lstm"].requires_grad for s in states)
        )
        if not grad_mode:
            if impl == "native" or native.usable_for(config):
                return _native_update(params, flat_grads, states, networks, roles, lrs, wds)
        else:
            pointwise = impl
            if impl == "native":
                native.load_library()  # the reason, now, if it cannot be built
        impl = "batched"

    directions: list[Tensor | None] = [None] * n
    new_states: list[State | None] = [None] * n
    if impl == "reference":
        for i in range(n):
            scale = _tensor_scales([states[i]], config, [flat_grads[i].numel()])
            out, lstm, moments = _coordinate_step(
                networks.network(roles[i]), config, flat_grads[i], states[i]["lstm"],
                states[i].get("moments"), reference=True, tensor_scale=scale,
            )
            directions[i] = out
            new_states[i] = _pack(lstm, moments)
    else:
        by_role: dict[str, list[int]] = {}
        for i, role in enumerate(roles):
            by_role.setdefault(role, []).append(i)
        for role, idx in by_role.items():
            outs, lstms, moms = _batched_role_step(
                networks.network(role), config, [flat_grads[i] for i in idx], [states[i] for i in idx],
                compiled=impl == "compiled", pointwise=pointwise,
            )
            for j, i in enumerate(idx):
                directions[i] = outs[j]
                new_states[i] = _pack(lstms[j], moms[j] if moms is not None else None)

    deltas = []
    for i in range(n):
        p = params[i]
        delta = directions[i].reshape(p.shape).to(p.dtype) * lrs[i]
        if wds[i] != 0:
            delta = delta - (lrs[i] * wds[i]) * p
        deltas.append(delta)
    return deltas, new_states  # type: ignore[return-value]


def _tensor_scales(states: Sequence[State], config: UpdateNetworkConfig, sizes: Sequence[int]) -> Tensor | None:
    """Per-coordinate :func:`tensor_rms` of each coordinate's tensor (``None`` if not a feature)."""
    if "tensor_rms" not in config.features:
        return None
    scales = [tensor_rms(st, config).expand(n) for st, n in zip(states, sizes)]
    return torch.cat(scales) if len(scales) > 1 else scales[0]


def _native_update(params, flat_grads, states, networks, roles, lrs, wds) -> tuple[list[Tensor], list[State]]:
    """``impl="native"`` without side effects: the kernel runs on copies of the state and on a zero
    buffer in place of each parameter, so the buffer ends up holding ``lr * direction``."""
    from . import native

    packed: dict[str, native.PackedNetwork] = {}
    deltas: list[Tensor | None] = [None] * len(params)
    new_states: list[State | None] = [None] * len(params)
    todo = []
    for i, (p, g, st) in enumerate(zip(params, flat_grads, states)):
        # the kernel writes into a fresh dense buffer, not into p: only p's device and dtype matter
        if native.eligible(p.detach().new_empty(0), g, st):
            if roles[i] not in packed:
                packed[roles[i]] = native.PackedNetwork(networks.network(roles[i]), networks.config)
            buf = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            todo.append((i, buf, {k: v.clone() for k, v in st.items() if k in ("lstm", "moments")}))
        else:
            d, s = _update([p], [g], [st], networks, [roles[i]], [lrs[i]], [wds[i]], "batched")
            deltas[i], new_states[i] = d[0], s[0]
    if todo:
        native.step_([packed[roles[i]] for i, _, _ in todo], [b for _, b, _ in todo],
                     [flat_grads[i] for i, _, _ in todo], [c for _, _, c in todo],
                     [lrs[i] for i, _, _ in todo], [0.0] * len(todo))
        for i, buf, copy in todo:
            delta = buf.reshape(params[i].shape)
            if wds[i] != 0:
                delta = delta - (lrs[i] * wds[i]) * params[i]
            deltas[i], new_states[i] = delta, copy
    return deltas, new_states  # type: ignore[return-value]


def _pack(lstm: Tensor, moments: Tensor | None) -> State:
    state = {"lstm": lstm}
    if moments is not None:
        state["moments"] = moments
    return state


_COMPILED = None


def _compiled_coordinate_step():
    """``_coordinate_step`` under ``torch.compile`` (created on first use; shapes are dynamic)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_coordinate_step, dynamic=True)
    return _COMPILED


def _batched_role_step(
    net: UpdateNetwork,
    config: UpdateNetworkConfig,
    grads: list[Tensor],
    states: list[State],
    compiled: bool = False,
    pointwise: str = "torch",
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
    """All coordinates of one role in one LSTM call (chunked when no gradient is needed).

    Under autograd, tensors of at least ``SEPARATE_SIZE`` coordinates get a call of their own:
    concatenating their state and splitting it again would copy (and, backward, zero-fill) the
    whole state every step, which costs more than the extra calls save.
    """
    if len(grads) > 1 and torch.is_grad_enabled():
        big = [i for i, g in enumerate(grads) if g.numel() >= SEPARATE_SIZE]
        if big:
            small = [i for i in range(len(grads)) if i not in big]
            groups = [[i] for i in big] + ([small] if small else [])
            outs, lstms, moms = [None] * len(grads), [None] * len(grads), [None] * len(grads)
            for group in groups:
                o, l, m = _batched_role_step(net, config, [grads[i] for i in group], [states[i] for i in group],
                                             compiled, pointwise)
                for j, i in enumerate(group):
                    outs[i], lstms[i] = o[j], l[j]
                    moms[i] = m[j] if m is not None else None
            return outs, lstms, (moms if "moments" in states[0] else None)  # type: ignore[return-value]
    sizes = [g.numel() for g in grads]
    g = torch.cat(grads) if len(grads) > 1 else grads[0]
    lstm = torch.cat([s["lstm"] for s in states]) if len(states) > 1 else states[0]["lstm"]
    has_moments = "moments" in states[0]
    moments = None
    if has_moments:
        moments = torch.cat([s["moments"] for s in states]) if len(states) > 1 else states[0]["moments"]

    scale = _tensor_scales(states, config, sizes)
    step = _compiled_coordinate_step() if compiled else _coordinate_step
    needs_grad = torch.is_grad_enabled() and (
        g.requires_grad or any(p.requires_grad for p in net.parameters()) or lstm.requires_grad
    )
    total = g.numel()
    if needs_grad or total <= CHUNK_SIZE:
        out, new_lstm, new_moments = step(net, config, g, lstm, moments, reference=False, pointwise=pointwise,
                                          tensor_scale=scale)
    else:
        out = torch.empty_like(g)
        new_lstm = torch.empty_like(lstm)
        new_moments = torch.empty_like(moments) if moments is not None else None
        for start in range(0, total, CHUNK_SIZE):
            stop = min(start + CHUNK_SIZE, total)
            o, l, m = step(
                net, config, g[start:stop], lstm[start:stop],
                moments[start:stop] if moments is not None else None, reference=False, pointwise=pointwise,
                tensor_scale=scale[start:stop] if scale is not None else None,
            )
            out[start:stop] = o
            new_lstm[start:stop] = l
            if new_moments is not None:
                new_moments[start:stop] = m
    outs = list(out.split(sizes))
    lstms = list(new_lstm.split(sizes))
    moms = list(new_moments.split(sizes)) if new_moments is not None else None
    return outs, lstms, moms
