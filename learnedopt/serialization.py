"""The pretrained format: save, load (shipped name, local directory, Hugging Face Hub), push, list.

A pretrained optimizer is a directory holding

- ``config.json``: an :class:`UpdateNetworkConfig` (architecture, features, roles, format and
  library versions, how it was trained), sorted and indented;
- ``model.safetensors``: the weights, one key prefix per role (``dense.weight_0``, ...);
- ``README.md``: the model card.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ConfigError, UpdateNetworkConfig
from .network import UpdateNetworks

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MODEL_CARD_NAME",
    "WeightsError",
    "HubError",
    "list_pretrained",
    "pretrained_dir",
    "load_networks",
    "save_networks",
    "push_networks",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"

def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsError(ValueError):
    """A ``model.safetensors`` that is corrupted or does not match its ``config.json``."""


class HubError(OSError):
    """A pretrained optimizer that could not be fetched from the Hugging Face Hub."""


# ---------------------------------------------------------------------- shipped optimizers
def pretrained_dir() -> Path:
    """The folder holding the shipped optimizers (installed as ``learnedopt.pretrained``)."""
    try:
        root = Path(str(resources.files("learnedopt.pretrained")))
        if root.is_dir():
            return root
    except ModuleNotFoundError:
        pass
    # running from a source checkout without installing
    return Path(__file__).resolve().parent.parent / "pretrained"


def list_pretrained() -> dict[str, str]:
    """Names of the shipped optimizers, each with its one-line description.

    Example:
        >>> "default" in list_pretrained()
        True
    """
    found = {}
    root = pretrained_dir()
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        config = sub / CONFIG_NAME
        if config.is_file():
            found[sub.name] = json.loads(config.read_text()).get("description", "")
    return found


# ---------------------------------------------------------------------- loading
def load_networks(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> UpdateNetworks:
    """Load update networks from a shipped name, a local directory, or a Hub repo id.

    Resolution order: a shipped name (see :func:`list_pretrained`), then an existing local
    directory, then a Hub repo id of the form ``"user/repo"`` (downloaded at ``revision`` into the
    Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only).
    """
    if isinstance(name_or_path, Path):
        return load_from_directory(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"pretrained must be a name, a directory or a repo id, got {name_or_path!r}")
    shipped = list_pretrained()
    if name_or_path in shipped:
        return load_from_directory(pretrained_dir() / name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_from_directory(path)
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise FileNotFoundError(f"pretrained directory {str(path)!r} does not exist or is not a directory")
    if _REPO_ID.match(name_or_path):
        return load_from_hub(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    raise ValueError(
        f"unknown pretrained optimizer {name_or_path!r}; shipped optimizers: {sorted(shipped)}. "
        "Pass one of them, a local directory, or a Hugging Face Hub repo id like 'user/repo'."
    )


def load_from_directory(directory: str | Path) -> UpdateNetworks:
    """Load a pretrained directory strictly: the weights must match the config exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained directory {str(directory)!r} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a pretrained directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(write one with UpdateNetworks.save_pretrained)"
        )
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err}); re-save or re-download it") from None
    config = UpdateNetworkConfig.from_dict(data, source=str(config_path))
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found next to {CONFIG_NAME}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{weights_path} is truncated or corrupted ({err}); re-download or re-save it"
        ) from None
    networks = UpdateNetworks(config)
    expected = networks.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{weights_path} does not match {config_path}: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}. The two files must come from the same save."
        )
    bad = sorted(k for k, v in weights.items() if not torch.isfinite(v).all())
    if bad:
        raise WeightsError(f"{weights_path} has non-finite values in {bad}; it cannot be used")
    networks.load_state_dict({k: v.float() for k, v in weights.items()})
    return networks


def load_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> UpdateNetworks:
    """Download ``config.json`` and ``model.safetensors`` of ``repo_id`` (cached) and load them."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import constants as hf_constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("loading from the Hub needs huggingface_hub: pip install huggingface_hub") from None

    where = f"{repo_id!r} (revision {revision or 'main'})"
    filename = CONFIG_NAME
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir, token=token))
        # the snapshot folder is named by the commit hash: fetch the weights of that very commit,
        # even if the branch moves in between
        commit = config_path.parent.name
        filename = WEIGHTS_NAME
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=commit, cache_dir=cache_dir, token=token)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        offline = hf_constants.HF_HUB_OFFLINE
        raise HubError(
            f"could not get {filename} of {where} from the Hugging Face Hub "
            f"({hf_constants.ENDPOINT}){' because HF_HUB_OFFLINE is set' if offline else ''}, and it "
            "is not in the local cache. Check your network connection (or HF_ENDPOINT), download it "
            "once while online and then use HF_HUB_OFFLINE=1, or pass a local directory path."
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in Hub repo {repo_id!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login` or pass a token)"
        ) from None
    except EntryNotFoundError:
        raise HubError(f"Hub repo {where} has no {filename}; is it a learnedopt optimizer?") from None
    return load_from_directory(config_path.parent)


# ---------------------------------------------------------------------- saving
def atomic_write(files: dict[Path, Any]) -> None:
    """Write each file to a temporary name in its folder, then rename them all into place.

    Nothing is renamed until every file is completely written, so an interruption leaves either
    the previous files or (at worst, between two renames) a mix of complete files, never a
    half-written one.
    """
    staged: dict[Path, str] = {}
    try:
        for path, write in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            staged[path] = tmp
            write(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; published weights are readable
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def default_model_card(config: UpdateNetworkConfig) -> str:
    """A minimal model card from the config (meta-training writes a fuller one)."""
    training = config.training
    lines = [
        "---",
        "library_name: learnedopt",
        "tags:",
        "- learned-optimizer",
        "- pytorch",
        "---",
        "",
        f"# {training.get('name', 'learnedopt update networks')}",
        "",
        config.description or "Coordinate-wise LSTM update networks for learnedopt.LSTMOptimizer.",
        "",
        "```python",
        "from learnedopt import LSTMOptimizer",
        "optimizer = LSTMOptimizer(model.parameters(), pretrained=PATH_OR_REPO_ID)",
        "```",
        "",
        f"Roles: {', '.join(config.roles)}; hidden size {config.hidden_size}, {config.num_layers} layers; "
        f"features: {', '.join(config.features)}.",
        "",
    ]
    if training:
        lines += ["## Training record", "", "```json", json.dumps(training, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def save_networks(networks: UpdateNetworks, directory: str | Path, *, model_card: str | None = None) -> Path:
    """Write the pretrained directory (see module docstring): all files staged, then renamed."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = networks.config
    config.library_version = __version__
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in networks.state_dict().items()}
    bad = sorted(k for k, v in weights.items() if not torch.isfinite(v).all())
    if bad:
        raise WeightsError(f"refusing to save non-finite weights ({bad}) to {directory}")
    card = model_card if model_card is not None else default_model_card(config)
    atomic_write({
        directory / WEIGHTS_NAME: lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}),
        directory / CONFIG_NAME: lambda tmp: Path(tmp).write_text(config.to_json()),
        directory / MODEL_CARD_NAME: lambda tmp: Path(tmp).write_text(card),
    })
    return directory


def push_networks(
    networks: UpdateNetworks,
    repo_id: str,
    *,
    model_card: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload learnedopt update networks",
    revision: str | None = None,
) -> Any:
    """Save to a temporary directory and upload it to ``repo_id`` on the Hub (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_networks(networks, tmp, model_card=model_card)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
        )
