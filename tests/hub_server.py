"""A fake Hugging Face Hub for tests: the ``resolve`` endpoint, served from a local folder.

``FakeHub(root)`` serves ``root/{owner}/{repo}/{revision}/{filename}`` at
``GET|HEAD /{owner}/{repo}/resolve/{revision}/{filename}`` on ``127.0.0.1`` with the headers that
``huggingface_hub.hf_hub_download`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``,
``X-Linked-Etag``/``X-Linked-Size`` for weight files) and the Hub's error codes
(``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``), so that the client raises
``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``RemoteEntryNotFoundError`` as it would
against huggingface.co. Each revision folder is one commit whose 40-hex hash is derived from the
repo id and the folder name; a request may name the revision or its commit hash. Every request is
recorded in :attr:`FakeHub.requests`.

Example:
    >>> hub = FakeHub(root)            # root/owner/repo/main/config.json, ...
    >>> with hub:                      # starts on a free port, stops on exit
    ...     url = hub.url              # point huggingface_hub's ENDPOINT here
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "Request", "closed_port_url"]

#: Files the real Hub stores in LFS; their HEAD also carries the ``X-Linked-*`` headers.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


class Request(NamedTuple):
    """One request the fake Hub received."""

    method: str
    path: str


class FakeHub:
    """A threaded HTTP server that answers like the Hub's ``/resolve/`` endpoint.

    Args:
        root: Folder holding ``{owner}/{repo}/{revision}/`` folders, one per revision.

    Attributes:
        requests: Every request received, in order (method and unquoted path).
        after_request: Called with each served :class:`Request` after its response is sent, e.g.
            to move a branch between two downloads.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.requests: list[Request] = []
        self.after_request: Callable[[Request], None] | None = None
        self._aliases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ repos
    @staticmethod
    def commit_hash(repo_id: str, revision: str) -> str:
        """The 40-hex commit hash of the revision folder ``revision`` of ``repo_id``."""
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def point_ref(self, repo_id: str, ref: str, revision: str) -> None:
        """Make ``ref`` (a branch or tag) resolve to the revision folder ``revision``, like a push."""
        with self._lock:
            self._aliases[(repo_id, ref)] = revision

    def resolve(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """``(commit_hash, folder)`` that ``revision`` (name or commit hash) of ``repo_id`` means."""
        repo_dir = self.root / repo_id
        with self._lock:
            name = self._aliases.get((repo_id, revision), revision)
        if "/" not in name and not name.startswith(".") and (repo_dir / name).is_dir():
            return self.commit_hash(repo_id, name), repo_dir / name
        for folder in sorted(repo_dir.iterdir()):
            if folder.is_dir() and self.commit_hash(repo_id, folder.name) == revision:
                return revision, folder
        return None

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` while running."""
        if self._server is None:
            raise RuntimeError("the fake Hub is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        if self._server is not None:
            raise RuntimeError("the fake Hub is already running")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped server is unreachable at once (no
    # pooled keep-alive connection survives ``stop()``).
    protocol_version = "HTTP/1.0"
    server_version = "FakeHub/1.0"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _serve(self, *, body: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        raw_path = urlsplit(self.path).path
        request = Request(self.command, unquote(raw_path))
        hub._record(request)
        try:
            self._respond(hub, raw_path, body=body)
        finally:
            if hub.after_request is not None:
                hub.after_request(request)

    def _respond(self, hub: FakeHub, raw_path: str, *, body: bool) -> None:
        # /{owner}/{repo}/resolve/{revision}/{filename...}; the revision is quoted with safe=""
        parts = raw_path.split("/")
        if len(parts) < 6 or parts[0] != "" or parts[3] != "resolve":
            return self._error(404, None, "Not Found", body=body)
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        revision = unquote(parts[4])
        filename = "/".join(unquote(p) for p in parts[5:])
        if not (hub.root / repo_id).is_dir():
            # the real Hub answers 401 for a repo that is missing (or private without a token)
            return self._error(401, "RepoNotFound", "Repository not found", body=body)
        resolved = hub.resolve(repo_id, revision)
        if resolved is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
        commit, folder = resolved
        path = (folder / filename).resolve()
        if folder.resolve() not in path.parents or not path.is_file():
            return self._error(
                404, "EntryNotFound", f"{filename} does not exist on {revision!r}", body=body,
                headers={"X-Repo-Commit": commit},
            )
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", commit)
        if filename.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        body: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if code is not None:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(payload)


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` for a port that nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
