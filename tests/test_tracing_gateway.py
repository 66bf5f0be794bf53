"""Issue 19: the spans of client requests on every transport, through the whole gateway (mcpgw.dispatch).

Layer: unit. Each gateway runs in process (tests/harness.py: its real site, channel and transports, its
children played by FakeMcpServer, which keeps every message it read); its tracer is the production one
with the SDK's in-memory exporter (tests/observing.py). A ``tools/call`` over Streamable HTTP, HTTP+SSE,
WebSocket and the 2026-07-28 sessionless path gives the MCP server span (the gateway's, continuing the
client's ``traceparent``) and its MCP client span (the upstream leg), whose id the child reads in
``params._meta.traceparent``; a remote server gets it as a header; across two cluster instances the
owner's spans continue the receiving instance's. With tracing off nothing is wrapped or re-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from treq.testing import StubTreq
from twisted.internet.task import LoopingCall

import mcpgw.session
import mcpgw.upstream.remote
from mcpgw.dispatch import ObservedRoute
from mcpgw.tracing.attributes import session_hash
from mcpgw.transports.streamable import PostExchange
from tests import wire
from tests.gateway_process import fixture_server
from tests.harness import Harness
from tests.observing import (
    CLIENT_PARENT,
    CLIENT_SPAN,
    CLIENT_TRACE,
    AuditTrail,
    Traced,
    observe,
    parent_hex,
    span_hex,
    trace_hex,
    traceparent_of,
    ws_answer,
    ws_open,
    ws_send,
)
from tests.test_remote_upstream import FakeMcp
from tests.wire import POST_HEADERS, messages_of, session_headers, tool_call

OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_SPAN = "b7ad6b7169203331"
OTHER_PARENT = f"00-{OTHER_TRACE}-{OTHER_SPAN}-01"
MODERN = "2026-07-28"


@pytest.fixture
def traced() -> Traced:
    return Traced()


@pytest.fixture
def gw(traced: Traced) -> Iterator[Harness]:
    with Harness(wire.config()) as h:
        observe(h, traced)
        yield h


def child_saw(h: Harness, id: Any, method: str = "tools/call") -> dict[str, Any]:
    """The message the (only) child read for request ``id``."""
    [pid] = h.child_pids()
    found = [m for m in h.program(pid).received if isinstance(m, dict) and m.get("id") == id and m.get("method") == method]
    assert len(found) == 1, h.program(pid).received
    return found[0]


def call_tree(traced: Traced, name: str = "tools/call echo") -> tuple[Any, Any]:
    """The request's MCP server span and its one MCP client span (the upstream leg), checked as a tree."""
    server, leg = traced.one(name, SpanKind.SERVER), traced.one(name, SpanKind.CLIENT)
    assert trace_hex(leg) == trace_hex(server) and parent_hex(leg) == span_hex(server)
    return server, leg


# -- Streamable HTTP -----------------------------------------------------------------------


def test_streamable_call_continues_the_client_header_and_the_child_continues_the_gateway(gw: Harness, traced: Traced):
    with gw.client() as client:
        sid = wire.open_session(client)
        r = client.post("/mcp", headers={**session_headers(sid), "traceparent": CLIENT_PARENT},
                        json=tool_call(7, "echo", {"text": "hi"}))
    assert messages_of(r)[0]["result"]["content"][0]["text"] == "hi"
    server, leg = call_tree(traced)
    assert trace_hex(server) == CLIENT_TRACE and parent_hex(server) == CLIENT_SPAN
    [pid] = gw.child_pids()
    assert dict(server.attributes or {}) == {
        "mcp.method.name": "tools/call", "gen_ai.tool.name": "echo", "gen_ai.operation.name": "execute_tool",
        "jsonrpc.request.id": "7", "mcp.session.id": session_hash(sid), "mcpgw.server": "fx",
        "mcpgw.transport": "streamable", "network.transport": "tcp", "network.protocol.name": "http",
        "client.address": "127.0.0.1", "mcpgw.outcome": "ok"}
    assert leg.attributes["mcpgw.upstream"] == "stdio" and leg.attributes["network.transport"] == "pipe"
    assert leg.attributes["mcpgw.child.pid"] == pid and leg.attributes["mcpgw.server"] == "fx"
    assert server.status.status_code == StatusCode.UNSET and leg.attributes["mcpgw.outcome"] == "ok"
    sent = child_saw(gw, 7)
    assert sent["params"] == {"name": "echo", "arguments": {"text": "hi"}, "_meta": {"traceparent": traceparent_of(leg)}}


