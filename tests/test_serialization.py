"""The pretrained directory format: save, load, strictness and the errors a user sees.

Random-initialised networks only (``torch.manual_seed``); shipped weights are not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import learnedopt
from learnedopt import (
    FORMAT_VERSION,
    ConfigError,
    UpdateNetworkConfig,
    UpdateNetworks,
    WeightsError,
    list_pretrained,
)
from learnedopt import serialization
from learnedopt.serialization import CONFIG_NAME, MODEL_CARD_NAME, WEIGHTS_NAME, load_networks

FILES = {CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME}


def make_networks(seed: int = 0, **config: Any) -> UpdateNetworks:
    torch.manual_seed(seed)
    return UpdateNetworks(UpdateNetworkConfig(**{"roles": ["conv", "dense"], **config}))


def saved(tmp_path: Path, seed: int = 0, **config: Any) -> Path:
    """A pretrained directory holding ``make_networks(seed, **config)``."""
    directory = tmp_path / f"saved-{seed}"
    make_networks(seed, **config).save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes: Any) -> Path:
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (hidden temporaries included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------- round trip
ROUND_TRIP_CONFIGS = [
    pytest.param({}, id="conv+dense"),
    pytest.param({"roles": ["dense"]}, id="single-role"),
    pytest.param(
        {"roles": ["conv", "dense", "bias"], "hidden_size": 8, "num_layers": 1,
         "features": ["grad_rms"], "update_clip": None},
        id="three-roles-small-no-clip",
    ),
    pytest.param(
        {"roles": ["dense", "embedding_1"], "num_layers": 3,
         "features": ["grad_logsign", "grad_rms", "momentum_rms"], "momentum_betas": [0.9],
         "description": "a test bundle", "training": {"steps": 3, "tasks": ["quad"], "opt": {"lr": 1e-3}}},
        id="training-record",
    ),
    pytest.param({"roles": ["dense"], "nominal_momentum": 0.9, "features": ["grad_logsign"]}, id="nominal-momentum"),
    pytest.param({"roles": ["dense", "bias"], "nominal_momentum": 0.9, "nominal_correction": "scale",
                  "schedule": "inverse_time"}, id="nominal-schedule"),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_round_trip_is_exact(tmp_path: Path, config: dict[str, Any]) -> None:
    networks = make_networks(**config)
    directory = networks.save_pretrained(tmp_path / "out")
    assert {p.name for p in directory.iterdir()} == FILES

    loaded = UpdateNetworks.from_pretrained(directory)
    assert loaded.config == networks.config
    assert loaded.config.library_version == learnedopt.__version__
    assert loaded.config.format_version == FORMAT_VERSION
    want, got = networks.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value), key

    # the loaded weights are the ones in use
    net = loaded.config.roles[-1]
    x, state = torch.randn(5, loaded.config.input_size), torch.randn(5, getattr(loaded, net).state_size)
    for a, b in zip(getattr(networks, net)(x, state), getattr(loaded, net)(x, state)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_directory_layout(tmp_path: Path, config: dict[str, Any]) -> None:
    networks = make_networks(**config)
    directory = networks.save_pretrained(tmp_path)

    text = (directory / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n", "config.json must be sorted and indented"
    assert data == networks.config.to_dict()

    weights = load_file(str(directory / WEIGHTS_NAME))
    roles = networks.config.roles
    assert {key.split(".", 1)[0] for key in weights} == set(roles), "one key prefix per role"
    per_role = {role: sorted(k.split(".", 1)[1] for k in weights if k.startswith(role + ".")) for role in roles}
    assert all(names == per_role[roles[0]] for names in per_role.values())
    assert all(v.dtype == torch.float32 for v in weights.values())
    with safetensors.safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    card = (directory / MODEL_CARD_NAME).read_text()
    front, _, body = card.partition("\n---\n")
    assert front.startswith("---\n") and "library_name: learnedopt" in front
    assert "LSTMOptimizer" in body and all(role in body for role in roles)
    if networks.config.description:
        assert networks.config.description in body
    if networks.config.training:
        assert '"steps": 3' in body


def test_custom_model_card(tmp_path: Path) -> None:
    card = "---\nlibrary_name: learnedopt\n---\n\n# Mine\n"
    make_networks().save_pretrained(tmp_path, model_card=card)
    assert (tmp_path / MODEL_CARD_NAME).read_text() == card


@pytest.mark.parametrize("form", ["str", "Path", "relative-str", "load_networks"])
def test_load_forms_of_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    directory = saved(tmp_path)
    monkeypatch.chdir(tmp_path)
    arg = {"str": str(directory), "Path": directory, "relative-str": f"./{directory.name}",
           "load_networks": str(directory)}[form]
    loader = load_networks if form == "load_networks" else UpdateNetworks.from_pretrained
    loaded = loader(arg)
    expected = make_networks().state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_save_overwrites_a_previous_save(tmp_path: Path) -> None:
    make_networks(seed=0).save_pretrained(tmp_path)
    make_networks(seed=1).save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES, "no temporary file left behind"
    loaded = UpdateNetworks.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in make_networks(seed=1).state_dict().items())


def test_saved_files_are_world_readable(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    make_networks().save_pretrained(tmp_path)
    for name in FILES:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------- atomic saving
class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [_Interrupted, KeyboardInterrupt])
def test_interrupted_save_keeps_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    directory = saved(tmp_path, seed=0)
    before = snapshot(directory)
    writes = []

    def save_half_then_fail(tensors, filename, metadata=None):
        writes.append(filename)
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    monkeypatch.setattr(serialization, "save_file", save_half_then_fail, raising=False)  # if imported at top
    with pytest.raises(error):
        make_networks(seed=1).save_pretrained(directory)
    assert writes and Path(writes[0]).parent == directory and Path(writes[0]).name != WEIGHTS_NAME
    assert snapshot(directory) == before, "the previous save must be intact and no temporary file left"
    monkeypatch.undo()
    loaded = UpdateNetworks.from_pretrained(directory)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in make_networks(seed=0).state_dict().items())


def test_interrupted_first_save_leaves_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    monkeypatch.setattr(serialization, "save_file", fail, raising=False)
    with pytest.raises(OSError, match="disk full"):
        make_networks().save_pretrained(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


# ---------------------------------------------------------------------- missing and corrupted files
def test_directory_without_config(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError) as info:
        UpdateNetworks.from_pretrained(directory)
    assert str(directory / CONFIG_NAME) in str(info.value)
    assert "save_pretrained" in str(info.value)


def test_directory_without_weights(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=str(directory / WEIGHTS_NAME)):
        UpdateNetworks.from_pretrained(directory)


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "cut-at-header": lambda data: data[:20],
    "empty": lambda data: b"",
    "garbage": lambda data: bytes(range(256)) * 8,
    "zeros": lambda data: bytes(len(data)),
    "text": lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_weights_raise_weights_error(tmp_path: Path, corrupt) -> None:
    directory = saved(tmp_path)
    path = directory / WEIGHTS_NAME
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(WeightsError) as info:
        UpdateNetworks.from_pretrained(directory)
    assert str(path) in str(info.value)
    assert "re-download" in str(info.value) or "re-save" in str(info.value)


def test_config_that_is_not_json(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / CONFIG_NAME).write_text('{"roles": ["conv", "dense"],')
    with pytest.raises(ConfigError, match=str(directory / CONFIG_NAME)):
        UpdateNetworks.from_pretrained(directory)


@pytest.mark.parametrize("extra", [{}, {"a_field_from_the_future": 1}], ids=["same-fields", "new-fields"])
def test_newer_format_version_says_to_upgrade(tmp_path: Path, extra: dict[str, Any]) -> None:
    directory = saved(tmp_path)
    config_path = edit_config(directory, format_version=FORMAT_VERSION + 1, **extra)
    with pytest.raises(ConfigError) as info:
        UpdateNetworks.from_pretrained(directory)
    message = str(info.value)
    assert str(config_path) in message
    assert f"format_version {FORMAT_VERSION + 1}" in message
    assert "upgrade" in message and "pip install -U learnedopt" in message


# (change to config.json, text the ConfigError must contain besides the file's path)
BAD_CONFIG_FILES = [
    pytest.param({"colour": "red"}, "colour", id="unknown-field"),
    pytest.param({"hidden_size": 0}, "hidden_size", id="hidden_size-0"),
    pytest.param({"hidden_size": "20"}, "hidden_size", id="hidden_size-str"),
    pytest.param({"hidden_size": 20.5}, "hidden_size", id="hidden_size-float"),
    pytest.param({"num_layers": -1}, "num_layers", id="num_layers-negative"),
    pytest.param({"features": ["grad_logsign", "grad_sign"]}, "grad_sign", id="unknown-feature"),
    pytest.param({"features": []}, "features", id="no-features"),
    pytest.param({"roles": []}, "roles", id="no-roles"),
    pytest.param({"roles": ["conv", "conv"]}, "roles", id="duplicate-roles"),
    pytest.param({"momentum_betas": []}, "momentum_betas", id="momentum-without-betas"),
    pytest.param({"momentum_betas": [0.5, 1.0]}, "beta", id="beta-1"),
    pytest.param({"rms_beta": -0.1}, "beta", id="rms_beta-negative"),
    pytest.param({"preprocess_p": 0}, "preprocess_p", id="preprocess_p-0"),
    pytest.param({"output_scale": -1}, "output_scale", id="output_scale-negative"),
    pytest.param({"update_clip": 0}, "update_clip", id="update_clip-0"),
    pytest.param({"format_version": "1"}, "format_version", id="format_version-str"),
    # Each of these escapes as something other than a ConfigError naming the field (see the
    # report): a string where a number belongs, a string where a list belongs, a role name
    # that cannot be a module name.
    pytest.param({"preprocess_p": "10"}, "preprocess_p", id="preprocess_p-str"),
    pytest.param({"output_scale": None}, "output_scale", id="output_scale-null"),
    pytest.param({"roles": "conv"}, "roles", id="roles-str"),
    pytest.param({"roles": ["conv", "dense-net"]}, "dense-net", id="role-not-identifier"),
]


@pytest.mark.parametrize("change, names", BAD_CONFIG_FILES)
def test_bad_config_file_raises_config_error(tmp_path: Path, change: dict[str, Any], names: str) -> None:
    directory = saved(tmp_path)
    config_path = edit_config(directory, **change)
    with pytest.raises(ConfigError) as info:
        UpdateNetworks.from_pretrained(directory)
    assert names in str(info.value)
    assert str(config_path) in str(info.value)


# ---------------------------------------------------------------------- weights vs config
def _drop_key(directory: Path) -> None:
    weights = load_file(str(directory / WEIGHTS_NAME))
    del weights["dense.head_bias"]
    save_file(weights, str(directory / WEIGHTS_NAME))


def _add_key(directory: Path) -> None:
    weights = load_file(str(directory / WEIGHTS_NAME))
    weights["dense.weight_9"] = torch.zeros(3)
    save_file(weights, str(directory / WEIGHTS_NAME))


# (name, change to the saved directory, texts the WeightsError must contain)
MISMATCHES = [
    ("key-removed", _drop_key, ["missing keys ['dense.head_bias']", "unexpected keys []"]),
    ("key-added", _add_key, ["missing keys []", "unexpected keys ['dense.weight_9']"]),
    ("hidden_size-8-vs-20", lambda d: edit_config(d, hidden_size=20),
     ["conv.weight_0: file (32, 13) vs config (80, 25)", "dense.head_weight: file (8,) vs config (20,)"]),
    ("roles-renamed", lambda d: edit_config(d, roles=["conv", "bias"]),
     ["missing keys ['bias.bias_0'", "unexpected keys ['dense.bias_0'"]),
    ("num_layers-2-vs-3", lambda d: edit_config(d, num_layers=3),
     ["missing keys ['conv.bias_2', 'conv.weight_2', 'dense.bias_2', 'dense.weight_2']"]),
    ("features-changed", lambda d: edit_config(d, features=["grad_rms"]),
     ["conv.weight_0: file (32, 13) vs config (32, 9)"]),
]


@pytest.mark.parametrize("change, expected", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_weights_that_do_not_match_the_config(tmp_path: Path, change, expected: list[str]) -> None:
    directory = saved(tmp_path, hidden_size=8)
    change(directory)
    with pytest.raises(WeightsError) as info:
        UpdateNetworks.from_pretrained(directory)
    message = str(info.value)
    assert str(directory / WEIGHTS_NAME) in message and str(directory / CONFIG_NAME) in message
    for text in expected:
        assert text in message


# ---------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_not_saved(tmp_path: Path, value: float) -> None:
    directory = saved(tmp_path, seed=0)
    before = snapshot(directory)
    networks = make_networks(seed=1)
    with torch.no_grad():
        networks.conv.weight_1[3, 2] = value
    with pytest.raises(WeightsError, match=r"non-finite.*conv\.weight_1"):
        networks.save_pretrained(directory)
    assert snapshot(directory) == before
    with pytest.raises(WeightsError):
        networks.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_not_loaded(tmp_path: Path, value: float) -> None:
    directory = saved(tmp_path)
    weights = load_file(str(directory / WEIGHTS_NAME))
    weights["dense.bias_0"][1] = value
    save_file(weights, str(directory / WEIGHTS_NAME))
    with pytest.raises(WeightsError) as info:
        UpdateNetworks.from_pretrained(directory)
    assert "dense.bias_0" in str(info.value) and str(directory / WEIGHTS_NAME) in str(info.value)


# ---------------------------------------------------------------------- names and paths
def test_unknown_name_lists_the_shipped_optimizers() -> None:
    with pytest.raises(ValueError) as info:
        load_networks("no-such-name")
    message = str(info.value)
    assert "'no-such-name'" in message
    assert str(sorted(list_pretrained())) in message
    assert "local directory" in message and "user/repo" in message


@pytest.mark.parametrize(
    "path",
    ["./does/not/exist", "../does-not-exist", "~/learnedopt-test-does-not-exist", "/does/not/exist",
     Path("does/not/exist")],
)
def test_missing_local_path_raises_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does.not.exist"):
        load_networks(path)


def test_a_file_is_not_a_pretrained_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_networks("weights.bin")


@pytest.mark.parametrize("bad", [123, "", None])
def test_name_of_the_wrong_type(bad) -> None:
    with pytest.raises(TypeError, match="pretrained must be"):
        load_networks(bad)


# ---------------------------------------------------------------------- UpdateNetworkConfig validation
BAD_CONFIGS = [
    pytest.param({"hidden_size": 0}, "hidden_size", id="hidden_size-0"),
    pytest.param({"hidden_size": -3}, "hidden_size", id="hidden_size-negative"),
    pytest.param({"hidden_size": 2.0}, "hidden_size", id="hidden_size-float"),
    pytest.param({"hidden_size": True}, "hidden_size", id="hidden_size-bool"),
    pytest.param({"num_layers": 0}, "num_layers", id="num_layers-0"),
    pytest.param({"features": ["grad_logsign", "adam"]}, "'adam'", id="unknown-feature"),
    pytest.param({"features": []}, "features", id="no-features"),
    pytest.param({"roles": []}, "roles", id="no-roles"),
    pytest.param({"roles": ["conv", "dense", "conv"]}, "distinct", id="duplicate-roles"),
    pytest.param({"roles": ["conv", ""]}, "roles", id="empty-role"),
    pytest.param({"roles": ["conv", 3]}, "roles", id="role-not-str"),
    pytest.param({"momentum_betas": [0.9, 1.5]}, "beta", id="beta-too-big"),
    pytest.param({"format_version": FORMAT_VERSION + 1}, "upgrade", id="newer-format"),
    pytest.param({"nominal_momentum": 1.0}, r"nominal_momentum must be a number in \[0, 1\) or null, got 1.0",
                 id="nominal-momentum-1"),
    pytest.param({"nominal_correction": "mul"}, r"nominal_correction must be one of \['add', 'scale'\], got 'mul'",
                 id="nominal-correction-unknown"),
    pytest.param({"schedule": "cosine"}, r"schedule must be one of \['constant', 'inverse_time'\], got 'cosine'",
                 id="schedule-unknown"),
]


@pytest.mark.parametrize("kwargs, names", BAD_CONFIGS)
def test_config_validation(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        UpdateNetworkConfig(**kwargs)


@pytest.mark.parametrize("role", ["dense-net", "1st", "conv.kernel", "has space"])
def test_role_names_must_be_identifiers(role: str) -> None:
    """A role is a key prefix in model.safetensors and a submodule name."""
    with pytest.raises(ValueError, match=f"{role!r}.*identifier"):
        UpdateNetworks(UpdateNetworkConfig(roles=["conv", role]))


@pytest.mark.parametrize("role", ["config", "training", "to"])
def test_role_names_that_clash_with_module_attributes(role: str) -> None:
    """Fails today: ``nn.Module.add_module`` raises ``KeyError: attribute 'to' already exists``."""
    with pytest.raises(ValueError, match=repr(role)):
        UpdateNetworks(UpdateNetworkConfig(roles=["dense", role]))


def test_push_to_hub_uploads_a_complete_pretrained_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["loaded"] = UpdateNetworks.from_pretrained(folder_path)
            calls["upload"] = (repo_id, commit_message, revision)
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    torch.manual_seed(0)
    nets = UpdateNetworks(UpdateNetworkConfig(roles=["conv", "dense"]))
    assert nets.push_to_hub("user/my-opt", token="t", private=True) == "commit-url"
    assert calls["create"] == ("user/my-opt", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    for a, b in zip(nets.state_dict().values(), calls["loaded"].state_dict().values()):
        assert torch.equal(a, b)
