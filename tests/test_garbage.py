"""Bad input on the wire: malformed and mistyped JSON-RPC, huge and odd bodies and headers,
forged session ids, and a Hypothesis fuzzer, against /mcp and /messages.

Every answer must be a 4xx (never a 5xx, never a hang), sessions must survive their clients'
mistakes, and no child process may outlive its session. Each test gets its own gateway (one with
a 1 MiB body limit for the 413 test).

Layer: unit (in process, no marker): tests/harness.py serves the gateway's real site and channel
(so Twisted's header limits and the gateway's body limits are the production ones) on a Clock,
its children played by FakeMcpServer. Raw requests are bytes written on that channel; "within 5 s"
is virtual time, never slept.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import wire
from tests.harness import Harness
from tests.wire import POST_HEADERS, assert_jsonrpc_error, messages_of, session_headers

PARSE_ERROR = -32700
INVALID_REQUEST = -32600


@pytest.fixture
def gw():
    with Harness(wire.config()) as h:
        yield h


@pytest.fixture
def client(gw):
    with gw.client() as c:
        yield c


@pytest.fixture
def sid(client):
    """A live Streamable HTTP session negotiated at 2025-03-26 (so batches reach the parser)."""
    sid = wire.open_session(client, "2025-03-26")
    yield sid
    wire.delete_session(client, sid)


@pytest.fixture
def legacy(gw):
    """A live HTTP+SSE session whose stream is held open (everything it carries is kept)."""
    stream = gw.open_sse()
    yield stream
    stream.close()


@pytest.fixture(params=["mcp-new", "mcp-session", "messages"])
def post(request, client, sid, legacy):
    """POST raw bytes where a message may go: /mcp before a session, /mcp in one, /messages."""
    return Poster(request.param, client, sid, legacy)


class Poster:
    """``post(body, **headers)``: the answer to ``body`` POSTed to ``target``."""

    def __init__(self, target: str, client, sid: str, legacy):
        self.target, self.client, self.sid, self.legacy = target, client, sid, legacy

    def __call__(self, body: bytes, **headers):
        if self.target == "messages":
            return self.client.post(self.legacy.endpoint, headers={"content-type": "application/json", **headers},
                                    content=body)
        base = POST_HEADERS if self.target == "mcp-new" else session_headers(self.sid, "2025-03-26")
        return self.client.post("/mcp", headers={**base, **headers}, content=body)


def assert_alive(client, sid, legacy):
    """Both sessions still answer after the garbage."""
    r = client.post("/mcp", headers=session_headers(sid, "2025-03-26"), json=wire.request("alive", "ping"))
    assert messages_of(r) == [{"jsonrpc": "2.0", "id": "alive", "result": {}}]
    r = client.post(legacy.endpoint, headers=POST_HEADERS, json=wire.request("alive", "ping"))
    assert r.status_code == 202
    assert legacy.harness.run_until(lambda: b'{"jsonrpc":"2.0","id":"alive","result":{}}' in legacy.received, timeout=5)
    legacy.clear()


# -- malformed and mistyped JSON-RPC ---------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"{", b"}", b"{'jsonrpc': '2.0'}", b"[1,", b"nul", b'{"a":1}{"b":2}', b"\x00", b'{"jsonrpc":"2.0",}',
    b'{"jsonrpc":"2.0","id":1,"method":"ping"', b"NaN", b"1e400", b'{"id":1,"method":"ping","jsonrpc":"2.0"}\x00',
    b"<xml/>", b"jsonrpc=2.0&method=ping",
], ids=repr)
def test_malformed_json_is_parse_error_transports_2025_11_25_sending_messages(post, client, sid, legacy, body):
    """2025-11-25 basic/transports §Sending Messages to the Server, 4 (input the server cannot
    accept gets an HTTP error status, 400, with a JSON-RPC error) and JSON-RPC 2.0 §5.1: -32700."""
    error = assert_jsonrpc_error(post(body), 400, PARSE_ERROR)
    assert error["message"]
    assert_alive(client, sid, legacy)


WRONG_TYPES = {
    "id as object": {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"},
    "id as array": {"jsonrpc": "2.0", "id": [1], "method": "ping"},
    "id as float": {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    "id as bool": {"jsonrpc": "2.0", "id": True, "method": "ping"},
    "id null in request": {"jsonrpc": "2.0", "id": None, "method": "ping"},
    "method as number": {"jsonrpc": "2.0", "id": 5, "method": 42},
    "method as null": {"jsonrpc": "2.0", "id": 5, "method": None},
    "method as object": {"jsonrpc": "2.0", "method": {"name": "ping"}},
    "params as string": {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": "all"},
    "params as number": {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": 1},
    "params as bool": {"jsonrpc": "2.0", "method": "notifications/initialized", "params": True},
    "jsonrpc 1.0": {"jsonrpc": "1.0", "id": 5, "method": "ping"},
    "jsonrpc as number": {"jsonrpc": 2.0, "id": 5, "method": "ping"},
    "no jsonrpc": {"id": 5, "method": "ping"},
    "no method, result or error": {"jsonrpc": "2.0", "id": 5},
    "response without id": {"jsonrpc": "2.0", "result": {}},
    "response with object id": {"jsonrpc": "2.0", "id": {}, "error": {"code": 1, "message": "x"}},
    "a string": "ping",
    "a number": 7,
    "null": None,
    "true": True,
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_wrong_types_are_invalid_request_basic_2025_11_25_messages(post, client, sid, legacy, name):
    """2025-11-25 basic/index §Messages (requests: string or integer id, string method; params an
    object) and JSON-RPC 2.0 §4-5: a mistyped message is 400 with -32600, its id echoed when valid."""
    msg = WRONG_TYPES[name]
    error = assert_jsonrpc_error(post(json.dumps(msg).encode()), 400, INVALID_REQUEST)
    assert error["message"]
    if name.startswith(("method as number", "method as null", "params as string", "params as number")):
        assert post(json.dumps(msg).encode()).json()["id"] == 5
    assert_alive(client, sid, legacy)


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xff"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"caf\xe9"}}',  # latin-1
    b'{"jsonrpc":"2.0","id":1,"method":"\xc3\x28"}',
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\\ud800"}}',  # lone surrogate
    json.dumps(wire.request(1, "ping")).encode("utf-16"),
    b"\xff\xfe\xfd",
], ids=repr)
def test_non_utf8_is_parse_error_transports_2025_11_25(post, client, sid, legacy, body):
    """2025-11-25 basic/transports (JSON-RPC messages MUST be UTF-8 encoded): bytes that are not
    UTF-8 JSON text are refused with 400 / -32700 before anything reaches a child."""
    assert_jsonrpc_error(post(body), 400, PARSE_ERROR)
    assert_alive(client, sid, legacy)


@pytest.mark.parametrize("body", [b"", b" ", b"\r\n", b"\t\n  \n"], ids=repr)
def test_empty_body_is_400_transports_2025_11_25_sending_messages(post, client, sid, legacy, body):
    """2025-11-25 basic/transports §Sending Messages to the Server, 3: the body MUST be a JSON-RPC
    message; an empty one is a parse error (400 / -32700)."""
    assert_jsonrpc_error(post(body), 400, PARSE_ERROR)
    assert_alive(client, sid, legacy)


DEEP = 300  # deeper than the encoder's limit (255): such a message cannot be re-encoded onto one line


@pytest.mark.parametrize("batch", [
    [], [1, 2, 3], [None], [[]], [{}], ["x"], [{"jsonrpc": "2.0"}], [[wire.request(1, "ping")]],
    [wire.request(1, "ping"), "garbage"], [wire.request(1, "ping"), {"jsonrpc": "2.0", "id": {}, "method": 1}],
    [json.loads("[" * DEEP + "]" * DEEP)],
    [{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"deep": json.loads("[" * DEEP + "]" * DEEP)}}],
], ids=lambda b: repr(b)[:40])
def test_json_array_of_garbage_is_400_transports_2025_03_26_sending_messages(post, client, sid, legacy, batch):
    """2025-03-26 basic/transports §Sending Messages, 3 and JSON-RPC 2.0 §6 (batch): an array
    that is empty or holds anything but valid messages is 400, and none of it is relayed."""
    r = post(json.dumps(batch).encode())
    assert_jsonrpc_error(r, 400, INVALID_REQUEST)
    assert_alive(client, sid, legacy)


def test_multiline_message_too_deep_to_reencode_is_400_transports_2025_11_25_stdio(post, client, sid, legacy):
    """2025-11-25 basic/transports §stdio (messages MUST NOT contain embedded newlines): a pretty-
    printed message is re-encoded onto one line for the child; one nested too deeply for that is
    a 400, not a 500."""
    deep = json.loads("[" * DEEP + "]" * DEEP)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"deep": deep}}, indent=1).encode()
    assert b"\n" in body
    assert_jsonrpc_error(post(body), 400, INVALID_REQUEST)
    if post.target == "mcp-session":  # a shallow pretty-printed message is relayed
        r = post(json.dumps(wire.request("pretty", "ping"), indent=2).encode())
        assert messages_of(r) == [{"jsonrpc": "2.0", "id": "pretty", "result": {}}]
    assert_alive(client, sid, legacy)


# -- size ------------------------------------------------------------------------------------


def test_ten_megabyte_body_round_trips_transports_2025_11_25_sending_messages(client, sid):
    """2025-11-25 basic/transports §Sending Messages to the Server: a 10 MB message is under the
    default maxBodyBytes (16 MiB); the server's echo of a 10 MB text comes back intact."""
    text = (secrets.token_hex(512) * 10240)[: 10 * 1024 * 1024]
    body = json.dumps(wire.tool_call("big", "echo", {"text": text})).encode()
    assert len(body) > 10 * 1024 * 1024
    r = client.post("/mcp", headers=session_headers(sid, "2025-03-26"), content=body, timeout=30)
    assert r.status_code == 200
    [reply] = messages_of(r)[-1:]
    assert reply["id"] == "big"
    assert reply["result"]["content"][0]["text"] == text


