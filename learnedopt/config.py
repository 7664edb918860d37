"""The configuration of a bundle of update networks, stored as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMAT_VERSION", "FEATURES", "UpdateNetworkConfig", "ConfigError"]

#: Version of the on-disk format (``config.json`` + ``model.safetensors``). Bumped when a
#: change would make older code misread a newer directory.
FORMAT_VERSION = 1

#: Input features an update network can read, and how many inputs each one adds.
#:
#: - ``grad_logsign``: the paper's preprocessing of the gradient, ``(log|g|/p, sign g)`` if
#:   ``|g| >= e^-p`` else ``(-1, e^p g)`` (2 inputs).
#: - ``grad_rms``: the gradient divided by the root of its running second moment, clipped to
#:   ``[-feature_clip, feature_clip]`` (1 input; invariant to the loss's scale).
#: - ``momentum_rms``: for each ``beta`` in ``momentum_betas``, the bias-corrected running mean of
#:   the gradient divided by the root of the running second moment, clipped (1 input per beta).
#: - ``tensor_rms``: the gradient and each running mean divided by the tensor's RMS gradient (the
#:   root of the mean, over the tensor, of the running second moment before this step), clipped
#:   (1 + one per beta inputs). Invariant to the loss's scale, like ``*_rms``, but it keeps the
#:   relative sizes of a tensor's coordinates, so an update can be proportional to the gradient
#:   (SGD/momentum-like) instead of to its sign (Adam-like).
FEATURES = {"grad_logsign": 2, "grad_rms": 1, "momentum_rms": None, "tensor_rms": None}

#: How a network corrects the nominal momentum step (``UpdateNetworkConfig.nominal_correction``).
NOMINAL_CORRECTIONS = ("add", "scale")

#: Learned step-size schedules (``UpdateNetworkConfig.schedule``).
SCHEDULES = ("constant", "inverse_time")


#: Names an ``UpdateNetworks`` module already uses; a role cannot take them.
_RESERVED_ROLES = frozenset({"config", "roles", "training"}) | frozenset(dir(__import__("torch").nn.Module))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """A ``config.json`` that this version of learnedopt cannot use."""


@dataclass
class UpdateNetworkConfig:
    """Architecture and input features of a bundle of coordinate-wise LSTM update networks.

    One config describes every network of a bundle: the networks of different roles share the
    architecture and differ only in their weights.

    Attributes:
        roles: Names of the networks in the bundle, e.g. ``["conv", "dense"]``. A bundle with a
            single role serves every parameter whatever its shape.
        hidden_size: Units in each LSTM layer (the paper uses 20).
        num_layers: Stacked LSTM layers (the paper uses 2).
        features: Input features, names from :data:`FEATURES`, in input order.
        preprocess_p: ``p`` of the paper's log/sign gradient preprocessing.
        momentum_betas: Decay rates of the running gradient means used by ``momentum_rms``.
        rms_beta: Decay rate of the running second moment used by the ``*_rms`` features.
        rms_eps: Added to the root of the second moment before dividing.
        feature_clip: Bound on the magnitude of the ``*_rms`` features.
        output_scale: The network's linear head output is multiplied by this to give the update.
        update_clip: Bound on the magnitude of each coordinate's update (before ``lr``), a
            safeguard against blow-ups past the trained horizon. ``None`` for no bound.
        nominal_momentum: ``None`` (the paper's setup): the update is the network's output alone.
            A momentum ``mu`` in ``[0, 1)``: the update is the network's output plus a Nesterov
            momentum step ``-exp(nominal_log_lr) * ((1 - mu) * g + mu * e)``, where ``e`` is a
            running mean of the gradient with decay ``mu`` that starts at zero (so this is
            ``torch.optim.SGD(nesterov=True)`` with learning rate ``(1 - mu) * exp(nominal_log_lr)``,
            including its warm-up) and ``nominal_log_lr`` a learned scalar of each network
            (starting at 0). The LSTM then learns a correction to a momentum step of learned size
            (a "nominal descent direction"). ``update_clip`` bounds the sum.
        nominal_correction: How the network corrects the nominal step: ``"add"`` (its output times
            ``output_scale`` is added to the step) or ``"scale"`` (the step's size is multiplied
            by ``exp(output_scale * output)`` per coordinate: a learned per-coordinate, per-step
            learning rate that keeps the step's direction).
        schedule: ``"constant"``: the update does not depend on the step count. ``"inverse_time"``:
            a tensor's update (and its weight decay, as a torch LR scheduler would) at step ``t``
            (the number of updates it has had before) is multiplied by
            ``1 / (1 + t * exp(schedule_log_rate))``, with ``schedule_log_rate`` a learned scalar of
            each network (starting at ``log(0.01)``: half the step size after 100 steps). The
            decay continues past the trained horizon.
        format_version: Version of the directory format that wrote this config.
        library_version: learnedopt version that wrote this config.
        description: One line saying what this optimizer is for.
        training: Free-form record of how the weights were made (command, settings, results).
    """

    roles: list[str] = field(default_factory=lambda: ["dense"])
    hidden_size: int = 20
    num_layers: int = 2
    features: list[str] = field(default_factory=lambda: ["grad_logsign", "momentum_rms"])
    preprocess_p: float = 10.0
    momentum_betas: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.99])
    rms_beta: float = 0.999
    rms_eps: float = 1e-8
    feature_clip: float = 10.0
    output_scale: float = 0.1
    update_clip: float | None = 1.0
    nominal_momentum: float | None = None
    nominal_correction: str = "add"
    schedule: str = "constant"
    format_version: int = FORMAT_VERSION
    library_version: str = ""
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def input_size(self) -> int:
        """Number of inputs per coordinate that the configured features produce."""
        n = 0
        for name in self.features:
            if name == "momentum_rms":
                n += len(self.momentum_betas)
            elif name == "tensor_rms":
                n += 1 + len(self.momentum_betas)
            else:
                n += FEATURES[name]
        return n

    @property
    def uses_moments(self) -> bool:
        """Whether the update needs running gradient moments kept in the state."""
        return self.nominal_momentum is not None or any(
            name in ("grad_rms", "momentum_rms", "tensor_rms") for name in self.features
        )

    @property
    def feature_means(self) -> int:
        """Running gradient means that the features read (the first columns of the moments)."""
        return len(self.momentum_betas) if {"momentum_rms", "tensor_rms"} & set(self.features) else 0

    @property
    def moment_betas(self) -> list[float]:
        """Decay rates of the running means kept in the state, in column order: the features'
        means, then the nominal step's (which starts at zero)."""
        nominal = [] if self.nominal_momentum is None else [self.nominal_momentum]
        return list(self.momentum_betas[: self.feature_means]) + nominal

    @property
    def num_moments(self) -> int:
        """Per-coordinate moment buffers kept in the state: the means, then the second moment."""
        return len(self.moment_betas) + 1 if self.uses_moments else 0

    @property
    def nominal_index(self) -> int | None:
        """Column of the moments that holds the nominal step's running mean (``None`` without one)."""
        return None if self.nominal_momentum is None else self.feature_means

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the shapes of weights and state and the update's math."""
        skip = {"format_version", "library_version", "description", "training"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    # ------------------------------------------------------------------ validation / io
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that is unusable."""
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise ConfigError(f"config format_version must be an integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version!r} is newer than this learnedopt "
                f"understands (format {FORMAT_VERSION}); upgrade learnedopt: "
                "pip install -U learnedopt"
            )
        if not isinstance(self.roles, list) or not self.roles:
            raise ConfigError(f"config roles must be a non-empty list of names, got {self.roles!r}")
        for role in self.roles:
            if not isinstance(role, str) or not role.isidentifier():
                raise ConfigError(f"config roles: {role!r} is not a Python identifier (use letters, digits, _)")
            if role in _RESERVED_ROLES or role.startswith("_"):
                raise ConfigError(f"config role name {role!r} is reserved; choose another name")
        if len(set(self.roles)) != len(self.roles):
            raise ConfigError(f"config roles must be distinct, got {self.roles!r}")
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config {name} must be a positive integer, got {value!r}")
        if not isinstance(self.features, list) or not self.features:
            raise ConfigError(f"config features must be a non-empty list, got {self.features!r}")
        for name in self.features:
            if name not in FEATURES:
                raise ConfigError(
                    f"unknown feature {name!r} in config features; known: {sorted(FEATURES)}"
                )
        if not isinstance(self.momentum_betas, list):
            raise ConfigError(f"config momentum_betas must be a list, got {self.momentum_betas!r}")
        if "momentum_rms" in self.features and not self.momentum_betas:
            raise ConfigError("feature 'momentum_rms' needs at least one value in momentum_betas")
        for beta in [*self.momentum_betas, self.rms_beta]:
            if not _is_number(beta) or not 0.0 <= beta < 1.0:
                raise ConfigError(f"config betas (momentum_betas, rms_beta) must lie in [0, 1), got {beta!r}")
        for name in ("preprocess_p", "output_scale", "feature_clip", "rms_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"config {name} must be a positive number, got {value!r}")
        if self.update_clip is not None and (not _is_number(self.update_clip) or not self.update_clip > 0):
            raise ConfigError(f"config update_clip must be a positive number or null, got {self.update_clip!r}")
        if self.nominal_momentum is not None and (
            not _is_number(self.nominal_momentum) or not 0.0 <= self.nominal_momentum < 1.0
        ):
            raise ConfigError(
                f"config nominal_momentum must be a number in [0, 1) or null, got {self.nominal_momentum!r}"
            )
        if self.nominal_correction not in NOMINAL_CORRECTIONS:
            raise ConfigError(
                f"config nominal_correction must be one of {list(NOMINAL_CORRECTIONS)}, got {self.nominal_correction!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"config schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.training, dict):
            raise ConfigError(f"config training must be an object, got {self.training!r}")
        if not isinstance(self.description, str) or not isinstance(self.library_version, str):
            raise ConfigError("config description and library_version must be strings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> UpdateNetworkConfig:
        """Build a config from parsed JSON, refusing unknown fields and newer formats."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)  # checked before unknown fields
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ConfigError(
                f"{source} has format_version {version}, newer than this learnedopt understands "
                f"(format {FORMAT_VERSION}); upgrade learnedopt: pip install -U learnedopt"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source} has unknown fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
