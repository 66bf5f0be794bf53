"""The wire tests' end-to-end layer: what only real processes and sockets show.

Layer: integration (``@pytest.mark.integration``): one ``twistd -n mcpgw`` subprocess for the module
(tests/gateway_process.py), its children real conformance fixtures (tests/fixtures/conformance_server.py).
The HTTP exchanges themselves (status codes, headers, bodies, session ids, SSE framing) are checked in
process, in the unit layer: tests/test_streamable_wire.py, tests/test_legacy_wire.py, tests/test_garbage.py
(tests/harness.py). Here: a real child process exits when its session ends or dies on its own, and a
refusal reaches a real socket as an answer (the gateway's lingering close), not a reset.
"""

from __future__ import annotations

import json

import pytest

from tests import wire
from tests.gateway_process import pid_alive, wait_until
from tests.wire import POST_HEADERS, assert_jsonrpc_error, messages_of, session_headers, sse_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway(wire.config())


@pytest.fixture
def client(gw):
    with wire.http_client(gw.url) as c:
        yield c


def new_child(gw, before: set[int]) -> int:
    """The one child the gateway started since ``before`` was taken."""
    assert wait_until(lambda: len(set(gw.child_pids()) - before) == 1)
    [pid] = set(gw.child_pids()) - before
    return pid


def test_delete_stops_the_child_process_transports_2025_11_25_session_management(client, gw):
    """2025-11-25 basic/transports §Session Management, 5: DELETE ends the session, and its child
    process really exits (within 2 s); the id is 404 afterwards."""
    before = set(gw.child_pids())
    sid = wire.open_session(client)
    pid = new_child(gw, before)
    assert wire.delete_session(client, sid) == 200
    assert wait_until(lambda: not pid_alive(pid), timeout=2.0), "the child outlived its session"
    assert_jsonrpc_error(client.delete("/mcp", headers={"mcp-session-id": sid}), 404, wire.SESSION_NOT_FOUND)


def test_child_process_exit_ends_its_session_transports_2025_11_25_session_management(client, gw):
    """2025-11-25 basic/transports §Session Management, 3-4: a child that really exits (os._exit(3))
    ends its session: the call in flight gets a JSON-RPC error, later requests get 404."""
    before = set(gw.child_pids())
    sid = wire.open_session(client)
    pid = new_child(gw, before)
    r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call("boom", "crash"))
    [reply] = messages_of(r)[-1:]
    assert reply["id"] == "boom" and reply["error"]["code"] < 0
    assert wait_until(lambda: not pid_alive(pid), timeout=2.0)
    r = client.post("/mcp", headers=session_headers(sid), json=wire.request(2, "ping"))
    assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)


def test_closing_the_sse_socket_stops_the_child_process_transports_2024_11_05_http_with_sse(client, gw):
    """2024-11-05 basic/transports §HTTP with SSE: the SSE connection is the session; when the
    client's socket closes, the child process is stopped within 2 s."""
    before = set(gw.child_pids())
    with client.stream("GET", "/sse", headers={"accept": "text/event-stream"}) as r:
        events = sse_events(r)
        endpoint = next(events).data
        init = wire.initialize(id=0, version="2024-11-05")
        assert client.post(endpoint, headers=POST_HEADERS, json=init).status_code == 202
        assert json.loads(next(events).data)["id"] == 0
        pid = new_child(gw, before)
    assert wait_until(lambda: not pid_alive(pid), timeout=2.0), "child still running 2 s after the stream closed"
    assert_jsonrpc_error(client.post(endpoint, headers=POST_HEADERS, json=wire.request(1, "ping")), 404)


@pytest.mark.parametrize("extra", [
    b"x-big: " + b"a" * 65536 + b"\r\n",
    b"".join(b"x-h%d: v\r\n" % i for i in range(2000)),
], ids=["one 64 KiB header", "2000 headers"])
def test_huge_headers_refusal_reaches_a_real_socket(gw, client, extra):
    """RFC 9110 §15.5: a request whose head is refused gets its 4xx over a real socket, or a
    closed connection (never a 5xx or a hang), and the gateway keeps serving."""
    body = json.dumps(wire.request(1, "ping")).encode()
    answer = wire.raw_http(gw.port, b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                                    b"accept: application/json, text/event-stream\r\n" + extra +
                           b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    status = wire.raw_status(answer)
    assert status == 0 and answer == b"" or 400 <= status < 500, answer[:200]
    assert client.get("/health").status_code == 200
