"""Issue 6, property tests: arbitrary bytes, headers and JSON at every endpoint of a gateway with
every guard on (auth, rate limiting, CORS, limits).

Properties: every answer is a status line within 5 s (no hang), never a 5xx; afterwards the
gateway is healthy, and once idle sessions expire no session and no child is left. Hypothesis
runs a bounded number of examples with no example database, so the run time is bounded too.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests import wire
from tests.gateway_process import wait_until

pytestmark = pytest.mark.integration

TOKEN = "props-token-0123456789abcdef"
PATHS = ["/mcp", "/sse", "/messages", "/ws", "/servers", "/servers/", "/servers/fx", "/servers/fx/mcp",
         "/servers/fx/sse", "/servers/fx/messages", "/servers/fx/ws", "/servers/nope/mcp", "/health", "/ready",
         "/", "/nope", "/mcp/", "/sse/x", "//mcp", "/%2e%2e/mcp"]
MAIN_PATHS = ["/mcp", "/sse", "/messages", "/servers/fx/mcp"]
METHODS = ["GET", "POST", "DELETE", "OPTIONS", "PUT", "HEAD", "PATCH", "TRACE", "CONNECT", "FOO"]
#: Framing headers the test writes itself (a wrong Content-Length would make the *client* hang).
FRAMING = {"host", "content-length", "transfer-encoding", "connection", "expect", "te", "trailer"}
HEADER_NAMES = ["authorization", "x-api-key", "origin", "content-type", "accept", "mcp-session-id",
                "mcp-protocol-version", "last-event-id", "x-forwarded-for", "x-real-ip", "upgrade",
                "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "cookie",
                "access-control-request-method", "access-control-request-headers", "mcp-method", "mcp-name"]
INTERESTING_VALUES = [
    f"Bearer {TOKEN}", "Bearer", "Bearer " + "x" * 3000, "bearer  a.b.c", "Basic Zm9vOmJhcg==", TOKEN,
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "application/json", "text/event-stream",
    "application/json, text/event-stream", "*/*", "http://localhost:5173", "http://evil.example", "null",
    "2025-11-25", "2024-11-05", "websocket", "13", "mcp", "1_1", "127.0.0.1", "::1, 10.0.0.1", "",
    "a" * 5000,
]

#: Most examples start from a request the gateway would accept, so the fuzzing gets past the guards.
BASES = [
    [],
    [("authorization", f"Bearer {TOKEN}"), ("accept", "application/json, text/event-stream"), ("content-type", "application/json")],
    [("x-api-key", TOKEN), ("accept", "text/event-stream")],
    [("authorization", f"Bearer {TOKEN}"), ("accept", "application/json, text/event-stream"),
     ("content-type", "application/json"), ("mcp-protocol-version", "2025-03-26")],
]


def header_lists(session_ids: list[str]) -> st.SearchStrategy[list[tuple[str, str]]]:
    value = st.sampled_from(INTERESTING_VALUES + session_ids) | st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=64)
    name = st.sampled_from(HEADER_NAMES) | st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)
    extra = st.lists(st.tuples(name, value), max_size=6)
    return st.builds(lambda base, more: [(n, v) for n, v in base + more if n.lower() not in FRAMING],
                     st.sampled_from(BASES), extra)

json_leaf = (st.none() | st.booleans() | st.integers(-(2 ** 64), 2 ** 64)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_value = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)
RPC_METHODS = ["initialize", "ping", "tools/list", "tools/call", "notifications/initialized", "notifications/cancelled",
               "server/discover", "resources/read", "logging/setLevel"]
rpc = st.fixed_dictionaries({"jsonrpc": st.just("2.0")}, optional={
    "id": st.integers(-5, 5) | st.text(max_size=6) | json_value,
    "method": st.sampled_from(RPC_METHODS) | st.text(max_size=10),
    "params": json_value | st.fixed_dictionaries({
        "protocolVersion": st.sampled_from(["2025-11-25", "2025-03-26", "2024-11-05", "x"]),
        "capabilities": st.just({}), "clientInfo": st.just({"name": "p", "version": "1"}),
        "name": st.sampled_from(["echo", "env", "sleep", "nope"]), "arguments": json_value}),
    "result": json_value,
})
bodies = st.one_of(
    st.sampled_from([wire.initialize(), wire.initialize(version="2025-03-26"), wire.request(1, "ping"),
                     wire.tool_call(2, "echo", {"text": "x"}), wire.notification("notifications/initialized")]
                    ).map(lambda v: json.dumps(v).encode()),
    rpc.map(lambda v: json.dumps(v).encode()),
    st.just(b""),
    st.binary(max_size=2048),
    json_value.map(lambda v: json.dumps(v).encode()),
    rpc.map(lambda v: json.dumps(v).encode()),
    st.lists(rpc, min_size=1, max_size=5).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway(wire.config(
        auth={"bearerTokens": [{"name": "props", "token": TOKEN}]},
        rateLimit={"enabled": True, "max": 1_000_000, "window": "1h"},
        cors={"origins": ["http://localhost:5173"]},
        session={"maxAge": 1000},
        limits={"maxHeaderBytes": 8192, "requestTimeout": 5, "maxBatchMessages": 4},
        maxBodyBytes=65536,
    ))


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``; what the gateway answers up to the end of its header block (or until it closes).

    A stream (SSE, a WebSocket) stays open by design: its status line and headers are the answer.
    """
    answer = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout} s to {data[:200]!r}") from None
            if not chunk:
                break
            answer += chunk
    return answer


