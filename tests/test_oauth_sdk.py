"""Issue 18, point 2: the official Python SDK's OAuth client signs in to the gateway on its own.

``ClientCredentialsOAuthProvider`` (mcp 2.x) gets only the gateway's URL and a client id and secret. On
the gateway's 401 it reads ``resource_metadata`` from ``WWW-Authenticate``, fetches the Protected Resource
Metadata (RFC 9728), finds the authorization server there, asks it for a token for the gateway's resource
(RFC 8707 ``resource``) and retries; then it lists and calls tools over Streamable HTTP. The authorization
server is oidc-provider (tests/oauth_server.py), the gateway a real process, and once more behind nginx
with TLS, where the resource and its metadata are the https URL the client connects to.
"""

from __future__ import annotations

import json
import ssl
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.exceptions import MCPDeprecationWarning

from tests.gateway_process import fixture_server
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, make_oauth_server  # noqa: F401 - the fixture
from tests.redis_server import free_port
from tests.test_nginx import Nginx, make_prefix

pytestmark = pytest.mark.integration


class MemoryStorage(TokenStorage):
    """Tokens and client information in memory, as an application that keeps nothing on disk."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


def gateway_config(issuer: str, resource: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "mcpServers": {"files": fixture_server()},
        "auth": {"oauth": {"resource": resource, "authorizationServers": [issuer], "scopesSupported": ["files:read"],
                           "toolScopes": {"files": {"sleep": ["files:write"]}}}},
        **extra,
    }


async def sign_in_list_and_call(url: str, verify: Any = True, scope: str | None = None) -> tuple[list[str], Any, MemoryStorage]:
    storage = MemoryStorage()
    with warnings.catch_warnings():
        # The client is given the gateway's URL and its credentials, nothing else: without ``issuer`` the SDK
        # warns that it follows the authorization server the resource names (which is what this shows).
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        provider = ClientCredentialsOAuthProvider(server_url=url, storage=storage, client_id=CLIENT_ID,
                                                  client_secret=CLIENT_SECRET, scope=scope)
    async with httpx2.AsyncClient(auth=provider, verify=verify, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            tools = await client.list_tools()
            result = await client.call_tool("echo", {"text": "signed in"})
    return [t.name for t in tools.tools], result, storage


def test_sdk_client_credentials_discover_the_as_and_call_tools(make_gateway, make_oauth_server) -> None:  # noqa: F811
    server = make_oauth_server()
    port = free_port()
    resource = f"http://127.0.0.1:{port}"
    gw = make_gateway(gateway_config(server.issuer, resource, port), port=port)
    names, result, storage = anyio.run(sign_in_list_and_call, f"{resource}/servers/files/mcp")
    assert "echo" in names and "sleep" not in names  # files:read only: the tool needing files:write is hidden
    assert result.content[0].text == "signed in"
    assert storage.tokens is not None  # the provider got its token from oidc-provider
    # A token for the gateway's /servers/files/mcp: RFC 8707, the resource the client connected to.
    with httpx.Client() as plain:
        prm = plain.get(f"{gw.url}/.well-known/oauth-protected-resource/servers/files/mcp").json()
    assert prm["resource"] == f"{resource}/servers/files/mcp" and prm["authorization_servers"] == [server.issuer]


def test_sdk_client_steps_up_on_403_insufficient_scope(make_gateway, make_oauth_server) -> None:  # noqa: F811
    """MCP authorization spec, "Step-Up Authorization Flow": the call of a tool the token has no scope for is
    403 with ``error="insufficient_scope"`` and the scopes to ask for; the SDK gets a token with them and
    retries, and the tool is then listed too."""
    server = make_oauth_server()
    port = free_port()
    resource = f"http://127.0.0.1:{port}"
    make_gateway(gateway_config(server.issuer, resource, port), port=port)
    url = f"{resource}/servers/files/mcp"

    async def main() -> Any:
        storage = MemoryStorage()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            provider = ClientCredentialsOAuthProvider(server_url=url, storage=storage, client_id=CLIENT_ID,
                                                      client_secret=CLIENT_SECRET)
        async with httpx2.AsyncClient(auth=provider, timeout=30) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                before = [t.name for t in (await client.list_tools()).tools]
                first_scope = storage.tokens.scope if storage.tokens else None
                slept = await client.call_tool("sleep", {"seconds": 0})
                after = [t.name for t in (await client.list_tools()).tools]
        return before, first_scope, slept, after, storage.tokens

    before, first_scope, slept, after, tokens = anyio.run(main)
    assert "sleep" not in before and first_scope == "files:read"  # the 401's scope: least privilege first
    assert not slept.is_error, json.dumps(slept.model_dump(mode="json"))
    assert "sleep" in after and set(tokens.scope.split()) == {"files:read", "files:write"}


def test_sdk_client_through_nginx_with_tls(make_gateway, make_oauth_server, tmp_path: Path) -> None:  # noqa: F811
    server = make_oauth_server()
    http_port, https_port, port = free_port(), free_port(), free_port()
    public = f"https://127.0.0.1:{https_port}"
    # nginx's own config: the gateway trusts it for X-Forwarded-*, and its public https URL is the resource.
    make_gateway(gateway_config(server.issuer, public, port, trustedProxies=["127.0.0.1"]), port=port)
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = make_prefix(prefix, [port], http_port, https_port)
    nginx = Nginx(prefix, conf)
    try:
        nginx.wait_listening(http_port, https_port)
        context = ssl.create_default_context(cafile=str(prefix / "certs" / "server.crt"))
        names, result, _ = anyio.run(sign_in_list_and_call, f"{public}/servers/files/mcp", context)
        assert "echo" in names and result.content[0].text == "signed in"
        with httpx.Client(verify=context) as client:
            r = client.post(f"{public}/servers/files/mcp", json={})
            prm = client.get(f"{public}/.well-known/oauth-protected-resource/servers/files/mcp").json()
        assert r.status_code == 401
        assert f'resource_metadata="{public}/.well-known/oauth-protected-resource/servers/files/mcp"' in r.headers["www-authenticate"]
        assert prm["resource"] == f"{public}/servers/files/mcp"
    finally:
        nginx.stop()


def client_credentials_token(server: Any, resource: str, scope: str) -> str:
    """A token from the authorization server for ``resource`` (RFC 8707), as any client would ask for one."""
    r = httpx.post(server.token_endpoint, data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
                   auth=(CLIENT_ID, CLIENT_SECRET), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_websocket_tool_scope_json_rpc_error_and_hidden_tool(make_gateway, make_oauth_server) -> None:  # noqa: F811
    """On a WebSocket (a live stream: no status to send) a call without the tool's scope is a JSON-RPC error
    naming ``insufficient_scope`` and the scopes; ``tools/list`` hides the tool; a token with the scope calls it."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    server = make_oauth_server()
    port = free_port()
    resource = f"http://127.0.0.1:{port}"
    make_gateway(gateway_config(server.issuer, resource, port), port=port)
    ws_url = f"ws://127.0.0.1:{port}/servers/files/ws"
    reader = client_credentials_token(server, f"{resource}/servers/files/ws", "files:read")
    writer = client_credentials_token(server, f"{resource}/servers/files/ws", "files:read files:write")
    elsewhere = client_credentials_token(server, f"{resource}/servers/other/ws", "files:read")

    async def exchange(token: str, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        async with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            answers = []
            for message in [{"jsonrpc": "2.0", "id": 0, "method": "initialize",
                             "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                        "clientInfo": {"name": "t", "version": "1"}}}, *messages]:
                await ws.send(json.dumps(message))
                answers.append(json.loads(await ws.recv()))
            return answers[1:]

    async def main() -> Any:
        listed, refused = await exchange(reader, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                         {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                          "params": {"name": "sleep", "arguments": {"seconds": 0}}})
        [called] = await exchange(writer, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                           "params": {"name": "sleep", "arguments": {"seconds": 0}}})
        try:
            await exchange(elsewhere)
            wrong_audience = None
        except InvalidStatus as e:
            wrong_audience = e.response
        return listed, refused, called, wrong_audience

    listed, refused, called, wrong_audience = anyio.run(main)
    names = [t["name"] for t in listed["result"]["tools"]]
    assert "echo" in names and "sleep" not in names
    assert refused["error"]["code"] == -32003
    assert refused["error"]["data"] == {"error": "insufficient_scope", "scope": "files:read files:write"}
    assert "result" in called
    assert wrong_audience is not None and wrong_audience.status_code == 401
    assert "resource_metadata=" in wrong_audience.headers["www-authenticate"]