def test_the_duration_histogram_has_the_trace_as_exemplar(gw: Harness, traced: Traced):
    """OpenMetrics exposition: the latest traced request of a bucket is its exemplar; the text format has none."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    with gw.client() as client:
        sid = wire.open_session(client)
        client.post("/mcp", headers={**session_headers(sid), "traceparent": CLIENT_PARENT}, json=tool_call(7, "echo", {}))
    registry = gw.gateway.metrics.registry
    lines = [line for line in openmetrics(registry).decode().splitlines()
             if line.startswith("mcp_gateway_request_duration_seconds_bucket{") and 'method="tools/call"' in line
             and " # " in line]
    assert len(lines) == 1 and f'# {{trace_id="{CLIENT_TRACE}"}}' in lines[0], lines
    assert b"trace_id" not in generate_latest(registry)


def test_an_aggregate_calls_leg_names_the_member_it_goes_to(traced: Traced):
    """Issue 19: the upstream leg of a call through an aggregate says which member server took it, and
    that member's child continues the leg (``params._meta.traceparent``)."""
    config = wire.config()
    config["mcpServers"].update({"a": fixture_server(), "b": fixture_server()})
    config["aggregate"] = {"name": "all", "servers": ["a", "b"]}
    with Harness(config) as h:
        observe(h, traced)
        with h.client() as client:
            sid = wire.open_session(client, path="/servers/all/mcp")
            r = client.post("/servers/all/mcp", headers=session_headers(sid), json=tool_call(7, "b__echo", {"text": "hi"}))
            assert messages_of(r)[0]["result"]["content"][0]["text"] == "hi"
        server, leg = call_tree(traced, "tools/call b__echo")
        assert leg.attributes["mcpgw.upstream"] == "aggregate" and leg.attributes["mcpgw.aggregate.member"] == "b"
        assert leg.attributes["mcpgw.server"] == "all" and server.attributes["mcpgw.server"] == "all"
        got = [m for pid in h.child_pids() for m in h.program(pid).received
               if isinstance(m, dict) and m.get("method") == "tools/call"]
        assert len(got) == 1 and got[0]["params"]["name"] == "echo"
        assert got[0]["params"]["_meta"]["traceparent"] == traceparent_of(leg)


def test_initialize_spans_its_spawn(gw: Harness, traced: Traced):
    with gw.client() as client:
        sid = wire.open_session(client)
    server, leg = call_tree(traced, "initialize")
    [spawn] = [s for s in traced.children(server) if s.kind == SpanKind.INTERNAL]
    assert spawn.name == "spawn" and spawn.attributes["mcpgw.child.pid"] == gw.child_pids()[0]
    assert spawn.end_time is not None and spawn.end_time <= leg.start_time
    assert server.attributes["mcp.session.id"] == session_hash(sid)


def test_meta_traceparent_wins_over_the_header_and_the_child_gets_ours_not_the_clients(gw: Harness, traced: Traced):
    with gw.client() as client:
        sid = wire.open_session(client)
        params = {"name": "echo", "arguments": {"text": "x"},
                  "_meta": {"traceparent": OTHER_PARENT, "tracestate": "vendor=1", "progressToken": "p"}}
        client.post("/mcp", headers={**session_headers(sid), "traceparent": CLIENT_PARENT},
                    json=wire.request(8, "tools/call", params))
    server, leg = call_tree(traced)
    assert trace_hex(server) == OTHER_TRACE and parent_hex(server) == OTHER_SPAN
    assert [trace_hex_of(link.context) for link in server.links] == [CLIENT_TRACE]  # the HTTP request's, linked
    meta = child_saw(gw, 8)["params"]["_meta"]
    assert meta == {"traceparent": traceparent_of(leg), "tracestate": "vendor=1", "progressToken": "p"}


def trace_hex_of(context: Any) -> str:
    return format(context.trace_id, "032x")


