"""Issue 10, point 1: remote upstreams (mcpgw.upstream.remote).

Integration: a real remote MCP server built with the official ``mcp`` 2.x SDK
(tests/fixtures/remote_server.py, uvicorn on a free loopback port), once over Streamable
HTTP and once over the legacy HTTP+SSE transport, behind a real gateway, reached through
each of the gateway's client transports (/mcp, /sse, /ws): tools, progress, a
server-to-client request (sampling), and the credentials rule (only the configured
upstream headers go upstream, never the client's).

Unit: RemoteUpstream against an in-memory Streamable HTTP server (treq's StubTreq over a
twisted.web resource): session id and protocol version kept, initialize not overtaken,
404 ends the session, unreachable server -> JSON-RPC errors; the SSE parser; config checks.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import httpx
import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcpgw import jsonrpc
from mcpgw.config import ConfigError, parse
from mcpgw.upstream import FilteredUpstream, make_upstream
from mcpgw.upstream.remote import RemoteUpstream, SseParser
from tests.gateway_process import Gateway, fixture_server
from tests.remote_fixture import RemoteServer, WsClient, sdk_session

UPSTREAM_TOKEN = "upstream-secret-0123456789"
CLIENT_TOKEN = "client-secret-abcdefghijkl"


# -- integration: a real SDK server behind a real gateway ---------------------------------


@pytest.fixture(scope="module")
def remote_gateway():
    servers = [RemoteServer("streamable-http", token=UPSTREAM_TOKEN, name="remote-http"),
               RemoteServer("sse", token=UPSTREAM_TOKEN, name="remote-sse")]
    gw = None
    try:
        auth = {"Authorization": "Bearer ${UPSTREAM_TOKEN}"}
        gw = Gateway({
            "mcpServers": {
                "http": {"url": servers[0].url, "transport": "streamable-http", "headers": auth},
                "legacy": {"url": servers[1].url, "transport": "sse", "headers": auth, "connectTimeout": 5},
            },
            "auth": {"bearerTokens": [{"name": "client", "token": CLIENT_TOKEN}]},
        }, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        for server in servers:
            server.stop()


CLIENT_HEADERS = {"Authorization": f"Bearer {CLIENT_TOKEN}"}

pytest_integration = pytest.mark.integration


async def _exercise(client: Any) -> dict[str, Any]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    tools = await client.list_tools()
    echo = await client.call_tool("echo", {"text": "through the gateway"})
    stepped = await client.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
    asked = await client.call_tool("ask", {"question": "sampled?"})
    seen = await client.call_tool("headers", {})
    prompt = await client.get_prompt("greet", {"who": "you"})
    resource = await client.read_resource("remote://info")
    return {
        "tools": sorted(t.name for t in tools.tools),
        "echo": echo.content[0].text,
        "progress": progress,
        "stepped": stepped.content[0].text,
        "asked": asked.content[0].text,
        "headers": json.loads(seen.content[0].text),
        "prompt": prompt.messages[0].content.text,
        "resource": resource.contents[0].text,
    }


def _check_headers(headers: dict[str, str]) -> None:
    """Upstream saw the configured credential, and nothing of the client's."""
    assert headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert not any(CLIENT_TOKEN in value for value in headers.values()), headers


@pytest_integration
@pytest.mark.parametrize("upstream", ["http", "legacy"])
@pytest.mark.parametrize("transport", ["mcp", "sse"])
def test_sdk_client_reaches_remote_upstream(remote_gateway, upstream, transport):
    """The SDK client on /servers/NAME/{mcp,sse} lists, calls (with progress and sampling), gets a
    prompt and reads a resource of a remote SDK server (Streamable HTTP or legacy SSE upstream)."""
    gw = remote_gateway
    out = sdk_session(f"{gw.url}/servers/{upstream}/{transport}", transport, _exercise, headers=CLIENT_HEADERS)
    assert {"whoami", "echo", "progress", "ask", "headers"} <= set(out["tools"])
    assert out["echo"] == "through the gateway"
    assert out["progress"] == [1, 2, 3] and out["stepped"] == "done"
    assert out["asked"] == "SAMPLED?"
    assert out["prompt"] == f"Hello, you, from remote-{'http' if upstream == 'http' else 'sse'}"
    assert out["resource"].startswith("remote server remote-")
    _check_headers(out["headers"])


