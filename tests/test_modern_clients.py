"""Issue 9: MCP 2026-07-28 clients at /mcp, served by pooled children (integration: a real gateway and children).

One gateway: ``fx`` (the default) is the conformance fixture with ``"sessions": "pooled"``;
``solo`` is the same fixture, one child per client session.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
import httpx
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests import wire
from tests.gateway_process import fixture_server, wait_until

pytestmark = pytest.mark.integration
MODERN = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "modern-tests", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}
NAME_OF = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway({
        "mcpServers": {"fx": fixture_server(sessions="pooled", poolSize=2, default=True), "solo": fixture_server()},
        "sse": {"keepalive": 0.2},
    })


@pytest.fixture
def client(gw):
    with wire.http_client(gw.url) as c:
        yield c


def modern(id: Any, method: str, params: dict | None = None, meta: dict | None = None) -> tuple[dict, dict]:
    """A 2026-07-28 request body and the headers that mirror it."""
    params = dict(params or {})
    params["_meta"] = {**ENVELOPE, **(meta or {})}
    headers = {**wire.POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": method}
    if method in NAME_OF:
        headers["mcp-name"] = params[NAME_OF[method]]
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}, headers


def error_of(r: httpx.Response, status: int, code: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    return body


# -- the official SDK 2.x client ----------------------------------------------------------------


async def _sdk(url: str, mode: str) -> tuple[str, bool, bool, list[str], str]:
    async with Client(streamable_http_client(url), mode=mode) as c:
        tools = await c.list_tools()
        result = await c.call_tool("echo", {"text": f"from {mode}"})
        session = c.session
        return (c.protocol_version, session.discover_result is not None, session.initialize_result is not None,
                [t.name for t in tools.tools], result.content[0].text)


@pytest.mark.parametrize("mode, version, discovered", [("auto", MODERN, True), ("legacy", wire.LATEST, False)])
def test_sdk_auto_and_legacy_same_url(gw, mode, version, discovered):
    """Must-show 1: the SDK 2.x client in auto mode adopts 2026-07-28 from server/discover (no
    initialize), in legacy mode it shakes hands at 2025-11-25; same URL, same stdio server."""
    negotiated, has_discover, has_initialize, names, text = anyio.run(_sdk, f"{gw.url}/mcp", mode)
    assert negotiated == version
    assert has_discover is discovered and has_initialize is not discovered
    assert "echo" in names and text == f"from {mode}"


def test_sdk_auto_falls_back_on_a_per_client_server(gw):
    """A server without a pool answers 2026-07-28 with 400/-32022 listing handshake versions: auto falls back."""
    negotiated, has_discover, has_initialize, names, _ = anyio.run(_sdk, f"{gw.url}/servers/solo/mcp", "auto")
    assert negotiated == wire.LATEST and has_initialize and not has_discover
    assert "echo" in names


# -- the 2026-07-28 Streamable HTTP rules --------------------------------------------------------


def test_discover_from_cached_initialize(client):
    """server/discover: supported versions, the child's capabilities and serverInfo, no session minted."""
    body, headers = modern("d", "server/discover")
    r = client.post("/mcp", headers=headers, json=body)
    assert r.status_code == 200 and "mcp-session-id" not in r.headers
    result = r.json()["result"]
    assert MODERN in result["supportedVersions"] and wire.LATEST in result["supportedVersions"]
    assert result["capabilities"]["tools"] == {"listChanged": True}
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"]
    assert result["resultType"] == "complete"


def test_result_shape_and_id(client):
    """A child's handshake-era result goes out with the client's id, resultType and caching directives."""
    body, headers = modern("x-1", "tools/list")
    r = client.post("/mcp", headers=headers, json=body)
    msg = r.json()
    assert msg["id"] == "x-1"
    assert msg["result"]["resultType"] == "complete" and msg["result"]["ttlMs"] == 0
    assert msg["result"]["cacheScope"] == "private"


