"""Issue 2: /health, /ready and /servers, and unknown paths."""

import httpx
import pytest

from tests.gateway_process import fixture_server

pytestmark = pytest.mark.integration


@pytest.fixture
def gw(make_gateway):
    return make_gateway({"mcpServers": {"alpha": fixture_server(), "beta": fixture_server(default=True)}})


def test_health_answers_healthy(gw):
    r = httpx.get(f"{gw.url}/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json()["status"] == "healthy"


def test_ready_when_servers_can_spawn(gw):
    r = httpx.get(f"{gw.url}/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready"}


def test_servers_lists_each_server_with_paths_and_default(gw):
    servers = httpx.get(f"{gw.url}/servers").json()["servers"]
    by_name = {s["name"]: s for s in servers}
    assert set(by_name) == {"alpha", "beta"}
    assert by_name["beta"]["default"] is True and by_name["alpha"]["default"] is False
    assert by_name["alpha"]["paths"] == {
        "sse": "/servers/alpha/sse", "messages": "/servers/alpha/messages", "mcp": "/servers/alpha/mcp",
        "ws": "/servers/alpha/ws",
    }
    assert by_name["alpha"]["sessions"] == 0


def test_servers_counts_live_sessions(gw):
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    r = httpx.post(f"{gw.url}/servers/alpha/mcp", json=init, headers=headers)
    assert r.status_code == 200
    sid = r.headers["mcp-session-id"]
    servers = {s["name"]: s for s in httpx.get(f"{gw.url}/servers").json()["servers"]}
    assert servers["alpha"]["sessions"] == 1 and servers["beta"]["sessions"] == 0
    assert httpx.delete(f"{gw.url}/servers/alpha/mcp", headers={"mcp-session-id": sid}).status_code == 200


def test_default_server_is_at_root_paths(gw):
    """The server marked "default": true (beta) answers /mcp."""
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    r = httpx.post(f"{gw.url}/mcp", json=init, headers=headers)
    sid = r.headers["mcp-session-id"]
    servers = {s["name"]: s for s in httpx.get(f"{gw.url}/servers").json()["servers"]}
    assert servers["beta"]["sessions"] == 1
    httpx.delete(f"{gw.url}/mcp", headers={"mcp-session-id": sid})


@pytest.mark.parametrize("path", ["/nope", "/servers/gamma/mcp", "/servers/alpha/nope"])
def test_unknown_paths_are_json_404(gw, path):
    r = httpx.get(f"{gw.url}{path}")
    assert r.status_code == 404
    assert r.json()["error"] == "not found"
