"""Issue 2, point 1: the official ``mcp`` SDK client reaches the default server over both transports."""

import json
from pathlib import Path

import anyio
import pytest
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def default_config() -> dict:
    with open(ROOT / "conf" / "gateway.json") as f:
        config = json.load(f)
    return config


async def _list_and_call(transport, mode):
    async with Client(transport, mode=mode) as client:
        tools = await client.list_tools()
        result = await client.call_tool("get_current_time", {"timezone": "UTC"})
        return [t.name for t in tools.tools], json.loads(result.content[0].text)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("kind", ["streamable", "sse"])
def test_sdk_lists_and_calls_default_server(make_gateway, kind, mode):
    """conf/gateway.json's default server (mcp-server-time) answers the SDK on /mcp and /sse."""
    gw = make_gateway(default_config())
    transport = streamable_http_client(f"{gw.url}/mcp") if kind == "streamable" else sse_client(f"{gw.url}/sse")
    names, payload = anyio.run(_list_and_call, transport, mode)
    assert "get_current_time" in names
    assert payload["timezone"] == "UTC"


def test_named_server_paths(make_gateway):
    """Every configured server is also at /servers/NAME/{mcp,sse}."""
    config = default_config()
    gw = make_gateway(config)
    name = next(iter(config["mcpServers"]))
    names, _ = anyio.run(_list_and_call, streamable_http_client(f"{gw.url}/servers/{name}/mcp"), "legacy")
    assert "get_current_time" in names
    names, _ = anyio.run(_list_and_call, sse_client(f"{gw.url}/servers/{name}/sse"), "legacy")
    assert "get_current_time" in names