@pytest.mark.parametrize("change, what", [
    ({"mcp-protocol-version": "2025-11-25"}, "version header differs from the body"),
    ({"mcp-method": "tools/list"}, "Mcp-Method differs"),
    ({"mcp-name": "big"}, "Mcp-Name differs"),
    ({"mcp-name": None}, "Mcp-Name missing"),
    ({"mcp-param-text": "=?base64?!!?="}, "Mcp-Param value not decodable"),
])
def test_header_mismatch_is_400_32020(client, change, what):
    """2026-07-28 Server Validation: headers that disagree with the body (or are missing/malformed): 400/-32020."""
    body, headers = modern(1, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
    for k, v in change.items():
        if v is None:
            headers.pop(k)
        else:
            headers[k] = v
    if headers["mcp-protocol-version"] != MODERN:
        headers["mcp-protocol-version"] = "2025-11-25"
        r = client.post("/mcp", headers=headers, json=body)  # body says 2026-07-28, no session: modern by body
    else:
        r = client.post("/mcp", headers=headers, json=body)
    assert error_of(r, 400, -32020)["id"] == 1, what


def test_base64_name_and_param_accepted(client):
    """Mcp-Name in the Base64 sentinel form is decoded before the comparison; Mcp-Param-* passes through."""
    body, headers = modern(2, "tools/call", {"name": "echo", "arguments": {"text": "héllo"}})
    headers["mcp-name"] = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
    headers["mcp-param-text"] = "=?base64?" + base64.b64encode("héllo".encode()).decode() + "?="
    r = client.post("/mcp", headers=headers, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "héllo"


def test_unsupported_version_lists_supported(client):
    """An unknown MCP-Protocol-Version: 400/-32022 with data.supported."""
    headers = {**wire.POST_HEADERS, "mcp-protocol-version": "2099-01-01"}
    body = error_of(client.post("/mcp", headers=headers, json=wire.request(1, "server/discover", {})), 400, -32022)
    assert MODERN in body["error"]["data"]["supported"]


def test_per_client_server_refuses_modern_with_handshake_versions(client):
    """A per-client server does not serve 2026-07-28: 400/-32022 whose supported list is handshake-only."""
    body, headers = modern(1, "server/discover")
    err = error_of(client.post("/servers/solo/mcp", headers=headers, json=body), 400, -32022)["error"]
    assert MODERN not in err["data"]["supported"] and wire.LATEST in err["data"]["supported"]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_and_delete_are_405(client, method):
    """2026-07-28 has no GET stream and no session to delete: 405, Allow: POST."""
    r = client.request(method, "/mcp", headers={"accept": "text/event-stream", "mcp-protocol-version": MODERN})
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize("method", ["no/such/method", "ping", "initialize", "resources/subscribe"])
def test_unknown_or_removed_method_is_404(client, method):
    """An unknown method (the child's -32601) or one 2026-07-28 removed: 404/-32601."""
    body, headers = modern(9, method, {"uri": "x"} if method == "resources/subscribe" else {})
    assert error_of(client.post("/mcp", headers=headers, json=body), 404, -32601)["id"] == 9


def test_batch_and_notification(client):
    """A batch is 400/-32600; a notification is 202 and goes nowhere."""
    body, headers = modern(1, "tools/list")
    error_of(client.post("/mcp", headers=headers, json=[body]), 400, -32600)
    headers["mcp-method"] = "notifications/cancelled"
    r = client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                    "params": {"requestId": 1, "_meta": ENVELOPE}})
    assert r.status_code == 202


def test_progress_makes_an_sse_response(client):
    """Progress before the result: the answer is an SSE stream scoped to the request, the client's token restored."""
    body, headers = modern(3, "tools/call", {"name": "sleep", "arguments": {"seconds": 0.1}}, meta={"progressToken": "tok"})
    with client.stream("POST", "/mcp", headers=headers, json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and line[5:].strip()]
    assert events[0]["method"] == "notifications/progress" and events[0]["params"]["progressToken"] == "tok"
    assert events[-1]["id"] == 3 and events[-1]["result"]["content"][0]["text"] == "slept 0.1"


def test_closing_the_stream_cancels_in_the_child(gw, client):
    """Closing the response cancels the call: the child gets notifications/cancelled (its stderr says so)."""
    body, headers = modern("long", "tools/call", {"name": "sleep", "arguments": {"seconds": 30}}, meta={"progressToken": "p"})
    with client.stream("POST", "/mcp", headers=headers, json=body) as r:
        next(r.iter_lines())
    assert wait_until(lambda: "cancelled: client closed the stream" in gw.log(), timeout=10)


