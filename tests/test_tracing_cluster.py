"""Issue 19 end to end: real ``twistd mcpgw`` processes export their spans over OTLP/HTTP to a collector
(tests/otlp_receiver.py on 127.0.0.1) and write a real audit file.

Layer: integration. The collector runs on this process's reactor (pytest-twisted), so every blocking
step of a test (an HTTP client, a gateway's stop) runs in a thread while the reactor serves it.

- One gateway, a real stdio child: each ``tools/call`` is a server span continuing the client's
  ``traceparent`` and a client span under it, exported by the BatchSpanProcessor; the audit file
  rotates at ``auditLog.maxBytes``, each line with the call's trace id and never its arguments.
- Two gateways sharing a redis-server (as tests/test_cluster.py runs them): a call sent to the
  instance that does not own the session gives one trace with both instances' spans, the owner's
  server span a child of the other's cluster leg.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_twisted
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests import wire
from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.redis_server import REDIS_SERVER
from tests.wire import POST_HEADERS, messages_of, session_headers, tool_call

pytestmark = pytest.mark.integration

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SECRET = "tracing-cluster-secret-0123456789abcdef"
#: Spans leave a gateway within 50 ms (BatchSpanProcessor's schedule delay), not at its stop only.
EXPORT_SOON = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def client_parent(n: int) -> str:
    return f"00-{CLIENT_TRACE}-{n:016x}-01"


def open_session(url: str) -> str:
    with httpx.Client(timeout=15) as client:
        r = client.post(url, headers=POST_HEADERS, json=wire.initialize())
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        assert client.post(url, headers=session_headers(sid), json=wire.notification("notifications/initialized")).status_code == 202
        return sid


def echo(url: str, sid: str, id: int, text: str, parent: str) -> str:
    with httpx.Client(timeout=15) as client:
        r = client.post(url, headers={**session_headers(sid), "traceparent": parent}, json=tool_call(id, "echo", {"text": text}))
        [reply] = messages_of(r)
        return reply["result"]["content"][0]["text"]


def calls(spans: list[ReceivedSpan], kind: int) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == "tools/call echo" and s.span.kind == kind]


def start(make_gateway: Any, config: dict[str, Any], **env: str) -> Gateway:
    return make_gateway(config, env={**EXPORT_SOON, **env})


@pytest_twisted.ensureDeferred
async def test_spans_reach_a_collector_and_the_audit_file_rotates(make_gateway: Any, tmp_path: Path):
    receiver = OtlpReceiver(reactor)
    base_url = receiver.start()
    audit = tmp_path / "audit.log"
    try:
        gw = start(make_gateway, {"mcpServers": {"fx": fixture_server()}, "tracing": {"serviceName": "e2e"},
                                  "auditLog": {"path": str(audit), "maxBytes": 4096, "keep": 2}},
                   OTEL_EXPORTER_OTLP_ENDPOINT=base_url)
        url = gw.url + "/mcp"
        sid = await deferToThread(open_session, url)
        count = 24  # each line is some 250 bytes: more than 4096 in all
        for i in range(count):
            text = await deferToThread(echo, url, sid, i + 10, f"secret-{i}", client_parent(i + 1))
            assert text == f"secret-{i}"
        spans = await receiver.received(2 * count + 2)
        await deferToThread(gw.stop)
    finally:
        await receiver.stop()
    servers, legs = calls(spans, Span.SPAN_KIND_SERVER), calls(spans, Span.SPAN_KIND_CLIENT)
    assert len(servers) == len(legs) == count
    by_id = {s.span_id: s for s in servers}
    for leg in legs:
        server = by_id[leg.parent_span_id]
        assert leg.trace_id == server.trace_id == CLIENT_TRACE and leg.attributes["mcpgw.upstream"] == "stdio"
        assert server.resource["service.name"] == "e2e" and server.attributes["mcpgw.outcome"] == "ok"
    assert sorted(int(s.parent_span_id, 16) for s in servers) == list(range(1, count + 1))
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.log"))
    assert files == ["audit.log", "audit.log.1"], files
    assert os.path.getsize(tmp_path / "audit.log.1") >= 4096
    lines = [orjson.loads(x) for name in ("audit.log.1", "audit.log") for x in (tmp_path / name).read_bytes().splitlines()]
    assert [line["target"] for line in lines] == ["echo"] * count
    assert {line["trace_id"] for line in lines} == {CLIENT_TRACE} and {line["outcome"] for line in lines} == {"ok"}
    assert b"secret-" not in (tmp_path / "audit.log").read_bytes() + (tmp_path / "audit.log.1").read_bytes()


@pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)")
@pytest_twisted.ensureDeferred
async def test_a_call_through_the_instance_that_does_not_own_the_session_is_one_trace(make_gateway: Any, redis: Any):
    receiver = OtlpReceiver(reactor)
    base_url = receiver.start()
    try:
        config = {"mcpServers": {"fx": fixture_server()}, "session": {"secret": SECRET}, "tracing": {},
                  "redis": {"url": redis.url_for(0), "heartbeat": 0.3, "timeout": 1.0}}
        a = start(make_gateway, config, OTEL_EXPORTER_OTLP_ENDPOINT=base_url, OTEL_SERVICE_NAME="gw-a")
        b = start(make_gateway, config, OTEL_EXPORTER_OTLP_ENDPOINT=base_url, OTEL_SERVICE_NAME="gw-b")
        for gw in (a, b):
            assert await deferToThread(wait_until, lambda gw=gw: httpx.get(gw.url + "/ready").status_code == 200, 15)
        sid = await deferToThread(open_session, a.url + "/mcp")
        assert await deferToThread(echo, b.url + "/mcp", sid, 5, "hop", client_parent(7)) == "hop"

        def both() -> list[ReceivedSpan]:
            return calls(receiver.spans, Span.SPAN_KIND_SERVER) + calls(receiver.spans, Span.SPAN_KIND_CLIENT)

        while len(both()) < 4:
            await receiver.received(len(receiver.spans) + 1)
        await deferToThread(lambda: (a.stop(), b.stop()))
    finally:
        await receiver.stop()
    spans = {(s.resource["service.name"], s.span.kind): s for s in both()}
    b_server, b_leg = spans["gw-b", Span.SPAN_KIND_SERVER], spans["gw-b", Span.SPAN_KIND_CLIENT]
    a_server, a_leg = spans["gw-a", Span.SPAN_KIND_SERVER], spans["gw-a", Span.SPAN_KIND_CLIENT]
    assert {s.trace_id for s in spans.values()} == {CLIENT_TRACE}
    assert b_server.parent_span_id == f"{7:016x}"
    assert b_leg.parent_span_id == b_server.span_id and b_leg.attributes["mcpgw.upstream"] == "cluster"
    assert a_server.parent_span_id == b_leg.span_id  # the owner continues the other instance's leg
    assert a_leg.parent_span_id == a_server.span_id and a_leg.attributes["mcpgw.upstream"] == "stdio"
