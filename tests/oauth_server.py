"""A real OAuth 2.1 authorization server for the OAuth tests: oidc-provider (npm), from
tests/fixtures/oauth_as/, on 127.0.0.1.

``install()`` runs ``npm ci`` for the fixture once into a cache directory named by a digest of its
package.json and package-lock.json: built in a temporary directory beside it and renamed into place,
under an ``fcntl.flock`` so that parallel test processes build it once. The lock pins
node@22 from npm as well (oidc-provider 9 supports Node 22 and later; this machine's node is 20).

``OAuthServer`` starts one and waits for its ``OAUTH_AS_READY <issuer>`` line; the
``make_oauth_server`` fixture stops every one it started.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "oauth_as"
#: What the installed node_modules is made from (server.js is copied in beside it, tests/oauth_server.install).
DEPENDENCIES = ("package.json", "package-lock.json")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
#: The default client of the tests' authorization server.
CLIENT_ID = "mcpgw-test-client"
CLIENT_SECRET = "mcpgw-test-client-secret-0123456789"


def install() -> Path:
    """The fixture's server.js inside its installed node_modules (skips the test when npm is missing)."""
    digest = hashlib.sha256()
    for name in DEPENDENCIES:
        digest.update(name.encode() + b"\0" + (FIXTURE / name).read_bytes() + b"\0")
    home = CACHE / f"mcpgw-oauth-as-{digest.hexdigest()[:16]}"
    if not (home / "node_modules" / "node" / "bin" / "node").is_file():
        _build(home)
    # ESM resolves oidc-provider from the script's own directory, so the script goes in there: named by
    # its content and renamed into place, so that every version is complete and none is overwritten.
    script = (FIXTURE / "server.js").read_bytes()
    target = home / f"server-{hashlib.sha256(script).hexdigest()[:12]}.js"
    if not target.is_file():
        fd, partial = tempfile.mkstemp(prefix=".server-", suffix=".js", dir=home)
        with os.fdopen(fd, "wb") as f:
            f.write(script)
        os.rename(partial, target)
    return target


def _build(home: Path) -> None:
    """``npm ci`` into a temporary directory beside ``home``, renamed to it; once, under a lock."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is needed to install the authorization server (oidc-provider)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "mcpgw-oauth-as.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if home.is_dir():
            return  # another process built it while this one waited
        build = Path(tempfile.mkdtemp(prefix=".mcpgw-oauth-as-", dir=CACHE))
        try:
            for name in DEPENDENCIES:
                shutil.copy2(FIXTURE / name, build / name)
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=build, check=True,
                           capture_output=True, text=True, timeout=600)
            if not (build / "node_modules" / "node" / "bin" / "node").is_file():
                raise RuntimeError("npm ci did not install node@22 (node_modules/node/bin/node)")
            os.rename(build, home)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise


class OAuthServer:
    """One oidc-provider process; ``issuer`` is its URL (``http://127.0.0.1:PORT``)."""

    def __init__(self, clients: Sequence[tuple[str, str] | tuple[str, str, str]] = ((CLIENT_ID, CLIENT_SECRET),),
                 scopes: str = "mcp files:read files:write", token_format: str = "jwt", ttl: int = 300,
                 port: int = 0, auth_method: str = "client_secret_basic"):
        script = install()
        home = script.parent
        argv = [str(home / "node_modules" / "node" / "bin" / "node"), str(script), str(port),
                "--scopes", scopes, "--format", token_format, "--ttl", str(ttl), "--auth-method", auth_method]
        for client in clients:
            argv += ["--client", ":".join(client)]
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.output: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        self.issuer = self._ready(lines, timeout=60)
        self.port = int(self.issuer.rsplit(":", 1)[1])

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            lines.put(line)
        lines.put(None)

    def _ready(self, lines: queue.Queue[str | None], timeout: float) -> str:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise RuntimeError("the authorization server did not start:\n" + "".join(self.output)) from None
            if line is None:
                raise RuntimeError("the authorization server exited:\n" + "".join(self.output))
            if line.startswith("OAUTH_AS_READY "):
                return line.split()[1]

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def make_oauth_server() -> Iterator[Callable[..., OAuthServer]]:
    """Start authorization servers (``make_oauth_server(**options)``); every one is stopped at the end."""
    started: list[OAuthServer] = []

    def start(**options: Any) -> OAuthServer:
        server = OAuthServer(**options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
