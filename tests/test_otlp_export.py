"""Issue 19: spans leave the gateway as OTLP/HTTP protobuf and a collector decodes them.

The tracer is built as the service builds it (``parse_tracing`` -> ``mcpgw.tracing.build``: the
export queue and thread of mcpgw.tracing.export, which encodes with mcpgw.tracing.otlp and POSTs);
the collector is tests/otlp_receiver.py on 127.0.0.1, decoding with opentelemetry-proto's messages. ``shutdown``
flushes in the reactor's thread pool while the reactor serves the receiver; the test waits on the
receiver's Deferred.
"""

from __future__ import annotations

import pytest_twisted
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from twisted.internet import reactor

from mcpgw.config.observability import parse_tracing
from mcpgw.tracing import build, inject_meta
from mcpgw.tracing.otel import OtelTracer
from tests.otlp_receiver import OtlpReceiver

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest_twisted.ensureDeferred
async def test_spans_reach_an_otlp_http_collector() -> None:
    receiver = OtlpReceiver(reactor)
    base_url = receiver.start()
    try:
        config = parse_tracing({"endpoint": base_url, "serviceName": "mcpgw-export-test", "headers": {"x-api-key": "k-1"}},
                               environ={})
        tracer = build(config, reactor)
        assert isinstance(tracer, OtelTracer)
        span = tracer.request("tools/call", {"name": "get_time", "arguments": {"tz": "UTC"}}, server="time",
                              transport="streamable", request_id=3, session_id="sess-1", identity="token:ci",
                              headers={"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"})
        leg = span.upstream("stdio", server="time", pid=4321)
        sent = inject_meta({"name": "get_time"}, leg)
        leg.end()
        span.end("tool_error")
        arrived = receiver.received(2)
        await tracer.shutdown()
        spans = await arrived
    finally:
        await receiver.stop()
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"
    assert receiver.headers[0]["x-api-key"] == "k-1"
    by_kind = {s.span.kind: s for s in spans}
    server, client = by_kind[Span.SPAN_KIND_SERVER], by_kind[Span.SPAN_KIND_CLIENT]
    assert server.name == client.name == "tools/call get_time"
    assert server.trace_id == client.trace_id == CLIENT_TRACE
    assert server.parent_span_id == "00f067aa0ba902b7"
    assert client.parent_span_id == server.span_id
    assert sent["_meta"]["traceparent"] == f"00-{CLIENT_TRACE}-{client.span_id}-01"
    assert server.resource["service.name"] == "mcpgw-export-test"
    assert server.scope == "mcpgw"
    assert server.attributes["gen_ai.tool.name"] == "get_time" and server.attributes["error.type"] == "tool_error"
    assert server.span.status.code == Status.STATUS_CODE_ERROR
    assert client.attributes["mcpgw.child.pid"] == 4321
    assert "UTC" not in str(server.span) + str(client.span)  # the arguments stayed home
