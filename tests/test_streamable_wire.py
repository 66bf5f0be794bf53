"""Streamable HTTP on the wire: every rule of MCP basic/transports, checked with raw HTTP.

Spec text: docs/specification/2025-11-25/basic/transports.mdx (and 2025-03-26 for batches)
in modelcontextprotocol/modelcontextprotocol.

Layer: unit (in process, no marker). Each test gets its own gateway from tests/harness.py: the
gateway's real site and channel on a Clock, its children played by FakeMcpServer; an httpx client
whose requests are HTTP/1.1 bytes on that channel. Waiting is virtual time (the Clock), never
sleeping. What only real processes show (a real child's exit) is in tests/test_wire_processes.py
(integration).
"""

from __future__ import annotations

import json
import re
import secrets

import pytest

from tests import wire
from tests.fake_process import FAKE_SERVER_INFO
from tests.gateway_process import fixture_server
from tests.harness import Harness
from tests.wire import (
    LATEST,
    POST_HEADERS,
    assert_jsonrpc_error,
    messages_of,
    session_headers,
    sse_events,
)


@pytest.fixture
def gw():
    config = wire.config(cors={"origins": ["*"]})  # `*` on a loopback bind: loopback origins (default: none)
    config["mcpServers"]["other"] = fixture_server()  # a second server, for cross-server ids
    with Harness(config) as h:
        yield h


@pytest.fixture
def client(gw):
    with gw.client() as c:
        yield c


@pytest.fixture
def new_session(client):
    """Open sessions on demand (``new_session(version)``); DELETE whatever is left at teardown."""
    opened: list[str] = []

    def open_(version: str = LATEST, capabilities: dict | None = None) -> str:
        sid = wire.open_session(client, version, capabilities=capabilities)
        opened.append(sid)
        return sid

    yield open_
    for sid in opened:
        wire.delete_session(client, sid)


def new_child(gw, before: set[int]) -> int:
    """The one child the gateway started since ``before`` was taken."""
    assert gw.run_until(lambda: len(set(gw.child_pids()) - before) == 1, timeout=5.0)
    [pid] = set(gw.child_pids()) - before
    return pid


# -- Sending Messages to the Server: Accept, Content-Type ------------------------


@pytest.mark.parametrize("accept", [None, "application/json", "text/event-stream", "text/html"])
def test_post_accept_must_list_json_and_event_stream_transports_2025_11_25_sending_messages(
        client, new_session, accept):
    """2025-11-25 basic/transports §Sending Messages to the Server, 2: the client MUST send
    an Accept listing application/json and text/event-stream; anything else is 406."""
    headers = {"content-type": "application/json"}
    if accept is not None:
        headers["accept"] = accept
    r = client.post("/mcp", headers=headers, json=wire.initialize())
    assert_jsonrpc_error(r, 406)
    assert "mcp-session-id" not in r.headers
    sid = new_session()
    headers = {k: v for k, v in session_headers(sid).items() if k != "accept"}
    if accept is not None:
        headers["accept"] = accept
    assert_jsonrpc_error(client.post("/mcp", headers=headers, json=wire.request(2, "ping")), 406)


def test_post_accept_with_parameters_and_wildcards_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 2: media-type parameters
    and q-values do not hide a listed type."""
    sid = new_session()
    headers = {**session_headers(sid), "accept": "application/json;q=0.9, text/event-stream;q=0.8"}
    r = client.post("/mcp", headers=headers, json=wire.request(2, "ping"))
    assert r.status_code == 200
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": 2, "result": {}}]


@pytest.mark.parametrize("accept", [None, "application/json", "text/html"])
def test_get_accept_must_list_event_stream_transports_2025_11_25_listening(client, new_session, accept):
    """2025-11-25 basic/transports §Listening for Messages from the Server, 2: the GET MUST
    list text/event-stream in Accept; 406 otherwise."""
    sid = new_session()
    headers = {"mcp-session-id": sid, "mcp-protocol-version": LATEST}
    if accept is not None:
        headers["accept"] = accept
    r = client.get("/mcp", headers=headers)
    assert_jsonrpc_error(r, 406)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/json-seq"])
def test_post_content_type_must_be_json_transports_2025_11_25_sending_messages(client, gw, ctype):
    """2025-11-25 basic/transports §Sending Messages to the Server, 3: the body is a JSON-RPC
    message; a body declared as anything but application/json is 415 and starts no session."""
    before = set(gw.child_pids())
    headers = {"accept": wire.ACCEPT_BOTH}
    if ctype is not None:
        headers["content-type"] = ctype
    r = client.post("/mcp", headers=headers, content=json.dumps(wire.initialize()))
    assert_jsonrpc_error(r, 415)
    assert "mcp-session-id" not in r.headers
    assert set(gw.child_pids()) <= before


def test_post_content_type_with_charset_is_json_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 3: ``application/json;
    charset=utf-8`` is application/json."""
    sid = new_session()
    headers = {**session_headers(sid), "content-type": "application/json; charset=utf-8"}
    r = client.post("/mcp", headers=headers, json=wire.request(7, "ping"))
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": 7, "result": {}}]