def test_body_over_max_body_bytes_is_413_transports_2025_11_25_sending_messages():
    """2025-11-25 basic/transports §Sending Messages to the Server, 4 (input the server cannot
    accept gets an HTTP error status): with maxBodyBytes 1 MiB a 2 MiB body is 413 on /mcp and
    /messages; a body under the limit still goes through, and nothing is started for the big one."""
    with Harness(wire.config(maxBodyBytes=1024 * 1024)) as gw, gw.client() as client:
        pad = "x" * (2 * 1024 * 1024)
        before = set(gw.child_pids())
        init = wire.initialize()
        init["params"]["clientInfo"]["pad"] = pad
        assert_jsonrpc_error(client.post("/mcp", headers=POST_HEADERS, json=init), 413)
        assert set(gw.child_pids()) <= before
        sid = wire.open_session(client)
        big = wire.tool_call(1, "echo", {"text": pad})
        assert_jsonrpc_error(client.post("/mcp", headers=session_headers(sid), json=big), 413)
        small = wire.tool_call(2, "echo", {"text": pad[: 512 * 1024]})
        r = client.post("/mcp", headers=session_headers(sid), json=small)
        assert messages_of(r)[-1]["result"]["content"][0]["text"] == pad[: 512 * 1024]
        legacy = gw.open_sse()
        try:
            r = client.post(legacy.endpoint, headers=POST_HEADERS, json=big)
            assert_jsonrpc_error(r, 413)
        finally:
            legacy.close()
        assert wire.delete_session(client, sid) == 200
        assert client.get("/health").status_code == 200


