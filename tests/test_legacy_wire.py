"""HTTP+SSE (MCP 2024-11-05) on the wire: ``GET /sse`` then ``POST /messages?sessionId=``.

Spec text: docs/specification/2024-11-05/basic/transports.mdx §HTTP with SSE
(modelcontextprotocol/modelcontextprotocol). Each test gets a gateway with ``sse.keepalive``
at 0.2 s.

Layer: unit (in process, no marker): tests/harness.py serves the gateway's real site and channel
on a Clock, its children played by FakeMcpServer; keepalive intervals and "within 2 s" are
virtual time, never slept. A real child's exit when its stream's socket closes is checked in
tests/test_wire_processes.py (integration).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import wire
from tests.fake_process import FAKE_SERVER_INFO
from tests.harness import Harness
from tests.wire import POST_HEADERS, assert_jsonrpc_error, sse_events

KEEPALIVE = 0.2


@pytest.fixture
def gw():
    with Harness(wire.config(sse={"keepalive": KEEPALIVE})) as h:
        yield h


@pytest.fixture
def client(gw):
    with gw.client() as c:
        yield c


class LegacySession:
    """An open ``/sse`` stream: its endpoint and its events."""

    def __init__(self, client, response, endpoint):
        self.client = client
        self.response = response
        self.endpoint = endpoint
        self.events = sse_events(response)

    @property
    def session_id(self) -> str:
        return self.endpoint.split("sessionId=", 1)[1]

    def post(self, message, **headers):
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        return self.client.post(self.endpoint, headers={"content-type": "application/json", **headers}, content=body)

    def next_message(self) -> dict:
        event = next(self.events)
        assert event.event == "message", event
        return json.loads(event.data)

    def initialize(self) -> dict:
        assert self.post(wire.initialize(id=0, version="2024-11-05")).status_code == 202
        reply = self.next_message()
        assert self.post(wire.notification("notifications/initialized")).status_code == 202
        return reply


@contextmanager
def legacy_session(client, path: str = "/sse") -> Iterator[LegacySession]:
    with client.stream("GET", path, headers={"accept": "text/event-stream"}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
        first = next(events)
        assert first.event == "endpoint", first
        session = LegacySession(client, r, first.data)
        session.events = events
        yield session


# -- the endpoint event ----------------------------------------------------------------


def test_first_event_is_endpoint_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: on connect the server MUST send an
    ``endpoint`` event with the URI for client messages, first."""
    with client.stream("GET", "/sse", headers={"accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(sse_events(r))
    assert first.event == "endpoint"
    assert first.data.startswith("/messages?sessionId=")
    assert len(first.data) > len("/messages?sessionId=") + 16


@pytest.mark.parametrize("path, prefix", [
    ("/servers/fx/sse", "/servers/fx/messages?sessionId="),
    ("/sse/", "/messages?sessionId="),
    ("/servers/fx/sse/", "/servers/fx/messages?sessionId="),
    ("/sse?client=x", "/messages?sessionId="),
])
def test_endpoint_under_named_paths_transports_2024_11_05_http_with_sse(client, path, prefix):
    """2024-11-05 basic/transports §HTTP with SSE: the endpoint event names the POST endpoint
    of the same server (``/servers/NAME/messages`` under a named path), and it works."""
    with legacy_session(client, path) as s:
        assert s.endpoint.startswith(prefix), s.endpoint
        assert s.initialize()["result"]["serverInfo"]["name"] == FAKE_SERVER_INFO["name"]


def test_sse_response_headers_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE (server messages as SSE): the stream is
    text/event-stream, uncached, with ``X-Accel-Buffering: no`` so proxies do not buffer it."""
    with legacy_session(client) as s:
        headers = s.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-accel-buffering"] == "no"
        assert "no-cache" in headers["cache-control"]


# -- POST /messages ----------------------------------------------------------------------


def test_post_is_202_and_reply_arrives_as_message_event_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: client messages are POSTed to the endpoint
    (accepted: 202); server messages arrive as SSE ``message`` events with the JSON as data."""
    with legacy_session(client) as s:
        init = s.initialize()
        assert init["id"] == 0 and init["result"]["protocolVersion"] == "2024-11-05"
        r = s.post(wire.tool_call("e1", "echo", {"text": "über"}))
        assert r.status_code == 202
        assert s.next_message() == {"jsonrpc": "2.0", "id": "e1",
                                    "result": {"content": [{"type": "text", "text": "über"}]}}
        r = s.post(wire.tool_call("n1", "notify"))
        assert r.status_code == 202
        got = [s.next_message() for _ in range(3)]
        assert [m.get("method") for m in got] == ["notifications/message", "notifications/tools/list_changed", None]
        assert got[-1]["id"] == "n1"


def test_notification_and_response_are_202_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: notifications and responses are POSTed
    to the endpoint too, and accepted."""
    with legacy_session(client) as s:
        s.initialize()
        assert s.post(wire.notification("notifications/roots/list_changed")).status_code == 202
        assert s.post({"jsonrpc": "2.0", "id": 12345, "result": {}}).status_code == 202
        assert s.post(wire.request(9, "ping")).status_code == 202
        assert s.next_message() == {"jsonrpc": "2.0", "id": 9, "result": {}}


def test_server_discover_answered_at_once_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: a method the server lacks gets a JSON-RPC
    error on the stream (server/discover: -32601 at once, so clients fall back to initialize)."""
    with legacy_session(client) as s:
        assert s.post(wire.request("d", "server/discover", {})).status_code == 202
        reply = s.next_message()
    assert reply["id"] == "d" and reply["error"]["code"] == -32601


def test_unknown_session_is_404_transports_2024_11_05_http_with_sse(client, gw):
    """2024-11-05 basic/transports §HTTP with SSE: a POST for a session that does not exist
    (never did, or ended with its stream) is refused: 404 with JSON-RPC error -32001."""
    for sid in ("nope", "A" * 22 + "." + "B" * 22, "%FF%FE"):
        r = client.post(f"/messages?sessionId={sid}", headers=POST_HEADERS, json=wire.request(1, "ping"))
        assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
    with legacy_session(client) as s:
        endpoint = s.endpoint
    assert gw.run_until(lambda: client.post(endpoint, headers=POST_HEADERS,
                                            json=wire.request(1, "ping")).status_code == 404, timeout=2)
    assert_jsonrpc_error(client.post(endpoint, headers=POST_HEADERS, json=wire.request(1, "ping")),
                         404, wire.SESSION_NOT_FOUND)


def test_streamable_session_id_is_404_on_messages_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: /messages knows only HTTP+SSE sessions; a
    Streamable HTTP session id is not one of them."""
    sid = wire.open_session(client)
    try:
        r = client.post(f"/messages?sessionId={sid}", headers=POST_HEADERS, json=wire.request(1, "ping"))
        assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
    finally:
        wire.delete_session(client, sid)


@pytest.mark.parametrize("query", ["", "?", "?sessionid=x", "?session=x"])
def test_missing_session_id_is_400_transports_2024_11_05_http_with_sse(client, query):
    """2024-11-05 basic/transports §HTTP with SSE: the POST endpoint is the one the server
    announced, with its sessionId; without one the request is 400."""
    r = client.post(f"/messages{query}", headers=POST_HEADERS, json=wire.request(1, "ping"))
    assert_jsonrpc_error(r, 400)


@pytest.mark.parametrize("body", [b"{", b"not json", b"", b"\xff\xfe", b'{"jsonrpc":"2.0","id":1,"method":}'])
def test_bad_json_is_400_transports_2024_11_05(client, body):
    """2024-11-05 basic/transports (messages are JSON-RPC, UTF-8): a body that is not JSON is
    400 with a -32700 parse error, and the session goes on."""
    with legacy_session(client) as s:
        r = s.post(body)
        assert_jsonrpc_error(r, 400, -32700)
        assert s.post(wire.request(2, "ping")).status_code == 202
        assert s.next_message() == {"jsonrpc": "2.0", "id": 2, "result": {}}


def test_get_messages_and_post_sse_are_405_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: the SSE endpoint is GET, the message
    endpoint POST; the other method is 405."""
    assert client.get("/messages?sessionId=x").status_code == 405
    assert client.post("/sse", headers=POST_HEADERS, json=wire.request(1, "ping")).status_code == 405


# -- keepalive and stream end ------------------------------------------------------------


def test_keepalive_ping_comments_transports_2024_11_05_http_with_sse(client, gw):
    """2024-11-05 basic/transports §HTTP with SSE (a long-lived SSE connection): an idle stream
    carries ``: ping`` comments every ``sse.keepalive`` seconds (0.2 here)."""
    with client.stream("GET", "/sse", headers={"accept": "text/event-stream"}) as r:
        t0 = gw.clock.seconds()
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            if buf.count(b": ping\n\n") >= 4:
                break
        elapsed = gw.clock.seconds() - t0
    assert buf.startswith(b"event: endpoint\n")
    # 4 pings, one per interval: more than three intervals after the stream opened, at most four.
    assert 3 * KEEPALIVE < elapsed <= 4 * KEEPALIVE + 1e-9, elapsed
    assert b"\n\n: ping\n\n" in buf


def test_closing_stream_stops_child_transports_2024_11_05_http_with_sse(client, gw):
    """2024-11-05 basic/transports §HTTP with SSE: the SSE connection is the session; when the
    client closes it the session ends and its child process is stopped within 2 s."""
    before = set(gw.child_pids())
    with legacy_session(client) as s:
        s.initialize()
        assert gw.run_until(lambda: len(set(gw.child_pids()) - before) == 1, timeout=5.0)
        [pid] = set(gw.child_pids()) - before
        assert gw.alive(pid)
        endpoint = s.endpoint
    t0 = gw.clock.seconds()
    assert gw.run_until(lambda: not gw.alive(pid), timeout=2.0), "child still running 2 s after the stream closed"
    assert gw.clock.seconds() - t0 < 2.0
    assert gw.program(pid).transport.stdinClosed, "the session ended by closing the child's stdin"
    assert pid not in gw.child_pids()
    assert_jsonrpc_error(client.post(endpoint, headers=POST_HEADERS, json=wire.request(1, "ping")), 404)


def test_idle_stream_has_no_child_until_its_first_message(client, gw):
    """The child of a legacy session is started by its first POSTed message (docs/performance.md,
    idle streams): an open, idle stream holds no child; the first POST starts one and is answered."""
    before = set(gw.child_pids())
    with legacy_session(client) as s:
        gw.advance(0.3)
        assert set(gw.child_pids()) - before == set()
        reply = s.initialize()
        assert reply["id"] == 0 and "result" in reply
        assert len(set(gw.child_pids()) - before) == 1


def test_child_exit_ends_stream_transports_2024_11_05_http_with_sse(client):
    """2024-11-05 basic/transports §HTTP with SSE: when the server side ends (the child
    crashes), the pending call gets an error and the SSE stream ends, so the client knows."""
    with legacy_session(client) as s:
        s.initialize()
        assert s.post(wire.tool_call("boom", "crash")).status_code == 202
        rest = [json.loads(e.data) for e in s.events]  # returns only because the stream ends
    assert [m["id"] for m in rest] == ["boom"]
    assert rest[0]["error"]["code"] == -32000  # the call failed with the child, it was not lost
