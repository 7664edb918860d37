"""Coordinate-wise LSTM update networks and the bundle that holds one per parameter role."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import UpdateNetworkConfig

__all__ = ["UpdateNetwork", "UpdateNetworks"]

#: Initial decay rate of an ``"inverse_time"`` schedule: the step size halves after 100 steps.
INITIAL_SCHEDULE_RATE = 0.01


class UpdateNetwork(nn.Module):
    """A small stacked LSTM applied to every coordinate independently, then a linear head.

    The weights are shared by all coordinates; each coordinate has its own hidden and cell
    state. The state of ``N`` coordinates is one ``(N, 2 * num_layers * hidden_size)`` tensor laid
    out as ``[h_1, ..., h_L, c_1, ..., c_L]``.

    Layer ``l`` keeps its input and recurrent weights side by side in one ``(4H, in + H)`` matrix,
    gate order ``(input, forget, cell, output)`` as in :class:`torch.nn.LSTM`, so that one matmul
    on ``[x, h]`` gives all four gates.
    """

    def __init__(self, input_size: int, hidden_size: int = 20, num_layers: int = 2, nominal: bool = False,
                 schedule: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        h = hidden_size
        for layer in range(num_layers):
            fan_in = (input_size if layer == 0 else h) + h
            self.register_parameter(f"weight_{layer}", nn.Parameter(torch.empty(4 * h, fan_in)))
            self.register_parameter(f"bias_{layer}", nn.Parameter(torch.empty(4 * h)))
        self.head_weight = nn.Parameter(torch.empty(h))
        self.head_bias = nn.Parameter(torch.empty(()))
        #: log step size of the nominal momentum step (``UpdateNetworkConfig.nominal_momentum``)
        self.nominal_log_lr = nn.Parameter(torch.empty(())) if nominal else None
        #: log decay rate of the learned step-size schedule (``UpdateNetworkConfig.schedule``)
        self.schedule_log_rate = nn.Parameter(torch.empty(())) if schedule else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's LSTM initialisation, forget-gate bias 1, and a small head (small first updates)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        h = self.hidden_size
        with torch.no_grad():
            for weight, bias in self.layer_parameters():
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)
                bias[h : 2 * h].add_(1.0)
            self.head_weight.uniform_(-0.1 * bound, 0.1 * bound)
            self.head_bias.zero_()
            if self.nominal_log_lr is not None:
                self.nominal_log_lr.zero_()
            if self.schedule_log_rate is not None:
                self.schedule_log_rate.fill_(math.log(INITIAL_SCHEDULE_RATE))

    def schedule_factor(self, step: float | Tensor) -> float | Tensor:
        """The learned schedule's multiplier of the update at a tensor's ``step`` (updates it has
        had before): ``1 / (1 + step * exp(schedule_log_rate))``, or ``1.0`` without a schedule.
        Differentiable in ``schedule_log_rate``."""
        if self.schedule_log_rate is None:
            return 1.0
        rate = self.schedule_log_rate
        # 1 / (1 + t e^r) = sigmoid(-(log t + r)): exactly 1 at t = 0 and no overflow for any r
        return torch.sigmoid(-(torch.as_tensor(step, dtype=rate.dtype).log() + rate))

    def layer_parameters(self) -> Iterator[tuple[Tensor, Tensor]]:
        for layer in range(self.num_layers):
            yield getattr(self, f"weight_{layer}"), getattr(self, f"bias_{layer}")

    @property
    def state_size(self) -> int:
        """Floats of recurrent state per coordinate."""
        return 2 * self.num_layers * self.hidden_size

    def forward(self, x: Tensor, state: Tensor, *, pointwise: str = "torch") -> tuple[Tensor, Tensor]:
        """One step for a batch of coordinates.

        Args:
            x: ``(N, input_size)`` input features.
            state: ``(N, state_size)`` recurrent state.
            pointwise: How the gate nonlinearities and the cell update run: ``"torch"`` (PyTorch
                ops), ``"native"`` (the fused kernel of :mod:`learnedopt.native`, forward and
                backward; float32 CPU) or ``"auto"`` (native where it can run, else torch).

        Returns:
            ``(out, new_state)``: the head's output ``(N,)`` and the new state ``(N, state_size)``.
        """
        from . import native
        h_size, n_layers = self.hidden_size, self.num_layers
        hs, cs = [], []
        inp = x
        # one split rather than a slice per piece: under autograd, each slice's backward would
        # allocate and zero a gradient the size of the whole state
        pieces = state.split(h_size, dim=1)
        for layer, (weight, bias) in enumerate(self.layer_parameters()):
            h, c = pieces[layer], pieces[n_layers + layer]
            gates = torch.addmm(bias, torch.cat([inp, h], dim=1), weight.t())
            if pointwise == "native" or (pointwise == "auto" and native.pointwise_eligible(gates, c)):
                h, c = native.lstm_pointwise(gates, c)
            else:
                # one sigmoid over all gates: on CPU, elementwise ops on the column slices of
                # `gates` are not vectorised and cost several times a contiguous pass
                act = torch.sigmoid(gates)
                i, f, o = act[:, :h_size], act[:, h_size : 2 * h_size], act[:, 3 * h_size :]
                g = torch.tanh(gates[:, 2 * h_size : 3 * h_size])
                c = f * c + i * g
                h = o * torch.tanh(c)
            hs.append(h)
            cs.append(c)
            inp = h
        out = inp @ self.head_weight + self.head_bias
        return out, torch.cat(hs + cs, dim=1)

    def forward_reference(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The textbook LSTM cell, written out term by term (the parity reference for ``forward``)."""
        h_size, n_layers = self.hidden_size, self.num_layers
        new_h, new_c = [], []
        inp = x
        for layer, (weight, bias) in enumerate(self.layer_parameters()):
            w_ih, w_hh = weight[:, : weight.shape[1] - h_size], weight[:, weight.shape[1] - h_size :]
            h = state[:, layer * h_size : (layer + 1) * h_size]
            c = state[:, (n_layers + layer) * h_size : (n_layers + layer + 1) * h_size]
            pre = inp @ w_ih.t() + h @ w_hh.t() + bias
            i = torch.sigmoid(pre[:, 0:h_size])
            f = torch.sigmoid(pre[:, h_size : 2 * h_size])
            g = torch.tanh(pre[:, 2 * h_size : 3 * h_size])
            o = torch.sigmoid(pre[:, 3 * h_size :])
            c = f * c + i * g
            h = o * torch.tanh(c)
            new_h.append(h)
            new_c.append(c)
            inp = h
        out = (inp * self.head_weight).sum(dim=1) + self.head_bias
        return out, torch.cat(new_h + new_c, dim=1)


