"""learnedopt: a drop-in learned optimizer for PyTorch.

Example:
    >>> import torch
    >>> from learnedopt import LSTMOptimizer
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = LSTMOptimizer(model.parameters())
"""

__version__ = "0.1.0"

from .config import FEATURES, FORMAT_VERSION, ConfigError, UpdateNetworkConfig
from .functional import compute_features, init_state, lstm_update, tensor_rms
from .native import NativeUnavailable
from .network import UpdateNetwork, UpdateNetworks
from .optimizer import DEFAULT_PRETRAINED, LSTMOptimizer
from .serialization import HubError, WeightsError, list_pretrained

__all__ = [
    "__version__",
    "LSTMOptimizer",
    "UpdateNetwork",
    "UpdateNetworks",
    "UpdateNetworkConfig",
    "lstm_update",
    "init_state",
    "compute_features",
    "tensor_rms",
    "NativeUnavailable",
    "list_pretrained",
    "DEFAULT_PRETRAINED",
    "FEATURES",
    "FORMAT_VERSION",
    "ConfigError",
    "WeightsError",
    "HubError",
]