# -- Session Management -----------------------------------------------------------


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18", "2025-11-25"])
def test_initialize_assigns_visible_ascii_session_id_transports_2025_11_25_session_management(client, version):
    """2025-11-25 basic/transports §Session Management, 1: the InitializeResult response carries
    MCP-Session-Id of visible ASCII (0x21-0x7E); §Sending Messages, 5: JSON or SSE."""
    r = client.post("/mcp", headers=POST_HEADERS, json=wire.initialize(id="init-1", version=version))
    assert r.status_code == 200
    sid = r.headers["mcp-session-id"]
    assert re.match(wire.VISIBLE_ASCII, sid)
    assert len(sid) >= 16
    ctype = r.headers["content-type"]
    assert ctype.startswith(("application/json", "text/event-stream"))
    [reply] = messages_of(r)
    assert reply["id"] == "init-1"
    assert reply["result"]["protocolVersion"] == version
    assert reply["result"]["serverInfo"]["name"] == FAKE_SERVER_INFO["name"]
    other = client.post("/mcp", headers=POST_HEADERS, json=wire.initialize(version=version))
    assert other.headers["mcp-session-id"] != sid, "every session gets its own id"
    for s in (sid, other.headers["mcp-session-id"]):
        assert wire.delete_session(client, s) == 200


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_missing_session_id_is_400_transports_2025_11_25_session_management(client, new_session, method):
    """2025-11-25 basic/transports §Session Management, 2: requests other than initialize
    without MCP-Session-Id SHOULD get 400 Bad Request."""
    new_session()  # a live session exists, but the request does not name it
    if method == "POST":
        r = client.post("/mcp", headers=POST_HEADERS, json=wire.request(1, "tools/list"))
    elif method == "GET":
        r = client.get("/mcp", headers={"accept": "text/event-stream"})
    else:
        r = client.delete("/mcp")
    assert_jsonrpc_error(r, 400)


def _altered(sid: str) -> str:
    i = len(sid) // 3
    return sid[:i] + ("A" if sid[i] != "A" else "B") + sid[i + 1:]


@pytest.mark.parametrize("kind", ["unknown", "forged", "altered", "ended"])
@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_unknown_session_id_is_404_transports_2025_11_25_session_management(client, new_session, kind, method):
    """2025-11-25 basic/transports §Session Management, 3-4: a terminated or unknown session
    id MUST get 404 Not Found (the body a JSON-RPC error -32001), so the client re-initializes."""
    sid = new_session()
    if kind == "unknown":
        bad = secrets.token_hex(16)
    elif kind == "forged":  # the gateway's shape (22-char nonce '.' 22-char tag), a tag it never made
        bad = f"{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(16)}"
    elif kind == "altered":
        bad = _altered(sid)
    else:
        assert wire.delete_session(client, sid) == 200
        bad = sid
    headers = session_headers(bad)
    if method == "POST":
        r = client.post("/mcp", headers=headers, json=wire.request(3, "tools/list"))
    elif method == "GET":
        r = client.get("/mcp", headers={**headers, "accept": "text/event-stream"})
    else:
        r = client.delete("/mcp", headers=headers)
    assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
    if kind != "ended":  # the real session is untouched
        r = client.post("/mcp", headers=session_headers(sid), json=wire.request(4, "ping"))
        assert messages_of(r) == [{"jsonrpc": "2.0", "id": 4, "result": {}}]


