"""Issue 11, point 1: the embedding API (``mcpgw.Gateway``).

The gateway's resource is mounted under ``/mcp-gw/`` in another twisted.web site on the
test's reactor (pytest-twisted); the official SDK client runs in a subprocess against it
(the SDK is asyncio, the gateway is on Twisted's reactor). ``add_server`` makes a new server
reachable at once; ``remove_server`` ends its sessions and stops its children. The example
in ``examples/`` is run as a process too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

import mcpgw
from mcpgw import ConfigError, Gateway
from tests.gateway_process import FIXTURE_SERVER, fixture_server, pid_alive, wait_until
from tests.wire import POST_HEADERS, initialize, session_headers, tool_call

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "embed_twisted_web.py"
pytestmark = pytest.mark.integration

#: The official SDK client, in its own process: lists the tools and calls echo.
SDK_CLIENT = r"""
import json, sys, anyio
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

async def main(url, kind):
    transport = streamable_http_client(url) if kind == "streamable" else sse_client(url)
    async with Client(transport, mode="legacy") as client:
        tools = await client.list_tools()
        result = await client.call_tool("echo", {"text": "through the mount"})
        print(json.dumps({"tools": [t.name for t in tools.tools], "echo": result.content[0].text}))

anyio.run(main, sys.argv[1], sys.argv[2])
"""


async def sdk(url: str, kind: str = "streamable") -> dict[str, Any]:
    """Run the SDK client against ``url`` without blocking the reactor."""
    out, err, code = await getProcessOutputAndValue(sys.executable, ["-c", SDK_CLIENT, url, kind], env=dict(os.environ))
    assert code == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


class App:
    """Another twisted.web application with the gateway mounted under /mcp-gw/."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        root = Resource()
        root.putChild(b"mcp-gw", gateway.resource)
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/mcp-gw"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def post(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        r = await treq.post(self.base + path, json.dumps(body).encode(), headers=headers, pool=self.pool)
        return r.code, await r.content(), r.headers

    async def close(self) -> None:
        await self.gateway.stop()
        await self.port.stopListening()


@pytest.fixture
def app():
    gateway = Gateway.from_config({
        "host": "127.0.0.1", "metrics": {"enabled": False}, "sse": {"keepalive": 0.5},
        "mcpServers": {"fx": fixture_server()},
    }, reactor)
    gateway.start()
    app = App(gateway)
    yield app
    pytest_twisted.blockon(defer.ensureDeferred(app.close()))
    assert not gateway.sessions()


@pytest_twisted.ensureDeferred
async def test_sdk_client_through_the_mount(app):
    """The SDK reaches the default server at /mcp-gw/mcp and /mcp-gw/sse, and a named one under
    /mcp-gw/servers/fx/."""
    for url, kind in ((app.base + "/mcp", "streamable"), (app.base + "/sse", "sse"),
                      (app.base + "/servers/fx/mcp", "streamable")):
        result = await sdk(url, kind)
        assert "echo" in result["tools"] and result["echo"] == "through the mount", (url, result)


@pytest_twisted.ensureDeferred
async def test_add_server_at_runtime(app):
    """add_server: the new server answers at once, no restart; its name is then taken."""
    status, _, _ = await app.post("/servers/extra/mcp", initialize(), POST_HEADERS)
    assert status == 404
    server = app.gateway.add_server("extra", command=sys.executable, args=[str(FIXTURE_SERVER)], env={"X_EXTRA": "1"})
    assert server.name == "extra" and "extra" in app.gateway.servers and "extra" in app.gateway.config.servers
    result = await sdk(app.base + "/servers/extra/mcp")
    assert result["echo"] == "through the mount"
    with pytest.raises(ValueError):
        app.gateway.add_server("extra", command=sys.executable)
    with pytest.raises(ConfigError):
        app.gateway.add_server("other", command="no-such-command-anywhere")
    with pytest.raises(ConfigError):
        app.gateway.add_server("bad name", command=sys.executable)