def test_failures_mark_the_spans(traced: Traced):
    with Harness(wire.config(limits={"requestTimeout": 2})) as h, h.client() as client:
        observe(h, traced)
        sid = wire.open_session(client)
        client.post("/mcp", headers=session_headers(sid), json=tool_call(2, "list_roots"))  # isError: no roots
        client.post("/mcp", headers=session_headers(sid), json=tool_call(3, "no_such_tool"))  # -32602
        r = client.post("/mcp", headers=session_headers(sid), json=tool_call(4, "sleep", {"seconds": 30}))
        assert messages_of(r)[-1]["error"]["code"] == -32001
    expected = {"tools/call list_roots": ("tool_error", "tool_error", None),
                "tools/call no_such_tool": ("error", "-32602", "-32602"), "tools/call sleep": ("timeout", "-32001", "-32001")}
    for name, (outcome, error_type, code) in expected.items():
        server, leg = call_tree(traced, name)
        for span in (server, leg):
            assert span.status.status_code == StatusCode.ERROR and span.status.description is None, name
            assert span.attributes["mcpgw.outcome"] == outcome, (name, span.attributes)
            assert span.attributes["error.type"] == error_type, (name, span.attributes)
            assert span.attributes.get("rpc.response.status_code") == code, (name, span.attributes)


def test_tracing_off_wraps_nothing_and_relays_the_clients_bytes(monkeypatch: pytest.MonkeyPatch):
    """No tracer, no audit trail: the session gets the transport's own route and the client's bytes."""
    seen: list[tuple[Any, bytes]] = []
    real = mcpgw.session.Session.request

    def spy(self: Any, msg: dict[str, Any], raw: bytes, route: Any) -> None:
        seen.append((route, raw))
        real(self, msg, raw, route)

    monkeypatch.setattr(mcpgw.session.Session, "request", spy)
    body = json.dumps(tool_call(5, "echo", {"text": "x"}), separators=(",", ":")).encode()
    with Harness(wire.config()) as h, h.client() as client:
        sid = wire.open_session(client)
        client.post("/mcp", headers={**session_headers(sid), "traceparent": CLIENT_PARENT}, content=body)
        assert child_saw(h, 5)["params"] == {"name": "echo", "arguments": {"text": "x"}}
        route, raw = seen[-1]
        assert type(route) is PostExchange and raw == body
        observe(h, Traced())
        client.post("/mcp", headers=session_headers(sid), content=body.replace(b":5,", b":6,"))
        assert isinstance(seen[-1][0], ObservedRoute)


# -- HTTP+SSE, WebSocket, 2026-07-28 ---------------------------------------------------------


def test_legacy_sse_call(gw: Harness, traced: Traced):
    stream = gw.open_sse()
    with gw.client() as client:
        for message in (wire.initialize(), wire.notification("notifications/initialized"),
                        wire.request(2, "tools/call", {"name": "echo", "arguments": {"text": "s"},
                                                       "_meta": {"traceparent": CLIENT_PARENT}})):
            assert client.post(stream.endpoint, json=message).status_code == 202
    assert gw.run_until(lambda: b'"id":2' in stream.received, 5)
    server, leg = call_tree(traced)
    assert trace_hex(server) == CLIENT_TRACE and parent_hex(server) == CLIENT_SPAN
    assert server.attributes["mcpgw.transport"] == "sse"
    assert leg.attributes["mcpgw.child.pid"] == gw.child_pids()[0]  # a child started by the first message
    assert child_saw(gw, 2)["params"]["_meta"] == {"traceparent": traceparent_of(leg)}
    stream.close()


def test_websocket_call(gw: Harness, traced: Traced):
    conn = ws_open(gw)
    ws_send(conn, wire.initialize())
    ws_answer(gw, conn, 1)
    ws_send(conn, wire.notification("notifications/initialized"))
    ws_send(conn, wire.request(3, "tools/call", {"name": "echo", "arguments": {"text": "w"},
                                                 "_meta": {"traceparent": CLIENT_PARENT}}))
    assert ws_answer(gw, conn, 3)["result"]["content"][0]["text"] == "w"
    server, leg = call_tree(traced)
    assert trace_hex(server) == CLIENT_TRACE and parent_hex(server) == CLIENT_SPAN
    assert server.attributes["mcpgw.transport"] == "ws" and server.attributes["network.protocol.name"] == "websocket"
    assert child_saw(gw, 3)["params"]["_meta"] == {"traceparent": traceparent_of(leg)}
    conn.hang_up()