@pytest_integration
@pytest.mark.parametrize("upstream", ["http", "legacy"])
def test_websocket_client_reaches_remote_upstream(remote_gateway, upstream):
    """A WebSocket client on /servers/NAME/ws: initialize, a call with progress notifications, sampling
    answered over the socket, and the upstream's view of the credentials."""
    gw = remote_gateway
    ws = WsClient(f"ws://127.0.0.1:{gw.port}/servers/{upstream}/ws", headers=CLIENT_HEADERS)
    try:
        init = ws.initialize()
        assert init["result"]["serverInfo"]["name"].startswith("remote-")
        echo = ws.tool("echo", {"text": "ws"})
        assert echo["result"]["content"][0]["text"] == "ws"
        stepped = ws.tool("progress", {"steps": 2}, _meta={"progressToken": "p1"})
        assert stepped["result"]["content"][0]["text"] == "done"
        progress = [m for m in ws.seen if m.get("method") == "notifications/progress"]
        assert [m["params"]["progress"] for m in progress] == [1, 2]
        assert all(m["params"]["progressToken"] == "p1" for m in progress)
        assert any(m.get("method") == "notifications/message" for m in ws.seen)
        asked = ws.tool("ask", {"question": "over ws"})
        assert asked["result"]["content"][0]["text"] == "OVER WS"
        _check_headers(json.loads(ws.tool("headers")["result"]["content"][0]["text"]))
    finally:
        ws.close()