# -- headers and session ids ----------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    b"x-big: " + b"a" * 65536 + b"\r\n",
    b"mcp-session-id: " + b"a" * 65536 + b"\r\n",
    b"".join(b"x-h%d: v\r\n" % i for i in range(2000)),
    b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(100)),
], ids=["one 64 KiB header", "64 KiB session id", "2000 headers", "100 KiB of headers"])
def test_huge_headers_are_refused_cleanly(gw, client, sid, legacy, extra):
    """RFC 9110 §15.5 (4xx for a request the server will not process) / RFC 6585 §5: huge request
    headers get a 4xx or a closed connection (never a 5xx or a hang); the gateway keeps serving."""
    body = json.dumps(wire.request(1, "ping")).encode()
    answer = gw.exchange(b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         b"accept: application/json, text/event-stream\r\n" + extra +
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    status = wire.raw_status(answer)
    # Twisted answers 400 for too many header bytes, and drops the connection outright (no
    # answer at all) for one header line over 16 KiB.
    assert status == 0 and answer == b"" or 400 <= status < 500, answer[:200]
    assert client.get("/health").status_code == 200
    assert_alive(client, sid, legacy)


FORGED = [
    "", "null", "undefined", "0", "../../etc/passwd", "' OR 1=1 --", "a" * 8192,
    "A" * 22 + "." + "B" * 22, "xxHmu1jnIkOZSt76sg23Jw.tu9nCbQ2tJ9mNw0KqLdA8g",  # shaped like a real id, never issued
    "x.y.z", ".", "..", "sid with spaces",
]


@pytest.mark.parametrize("forged", FORGED, ids=lambda s: repr(s)[:30])
def test_forged_session_ids_are_404_transports_2025_11_25_session_management(client, gw, forged):
    """2025-11-25 basic/transports §Session Management, 3 (unknown ids get 404) and
    security_best_practices §Session Hijacking: no guessed id reaches a session."""
    before = set(gw.child_pids())
    headers = {**POST_HEADERS, "mcp-session-id": forged, "mcp-protocol-version": "2025-11-25"}
    r = client.post("/mcp", headers=headers, json=wire.request(1, "ping"))
    assert r.status_code in (400, 404), r.text  # an empty value may count as missing
    if forged.strip():
        assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
    r = client.post("/messages", params={"sessionId": forged}, headers=POST_HEADERS, json=wire.request(1, "ping"))
    assert r.status_code in (400, 404)
    assert set(gw.child_pids()) <= before


@pytest.mark.parametrize("raw_id", [b"\xff\xfe", "caf\u00e9".encode(), b"\x01\x02", b"a\x00b", "\u2603".encode(),
                                    b" ", b"\t", b" \t ",
                                    # the gateway's id shape (22 '.' 22), with non-ASCII nonce or tag
                                    b"A" * 22 + b"." + b"\xe9" * 22, b"\xe9" * 22 + b"." + b"A" * 22,
                                    b"A" * 22 + b"." + "\u00e9".encode() * 11], ids=repr)
def test_non_ascii_session_ids_are_refused_transports_2025_11_25_session_management(gw, client, raw_id):
    """2025-11-25 basic/transports §Session Management, 1 (ids are visible ASCII only): a
    header or query id with other bytes matches no session; 4xx, never a 5xx."""
    body = json.dumps(wire.request(1, "ping")).encode()
    head = (b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"accept: application/json, text/event-stream\r\nmcp-session-id: " + raw_id + b"\r\n")
    answer = gw.exchange(head + b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    assert 400 <= wire.raw_status(answer) < 500, answer[:200]
    quoted = "".join(f"%{b:02X}" for b in raw_id).encode()
    answer = gw.exchange(b"POST /messages?sessionId=" + quoted + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                         b"content-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    assert wire.raw_status(answer) == 404, answer[:200]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("last_event_id", [
    b"1_" + b"9" * 5000, b"9" * 5000 + b"_1", b"\xb2_1", b"1_\xb2", "\u0661_\u0661".encode(), b"abc", b"_", b"1_",
    b"_1", b"1_-1", b"-1_1", b"0_0", b"1_1_1", b"999999_0", b" 1_1", b"1 _1", b"\xff",
], ids=lambda v: repr(v)[:24])
def test_garbage_last_event_id_transports_2025_11_25_resumability(gw, client, last_event_id):
    """2025-11-25 basic/transports §Resumability and Redelivery, 2: a Last-Event-ID the server
    never issued cannot resume anything; the GET opens a fresh stream (200, or 409 while one is
    open), never a 5xx."""
    sid = wire.open_session(client)
    try:
        head = (b"GET /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n"
                b"mcp-session-id: " + sid.encode() + b"\r\nmcp-protocol-version: 2025-11-25\r\n"
                b"last-event-id: " + last_event_id + b"\r\n\r\n")
        conn = gw.connect()
        conn.send(head)
        gw.run_until(lambda: b"\r\n\r\n" in conn.received or conn.closed, timeout=5)
        answer = conn.received
        conn.hang_up()
        status = wire.raw_status(answer)
        assert status in (200, 409), answer[:300]
        if status == 200:
            assert b"text/event-stream" in answer.lower()
    finally:
        assert wire.delete_session(client, sid) == 200


# -- fuzzing ----------------------------------------------------------------------------------

METHODS = ["ping", "tools/list", "tools/call", "initialize", "notifications/initialized", "notifications/cancelled",
           "notifications/progress", "server/discover", "resources/read", "prompts/get", "completion/complete",
           "logging/setLevel", "sampling/createMessage", "resources/subscribe"]

json_leaf = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_value = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)
rpc_like = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.just("2.0") | json_value,
    "id": st.integers(-5, 5) | st.text(max_size=4) | json_value,
    "method": st.sampled_from(METHODS) | json_value,
    "params": json_value | st.fixed_dictionaries({"name": st.sampled_from(["echo", "no-such-tool"]),
                                                  "arguments": json_value}),
    "result": json_value,
    "error": json_value,
})
rpc_ids = st.integers(-(2 ** 53), 2 ** 53) | st.text(max_size=8)
rpc_params = st.dictionaries(st.text(max_size=6), json_value, max_size=3)
well_formed = st.one_of(  # valid JSON-RPC with random contents: these reach the child
    st.builds(lambda id, method, params: {"jsonrpc": "2.0", "id": id, "method": method, "params": params},
              rpc_ids, st.sampled_from(METHODS) | st.text(max_size=10), rpc_params),
    st.builds(lambda method, params: {"jsonrpc": "2.0", "method": method, "params": params},
              st.sampled_from(METHODS) | st.text(max_size=10), rpc_params),
    st.builds(lambda id, result: {"jsonrpc": "2.0", "id": id, "result": result}, rpc_ids, json_value),
    st.builds(lambda id, code, message: {"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}},
              rpc_ids, st.integers(-33000, 0), st.text(max_size=10)),
)
json_bodies = st.one_of(
    well_formed, rpc_like, json_value, st.lists(well_formed | rpc_like, min_size=1, max_size=3),
).map(lambda doc: json.dumps(doc).encode())
byte_bodies = st.binary(max_size=512) | st.text(max_size=128).map(str.encode)

TARGETS = ["mcp-session", "messages", "mcp-new", "named-mcp", "mcp-forged", "messages-forged"]
HEADER_VARIANTS = [
    dict(POST_HEADERS),
    dict(POST_HEADERS),
    {**POST_HEADERS, "mcp-protocol-version": "2025-11-25"},
    {**POST_HEADERS, "mcp-protocol-version": "bogus"},
    {"accept": "application/json", "content-type": "application/json"},
    {"accept": wire.ACCEPT_BOTH, "content-type": "text/plain"},
    {"accept": wire.ACCEPT_BOTH},
]


def fuzz(gw, bodies):
    """POST ``bodies`` to every target: never a 5xx, always an answer within 5 s; afterwards
    /health answers, and once the sessions made here are ended no child is left."""
    before = set(gw.child_pids())
    log_mark = len(gw.log())
    created: list[str] = []
    seen: Counter[str] = Counter()
    with gw.client(timeout=5.0) as client:
        live = wire.open_session(client, "2025-03-26")
        created.append(live)
        legacy = gw.open_sse()
        forged = f"{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(16)}"
        urls = {
            "mcp-new": ("/mcp", {}), "named-mcp": ("/servers/fx/mcp", {}),
            "mcp-session": ("/mcp", {"mcp-session-id": live}), "mcp-forged": ("/mcp", {"mcp-session-id": forged}),
            "messages": (legacy.endpoint, {}), "messages-forged": (f"/messages?sessionId={forged}", {}),
        }

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(body=bodies, target=st.sampled_from(TARGETS), headers=st.sampled_from(HEADER_VARIANTS))
        def one(body, target, headers):
            path, extra = urls[target]
            t0 = gw.clock.seconds()
            with client.stream("POST", path, headers={**headers, **extra}, content=body) as r:
                r.read()  # a JSON answer, or an SSE stream that must end after its response
            assert gw.clock.seconds() - t0 < 5.0
            event(f"{target} -> {r.status_code}")
            seen[f"{target} {r.status_code}"] += 1
            assert r.status_code < 500, (r.status_code, r.text[:300])
            assert r.status_code in (200, 202, 400, 404, 405, 406, 409, 413, 415), (r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert r.json()["error"]["code"] < 0
            if r.status_code == 202 and path.endswith("/mcp"):
                assert r.content == b""
            if "mcp-session-id" in r.headers:
                created.append(r.headers["mcp-session-id"])

        try:
            one()
            print("fuzz outcomes:", dict(sorted(seen.items())))  # shown with -s
            assert client.get("/health").status_code == 200
        finally:
            for sid in created:
                client.delete("/mcp", headers={"mcp-session-id": sid})
                client.delete("/servers/fx/mcp", headers={"mcp-session-id": sid})
            legacy.close()
    assert gw.run_until(lambda: set(gw.child_pids()) <= before, timeout=5.0), (before, gw.child_pids())
    assert "Unhandled" not in gw.log()[log_mark:]


def test_fuzz_random_bytes_transports_2025_11_25_sending_messages(gw):
    """2025-11-25 basic/transports §Sending Messages to the Server, 4: whatever the bytes, input
    the server cannot accept gets an HTTP error status (4xx), promptly, and leaks nothing."""
    fuzz(gw, byte_bodies)


def test_fuzz_random_json_transports_2025_11_25_sending_messages(gw):
    """2025-11-25 basic/transports §Sending Messages to the Server, 3-5, and 2025-03-26 batches:
    random JSON values and JSON-RPC-shaped objects get 202, a JSON/SSE answer that ends, or a
    4xx; never a 5xx or a hang, and no child outlives its session."""
    fuzz(gw, json_bodies)