def modern_call(id: Any, tool: str, arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = wire.request(id, "tools/call", {"name": tool, "arguments": arguments, "_meta": meta})
    return body, {**POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool,
                  "traceparent": CLIENT_PARENT}


def test_sessionless_2026_call_to_a_pooled_server(traced: Traced):
    config = wire.config()
    config["mcpServers"]["fx"].update(sessions="pooled", poolSize=1)
    with Harness(config) as h, h.client() as client:
        observe(h, traced)
        body, headers = modern_call(9, "echo", {"text": "m"})
        r = client.post("/mcp", headers=headers, json=body)
        assert r.json()["result"]["content"][0]["text"] == "m", r.text
        server, leg = call_tree(traced)
        assert trace_hex(server) == CLIENT_TRACE and parent_hex(server) == CLIENT_SPAN
        assert leg.attributes["mcpgw.upstream"] == "pool" and "mcp.session.id" not in server.attributes
        [pid] = h.child_pids()
        [sent] = [m for m in h.program(pid).received if m.get("method") == "tools/call"]
        assert sent["params"]["_meta"] == {**body["params"]["_meta"], "traceparent": traceparent_of(leg)}


def test_sessionless_2026_rounds_each_have_their_span_and_audit_line(traced: Traced):
    """An InputRequiredResult ends its request's span; the retry with requestState has its own; a child's
    request for a capability the client did not declare ends the call (-32021) and its span."""
    config = wire.config()
    config["mcpServers"]["fx"].update(sessions="pooled", poolSize=1)
    audit = AuditTrail()
    with Harness(config) as h, h.client() as client:
        observe(h, traced, audit)
        body, headers = modern_call(1, "list_roots", {})
        body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {"roots": {}}
        first = client.post("/mcp", headers=headers, json=body).json()["result"]
        assert first["resultType"] == "input_required", first
        body["id"] = 2
        body["params"].update(requestState=first["requestState"], inputResponses={"roots": {"roots": []}})
        assert client.post("/mcp", headers=headers, json=body).json()["result"]["content"][0]["text"] == '{"roots":[]}'
        body, headers = modern_call(3, "list_roots", {})
        assert client.post("/mcp", headers=headers, json=body).json()["error"]["code"] == -32021
    spans = traced.named("tools/call list_roots", SpanKind.SERVER)
    assert [s.attributes["mcpgw.outcome"] for s in spans] == ["input_required", "ok", "missing_capability"]
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR]
    assert spans[2].attributes["error.type"] == "-32021" and "error.type" not in spans[0].attributes
    assert [(line["outcome"], line["error_code"]) for line in audit.lines()] == [
        ("input_required", None), ("ok", None), ("missing_capability", -32021)]
    assert len({line["trace_id"] for line in audit.lines()}) == 1  # one client trace (its traceparent header)


# -- a remote upstream -------------------------------------------------------------------------


def test_remote_upstream_gets_the_traceparent_header(traced: Traced, monkeypatch: pytest.MonkeyPatch):
    upstream = FakeMcp()
    stub = StubTreq(upstream)
    monkeypatch.setattr(mcpgw.upstream.remote, "http_client", lambda reactor: stub)
    with Harness({"mcpServers": {"r": {"url": "http://upstream.test/mcp"}}}) as h:
        observe(h, traced)
        pump = LoopingCall(stub.flush)  # the in-memory HTTP client's I/O, on the gateway's clock
        pump.clock = h.clock
        pump.start(0.01)
        try:
            with h.client() as client:
                sid = wire.open_session(client, version="2025-06-18")
                r = client.post("/mcp", headers={**session_headers(sid, "2025-06-18"), "traceparent": CLIENT_PARENT},
                                json=tool_call(4, "echo", {"text": "r"}))
                assert messages_of(r)[0]["result"] == {"method": "tools/call"}, r.text
        finally:
            pump.stop()
    server, leg = call_tree(traced)
    assert trace_hex(server) == CLIENT_TRACE
    assert leg.attributes["mcpgw.upstream"] == "remote" and leg.attributes["network.transport"] == "tcp"
    assert leg.attributes["server.address"] == "upstream.test" and leg.attributes["server.port"] == 80
    [(_, headers, body)] = [s for s in upstream.seen if s[2] and s[2].get("method") == "tools/call"]
    assert headers[b"Traceparent"] == [traceparent_of(leg).encode()]
    assert body["params"]["_meta"] == {"traceparent": traceparent_of(leg)}