@pytest_integration
def test_servers_index_shows_remote_without_credentials(remote_gateway):
    """/servers names each remote's kind, URL and transport, never its headers."""
    gw = remote_gateway
    body = httpx.get(f"{gw.url}/servers", headers=CLIENT_HEADERS).text
    servers = {s["name"]: s for s in json.loads(body)["servers"]}
    assert servers["http"]["kind"] == "remote" and servers["http"]["transport"] == "streamable-http"
    assert servers["legacy"]["kind"] == "remote" and servers["legacy"]["transport"] == "sse"
    assert UPSTREAM_TOKEN not in body and UPSTREAM_TOKEN not in gw.log()
    assert httpx.get(f"{gw.url}/ready").status_code == 200


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_integration
def test_unreachable_remote_answers_with_a_jsonrpc_error(make_gateway):
    """A remote server nobody listens for: initialize gets a JSON-RPC error at once, the gateway stays up."""
    gw = make_gateway({"mcpServers": {
        "gone": {"url": f"http://127.0.0.1:{_closed_port()}/mcp", "connectTimeout": 2},
        "fx": fixture_server(default=True),
    }})
    r = httpx.post(f"{gw.url}/servers/gone/mcp", headers={"accept": "application/json, text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                         "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
                   timeout=10)
    assert r.status_code == 200
    assert r.json()["error"]["code"] == jsonrpc.CONNECTION_CLOSED
    assert "unreachable" in r.json()["error"]["message"]
    assert httpx.get(f"{gw.url}/health").status_code == 200


def test_connection_failures_tell_the_client_their_kind_not_the_internal_address():
    """Issue 15: error bodies never carry internal host names or addresses (Twisted's messages do:
    'Connection was refused by other side: 111' with the address, 'address internal.corp not found')."""
    from twisted.internet import error
    from twisted.python.failure import Failure

    from mcpgw.upstream.remote import public_reason

    cases = {
        error.ConnectionRefusedError("10.1.2.3:8080"): "connection refused",
        error.DNSLookupError("address 'mcp.internal.corp' not found"): "name lookup failed",
        error.TimeoutError("connecting to 10.1.2.3 timed out"): "timed out",
        RuntimeError("anything about 10.1.2.3"): "connection failed",
    }
    for exc, kind in cases.items():
        assert public_reason(Failure(exc)) == kind


# -- unit: RemoteUpstream against an in-memory Streamable HTTP server ----------------------


class FakeMcp(Resource):
    """A minimal Streamable HTTP MCP endpoint: records requests; answers JSON; 404 when told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]], Any]] = []
        self.forget = False
        self.held: list[Any] = []  # requests of methods in ``hold``, answered by release()
        self.hold: set[str] = set()

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        self.seen.append((b"POST", dict(request.requestHeaders.getAllRawHeaders()), body))
        if self.forget:
            request.setResponseCode(404)
            return b""
        if "id" not in body or "method" not in body:
            request.setResponseCode(202)
            return b""
        if body["method"] in self.hold:
            self.held.append((request, body))
            return NOT_DONE_YET
        return self._answer(request, body)

    def _answer(self, request: Any, body: dict[str, Any]) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if body["method"] == "initialize":
            request.setHeader(b"mcp-session-id", b"upstream-1")
            result: dict[str, Any] = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "fake", "version": "1"}}
        else:
            result = {"method": body["method"]}
        return json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()

    def release(self) -> None:
        held, self.held = self.held, []
        for request, body in held:
            request.write(self._answer(request, body))
            request.finish()

    #: what the GET stream says (an SSE body), or None: 405, no GET stream
    stream: bytes | None = None

    def render_GET(self, request: Any) -> bytes:
        self.seen.append((b"GET", dict(request.requestHeaders.getAllRawHeaders()), None))
        if self.stream is None:
            request.setResponseCode(405)
            return b""
        request.setHeader(b"content-type", b"text/event-stream")
        return self.stream

    def render_DELETE(self, request: Any) -> bytes:
        self.seen.append((b"DELETE", dict(request.requestHeaders.getAllRawHeaders()), None))
        return b""


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ended: list[str] = []
        self.errors: list[str] = []

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        assert jsonrpc.loads(raw) == msg
        self.messages.append(msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self.errors.append(reason)

    def upstreamEnded(self, reason: str) -> None:
        self.ended.append(reason)


def _remote(url: str = "http://upstream.test/mcp", **extra: Any):
    config = parse({"mcpServers": {"r": {"url": url, "headers": {"X-Token": "${TOK}"}, **extra}}}, {"TOK": "t0ken"})
    return config.servers["r"]


def _wire(server: Any = None) -> tuple[RemoteUpstream, FakeMcp, StubTreq, Recorder]:
    fake = FakeMcp()
    stub = StubTreq(fake)
    delegate = Recorder()
    upstream = RemoteUpstream(server or _remote(), delegate, Clock(), http=stub)
    upstream.spawn()
    return upstream, fake, stub, delegate


def _msg(id: Any, method: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": {}}).encode()


INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def test_session_id_and_version_are_kept_and_config_headers_sent():
    """After initialize, every request carries the upstream's Mcp-Session-Id, the negotiated
    MCP-Protocol-Version and the configured headers (resolved from the environment)."""
    upstream, fake, stub, delegate = _wire()
    assert upstream.pid is None
    assert upstream.send(_msg(1, "initialize"))
    stub.flush()
    assert upstream.send(INITIALIZED)
    stub.flush()
    assert upstream.send(_msg(2, "tools/list"))
    stub.flush()
    assert [m["id"] for m in delegate.messages] == [1, 2]
    last = fake.seen[-1][1]
    assert last[b"Mcp-Session-Id"] == [b"upstream-1"]
    assert last[b"Mcp-Protocol-Version"] == [b"2025-06-18"]
    assert last[b"X-Token"] == [b"t0ken"]
    assert b"GET" in [s[0] for s in fake.seen]  # the GET stream was tried after initialized (405 here)


def test_get_stream_relays_server_messages_and_reconnects():
    """After notifications/initialized the GET stream is opened; its messages are relayed; when it
    ends it is reopened (on the injected clock) with Last-Event-ID."""
    upstream, fake, stub, delegate = _wire()
    fake.stream = (b'id: s1\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n'
                   b': keepalive\n\nid: s2\ndata: {"jsonrpc":"2.0","id":"srv-1","method":"roots/list"}\n\n')
    # The client declares roots: a remote's roots/list reaches only a client that did (mcpgw.pool.undeclared).
    upstream.send(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{"roots":{}}}}')
    stub.flush()
    upstream.send(INITIALIZED)
    stub.flush()
    assert [m.get("method") for m in delegate.messages[1:]] == ["notifications/tools/list_changed", "roots/list"]
    gets = [s for s in fake.seen if s[0] == b"GET"]
    assert gets[0][1][b"Accept"] == [b"text/event-stream"] and gets[0][1][b"Mcp-Session-Id"] == [b"upstream-1"]
    upstream._reactor.advance(1)
    stub.flush()
    gets = [s for s in fake.seen if s[0] == b"GET"]
    assert len(gets) == 2 and gets[1][1][b"Last-Event-Id"] == [b"s2"]
    upstream.stop()
    stub.flush()


def test_nothing_overtakes_initialize():
    """Messages sent while initialize is unanswered wait, then go upstream in order with the session id."""
    upstream, fake, stub, delegate = _wire()
    fake.hold = {"initialize"}
    upstream.send(_msg(1, "initialize"))
    upstream.send(INITIALIZED)
    upstream.send(_msg(2, "ping"))
    stub.flush()
    assert [s[2].get("method") for s in fake.seen] == ["initialize"]
    fake.release()
    stub.flush()
    posts = [s for s in fake.seen if s[0] == b"POST"]
    assert [s[2].get("method") for s in posts] == ["initialize", "notifications/initialized", "ping"]
    assert posts[2][1][b"Mcp-Session-Id"] == [b"upstream-1"]
    assert [m["id"] for m in delegate.messages] == [1, 2]


def test_upstream_404_ends_the_session():
    """The remote server forgot the session (404): the upstream ends, so the client session ends
    and the client re-initializes."""
    upstream, fake, stub, delegate = _wire()
    upstream.send(_msg(1, "initialize"))
    stub.flush()
    fake.forget = True
    upstream.send(_msg(2, "tools/list"))
    stub.flush()
    assert upstream.ended
    assert delegate.ended and "404" in delegate.ended[0]
    assert not upstream.send(_msg(3, "ping"))


def test_refused_request_gets_a_jsonrpc_error():
    """An HTTP error answer to a request becomes a JSON-RPC error for that request id."""
    upstream, fake, stub, delegate = _wire()
    fake.forget = True  # 404 before any session: not a lost session, a refused request
    upstream.send(_msg(7, "initialize"))
    stub.flush()
    assert delegate.messages[0]["id"] == 7
    assert delegate.messages[0]["error"]["code"] == jsonrpc.CONNECTION_CLOSED
    assert not upstream.ended


def test_stop_deletes_the_upstream_session():
    """stop() sends DELETE with the session id and fires once done; ended afterwards."""
    upstream, fake, stub, _delegate = _wire()
    upstream.send(_msg(1, "initialize"))
    stub.flush()
    d = upstream.stop()
    stub.flush()
    assert upstream.ended
    assert d.called
    delete = [s for s in fake.seen if s[0] == b"DELETE"]
    assert delete and delete[0][1][b"Mcp-Session-Id"] == [b"upstream-1"]


def test_tool_filter_wraps_a_remote():
    """``tools.deny`` on a remote server: make_upstream puts a FilteredUpstream in front."""
    server = _remote(tools={"deny": ["secret"]})
    upstream = make_upstream(server, Recorder(), Clock())
    assert isinstance(upstream, FilteredUpstream) and isinstance(upstream.inner, RemoteUpstream)


def test_sse_parser_events_across_chunks():
    """Events split anywhere (CRLF too) are reassembled; comments ignored; id and retry kept."""
    events: list[tuple[str, str, Any]] = []
    parser = SseParser(lambda n, d, i: events.append((n, d, i)), 1000, lambda: None)
    for chunk in [b": ping\r", b"\nevent: endpoint\r\ndata: /messages?x=1\r\n\r\n", b"id: 7\nretry: 10\ndata: {\"a\"",
                  b":1}\ndata: more\n", b"\n"]:
        parser.feed(chunk)
    assert events == [("endpoint", "/messages?x=1", None), ("message", '{"a":1}\nmore', "7")]
    assert parser.retry == 10


def test_sse_parser_limit():
    """An event over the limit breaks the parser once."""
    broken: list[int] = []
    parser = SseParser(lambda *a: None, 10, lambda: broken.append(1))
    parser.feed(b"data: " + b"x" * 50 + b"\n\n")
    parser.feed(b"data: y\n\n")
    assert broken == [1]


# -- config -------------------------------------------------------------------------------


def test_config_remote_server_fields():
    """url/transport/headers/timeouts are parsed; ${VAR} comes from the environment; no command needed."""
    config = parse({"mcpServers": {"r": {"url": "https://mcp.example/mcp", "transport": "sse",
                                         "headers": {"Authorization": "Bearer ${T}"}, "connectTimeout": 3,
                                         "requestTimeout": 60}}}, {"T": "abc"})
    server = config.servers["r"]
    assert server.kind == "remote" and server.transport == "sse"
    assert server.headers == {"Authorization": "Bearer abc"}
    assert (server.connectTimeout, server.exchangeTimeout) == (3, 60)  # requestTimeout: exchangeTimeout's old name
    assert "abc" not in repr(server)


def test_config_exchange_timeout_and_its_old_name():
    """``exchangeTimeout`` (one HTTP exchange with the remote server), read from ``requestTimeout`` too; both: an error."""
    def server(**keys: Any) -> Any:
        return parse({"mcpServers": {"r": {"url": "https://mcp.example/mcp", **keys}}}, {}).servers["r"]

    assert server().exchangeTimeout == 300.0
    assert server(exchangeTimeout=7).exchangeTimeout == 7
    assert server(requestTimeout=9).exchangeTimeout == 9
    with pytest.raises(ConfigError, match="mcpServers.r.requestTimeout: is the old name of exchangeTimeout"):
        server(exchangeTimeout=7, requestTimeout=9)


@pytest.mark.parametrize("spec, key", [
    ({"url": "ftp://x/mcp"}, "mcpServers.r.url"),
    ({"url": "https://user:pw@x/mcp"}, "mcpServers.r.url"),
    ({"url": "http://x/mcp", "transport": "websocket"}, "mcpServers.r.transport"),
    ({"url": "http://x/mcp", "headers": {"A": "${MISSING}"}}, "mcpServers.r.headers.A"),
    ({"url": "http://x/mcp", "command": "x"}, "mcpServers.r.command"),
    ({"url": "http://x/mcp", "connectTimeout": 0}, "mcpServers.r.connectTimeout"),
    ({"url": "http://x/mcp", "tools": {"allow": "x"}}, "mcpServers.r.tools.allow"),
])
def test_config_remote_server_errors(spec, key):
    """Each wrong remote setting names its key."""
    with pytest.raises(ConfigError) as e:
        parse({"mcpServers": {"r": spec}}, {})
    assert e.value.key == key


def test_config_stdio_tool_filter():
    config = parse({"mcpServers": {"s": {"command": sys.executable, "tools": {"allow": ["a", "b"], "deny": ["b"]}}}}, {})
    tools = config.servers["s"].tools
    assert tools.permits("a") and not tools.permits("b") and not tools.permits("c")


def test_upstream_connections_write_no_factory_log_line() -> None:
    """The pool's connections are made through endpoints that quiet their factory (no "Starting
    factory" line per upstream connection), with Agent's own TCP and TLS endpoints underneath."""
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import URI
    from twisted.web.error import SchemeNotSupported

    from mcpgw.upstream.remote import _client, _QuietEndpoints

    reactor = MemoryReactorClock()
    endpoints = _QuietEndpoints(reactor)
    plain = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/mcp"))
    assert isinstance(plain._endpoint, HostnameEndpoint)
    factory = Factory()
    assert factory.noisy
    plain.connect(factory)
    assert factory.noisy is False
    tls = endpoints.endpointForURI(URI.fromBytes(b"https://example.com/mcp"))
    assert not isinstance(tls._endpoint, HostnameEndpoint)  # TLS wrapped around it
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://example.com/"))
    assert isinstance(_client(reactor)._agent._endpointFactory, _QuietEndpoints)