def test_session_id_of_one_server_is_404_on_another_path_transports_2025_11_25_session_management(client, new_session):
    """2025-11-25 basic/transports §Session Management, 3: a session belongs to its MCP
    endpoint; a legacy HTTP+SSE session id is unknown to /mcp."""
    with client.stream("GET", "/sse") as r:
        endpoint = next(sse_events(r))
        legacy_sid = endpoint.data.split("sessionId=", 1)[1]
        r2 = client.post("/mcp", headers=session_headers(legacy_sid), json=wire.request(1, "ping"))
        assert_jsonrpc_error(r2, 404, wire.SESSION_NOT_FOUND)


def test_session_id_of_another_server_is_404_transports_2025_11_25_session_management(client, new_session):
    """2025-11-25 basic/transports §Session Management, 3: a session belongs to the MCP endpoint
    that created it; /servers/other/mcp does not know a session of the default server."""
    sid = new_session()
    r = client.post("/servers/other/mcp", headers=session_headers(sid), json=wire.request(1, "ping"))
    assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
    r = client.post("/servers/fx/mcp", headers=session_headers(sid), json=wire.request(2, "ping"))
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": 2, "result": {}}]


def test_session_whose_child_died_is_404_transports_2025_11_25_session_management(client, gw):
    """2025-11-25 basic/transports §Session Management, 3-4: the server MAY end a session (its
    child crashed); the call in flight gets a JSON-RPC error, later requests get 404."""
    sid = wire.open_session(client)
    r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call("boom", "crash"))
    [reply] = messages_of(r)[-1:]
    assert reply["id"] == "boom" and reply["error"]["code"] < 0
    r = client.post("/mcp", headers=session_headers(sid), json=wire.request(2, "ping"))
    assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)


def test_delete_ends_session_then_404_transports_2025_11_25_session_management(client, gw):
    """2025-11-25 basic/transports §Session Management, 5: DELETE with MCP-Session-Id ends the
    session (200 here, its child stops); afterwards the id is 404 (§Session Management, 3)."""
    before = set(gw.child_pids())
    sid = wire.open_session(client)
    pid = new_child(gw, before)
    r = client.delete("/mcp", headers={"mcp-session-id": sid, "mcp-protocol-version": LATEST})
    assert r.status_code == 200
    assert gw.run_until(lambda: not gw.alive(pid), timeout=2.0), "the child outlived its session"
    assert_jsonrpc_error(client.delete("/mcp", headers={"mcp-session-id": sid}), 404, wire.SESSION_NOT_FOUND)
    r = client.post("/mcp", headers=session_headers(sid), json=wire.request(5, "ping"))
    assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)


