"""``LSTMOptimizer``: a :class:`torch.optim.Optimizer` driven by pretrained LSTM update networks."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import native
from .functional import IMPLEMENTATIONS, init_state, lstm_update, scheduled_lrs, state_dtype
from .network import UpdateNetworks

__all__ = ["LSTMOptimizer", "DEFAULT_PRETRAINED"]

#: The shipped optimizer that ``LSTMOptimizer(params)`` loads.
DEFAULT_PRETRAINED = "default"

_STATE_KEYS = ("lstm", "moments")
_WARNED_NO_NATIVE = False
_LSTM_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def _warn_no_native(err: Exception) -> None:
    """Once per process: ``impl="auto"`` fell back to the PyTorch path because of ``err``."""
    global _WARNED_NO_NATIVE
    if not _WARNED_NO_NATIVE:
        _WARNED_NO_NATIVE = True
        warnings.warn(f"LSTMOptimizer: using the slower PyTorch path (impl='batched') because "
                      f"the native kernel is unavailable: {err}. Pass impl='batched' to silence this.",
                      RuntimeWarning, stacklevel=7)


class LSTMOptimizer(Optimizer):
    """A learned optimizer: a coordinate-wise two-layer LSTM turns each gradient into an update.

    Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent". One
    small network, shared by all coordinates, reads features of each coordinate's gradient and
    its own per-coordinate hidden state, and proposes that coordinate's update. A bundle holds one
    network per parameter *role* (for example ``conv`` kernels vs ``dense`` weights); roles are
    chosen from each tensor's shape, or set per param group with ``{"params": ..., "role": "conv"}``.

    Args:
        params: Tensors or param-group dicts, as for any ``torch.optim`` optimizer. A group may set
            ``lr``, ``weight_decay``, ``maximize`` and ``role``.
        lr: Multiplies the learned update (default 1.0, the scale it was meta-trained at). LR
            schedulers read and write it; ``lr=0`` freezes a group.
        pretrained: Name of a shipped optimizer (see :func:`learnedopt.list_pretrained`), a local
            directory, or a Hugging Face Hub repo id (``"user/repo"``). Defaults to ``"default"``.
        networks: An :class:`UpdateNetworks` to use instead of loading ``pretrained``.
        weight_decay: Decoupled weight decay: ``p <- p - lr * weight_decay * p`` each step.
        maximize: Maximise the objective instead of minimising it.
        role: Default role for groups that do not set one (``None``: chosen from the shape).
        revision: Hub revision (branch, tag or commit) when ``pretrained`` is a repo id.
        cache_dir: Hub cache directory.
        impl: ``"auto"`` (default): ``"native"`` for float32 CPU tensors when the kernel can be
            built here, ``"batched"`` otherwise. ``"native"``: the fused C++ kernel, in place
            (compiled with g++ on first use; tensors it cannot take, e.g. float64 or CUDA, go
            through ``"batched"``). ``"batched"``: one LSTM call per role in PyTorch ops.
            ``"compiled"``: the same under ``torch.compile``. ``"reference"``: per tensor, the
            textbook cell. All compute the same update (parity-tested).
        state_dtype: Storage type of the per-coordinate LSTM state: ``None`` (float32; float64
            for float64 parameters) or ``torch.bfloat16`` (half the memory; math in float32).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LSTMOptimizer(model.parameters())
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1.0,
        *,
        pretrained: str | Path | None = None,
        networks: UpdateNetworks | None = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
        role: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        impl: str = "auto",
        state_dtype: torch.dtype | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, weight_decay=weight_decay)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"Invalid impl: {impl!r}; choose one of {IMPLEMENTATIONS}")
        if state_dtype not in _LSTM_STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype}; choose None (float32, float64 for float64 "
                "parameters), torch.float32 or torch.bfloat16"
            )
        if networks is not None and pretrained is not None:
            raise ValueError("pass either pretrained= or networks=, not both")
        if networks is None:
            networks = UpdateNetworks.from_pretrained(
                DEFAULT_PRETRAINED if pretrained is None else pretrained,
                revision=revision,
                cache_dir=cache_dir,
            )
        elif not isinstance(networks, UpdateNetworks):
            raise TypeError(f"networks must be an UpdateNetworks, got {type(networks).__name__}")
        self.networks = networks
        self.impl = impl
        self.state_dtype = state_dtype
        self._native_packed: dict[str, tuple[tuple, native.PackedNetwork]] = {}
        if impl == "native":  # fail now, with the reason, rather than at the first step
            native.load_library()
            native.check_supported(networks.config)
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize, role=role)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it is validated completely before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        _check_hyperparameters(
            lr=param_group.get("lr", 0.0), weight_decay=param_group.get("weight_decay", 0.0)
        )
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # torch rejects sets itself
            params = list(params)
        if isinstance(params, list):
            if len({id(p) for p in params}) != len(params):
                raise ValueError(
                    "a parameter group lists the same parameter more than once; list each parameter "
                    "once (it would otherwise be updated twice per step)"
                )
            for p in params:
                if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                    raise TypeError(
                        f"LSTMOptimizer can only optimize floating-point or complex tensors, got {p.dtype}"
                    )
            param_group = {**param_group, "params": params}
        role = param_group.get("role", self.defaults.get("role"))
        if role is not None:
            if not isinstance(role, str):
                raise TypeError(f"param group 'role' must be a string or None, got {role!r}")
            roles = self.networks.roles
            if len(roles) > 1 and role not in roles:
                raise ValueError(
                    f"Invalid role: {role!r}; these update networks have roles {roles}. "
                    "Use one of them, or load a pretrained optimizer that has this role."
                )
        if isinstance(params, list):  # fail at construction, not at the first step
            for p in params:
                if isinstance(p, Tensor):
                    self.networks.resolve_role(role, p)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step
    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]], list[str], list, list]:
        """Tensors with gradients, their (lazily created) states, roles and hyperparameters."""
        params, grads, states, roles, lrs, wds = [], [], [], [], [], []
        config = self.networks.config
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "LSTMOptimizer does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(..., sparse=False)) or a sparse optimizer such as "
                        "torch.optim.SparseAdam for those parameters"
                    )
                state = self.state[p]
                # a complex tensor is optimized as its real view: each part is a coordinate
                real_p = torch.view_as_real(p) if p.is_complex() else p
                grad = torch.view_as_real(p.grad) if p.is_complex() else p.grad
                if group["maximize"]:
                    grad = -grad
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state.update(init_state(grad, config, self.state_dtype))
                params.append(real_p)
                grads.append(grad)
                states.append(state)
                roles.append(self.networks.resolve_role(group["role"], p))
                lrs.append(group["lr"])
                wds.append(group["weight_decay"])
        return params, grads, states, roles, lrs, wds

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        params, grads, states, roles, lrs, wds = self._collect()
        if not params:
            return loss
        device = params[0].device
        if self.networks.head_device() != device:  # follow the model, e.g. after model.cuda()
            self.networks.to(device)
        fast = self._native_indices(params, grads, states)
        nonfinite = 0  # the kernel counts non-finite gradients itself; the rest are checked below
        if fast:
            nonfinite = native.step_(
                [self._packed(roles[i]) for i in fast], [params[i] for i in fast],
                [grads[i].reshape(-1) for i in fast], [states[i] for i in fast],
                scheduled_lrs(self.networks, [roles[i] for i in fast], [lrs[i] for i in fast],
                              [states[i]["step"] for i in fast]),
                [wds[i] for i in fast],
            )
            for i in fast:
                states[i]["step"] += 1
            rest = sorted(set(range(len(params))) - set(fast))
            params, grads, states, roles, lrs, wds = (
                [seq[i] for i in rest] for seq in (params, grads, states, roles, lrs, wds)
            )
        if params:
            if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                nonfinite += 1
            impl = "batched" if self.impl in ("auto", "native") else self.impl
            deltas, new_states = lstm_update(
                params, grads, states, self.networks, roles, lr=lrs, weight_decay=wds, impl=impl,
                step=[state["step"] for state in states],
            )
            torch._foreach_add_(params, deltas)
            for state, new in zip(states, new_states):
                state["step"] += 1
                for key, value in new.items():
                    state[key].copy_(value)
        if nonfinite:
            warnings.warn(
                "LSTMOptimizer: the gradient has non-finite values (NaN or Inf); those coordinates "
                "were not updated and their LSTM state was kept. Check the loss for overflow: "
                "lower the learning rate, clip gradients, or use loss scaling.",
                RuntimeWarning,
                stacklevel=4,  # step <- no_grad wrapper <- Optimizer's hook wrapper <- the caller
            )
        return loss

    def _native_indices(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]) -> list[int]:
        """Which tensors the native kernel updates this step (none unless impl is auto/native)."""
        if self.impl not in ("auto", "native") or params[0].device.type != "cpu":
            return []
        if self.impl == "auto" and not native.usable_for(self.networks.config, _warn_no_native):
            return []
        return [i for i, (p, g, st) in enumerate(zip(params, grads, states)) if native.eligible(p, g, st)]

    def _packed(self, role: str) -> native.PackedNetwork:
        """The role's network in the kernel's layout, rebuilt when its weights change."""
        net = self.networks.network(role)
        key = tuple((p.data_ptr(), p._version) for p in net.parameters())
        cached = self._native_packed.get(role)
        if cached is None or cached[0] != key:
            cached = (key, native.PackedNetwork(net, self.networks.config))
            self._native_packed[role] = cached
        return cached[1]

    # ------------------------------------------------------------------ (de)serialisation
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["networks"] = self.networks
        state["impl"] = self.impl
        state.pop("_native_packed", None)  # ctypes structures; rebuilt on demand
        state["state_dtype"] = self.state_dtype
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._native_packed = {}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state plus the update networks' architecture and weights.

        Loadable with ``torch.load(..., weights_only=True)``. State-dict post-hooks see the
        complete dict, networks included.
        """
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        sd["update_networks"] = {
            "architecture": self.networks.config.architecture(),
            "weights": {k: v.detach().clone() for k, v in self.networks.state_dict().items()},
        }
        for hook in hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore per-coordinate LSTM states and the update networks' weights.

        Post-hooks run once everything (weights, state) is loaded.

        Raises:
            ValueError: if the state dict was saved with update networks of another architecture
                (roles, hidden size, features...).
        """
        state_dict = dict(state_dict)  # never mutate the caller's dict
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        saved_nets = state_dict.pop("update_networks", None)
        if saved_nets is not None:
            mine = self.networks.config.architecture()
            theirs = saved_nets.get("architecture", {})
            diffs = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)}
            if diffs:
                shown = ", ".join(f"{k}: saved {a!r} vs this optimizer {b!r}" for k, (a, b) in diffs.items())
                raise ValueError(
                    "cannot load an optimizer state saved with other update networks "
                    f"({shown}); construct LSTMOptimizer with the same pretrained networks first"
                )
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        if saved_nets is not None:
            self.networks.load_state_dict(saved_nets["weights"])
        # torch casts floating state to the parameter's dtype; state is kept in float32 for
        # low-precision parameters, so re-read those tensors from the saved dict.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None or p not in self.state:
                continue
            dtype = state_dtype(torch.view_as_real(p).dtype if p.is_complex() else p.dtype)
            for key in _STATE_KEYS:
                if key in saved:
                    wanted = self.state_dtype or dtype if key == "lstm" else dtype
                    self.state[p][key] = saved[key].to(dtype=wanted, device=p.device, copy=True)
        for post_hook in list(post.values()):
            post_hook(self)


def _check_hyperparameters(*, lr: Any, weight_decay: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = float(lr)
    else:
        lr_value = lr
    if not isinstance(lr_value, (int, float)) or not lr_value >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