def assert_clean(gw: Any) -> None:
    """Healthy; and once idle sessions expire (session.maxAge 1 s), no session and no child."""
    r = httpx.get(gw.url + "/health", timeout=5)
    assert r.status_code == 200
    assert wait_until(lambda: httpx.get(gw.url + "/health").json()["sessions"] == 0 and gw.child_pids() == [], 15), \
        (httpx.get(gw.url + "/health").json(), gw.child_pids())


def test_arbitrary_requests(gw):
    seen: Counter[str] = Counter()
    with wire.http_client(gw.url) as c:
        r = c.post("/mcp", headers={**wire.POST_HEADERS, "authorization": f"Bearer {TOKEN}"},
                   json=wire.initialize(version="2025-03-26"))
        live = r.headers["mcp-session-id"]
    queries = st.none() | st.sampled_from([f"?sessionId={live}"]) | st.text(max_size=40).map(
        lambda q: "?sessionId=" + q.replace(" ", "+"))

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(method=st.sampled_from(["POST"] * 6 + ["GET"] * 3 + METHODS), path=st.sampled_from(MAIN_PATHS * 3 + PATHS), query=queries,
           hdrs=header_lists([live]), body=bodies)
    def one(method: str, path: str, query: str | None, hdrs: list[tuple[str, str]], body: bytes) -> None:
        target = path + (query or "")
        head = f"{method} {target} HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{n}: {v}\r\n" for n, v in hdrs) + "\r\n"
        try:
            data = head.encode("latin-1") + body
        except UnicodeEncodeError:
            data = head.encode("utf-8") + body
        answer = exchange(gw.port, data)
        status = wire.raw_status(answer)
        seen[f"{path} {status}"] += 1
        assert 100 <= status < 500, answer[:400]

    one()
    print("outcomes:", dict(sorted(seen.items())))  # shown with -s
    assert_clean(gw)