@pytest_twisted.ensureDeferred
async def test_remove_server_ends_sessions_and_children(app):
    """remove_server: every session of the server ends, its children exit (before the Deferred
    fires), and its paths are 404 from then on; other servers are untouched."""
    app.gateway.add_server("extra", command=sys.executable, args=[str(FIXTURE_SERVER)])
    sids = []
    for _ in range(2):
        status, body, headers = await app.post("/servers/extra/mcp", initialize(), POST_HEADERS)
        assert status == 200, body
        sids.append(headers.getRawHeaders(b"mcp-session-id")[0].decode())
    status, _, headers = await app.post("/mcp", initialize(), POST_HEADERS)
    keep = headers.getRawHeaders(b"mcp-session-id")[0].decode()
    pids = [s["pid"] for s in app.gateway.sessions() if s["server"] == "extra"]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    ended = await app.gateway.remove_server("extra")
    assert ended == 2
    assert not any(pid_alive(p) for p in pids)
    assert [s["id"] for s in app.gateway.sessions()] == [keep]
    status, _, _ = await app.post("/servers/extra/mcp", tool_call(2, "echo", {"text": "x"}), session_headers(sids[0]))
    assert status == 404
    status, _, _ = await app.post("/servers/extra/mcp", initialize(), POST_HEADERS)
    assert status == 404
    status, body, _ = await app.post("/mcp", tool_call(2, "echo", {"text": "x"}), session_headers(keep))
    assert status == 200 and b"x" in body
    with pytest.raises(KeyError):
        app.gateway.remove_server("extra")
    with pytest.raises(ValueError):
        app.gateway.remove_server("fx")  # the default server is also at the root paths


def test_public_surface(tmp_path):
    """The names ``mcpgw`` exports; from_file reads a config file (and checks it)."""
    assert {"Gateway", "GatewayConfig", "ServerConfig", "ConfigError", "load_config", "parse_config"} <= set(mcpgw.__all__)
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"metrics": {"enabled": False}, "mcpServers": {"fx": fixture_server()}}))
    gateway = Gateway.from_file(str(path), reactor, environ={})
    assert list(gateway.servers) == ["fx"]
    assert {b"mcp", b"sse", b"ws", b"servers", b"health", b"ready"} <= set(gateway.resource.children)
    assert b"admin" not in gateway.resource.children  # no admin token, no admin API
    assert not gateway.service.running
    path.write_text(json.dumps({"mcpServers": {}}))
    with pytest.raises(ConfigError):
        Gateway.from_file(str(path), reactor, environ={})


def test_example_app(tmp_path):
    """examples/embed_twisted_web.py: its own page, the gateway under /mcp-gw/, a server added
    and removed at runtime, reached by the SDK client."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", "0", "--echo-command", json.dumps([sys.executable, str(FIXTURE_SERVER)])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        base = None
        for _ in range(200):
            line = proc.stdout.readline().decode()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)/ ", line)
            if m:
                base = m.group(1)
                break
        assert base, "the example did not start"
        assert "twisted.web app" in httpx.get(base + "/").text
        assert httpx.get(base + "/mcp-gw/health").json()["status"] == "healthy"
        assert httpx.post(base + "/add-echo").json()["added"] == "echo"
        out = subprocess.run([sys.executable, "-c", SDK_CLIENT, base + "/mcp-gw/servers/echo/mcp", "streamable"],
                             check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.splitlines()[-1])["echo"] == "through the mount"
        assert httpx.post(base + "/remove-echo", timeout=10).json() == {"removed": "echo", "sessionsEnded": 0}
        assert httpx.post(base + "/mcp-gw/servers/echo/mcp", json=initialize(), headers=POST_HEADERS).status_code == 404
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert wait_until(lambda: not pid_alive(proc.pid), 5)
