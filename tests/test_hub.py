"""Loading update networks from the Hugging Face Hub, against a fake Hub on 127.0.0.1.

No test reaches the internet: an autouse fixture points huggingface_hub at a closed local port
unless a test starts the fake Hub (``hub`` fixture), turns telemetry off, hides any stored token
and skips the client's retry back-off sleeps.

``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read into ``huggingface_hub.constants`` at import time;
``hf_hub_download`` builds its URL from ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (derived from
``ENDPOINT`` at import, not at call time) and checks ``constants.is_offline_mode()`` (which returns
``constants.HF_HUB_OFFLINE``) on every request, so the tests patch those constants; one test runs
a subprocess with the real environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import huggingface_hub.file_download as hf_file_download
import huggingface_hub.utils._http as hf_http
import pytest
import torch
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from hub_server import FakeHub, Request, closed_port_url

import learnedopt
from learnedopt import HubError, LSTMOptimizer, UpdateNetworkConfig, UpdateNetworks

REPO = "owner/repo"
CONFIG_ONLY_REPO = "owner/config-only"
#: revision folder served by the fake Hub -> seed of the random networks saved there
SERVED_SEEDS = {"main": 0, "v1": 1}


# ---------------------------------------------------------------------- fixtures
class _NoSleepTime:
    """The ``time`` module with ``sleep`` recording its argument instead of sleeping."""

    def __init__(self, sleeps: list[float]) -> None:
        self._sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        self._sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point huggingface_hub (this process and subprocesses) at ``url``."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setenv("HF_ENDPOINT", url)


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """What ``HF_HUB_OFFLINE=1`` (or unset) means to an already imported huggingface_hub."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


@pytest.fixture(autouse=True)
def hermetic_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[float]:
    """Keep huggingface_hub local and fast; returns the back-off sleeps that were skipped."""
    use_endpoint(monkeypatch, closed_port_url())
    set_offline(monkeypatch, False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ETAG_TIMEOUT", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", _NoSleepTime(sleeps))
    monkeypatch.setattr(hf_file_download, "time", _NoSleepTime(sleeps))
    yield sleeps
    assert hf_constants.ENDPOINT.startswith("http://127.0.0.1:"), "a test pointed the Hub client off this machine"


def random_networks(seed: int) -> UpdateNetworks:
    torch.manual_seed(seed)
    return UpdateNetworks(UpdateNetworkConfig(roles=["conv", "dense"]))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, UpdateNetworks]]:
    """The fake Hub's folder: ``owner/repo`` at ``main`` and tag ``v1`` (different weights), and a
    repo without weights. Returns the folder and the networks saved at each revision."""
    root = tmp_path_factory.mktemp("fake_hub")
    networks = {}
    for revision, seed in SERVED_SEEDS.items():
        networks[revision] = random_networks(seed)
        networks[revision].save_pretrained(root / REPO / revision)
    random_networks(2).save_pretrained(root / CONFIG_ONLY_REPO / "main")
    (root / CONFIG_ONLY_REPO / "main" / "model.safetensors").unlink()
    return root, networks