def test_delete_closes_open_streams_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages, 6 (the server MAY terminate the SSE stream
    if the session expires): after DELETE the GET stream ends instead of hanging."""
    sid = new_session()
    with client.stream("GET", "/mcp", headers={**session_headers(sid), "accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        events = sse_events(r)
        assert next(events).data == ""  # priming
        assert wire.delete_session(client, sid) == 200
        assert [e.data for e in events] == []  # the stream ends


def test_delete_during_a_call_ends_its_stream_transports_2025_11_25_session_management(client, gw, new_session):
    """2025-11-25 basic/transports §Sending Messages, 6 (the server MAY terminate the SSE stream if
    the session ends) and §Session Management, 5: DELETE while a call runs answers the call with a
    JSON-RPC error and ends its stream; nothing hangs."""
    sid = new_session()
    call = wire.tool_call("slow", "sleep", {"seconds": 30}, progress="slow")
    with client.stream("POST", "/mcp", headers=session_headers(sid), json=call) as r:
        events = sse_events(r)
        assert next(events).data == ""  # priming
        assert json.loads(next(events).data)["params"]["progress"] == 0
        assert wire.delete_session(client, sid) == 200
        rest = [json.loads(e.data) for e in events]  # returns only because the stream ends
    assert [m["id"] for m in rest] == ["slow"]
    assert rest[0]["error"]["code"] < 0


# -- Protocol Version Header --------------------------------------------------------


@pytest.mark.parametrize("version", ["1999-01-01", "2026-07-28", "latest", ""])
def test_unsupported_protocol_version_is_400_transports_2025_11_25_protocol_version_header(
        client, new_session, version):
    """2025-11-25 basic/transports §Protocol Version Header: an invalid or unsupported
    MCP-Protocol-Version MUST get 400 Bad Request."""
    sid = new_session()
    headers = session_headers(sid, version)
    assert_jsonrpc_error(client.post("/mcp", headers=headers, json=wire.request(1, "ping")), 400)
    assert_jsonrpc_error(client.get("/mcp", headers={**headers, "accept": "text/event-stream"}), 400)


def test_absent_protocol_version_is_accepted_transports_2025_11_25_protocol_version_header(client, new_session):
    """2025-11-25 basic/transports §Protocol Version Header: without MCP-Protocol-Version the
    server SHOULD assume 2025-03-26 (and so accept the request)."""
    sid = new_session("2025-06-18")
    r = client.post("/mcp", headers=session_headers(sid, None), json=wire.request(1, "ping"))
    assert r.status_code == 200
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": 1, "result": {}}]


@pytest.mark.parametrize("header", ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"])
def test_every_supported_protocol_version_is_accepted_transports_2025_11_25_protocol_version_header(
        client, new_session, header):
    """2025-11-25 basic/transports §Protocol Version Header: every version the gateway supports
    is accepted in MCP-Protocol-Version."""
    sid = new_session()
    r = client.post("/mcp", headers=session_headers(sid, header), json=wire.request(1, "ping"))
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": 1, "result": {}}]


# -- Notifications, responses, requests -----------------------------------------------


def test_notification_is_202_without_body_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 4: an accepted notification
    MUST get 202 Accepted with no body."""
    sid = new_session()
    r = client.post("/mcp", headers=session_headers(sid),
                    json=wire.notification("notifications/roots/list_changed"))
    assert r.status_code == 202
    assert r.content == b""
    assert "content-type" not in r.headers or r.headers.get("content-length") == "0"


def test_response_is_202_without_body_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 4: an accepted JSON-RPC
    response (a client's answer to a server request) MUST get 202 with no body."""
    sid = new_session()
    for answer in ({"jsonrpc": "2.0", "id": 991, "result": {"roots": []}},
                   {"jsonrpc": "2.0", "id": "s-1", "error": {"code": -32601, "message": "no"}}):
        r = client.post("/mcp", headers=session_headers(sid), json=answer)
        assert r.status_code == 202
        assert r.content == b""


def test_server_request_answered_by_client_post_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages, 6 and 4: a server request (roots/list) rides
    the POST stream of the call it belongs to; the client's response is a POST answered 202."""
    sid = new_session(capabilities={"roots": {"listChanged": True}})
    with client.stream("POST", "/mcp", headers=session_headers(sid), json=wire.tool_call(1, "list_roots")) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = (json.loads(e.data) for e in sse_events(r) if e.data)
        ask = next(events)
        assert ask["method"] == "roots/list"
        answer = {"jsonrpc": "2.0", "id": ask["id"], "result": {"roots": [{"uri": "file:///tmp", "name": "tmp"}]}}
        r2 = client.post("/mcp", headers=session_headers(sid), json=answer)
        assert r2.status_code == 202 and r2.content == b""
        rest = list(events)
    assert rest[-1]["id"] == 1
    assert json.loads(rest[-1]["result"]["content"][0]["text"])["roots"][0]["uri"] == "file:///tmp"


def test_request_json_response_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 5: a request gets either
    text/event-stream or application/json with one JSON object, its response."""
    sid = new_session()
    r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call("c1", "echo", {"text": "héllo"}))
    assert r.status_code == 200
    if r.headers["content-type"].startswith("application/json"):
        assert int(r.headers["content-length"]) == len(r.content)
        assert isinstance(r.json(), dict)
    [reply] = messages_of(r)
    assert reply == {"jsonrpc": "2.0", "id": "c1", "result": {"content": [{"type": "text", "text": "héllo"}]}}


def test_request_sse_stream_ends_after_response_transports_2025_11_25_sending_messages(client, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 6: an SSE answer starts with
    a priming event (id, empty data, and retry), carries related notifications, includes the
    response and then terminates."""
    sid = new_session()
    call = wire.tool_call(11, "sleep", {"seconds": 0.2}, progress="tok-11")
    with client.stream("POST", "/mcp", headers=session_headers(sid), json=call) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))  # returns only because the gateway ends the stream
    prime, *rest = events
    assert prime.id and prime.data == "" and prime.retry and int(prime.retry) > 0
    messages = [json.loads(e.data) for e in rest]
    assert all(e.id for e in rest), "every event of a resumable stream has an id"
    assert len({e.id for e in events}) == len(events), "event ids are unique"
    assert [m.get("method") for m in messages[:-1]] == ["notifications/progress"] * (len(messages) - 1)
    assert all(m["params"]["progressToken"] == "tok-11" for m in messages[:-1])
    assert messages[-1] == {"jsonrpc": "2.0", "id": 11, "result": {"content": [{"type": "text", "text": "slept 0.2"}]}}


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18"])
def test_no_empty_priming_event_before_2025_11_25_transports_2025_06_18_sending_messages(client, new_session, version):
    """2025-06-18 basic/transports §Sending Messages to the Server, 5-6: before 2025-11-25 every
    SSE event carries a JSON-RPC message (the empty priming event came with 2025-11-25, which
    older clients would fail to parse)."""
    sid = new_session(version)
    call = wire.tool_call(13, "sleep", {"seconds": 0.05}, progress="old")
    r = client.post("/mcp", headers=session_headers(sid, version), json=call)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = wire.events_of(r.content)
    assert events and all(e.data for e in events)
    assert [json.loads(e.data).get("method") for e in events] == ["notifications/progress"] * 2 + [None]


