"""Shared fixtures: small, randomly initialised update networks (never the shipped weights)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from learnedopt import UpdateNetworkConfig, UpdateNetworks


def _make_networks(
    roles: Sequence[str] = ("dense",),
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **fields,
) -> UpdateNetworks:
    """A bundle with fresh random weights; ``hidden_size`` defaults to 6 to keep tests fast."""
    fields.setdefault("hidden_size", 6)
    torch.manual_seed(seed)
    networks = UpdateNetworks(UpdateNetworkConfig(roles=list(roles), **fields))
    if dtype is not None:
        networks.to(dtype)
    # Make the head large enough that the updates are not all tiny (the init is deliberately
    # small) without reaching update_clip: differences between code paths then show up clearly.
    with torch.no_grad():
        for role in networks.roles:
            networks.network(role).head_weight.mul_(20.0)
            networks.network(role).head_bias.fill_(0.01)
            if networks.network(role).nominal_log_lr is not None:  # a step of 0.2 x the momentum
                networks.network(role).nominal_log_lr.fill_(-1.6)
    return networks


@pytest.fixture
def make_networks() -> Callable[..., UpdateNetworks]:
    """Factory: ``make_networks(roles=("conv", "dense"), seed=0, dtype=None, **config_fields)``."""
    return _make_networks