def test_arbitrary_json_with_credentials(gw):
    """Past the guards: authenticated POSTs of arbitrary JSON to every MCP endpoint, with and
    without a live session, a forged one, or an origin."""
    seen: Counter[str] = Counter()
    with wire.http_client(gw.url) as c:
        r = c.post("/mcp", headers={**wire.POST_HEADERS, "authorization": f"Bearer {TOKEN}"},
                   json=wire.initialize(version="2025-03-26"))
        live = r.headers["mcp-session-id"]
    extras = st.sampled_from([[], [("mcp-session-id", live)], [("mcp-session-id", live), ("mcp-protocol-version", "2025-03-26")],
                              [("mcp-session-id", "forged.forged")], [("origin", "http://localhost:5173")],
                              [("origin", "http://evil.example")]])

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(["/mcp", "/servers/fx/mcp", f"/messages?sessionId={live}", "/messages?sessionId=x"]),
           extra=extras, body=bodies)
    def one(path: str, extra: list[tuple[str, str]], body: bytes) -> None:
        hdrs = [("authorization", f"Bearer {TOKEN}"), ("accept", "application/json, text/event-stream"),
                ("content-type", "application/json"), *extra]
        head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{n}: {v}\r\n" for n, v in hdrs) + "\r\n"
        answer = exchange(gw.port, head.encode() + body)
        status = wire.raw_status(answer)
        seen[f"{path.split('?')[0]} {status}"] += 1
        assert 200 <= status < 500, answer[:400]

    one()
    print("outcomes:", dict(sorted(seen.items())))
    assert_clean(gw)


def test_arbitrary_bytes(gw):
    """Not HTTP at all: the gateway answers a 4xx or hangs up once the client has said all it
    will (half-close); never a 5xx, never a connection left open."""
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.binary(min_size=1, max_size=4096) | st.text(max_size=300).map(lambda t: (t + "\r\n\r\n").encode()))
    def one(data: bytes) -> None:
        answer = b""
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    answer += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
            except TimeoutError:
                raise AssertionError(f"connection still open 5 s after {data[:100]!r}") from None
        assert wire.raw_status(answer) < 500, answer[:300]

    one()
    assert_clean(gw)


frames = st.lists(
    st.one_of(
        rpc.map(lambda v: ("text", json.dumps(v))),
        json_value.map(lambda v: ("text", json.dumps(v))),
        st.text(max_size=200).map(lambda t: ("text", t)),
        st.binary(max_size=200).map(lambda b: ("binary", b)),
    ),
    min_size=1, max_size=6,
)


def test_arbitrary_websocket_messages(gw):
    """Any sequence of frames on an authenticated socket: answers or a close with a code, never
    a hang; the socket's session and child are gone after it closes."""
    closes: Counter[int | None] = Counter()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(sequence=frames)
    def one(sequence: list[tuple[str, Any]]) -> None:
        async def go() -> None:
            async with connect(f"ws://127.0.0.1:{gw.port}/ws", subprotocols=["mcp"],
                               additional_headers={"authorization": f"Bearer {TOKEN}"}, open_timeout=5) as ws:
                try:
                    for kind, payload in sequence:
                        await ws.send(payload if kind == "text" else bytes(payload))
                    await ws.send(json.dumps({"jsonrpc": "2.0", "id": "last", "method": "ping"}))
                    while True:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if isinstance(msg, dict) and msg.get("id") == "last":
                            break
                    closes[None] += 1
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                    closes[code] += 1
                    assert code in (1003, 1007, 1009, 1011), e
        asyncio.run(go())

    one()
    print("closes:", dict(closes))
    assert_clean(gw)


@pytest.mark.parametrize("method, path", [("HEAD", "/messages"), ("DELETE", "/health"), ("PUT", "/servers"),
                                          ("PATCH", "/sse"), ("HEAD", "/servers/fx/messages"), ("FOO", "/ready")])
def test_methods_nobody_serves_are_405(gw, method, path):
    """Found by the fuzzer: twisted.web answers 501 for methods besides GET/HEAD/POST, and 500 for
    HEAD on a POST-only resource. The gateway says 405 with Allow."""
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 0\r\n\r\n"
    answer = exchange(gw.port, head.encode())
    assert wire.raw_status(answer) == 405, answer[:300]
    assert b"\r\nAllow: " in answer