def test_long_call_turns_into_stream_with_keepalive_transports_2025_11_25_sending_messages(client, gw, new_session):
    """2025-11-25 basic/transports §Sending Messages to the Server, 5-6: a call that outlasts the
    keepalive interval (sse.keepalive 0.2 s here) is answered as an SSE stream that carries
    ``: ping`` comments, then the response, then ends (no idle JSON wait behind proxies)."""
    sid = new_session()
    r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call(12, "sleep", {"seconds": 1}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert b"\n: ping\n\n" in r.content
    assert messages_of(r)[-1]["id"] == 12
    assert not re.search(r"keepalive (write )?failed", gw.log())


def test_request_without_session_is_400_and_reaches_no_child_transports_2025_11_25_session_management(client, gw):
    """2025-11-25 basic/transports §Session Management, 2: a non-initialize request without a
    session id is 400, and nothing is started for it."""
    before = set(gw.child_pids())
    r = client.post("/mcp", headers=POST_HEADERS, json=wire.tool_call(1, "echo", {"text": "x"}))
    assert_jsonrpc_error(r, 400)
    assert set(gw.child_pids()) <= before


# -- Batches (2025-03-26 only) ------------------------------------------------------


def test_batch_accepted_in_2025_03_26_transports_sending_messages(client, new_session):
    """2025-03-26 basic/transports §Sending Messages to the Server, 3: the body MAY be an array
    batching requests and notifications; all responses come back (here on one SSE stream)."""
    sid = new_session("2025-03-26")
    batch = [wire.request("a", "ping"), wire.notification("notifications/roots/list_changed"),
             wire.tool_call("b", "echo", {"text": "batched"})]
    r = client.post("/mcp", headers=session_headers(sid, "2025-03-26"), json=batch)
    assert r.status_code == 200
    replies = messages_of(r)
    if len(replies) == 1 and isinstance(replies[0], list):
        replies = replies[0]
    by_id = {m["id"]: m for m in replies}
    assert set(by_id) == {"a", "b"}
    assert by_id["a"]["result"] == {}
    assert by_id["b"]["result"]["content"][0]["text"] == "batched"


def test_batch_of_notifications_is_202_in_2025_03_26_transports_sending_messages(client, new_session):
    """2025-03-26 basic/transports §Sending Messages to the Server, 4: a batch of only
    notifications/responses gets 202 Accepted with no body."""
    sid = new_session("2025-03-26")
    batch = [wire.notification("notifications/roots/list_changed"), {"jsonrpc": "2.0", "id": 77, "result": {}}]
    r = client.post("/mcp", headers=session_headers(sid, "2025-03-26"), json=batch)
    assert r.status_code == 202
    assert r.content == b""


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
def test_batch_rejected_after_2025_03_26_transports_2025_06_18_sending_messages(client, new_session, version):
    """2025-06-18 basic/transports §Sending Messages to the Server, 3: the body MUST be a single
    JSON-RPC message (batching was removed); a batch is 400 and nothing of it is relayed."""
    sid = new_session(version)
    batch = [wire.tool_call("x", "echo", {"text": "never"}), wire.request("y", "ping")]
    assert_jsonrpc_error(client.post("/mcp", headers=session_headers(sid, version), json=batch), 400)
    # The session is still fine, and id "x" was never sent (so it can be used again).
    r = client.post("/mcp", headers=session_headers(sid, version), json=wire.tool_call("x", "echo", {"text": "ok"}))
    assert messages_of(r)[-1]["result"]["content"][0]["text"] == "ok"


def test_initialize_in_batch_is_400_lifecycle_2025_03_26_initialization(client, gw):
    """2025-03-26 basic/lifecycle §Initialization: initialize MUST NOT be part of a batch."""
    before = set(gw.child_pids())
    r = client.post("/mcp", headers=POST_HEADERS, json=[wire.initialize(version="2025-03-26")])
    assert_jsonrpc_error(r, 400)
    assert "mcp-session-id" not in r.headers
    assert set(gw.child_pids()) <= before


# -- Listening for Messages from the Server (GET) -------------------------------------


def _get_stream(client, sid, **headers):
    return client.stream("GET", "/mcp", headers={**session_headers(sid), "accept": "text/event-stream", **headers})


def test_get_stream_receives_server_initiated_messages_transports_2025_11_25_listening(client, new_session):
    """2025-11-25 basic/transports §Listening for Messages from the Server, 4: the GET stream
    carries server notifications unrelated to any running request (tools/list_changed), never
    a response; the POST stream keeps what relates to its request (§Sending Messages, 6), and
    no message goes to both (§Multiple Connections, 2)."""
    sid = new_session()
    with _get_stream(client, sid) as g:
        assert g.status_code == 200
        assert g.headers["content-type"].startswith("text/event-stream")
        events = sse_events(g)
        prime = next(events)
        assert prime.id and prime.data == ""
        r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call(21, "notify", {"message": "hi"}))
        on_post = messages_of(r)
        pushed = json.loads(next(events).data)
    assert pushed == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    assert on_post[-1] == {"jsonrpc": "2.0", "id": 21, "result": {"content": [{"type": "text", "text": "notified"}]}}
    assert [m.get("method") for m in on_post[:-1]] == ["notifications/message"]
    assert on_post[0]["params"]["data"] == "hi"