def test_sampling_becomes_input_required(client):
    """A child's sampling/createMessage during tools/call: InputRequiredResult; the retry with
    inputResponses and requestState resumes the same call in the child."""
    sampling = {"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}
    body, headers = modern(1, "tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"}}, meta=sampling)
    result = client.post("/mcp", headers=headers, json=body).json()["result"]
    assert result["resultType"] == "input_required"
    [(key, asked)] = result["inputRequests"].items()
    assert asked["method"] == "sampling/createMessage"
    answer = {"role": "assistant", "content": {"type": "text", "text": "pong"}, "model": "m", "stopReason": "endTurn"}
    retry, headers = modern(2, "tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"},
                                              "inputResponses": {key: answer}, "requestState": result["requestState"]},
                           meta=sampling)
    final = client.post("/mcp", headers=headers, json=retry).json()
    assert final["id"] == 2 and final["result"]["content"][0]["text"] == "LLM response: pong"


def test_undeclared_capability_is_32021(client):
    """The child asks for sampling but the caller declared no sampling capability: 400/-32021 naming it."""
    body, headers = modern(1, "tools/call", {"name": "test_missing_capability", "arguments": {}})
    err = error_of(client.post("/mcp", headers=headers, json=body), 400, -32021)["error"]
    assert err["data"]["requiredCapabilities"] == {"sampling": {}}


def test_capability_checking_child_sees_per_request_capabilities(client):
    """A child that checks its client's capabilities sees the caller's own (the per-request _meta passed on),
    not the gateway's: it does not ask, and says so in its result."""
    body, headers = modern(1, "tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"}})
    result = client.post("/mcp", headers=headers, json=body).json()["result"]
    assert result["isError"] is True and result["content"][0]["text"] == "Client does not support sampling"


@pytest.mark.parametrize("level, delivered", [(None, False), ("info", True), ("error", False)])
def test_log_lines_only_with_log_level(client, level, delivered):
    """A call's notifications/message reaches the caller only if it set _meta logLevel, at that level or above."""
    meta = {"io.modelcontextprotocol/logLevel": level} if level else {}
    body, headers = modern(1, "tools/call", {"name": "notify", "arguments": {"message": "hello"}}, meta=meta)
    r = client.post("/mcp", headers=headers, json=body)
    assert ('"notifications/message"' in r.text) is delivered
    assert "notified" in r.text