# -- a cluster hop (two instances in memory) -----------------------------------------------------


def test_cluster_hop_one_trace_across_both_instances(monkeypatch: pytest.MonkeyPatch):
    import mcpgw.cluster
    from mcpgw.cluster.memory import MemoryWorld
    from mcpgw.cluster.service import Cluster
    from tests.fake_process import UNREAL_PID, FakeMcpServer, FakeProcessReactor
    from tests.test_cluster_unit import SECRET, Instance

    clock = FakeProcessReactor(program=FakeMcpServer, first_pid=UNREAL_PID)
    world = MemoryWorld(clock)
    numbers = iter(("100000001", "100000002"))
    monkeypatch.setattr(mcpgw.cluster, "Cluster", lambda config, reactor, metrics=None: Cluster(
        config, reactor, metrics, backend=world.backend(next(numbers))))
    config = wire.config(session={"secret": SECRET}, redis={"url": "redis://127.0.0.1:9/0", "heartbeat": 0.3})
    a, b = Instance(config, clock, world), Instance(config, clock, world)
    try:
        traced_a, traced_b, audit_a, audit_b = Traced(), Traced(), AuditTrail(), AuditTrail()
        observe(a, traced_a, audit_a)
        observe(b, traced_b, audit_b)
        with a.client() as client:
            sid = wire.open_session(client)
        traced_a.clear()
        with b.client() as client:
            r = client.post("/mcp", headers={**session_headers(sid), "traceparent": CLIENT_PARENT},
                            json=tool_call(5, "echo", {"text": "hop"}))
        assert messages_of(r)[0]["result"]["content"][0]["text"] == "hop"
        b_server, b_leg = call_tree(traced_b)
        a_server, a_leg = call_tree(traced_a)
        assert {trace_hex(s) for s in (b_server, b_leg, a_server, a_leg)} == {CLIENT_TRACE}
        assert parent_hex(b_server) == CLIENT_SPAN and parent_hex(a_server) == span_hex(b_leg)
        assert b_leg.attributes["mcpgw.upstream"] == "cluster" and b_leg.attributes["mcpgw.cluster.node"] == a.instance
        assert a_leg.attributes["mcpgw.upstream"] == "stdio"
        assert child_saw(a, 5)["params"]["_meta"] == {"traceparent": traceparent_of(a_leg)}
        # One audit line, by the instance that runs the session, with the client's address from the other.
        assert audit_b.events == []
        [line] = audit_a.lines()
        assert line["outcome"] == "ok" and line["client_ip"] == "127.0.0.1" and line["trace_id"] == CLIENT_TRACE
    finally:
        for instance in (a, b):
            instance.close(check=False)


def test_a_forwarded_post_carries_the_context_in_keys_earlier_releases_ignore():
    from mcpgw.cluster import wire as cluster_wire

    plain = cluster_wire.Post("S1", "100000002", 4, b"{}")
    assert cluster_wire.encode(plain) == b'{"t":"post","s":"S1","f":"100000002","r":4}\n{}'  # as every release wrote it
    traced = cluster_wire.Post("S1", "100000002", 4, b"{}", carrier={"traceparent": CLIENT_PARENT}, client_ip="10.0.0.7")
    data = cluster_wire.encode(traced)
    assert data.startswith(b'{"t":"post","s":"S1","f":"100000002","r":4,"tc":{"traceparent":"00-')
    assert cluster_wire.decode(data) == traced and cluster_wire.decode(cluster_wire.encode(plain)) == plain
    for bad in (b'"tc":"x"', b'"tc":{"tracestate":"a"}', b'"tc":{"traceparent":1}', b'"ip":5'):
        with pytest.raises(cluster_wire.WireError):
            cluster_wire.decode(b'{"t":"post","s":"S1","f":"1","r":4,' + bad + b"}\n{}")