def test_server_notification_without_get_stream_rides_the_post_stream_transports_2025_11_25_multiple_connections(
        client, new_session):
    """2025-11-25 basic/transports §Sending Messages, 6 / §Multiple Connections: with no GET
    stream open, a server notification is not lost; it comes on the open POST stream, once."""
    sid = new_session()
    r = client.post("/mcp", headers=session_headers(sid), json=wire.tool_call(22, "notify"))
    methods = [m.get("method") for m in messages_of(r)]
    assert methods == ["notifications/message", "notifications/tools/list_changed", None]


def test_second_concurrent_get_stream_is_409_transports_2025_11_25_multiple_connections(client, new_session):
    """2025-11-25 basic/transports §Multiple Connections / §Listening: one standalone GET stream
    per session; a second concurrent GET is refused (409 Conflict) and the first stays open."""
    sid = new_session()
    with _get_stream(client, sid) as g:
        events = sse_events(g)
        assert next(events).data == ""
        r = client.get("/mcp", headers={**session_headers(sid), "accept": "text/event-stream"})
        assert_jsonrpc_error(r, 409)
        client.post("/mcp", headers=session_headers(sid), json=wire.tool_call(23, "notify"))
        assert json.loads(next(events).data)["method"] == "notifications/tools/list_changed"


# -- Resumability and Redelivery ----------------------------------------------------------