def test_listen_gets_list_changed_and_resource_updates(gw):
    """subscriptions/listen: acknowledged, then tools/list_changed and resources/updated (via the children's
    resources/subscribe) arrive on the listen stream with the subscription id in _meta."""
    body, headers = modern("L", "subscriptions/listen", {"notifications": {
        "toolsListChanged": True, "resourceSubscriptions": ["test://static-text"]}})
    got: list[dict] = []
    with httpx.Client(base_url=gw.url, timeout=10) as c, c.stream("POST", "/mcp", headers=headers, json=body) as r:
        lines = r.iter_lines()

        def next_event() -> dict:
            for line in lines:
                if line.startswith("data:") and line[5:].strip():
                    return json.loads(line[5:])
            raise AssertionError("stream ended")

        ack = next_event()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"toolsListChanged": True, "resourceSubscriptions": ["test://static-text"]}
        with wire.http_client(gw.url) as other:
            for _ in range(2):  # both children, whichever the call lands on
                call, h = modern(5, "tools/call", {"name": "touch_resource", "arguments": {"uri": "test://static-text"}})
                assert "updated" in other.post("/mcp", headers=h, json=call).text
            call, h = modern(6, "tools/call", {"name": "notify", "arguments": {"message": "m"}})
            other.post("/mcp", headers=h, json=call)
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            got.append(next_event())
    methods = [e["method"] for e in got]
    assert methods.count("notifications/resources/updated") == 2 and "notifications/tools/list_changed" in methods
    assert all(e["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "L" for e in got)


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18", "2025-11-25", "1999-01-01"])
def test_handshake_sessions_share_the_pool(gw, client, version):
    """A handshake-era client of a pooled server: initialize answered from the cached result with the
    version negotiated for this client, a session id as before, calls served by the pool: no new child."""
    children = set(gw.child_pids())
    r = client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize(version=version))
    assert r.status_code == 200 and r.headers["mcp-session-id"]
    assert r.json()["result"]["protocolVersion"] == (version if version != "1999-01-01" else wire.LATEST)
    assert r.json()["result"]["serverInfo"]["name"]
    sid = r.headers["mcp-session-id"]
    headers = {**wire.POST_HEADERS, "mcp-session-id": sid, "mcp-protocol-version": r.json()["result"]["protocolVersion"]}
    assert client.post("/mcp", headers=headers, json=wire.notification("notifications/initialized")).status_code == 202
    reply = client.post("/mcp", headers=headers, json=wire.request(1, "tools/call", {"name": "echo", "arguments": {"text": sid}}))
    assert reply.json() == {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": sid}]}} or \
        reply.json()["result"]["content"][0]["text"] == sid
    assert client.delete("/mcp", headers=headers).status_code == 200
    assert set(gw.child_pids()) == children


def test_preflight_allows_mcp_param_headers(gw, client):
    """A browser's preflight for a 2026-07-28 call with Mcp-Param-* headers is allowed those headers."""
    r = client.options("/mcp", headers={"origin": gw.url, "access-control-request-method": "POST",
                                        "access-control-request-headers": "content-type, mcp-method, mcp-param-region"})
    assert r.status_code == 204
    assert "mcp-param-region" in r.headers["access-control-allow-headers"].lower()


# -- issue 9: parked calls per request, several inputs per round, x-mcp-header validation ----------


ELICIT = {"io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "sampling": {}, "roots": {}}}


@pytest.fixture(scope="module")
def one_child(make_module_gateway):
    """A pooled server with one child (every call meets every other) and a short poolInputWait."""
    return make_module_gateway({"mcpServers": {"fx": fixture_server(sessions="pooled", poolSize=1, poolInputWait=1.5,
                                                                    default=True)}})


def _ask_name(c: httpx.Client, id: Any) -> dict:
    body, headers = modern(id, "tools/call", {"name": "test_input_required_result_elicitation", "arguments": {}},
                           meta=ELICIT)
    r = c.post("/mcp", headers=headers, json=body)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def test_abandoned_input_required_does_not_block_another_client(one_child):
    """Client A gets an InputRequiredResult and never retries; client B's elicitation on the same (only) child
    is still bridged and completes; after poolInputWait A's call is cancelled in the child."""
    with wire.http_client(one_child.url) as a, wire.http_client(one_child.url) as b:
        abandoned = _ask_name(a, "a-1")
        assert abandoned["resultType"] == "input_required" and list(abandoned["inputRequests"]) == ["user_name"]
        asked = _ask_name(b, "b-1")
        assert asked["resultType"] == "input_required", asked
        assert asked["requestState"] != abandoned["requestState"]
        retry, headers = modern("b-2", "tools/call", {
            "name": "test_input_required_result_elicitation", "arguments": {},
            "inputResponses": {"user_name": {"action": "accept", "content": {"name": "Bob"}}},
            "requestState": asked["requestState"]}, meta=ELICIT)
        final = b.post("/mcp", headers=headers, json=retry).json()
        assert final["id"] == "b-2" and final["result"]["content"][0]["text"] == "Hello, Bob!", final
    assert wait_until(lambda: "abandoned: no retry with its input within 1.5s" in one_child.log(), timeout=10)
    # The late retry of the abandoned call: its requestState has expired with poolInputWait, -32602 (2026-07-28
    # mrtr Server Requirements 5: a short expiry); the client starts the request again without requestState.
    with wire.http_client(one_child.url) as a:
        late, headers = modern("a-2", "tools/call", {
            "name": "test_input_required_result_elicitation", "arguments": {},
            "inputResponses": {"user_name": {"action": "accept", "content": {"name": "Al"}}},
            "requestState": abandoned["requestState"]}, meta=ELICIT)
        error = error_of(a.post("/mcp", headers=headers, json=late), 400, -32602)["error"]
        assert error["data"] == {"requestState": "expired"}, error


def test_requests_at_once_come_in_one_input_required_result(one_child):
    """A child asking elicitation, sampling and roots/list at once: one InputRequiredResult with three keys
    (the child's own names), one retry answers all three."""
    with wire.http_client(one_child.url) as c:
        body, headers = modern(1, "tools/call", {"name": "test_input_required_result_multiple_inputs", "arguments": {}},
                               meta=ELICIT)
        result = c.post("/mcp", headers=headers, json=body).json()["result"]
        assert result["resultType"] == "input_required"
        asked = result["inputRequests"]
        assert {k: v["method"] for k, v in asked.items()} == {
            "user_name": "elicitation/create", "greeting": "sampling/createMessage", "client_roots": "roots/list"}
        assert "_meta" not in asked["user_name"]["params"]
        answers = {"user_name": {"action": "accept", "content": {"name": "Ann"}},
                   "greeting": {"role": "assistant", "content": {"type": "text", "text": "hi"}, "model": "m"},
                   "client_roots": {"roots": [{"uri": "file:///x"}]}}
        body, headers = modern(2, "tools/call", {"name": "test_input_required_result_multiple_inputs", "arguments": {},
                                                 "inputResponses": answers, "requestState": result["requestState"]},
                               meta=ELICIT)
        final = c.post("/mcp", headers=headers, json=body).json()
        assert final["result"]["content"][0]["text"] == "name=Ann greeting=hi roots=1", final


@pytest.mark.parametrize("param, arguments, status", [
    ("us-west1", {"region": "us-west1"}, 200),
    ("=?base64?" + base64.b64encode(b"us-west1").decode() + "?=", {"region": "us-west1"}, 200),
    (None, {"query": "q"}, 200),                      # no value, no header
    (None, {"region": "us-west1"}, 400),              # value in the body, header omitted
    ("eu-west1", {"region": "us-west1"}, 400),        # header disagrees with the body
    ("us-west1", {"query": "q"}, 400),                # header without a value in the body
])
def test_mcp_param_headers_checked_against_x_mcp_header(client, param, arguments, status):
    """SEP-2243: test_custom_headers annotates ``region`` with x-mcp-header Region; Mcp-Param-Region must
    mirror it (after Base64-sentinel decoding) when, and only when, the argument has a value: else 400/-32020."""
    body, headers = modern(5, "tools/call", {"name": "test_custom_headers", "arguments": arguments})
    if param is not None:
        headers["Mcp-Param-Region"] = param
    r = client.post("/mcp", headers=headers, json=body)
    if status == 400:
        assert error_of(r, 400, -32020)["id"] == 5
    else:
        assert r.status_code == 200 and "test_custom_headers called with" in r.text, r.text


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_modern_requests_counted(one_child):
    """The metrics registry counts 2026-07-28 requests (transport "modern") and what became of them."""
    before = httpx.get(one_child.metrics_url, timeout=10).text
    with wire.http_client(one_child.url) as c:
        asked = _ask_name(c, "m-1")
        body, headers = modern("m-2", "tools/call", {
            "name": "test_input_required_result_elicitation", "arguments": {},
            "inputResponses": {"user_name": {"action": "accept", "content": {"name": "M"}}},
            "requestState": asked["requestState"]}, meta=ELICIT)
        assert c.post("/mcp", headers=headers, json=body).status_code == 200
        body, headers = modern("m-3", "tools/call", {"name": "test_custom_headers", "arguments": {"region": "x"}})
        error_of(c.post("/mcp", headers=headers, json=body), 400, -32020)
    after = httpx.get(one_child.metrics_url, timeout=10).text
    requests = {"transport": "modern", "server": "fx", "method": "tools/call"}
    assert _sample(after, "mcp_gateway_requests_total", requests) - _sample(before, "mcp_gateway_requests_total", requests) == 3
    for outcome in ("input_required", "resumed", "header_mismatch"):
        labels = {"server": "fx", "outcome": outcome}
        grew = _sample(after, "mcp_gateway_modern_outcomes_total", labels) - _sample(before, "mcp_gateway_modern_outcomes_total", labels)
        assert grew == 1, (outcome, after)


# -- /sse and /ws sessions of a pooled server --------------------------------------------------


def test_legacy_sse_and_websocket_sessions_share_the_pool(gw):
    """A pooled server's 2024-11-05 (/sse) and WebSocket (/ws) sessions are served by its pool too:
    initialize from the cached result with the client's version, calls answered on their own
    stream or socket (colliding ids from two transports at once), and no child of their own."""
    from websockets.asyncio.client import connect

    from tests.mcp_raw import LegacySession, result_text

    children = set(gw.child_pids())

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client, LegacySession(client, gw.url) as legacy, \
                connect(gw.url.replace("http://", "ws://") + "/ws", subprotocols=["mcp"]) as ws:
            assert (await legacy.initialize())["serverInfo"]["name"]
            await ws.send(json.dumps(wire.initialize(id=0, version="2025-06-18")))
            assert json.loads(await ws.recv())["result"]["protocolVersion"] == "2025-06-18"
            await ws.send(json.dumps(wire.notification("notifications/initialized")))
            assert set(gw.child_pids()) == children  # nothing spawned for either session
            for i in range(5):
                await ws.send(json.dumps(wire.tool_call(i, "echo", {"text": f"ws {i}"})))
                got = await legacy.call(wire.tool_call(i, "echo", {"text": f"sse {i}"}))
                assert result_text(got[-1]) == f"sse {i}"
                reply = json.loads(await ws.recv())
                assert reply["id"] == i and reply["result"]["content"][0]["text"] == f"ws {i}"

    anyio.run(main)
    assert set(gw.child_pids()) == children


# -- issue 22: a handshake-era client of a pooled server is asked only for what it declared -------------


@pytest.mark.parametrize("tool, arguments, method, capability", [
    ("test_sampling", {"prompt": "hi"}, "sampling/createMessage", "sampling"),
    ("test_elicitation", {"message": "name?"}, "elicitation/create", "elicitation"),
    ("list_roots", {}, "roots/list", "roots"),
])
def test_pooled_handshake_client_never_asked_for_undeclared_capability(gw, client, tool, arguments, method, capability):
    """2025-11-25 basic/lifecycle Capability Negotiation: a client that declared ``capabilities: {}`` never
    receives a sampling / elicitation / roots request through a pooled server (whose children saw the gateway's
    capabilities): the gateway answers the child as the client's SDK would, and the tool reports it."""
    r = client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize(capabilities={}))
    sid = r.headers["mcp-session-id"]
    headers = {**wire.POST_HEADERS, "mcp-session-id": sid, "mcp-protocol-version": r.json()["result"]["protocolVersion"]}
    client.post("/mcp", headers=headers, json=wire.notification("notifications/initialized"))
    with client.stream("POST", "/mcp", headers=headers, json=wire.tool_call(1, tool, arguments)) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:") and line[5:].strip()] \
            if stream.headers["content-type"].startswith("text/event-stream") else [json.loads(stream.read())]
    assert not [e for e in events if e.get("method") == method], events
    final = events[-1]
    assert final["id"] == 1 and final["result"]["isError"] is True, final
    assert f"{capability} capability" in final["result"]["content"][0]["text"], final
    client.delete("/mcp", headers=headers)


def test_pooled_handshake_client_that_declared_sampling_is_asked(gw, client):
    """The same call from a client that declared sampling: the child's request reaches it on the call's stream."""
    r = client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize(capabilities={"sampling": {}}))
    headers = {**wire.POST_HEADERS, "mcp-session-id": r.headers["mcp-session-id"],
               "mcp-protocol-version": r.json()["result"]["protocolVersion"]}
    client.post("/mcp", headers=headers, json=wire.notification("notifications/initialized"))
    with client.stream("POST", "/mcp", headers=headers, json=wire.tool_call(1, "test_sampling", {"prompt": "hi"})) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data:") and line[5:].strip():
                asked = json.loads(line[5:])
                break
        assert asked["method"] == "sampling/createMessage"
        answer = {"role": "assistant", "content": {"type": "text", "text": "pong"}, "model": "m"}
        client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": asked["id"], "result": answer})
        final = next(json.loads(line[5:]) for line in lines if line.startswith("data:") and line[5:].strip())
    assert final["result"]["content"][0]["text"] == "LLM response: pong", final
    client.delete("/mcp", headers=headers)
