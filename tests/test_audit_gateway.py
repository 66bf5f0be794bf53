"""Issue 19: the audit trail of a running gateway: one line per audited call, refusal and admin request.

Layer: unit. The gateways run in process (tests/harness.py) with the production tracer on an in-memory
exporter and an audit trail that keeps its events (tests/observing.py): each line is what
mcpgw.audit.AuditLog writes (``encode``). The last tests build the service as ``twistd mcpgw`` does,
on the real reactor, with a real audit file and an OTLP receiver on 127.0.0.1: its stop writes out and
exports what is held.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from opentelemetry.trace import SpanKind
from twisted.internet import reactor

from mcpgw.admin import AdminAuth, AdminResource
from mcpgw.audit import AuditEvent, AuditLog
from mcpgw.config import parse
from mcpgw.logs import short_session
from mcpgw.tap import build_service
from mcpgw.tracing.otel import OtelTracer
from tests import wire
from tests.harness import Harness
from tests.observing import (
    CLIENT_PARENT,
    CLIENT_TRACE,
    AuditTrail,
    Traced,
    observe,
    trace_hex,
    ws_answer,
    ws_open,
    ws_send,
)
from tests.otlp_receiver import OtlpReceiver
from tests.test_oauth_gateway import call as oauth_call
from tests.test_oauth_gateway import fake_as, gateway_config, token  # noqa: F401 - fake_as: a fixture
from tests.test_oauth_gateway import open_session as oauth_session
from tests.wire import POST_HEADERS, session_headers, tool_call

TOKEN = "ci-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SECRET_ARGUMENT = "s3cr3t-argument-value"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def config(**extra: Any) -> dict[str, Any]:
    return wire.config(auth={"bearerTokens": [{"name": "ci", "token": TOKEN}]}, **extra)


@pytest.fixture
def observed() -> Iterator[tuple[Harness, Traced, AuditTrail]]:
    traced, audit = Traced(), AuditTrail()
    with Harness(config(limits={"requestTimeout": 2})) as h:
        observe(h, traced, audit)
        yield h, traced, audit


def post(client: Any, sid: str, message: dict[str, Any], **headers: str) -> Any:
    return client.post("/mcp", headers={**session_headers(sid), **AUTH, **headers}, json=message)


def open_session(client: Any) -> str:
    r = client.post("/mcp", headers={**POST_HEADERS, **AUTH}, json=wire.initialize())
    sid = r.headers["mcp-session-id"]
    assert post(client, sid, wire.notification("notifications/initialized")).status_code == 202
    return sid


def test_a_line_for_each_outcome_of_an_audited_call(observed: tuple[Harness, Traced, AuditTrail]):
    h, traced, audit = observed
    with h.client() as client:
        sid = open_session(client)
        post(client, sid, tool_call(2, "echo", {"text": SECRET_ARGUMENT}), traceparent=CLIENT_PARENT)
        post(client, sid, tool_call(3, "list_roots"))  # a result with isError (no roots declared)
        post(client, sid, tool_call(4, "no_such_tool", {"password": SECRET_ARGUMENT}))  # -32602
        post(client, sid, tool_call(5, "sleep", {"seconds": 30}))  # past limits.requestTimeout (2 s)
        post(client, sid, wire.request(6, "logging/setLevel", {"level": "info"}))
        post(client, sid, wire.request(7, "tools/list"))  # not audited
    lines = audit.lines()
    who = {"method": "tools/call", "server": "fx", "identity": "token:ci", "client_ip": "127.0.0.1"}
    assert [{k: line[k] for k in ("target", "outcome", "error_code")} for line in lines] == [
        {"target": "echo", "outcome": "ok", "error_code": None},
        {"target": "list_roots", "outcome": "tool_error", "error_code": None},
        {"target": "no_such_tool", "outcome": "error", "error_code": -32602},
        {"target": "sleep", "outcome": "timeout", "error_code": -32001},
        {"target": "info", "outcome": "ok", "error_code": None},
    ]
    for line in lines[:4]:
        assert {k: line[k] for k in who} == who
    assert lines[4]["method"] == "logging/setLevel"
    assert lines[0]["trace_id"] == CLIENT_TRACE  # the client's trace, continued
    spans = {s.name: trace_hex(s) for s in traced.spans() if s.kind == SpanKind.SERVER}
    assert [line["trace_id"] for line in lines[1:4]] == [spans[f"tools/call {t}"] for t in ("list_roots", "no_such_tool", "sleep")]
    assert lines[3]["duration_ms"] == 2000.0  # the gateway's clock: the timeout is exactly limits.requestTimeout
    text = audit.text()
    assert SECRET_ARGUMENT.encode() not in text and b"Unknown tool" not in text and b"Client does not support" not in text


def test_refused_on_the_head_unauthorized_and_rate_limited():
    """401 and 429 are decided on the request head (no JSON-RPC method yet): "http" and the path."""
    traced, audit = Traced(), AuditTrail()
    with Harness(config(rateLimit={"enabled": True, "max": 3, "window": "1m"})) as h, h.client() as client:
        observe(h, traced, audit)
        assert client.post("/mcp", headers=POST_HEADERS, json=wire.initialize()).status_code == 401
        # Counted by identity (the 401 was counted by address): the fourth is over the limit.
        codes = [client.post("/mcp", headers={**POST_HEADERS, **AUTH}, json=wire.request(1, "ping")).status_code
                 for _ in range(4)]
        assert codes == [400, 400, 400, 429], codes
    unauthorized, rate_limited = audit.lines()
    assert {k: unauthorized[k] for k in ("method", "target", "server", "identity", "client_ip", "outcome", "error_code")} == {
        "method": "http", "target": "/mcp", "server": "fx", "identity": None, "client_ip": "127.0.0.1",
        "outcome": "unauthorized", "error_code": -32000}
    assert {k: rate_limited[k] for k in ("method", "target", "identity", "outcome")} == {
        "method": "http", "target": "/mcp", "identity": "token:ci", "outcome": "rate_limited"}
    assert [line["trace_id"] for line in (unauthorized, rate_limited)] == [trace_hex(s) for s in traced.named("http")]
    assert {s.attributes["http.response.status_code"] for s in traced.named("http")} == {401, 429}


def test_a_websocket_message_over_the_rate_limit():
    traced, audit = Traced(), AuditTrail()
    with Harness(config(rateLimit={"enabled": True, "max": 3, "window": "1m"})) as h:
        observe(h, traced, audit)
        conn = ws_open(h, headers=AUTH)  # the upgrade is one hit
        ws_send(conn, wire.initialize())
        ws_answer(h, conn, 1)
        ws_send(conn, tool_call(2, "echo", {"text": "ok"}))
        ws_answer(h, conn, 2)
        ws_send(conn, tool_call(3, "echo", {"text": SECRET_ARGUMENT}))
        assert ws_answer(h, conn, 3)["error"]["message"].startswith("Too Many Requests")
        conn.hang_up()
    ok, limited = audit.lines()
    assert (ok["outcome"], limited["outcome"]) == ("ok", "rate_limited")
    assert {k: limited[k] for k in ("method", "target", "identity", "error_code")} == {
        "method": "tools/call", "target": "echo", "identity": "token:ci", "error_code": -32000}
    [refused] = [s for s in traced.named("tools/call echo", SpanKind.SERVER) if s.attributes["mcpgw.outcome"] == "rate_limited"]
    assert limited["trace_id"] == trace_hex(refused) != ok["trace_id"]
    assert SECRET_ARGUMENT.encode() not in audit.text()


def test_a_call_the_token_has_no_scope_for(fake_as: Any):  # noqa: F811 - the fixture
    traced, audit = Traced(), AuditTrail()
    with Harness(gateway_config()) as h, h.client() as client:
        observe(h, traced, audit)
        reader = token(h)
        sid = oauth_session(client, reader)
        assert oauth_call(client, reader, sid, tool_call(3, "sleep", {"seconds": 0})).status_code == 403
    [line] = audit.lines()
    assert {k: line[k] for k in ("method", "target", "server", "outcome", "error_code")} == {
        "method": "tools/call", "target": "sleep", "server": "files", "outcome": "forbidden", "error_code": -32000}
    assert line["identity"] is not None and line["trace_id"] == trace_hex(traced.one("tools/call sleep"))


def test_admin_requests_are_audited_with_session_ids_shortened():
    audit = AuditTrail()
    with Harness(wire.config(admin={"token": ADMIN_TOKEN})) as h, h.client() as client:
        service = h.gateway.service
        h.gateway.resource.putChild(b"admin", AdminResource(service.control, service.stats, AdminAuth(ADMIN_TOKEN), audit))
        sid = wire.open_session(client)
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.get(f"/admin/sessions/{sid}", headers=admin).status_code == 200
        assert client.delete(f"/admin/sessions/{sid}", headers=admin).status_code == 200
        assert client.get("/admin/servers/nope", headers=admin).status_code == 404
        assert client.get("/admin/", headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    lines = audit.lines()
    assert [(line["method"], line["target"], line["identity"], line["outcome"], line["error_code"]) for line in lines] == [
        ("admin", f"GET /admin/sessions/{short_session(sid)}", "admin", "ok", None),
        ("admin", f"DELETE /admin/sessions/{short_session(sid)}", "admin", "ok", None),
        ("admin", "GET /admin/servers/nope", "admin", "error", 404),
        ("admin", "GET /admin/", None, "unauthorized", 401),
    ]
    assert sid.encode() not in audit.text() and {line["client_ip"] for line in lines} == {"127.0.0.1"}


# -- the service, as twistd builds it --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_service_builds_both_and_its_stop_flushes_them(tmp_path: Path):
    receiver = OtlpReceiver(reactor)
    base_url = receiver.start()
    path = tmp_path / "audit.log"
    try:
        gateway = parse({"mcpServers": {"fx": {"command": "/bin/true"}},
                         "tracing": {"endpoint": base_url, "serviceName": "flush-test"}, "auditLog": {"path": str(path)}}, {})
        top = build_service(gateway, reactor, serve=False)
        ctx = top.context  # type: ignore[attr-defined]
        assert isinstance(ctx.tracer, OtelTracer) and isinstance(ctx.audit, AuditLog)
        top.startService()
        span = ctx.tracer.request("tools/call", {"name": "t"}, server="fx", transport="streamable")
        span.end()
        ctx.audit.record(AuditEvent(time=1.0, method="tools/call", outcome="ok", target="t", trace_id=span.trace_id))
        arrived = receiver.received(1)
        await top.stopService()
        [exported] = await arrived
    finally:
        await receiver.stop()
    assert exported.trace_id == span.trace_id and exported.resource["service.name"] == "flush-test"
    [line] = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert line["target"] == "t" and line["trace_id"] == span.trace_id


def test_admin_failures_lists_the_recent_failed_calls_with_their_trace_ids():
    """What the console's "Recent failed calls" shows (GET /admin/failures): failures only, newest first,
    each with the trace id of its span; never arguments."""
    traced, audit = Traced(), AuditTrail()
    with Harness(config(admin={"token": ADMIN_TOKEN}, limits={"requestTimeout": 2})) as h, h.client() as client:
        observe(h, traced, audit)
        sid = open_session(client)
        post(client, sid, tool_call(2, "echo", {"text": SECRET_ARGUMENT}))  # ok: not listed
        post(client, sid, tool_call(3, "no_such_tool", {"password": SECRET_ARGUMENT}))  # -32602
        post(client, sid, tool_call(4, "sleep", {"seconds": 30}))  # timeout
        r = client.get("/admin/failures", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200
    failures = r.json()["failures"]
    assert [(f["target"], f["outcome"], f["errorCode"]) for f in failures] == [
        ("sleep", "timeout", -32001), ("no_such_tool", "error", -32602)]
    spans = {s.name: trace_hex(s) for s in traced.spans() if s.kind == SpanKind.SERVER}
    assert [f["traceId"] for f in failures] == [spans["tools/call sleep"], spans["tools/call no_such_tool"]]
    assert SECRET_ARGUMENT not in r.text and failures[0]["identity"] == "token:ci"