def test_resume_post_stream_after_disconnect_replays_missed_events_once_transports_2025_11_25_resumability(
        gw, client, new_session):
    """2025-11-25 basic/transports §Resumability and Redelivery, 1-2 and §Sending Messages, 6:
    a POST SSE stream (priming event with id and retry) cut mid-call is resumed by GET with
    Last-Event-ID; the missed events arrive exactly once, only from that stream, and the
    resumed stream ends after the response. Disconnection is not cancellation."""
    sid = new_session()
    call = wire.tool_call(31, "sleep", {"seconds": 0.5}, progress="p31")
    with gw.client() as first, first.stream("POST", "/mcp", headers=session_headers(sid), json=call) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
        prime = next(events)
        assert prime.data == "" and prime.id and prime.retry is not None and int(prime.retry) > 0
        seen = next(events)
        assert json.loads(seen.data)["params"]["progress"] == 0
    # leaving the block dropped the connection mid-stream
    assert seen.id is not None
    stream_prefix = seen.id.split("_")[0]

    def resume(last_id: str) -> list:
        with _get_stream(client, sid, **{"last-event-id": last_id}) as g:
            assert g.status_code == 200
            return list(sse_events(g))  # ends once the stream's response is out

    live = resume(seen.id)  # during the call (or after it): replay, then live events
    replay = resume(seen.id)  # after the call: all from the replay log
    for got in (live, replay):
        assert [e.id for e in got] == [e.id for e in live]
        assert len({e.id for e in got}) == len(got) == 2, [e.id for e in got]
        assert all(e.id.split("_")[0] == stream_prefix for e in got), "only events of that stream"
        assert seen.id not in {e.id for e in got}
        progress, result = (json.loads(e.data) for e in got)
        assert progress["params"] == {"progressToken": "p31", "progress": 0.5, "total": 0.5}
        assert result == {"jsonrpc": "2.0", "id": 31, "result": {"content": [{"type": "text", "text": "slept 0.5"}]}}
    assert resume(live[-1].id) == []  # nothing after the last event; the stream is over


def test_resume_does_not_replay_other_streams_transports_2025_11_25_resumability(client, new_session):
    """2025-11-25 basic/transports §Resumability and Redelivery, 2: the server MUST NOT replay
    messages that would have been delivered on a different stream."""
    sid = new_session()
    first = messages_of(client.post("/mcp", headers=session_headers(sid), json=wire.tool_call(41, "notify")))
    with client.stream("POST", "/mcp", headers=session_headers(sid),
                       json=wire.tool_call(42, "sleep", {"seconds": 0.05}, progress="p42")) as r:
        second = list(sse_events(r))
    assert first[-1]["id"] == 41
    with _get_stream(client, sid, **{"last-event-id": second[0].id}) as g:
        replayed = [json.loads(e.data) for e in sse_events(g)]
    assert replayed[-1]["id"] == 42
    assert [m["method"] for m in replayed[:-1]] == ["notifications/progress"] * 2
    assert replayed == [json.loads(e.data) for e in second[1:]]


# -- Methods, discovery, DNS rebinding, CORS --------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD"])
def test_unsupported_method_is_405_transports_2025_11_25_streamable_http(client, new_session, method):
    """2025-11-25 basic/transports §Streamable HTTP: the MCP endpoint supports POST and GET (and
    DELETE, §Session Management 5); other methods get 405 Method Not Allowed with Allow."""
    sid = new_session()
    r = client.request(method, "/mcp", headers=session_headers(sid), content=b"{}")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST", "DELETE"}


@pytest.mark.parametrize("version, status, code", [(None, 404, -32601), ("2026-07-28", 400, -32022)])
def test_server_discover_without_session_fails_fast_transports_2025_11_25_backwards_compatibility(
        client, gw, version, status, code):
    """2025-11-25 basic/transports §Backwards Compatibility (a client probing a newer method
    falls back on 400/404): server/discover without a session gets an immediate JSON-RPC error
    (404/-32601, or 400/-32022 for MCP-Protocol-Version 2026-07-28) and starts no child."""
    before = set(gw.child_pids())
    headers = dict(POST_HEADERS)
    if version:
        headers["mcp-protocol-version"] = version
    t0 = gw.clock.seconds()
    r = client.post("/mcp", headers=headers, json=wire.request("d1", "server/discover", {}))
    assert gw.clock.seconds() == t0, "answered at once (no time passed)"
    error = assert_jsonrpc_error(r, status, code)
    assert error["message"]
    if status == 404:
        assert r.json()["id"] == "d1"
    assert "mcp-session-id" not in r.headers
    assert set(gw.child_pids()) <= before