class UpdateNetworks(nn.Module):
    """A bundle of update networks, one per parameter role, sharing one :class:`UpdateNetworkConfig`.

    This is the module that owns the learned weights: it saves and loads the pretrained format
    (``config.json``, ``model.safetensors`` with one key prefix per role, ``README.md``) and
    pushes to the Hugging Face Hub. :class:`~learnedopt.LSTMOptimizer` holds one.

    Example:
        >>> nets = UpdateNetworks(UpdateNetworkConfig(roles=["conv", "dense"]))
        >>> sorted(nets.roles)
        ['conv', 'dense']
    """

    def __init__(self, config: UpdateNetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else UpdateNetworkConfig()
        for role in self.config.roles:
            if not role.isidentifier():
                raise ValueError(f"role name {role!r} must be a Python identifier (letters, digits, _)")
            self.add_module(
                role,
                UpdateNetwork(self.config.input_size, self.config.hidden_size, self.config.num_layers,
                              nominal=self.config.nominal_momentum is not None,
                              schedule=self.config.schedule != "constant"),
            )

    @property
    def roles(self) -> list[str]:
        return list(self.config.roles)

    def head_device(self) -> torch.device:
        """The device the networks' weights live on."""
        return next(self.parameters()).device

    def network(self, role: str) -> UpdateNetwork:
        """The network that serves ``role``; a single-network bundle serves every role."""
        if len(self.config.roles) == 1:
            return getattr(self, self.config.roles[0])
        if role not in self.config.roles:
            raise KeyError(
                f"these update networks have no role {role!r}; available roles: {self.config.roles}. "
                "Set a param group's 'role' to one of them, or load a bundle that has this role."
            )
        return getattr(self, role)

    def resolve_role(self, role: str | None, param: Tensor) -> str:
        """The role a parameter is updated with: ``role`` if given, else chosen from its shape.

        Automatic choice: tensors of 3 or more dimensions (conv kernels) use ``conv`` and tensors of
        at most 1 dimension (biases, norm scales) use ``bias``, each when the bundle has that role;
        everything else, and a shape whose role the bundle lacks, uses ``dense`` (as in the paper,
        where one network served everything fully connected). A single-network bundle serves every
        role. An explicit role that the bundle lacks is an error.
        """
        roles = self.config.roles
        if role is not None:
            if len(roles) > 1 and role not in roles:
                raise ValueError(
                    f"param group role {role!r} is not in these update networks; available roles: "
                    f"{roles}. Use one of them, or load a bundle that has this role."
                )
            return role
        if len(roles) == 1:
            return roles[0]
        if param.dim() >= 3 and "conv" in roles:
            return "conv"
        if param.dim() <= 1 and "bias" in roles:
            return "bias"
        if "dense" in roles:
            return "dense"
        raise ValueError(
            f"a parameter of shape {tuple(param.shape)} has no network in these update networks "
            f"(roles {roles}, no 'dense' fallback); set the param group's 'role' to one of them"
        )

    # ------------------------------------------------------------------ pretrained format
    def save_pretrained(self, directory: str | Path, *, model_card: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``directory``.

        Each file is written to a temporary name and renamed into place, so an interrupted save
        never leaves a half-written file under the real name.
        """
        from .serialization import save_networks

        return save_networks(self, directory, model_card=model_card)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> UpdateNetworks:
        """Load a shipped optimizer by name, a local directory, or a Hugging Face Hub repo id."""
        from .serialization import load_networks

        return load_networks(name_or_path, revision=revision, cache_dir=cache_dir, token=token)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        model_card: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload learnedopt update networks",
        revision: str | None = None,
    ) -> Any:
        """Upload this bundle to the Hugging Face Hub as ``repo_id`` (creating the repo if needed)."""
        from .serialization import push_networks

        return push_networks(
            self,
            repo_id,
            model_card=model_card,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
        )

    def extra_repr(self) -> str:
        c = self.config
        nominal = "" if c.nominal_momentum is None else f", nominal_momentum={c.nominal_momentum}"
        schedule = "" if c.schedule == "constant" else f", schedule={c.schedule!r}"
        return (f"roles={c.roles}, hidden_size={c.hidden_size}, num_layers={c.num_layers}, "
                f"features={c.features}{nominal}{schedule}")