@pytest.fixture
def hub(served, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The fake Hub, running, with huggingface_hub pointed at it."""
    root, _ = served
    server = FakeHub(root).start()
    use_endpoint(monkeypatch, server.url)
    yield server
    server.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def assert_same_networks(actual: UpdateNetworks, expected: UpdateNetworks) -> None:
    assert actual.config.to_dict() == expected.config.to_dict()
    got, want = actual.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the served weights"


def commit(revision: str) -> str:
    return FakeHub.commit_hash(REPO, revision)


# ---------------------------------------------------------------------- the fake Hub itself
def test_fake_hub_speaks_the_resolve_protocol(hub: FakeHub, served) -> None:
    root, _ = served
    for revision in SERVED_SEEDS:
        for filename in ("config.json", "model.safetensors"):
            meta = get_hf_file_metadata(hf_hub_url(REPO, filename, revision=revision))
            assert meta.commit_hash == commit(revision)
            assert meta.size == (root / REPO / revision / filename).stat().st_size
            assert meta.etag and len(meta.etag) == 64
    assert commit("main") != commit("v1")
    assert hub.requests[0] == Request("HEAD", f"/{REPO}/resolve/main/config.json")


def test_served_revisions_differ(served) -> None:
    # otherwise the revision tests below would prove nothing
    _, networks = served
    main, v1 = networks["main"].state_dict(), networks["v1"].state_dict()
    assert all(not torch.equal(main[k], v1[k]) for k in main if k.endswith("weight_0"))


# ---------------------------------------------------------------------- downloading
@pytest.mark.parametrize(
    "revision, expected",
    [
        pytest.param(None, "main", id="default-branch"),
        pytest.param("main", "main", id="branch"),
        pytest.param("v1", "v1", id="tag"),
        pytest.param(commit("v1"), "v1", id="commit-hash"),
    ],
)
def test_from_pretrained_downloads_the_revision(hub, served, cache_dir, revision, expected) -> None:
    _, networks = served
    loaded = UpdateNetworks.from_pretrained(REPO, revision=revision, cache_dir=cache_dir)
    assert_same_networks(loaded, networks[expected])
    fetched = {(r.method, r.path.rsplit("/", 1)[-1]) for r in hub.requests}
    assert {("GET", "config.json"), ("GET", "model.safetensors")} <= fetched
    assert hub.requests[0] == Request("HEAD", f"/{REPO}/resolve/{revision or 'main'}/config.json")
    snapshot = cache_dir / "models--owner--repo" / "snapshots" / commit(expected)
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()


def test_optimizer_downloads_the_revision(hub, served, cache_dir) -> None:
    _, networks = served
    model = torch.nn.Linear(4, 2)
    optimizer = LSTMOptimizer(model.parameters(), pretrained=REPO, revision="v1", cache_dir=cache_dir)
    assert_same_networks(optimizer.networks, networks["v1"])
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_second_load_reads_the_cache(hub, served, cache_dir) -> None:
    _, networks = served
    UpdateNetworks.from_pretrained(REPO, revision="v1", cache_dir=cache_dir)
    hub.requests.clear()
    loaded = UpdateNetworks.from_pretrained(REPO, revision="v1", cache_dir=cache_dir)
    assert_same_networks(loaded, networks["v1"])
    assert hub.requests and all(r.method == "HEAD" for r in hub.requests), hub.requests


def test_config_and_weights_come_from_one_commit(hub, served, cache_dir) -> None:
    """A push that moves ``main`` between the two downloads must not mix two commits."""
    _, networks = served

    def push_after_config(request: Request) -> None:
        if request == Request("GET", f"/{REPO}/resolve/main/config.json"):
            hub.point_ref(REPO, "main", "v1")

    hub.after_request = push_after_config
    loaded = UpdateNetworks.from_pretrained(REPO, cache_dir=cache_dir)
    # the config came from main's old commit; the weights must come from that commit too
    assert_same_networks(loaded, networks["main"])


# ---------------------------------------------------------------------- offline and unreachable
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "server-stopped"])
@pytest.mark.parametrize("revision", ["main", "v1", commit("v1")])
def test_cached_revision_loads_without_the_hub(hub, served, cache_dir, monkeypatch, how, revision) -> None:
    _, networks = served
    expected = "main" if revision == "main" else "v1"
    UpdateNetworks.from_pretrained(REPO, revision=revision, cache_dir=cache_dir)
    hub.requests.clear()
    if how == "HF_HUB_OFFLINE":
        set_offline(monkeypatch, True)
    else:
        hub.stop()
    loaded = UpdateNetworks.from_pretrained(REPO, revision=revision, cache_dir=cache_dir)
    assert_same_networks(loaded, networks[expected])
    assert hub.requests == []


def test_offline_and_not_cached_raises_hub_error(hub, cache_dir, monkeypatch) -> None:
    set_offline(monkeypatch, True)
    with pytest.raises(HubError) as info:
        UpdateNetworks.from_pretrained(REPO, revision="v1", cache_dir=cache_dir)
    message = str(info.value)
    assert REPO in message and "v1" in message
    assert "HF_HUB_OFFLINE" in message
    assert "not in the local cache" in message
    assert "local directory" in message
    assert hub.requests == []


@pytest.mark.parametrize("via", ["from_pretrained", "LSTMOptimizer"])
def test_unreachable_and_not_cached_raises_hub_error(cache_dir, via) -> None:
    # the autouse fixture points the endpoint at a closed port
    with pytest.raises(HubError) as info:
        if via == "from_pretrained":
            UpdateNetworks.from_pretrained(REPO, cache_dir=cache_dir)
        else:
            LSTMOptimizer([torch.zeros(2, requires_grad=True)], pretrained=REPO, cache_dir=cache_dir)
    message = str(info.value)
    assert REPO in message
    assert hf_constants.ENDPOINT in message
    assert "network" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local directory" in message
    assert "because HF_HUB_OFFLINE is set" not in message


# ---------------------------------------------------------------------- missing repo, revision, file
@pytest.mark.parametrize(
    "repo_id, revision, expected",
    [
        pytest.param("owner/no-such-repo", None, "Hub repo 'owner/no-such-repo' not found", id="repo"),
        pytest.param(REPO, "v9", "revision 'v9' not found in Hub repo 'owner/repo'", id="revision"),
        pytest.param(REPO, "0" * 40, f"revision {'0' * 40!r} not found", id="unknown-commit"),
        pytest.param(CONFIG_ONLY_REPO, None, "has no model.safetensors", id="file"),
    ],
)
def test_missing_on_the_hub_raises_hub_error(hub, cache_dir, repo_id, revision, expected) -> None:
    with pytest.raises(HubError, match=expected):
        UpdateNetworks.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir)
    assert hub.requests, "the fake Hub should have been asked"


# ---------------------------------------------------------------------- real environment variables
def test_environment_variables_in_a_fresh_process(hub, served, cache_dir, tmp_path) -> None:
    """``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1`` set before import, as a user would."""
    _, networks = served
    UpdateNetworks.from_pretrained(REPO, revision="v1", cache_dir=cache_dir)
    expected = float(sum(t.double().sum() for t in networks["v1"].state_dict().values()))
    hub.stop()
    script = textwrap.dedent(
        f"""
        import learnedopt
        nets = learnedopt.UpdateNetworks.from_pretrained({REPO!r}, revision="v1", cache_dir={str(cache_dir)!r})
        print("checksum", float(sum(t.double().sum() for t in nets.state_dict().values())))
        try:
            learnedopt.UpdateNetworks.from_pretrained({REPO!r}, cache_dir={str(tmp_path / "empty")!r})
        except learnedopt.HubError as err:
            print("error", err)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=closed_port_url(),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert float(lines["checksum"]) == pytest.approx(expected, rel=0, abs=0)
    assert "HF_HUB_OFFLINE" in lines["error"] and "not in the local cache" in lines["error"]


def test_hub_error_is_an_os_error() -> None:
    assert issubclass(learnedopt.HubError, OSError)