@pytest.mark.parametrize("origin", ["http://evil.example", "https://127.0.0.1.evil.example", "null",
                                    "http://localhost@evil.example"])
@pytest.mark.parametrize("path, method", [("/mcp", "POST"), ("/sse", "GET"), ("/messages?sessionId=x", "POST")])
def test_origin_not_allowed_is_403_transports_2025_11_25_security_warning(client, gw, origin, path, method):
    """2025-11-25 basic/transports §Security Warning, 1: servers MUST validate Origin; an
    invalid Origin MUST get 403 Forbidden (body: a JSON-RPC error without an id); no session."""
    before = set(gw.child_pids())
    r = client.request(method, path, headers={**POST_HEADERS, "origin": origin}, json=wire.initialize())
    error = assert_jsonrpc_error(r, 403)
    assert r.json().get("id") is None and error["message"]
    assert "mcp-session-id" not in r.headers
    assert "access-control-allow-origin" not in r.headers
    assert set(gw.child_pids()) <= before


def test_loopback_origin_is_allowed_with_cors_headers_transports_2025_11_25_security_warning(client, gw):
    """2025-11-25 basic/transports §Security Warning, 1: a valid (loopback) Origin is served,
    with CORS headers exposing Mcp-Session-Id to the browser."""
    origin = "http://localhost:5173"
    r = client.post("/mcp", headers={**POST_HEADERS, "origin": origin}, json=wire.initialize())
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "mcp-session-id" in r.headers["access-control-expose-headers"].lower()
    assert wire.delete_session(client, r.headers["mcp-session-id"]) == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "10.0.0.1:{port}"])
@pytest.mark.parametrize("path, method", [("/mcp", "POST"), ("/sse", "GET")])
def test_host_not_loopback_is_403_transports_2025_11_25_security_warning(client, gw, host, path, method):
    """2025-11-25 basic/transports §Security Warning, 2 (DNS rebinding): bound to 127.0.0.1,
    the gateway answers only loopback Host names; others get 403 and start nothing."""
    before = set(gw.child_pids())
    r = client.request(method, path, headers={**POST_HEADERS, "host": host.format(port=gw.port)},
                       json=wire.initialize())
    assert_jsonrpc_error(r, 403)
    assert "mcp-session-id" not in r.headers
    assert set(gw.child_pids()) <= before


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST"])
def test_loopback_host_names_are_served_transports_2025_11_25_security_warning(client, gw, host):
    """2025-11-25 basic/transports §Security Warning, 2: loopback Host names are served."""
    r = client.post("/mcp", headers={**POST_HEADERS, "host": host.format(port=gw.port)}, json=wire.initialize())
    assert r.status_code == 200
    assert wire.delete_session(client, r.headers["mcp-session-id"]) == 200


def test_missing_host_is_403_transports_2025_11_25_security_warning(gw):
    """2025-11-25 basic/transports §Security Warning, 2: an HTTP/1.0 request without any Host
    cannot prove it is for localhost; 403 (raw bytes, since HTTP clients always send Host)."""
    body = json.dumps(wire.initialize()).encode()
    answer = gw.exchange(b"POST /mcp HTTP/1.0\r\ncontent-type: application/json\r\n"
                                    b"accept: application/json, text/event-stream\r\n"
                                    b"content-length: %d\r\n\r\n%s" % (len(body), body))
    assert wire.raw_status(answer) == 403


def test_cors_preflight_transports_2025_11_25_security_warning(client, gw):
    """2025-11-25 basic/transports §Security Warning, 1 (Origin validation) with CORS: a
    preflight OPTIONS from an allowed origin is 204 and lists the MCP methods and headers
    a browser client needs; from a forbidden origin it is 403."""
    before = set(gw.child_pids())
    origin = "http://127.0.0.1:8080"
    r = client.options("/mcp", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, mcp-session-id, mcp-protocol-version, last-event-id",
    })
    assert r.status_code in (200, 204)
    assert r.headers["access-control-allow-origin"] == origin
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "mcp-session-id", "mcp-protocol-version", "last-event-id"} <= allowed
    assert "mcp-session-id" in r.headers["access-control-expose-headers"].lower()
    r = client.options("/mcp", headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers
    assert set(gw.child_pids()) <= before
