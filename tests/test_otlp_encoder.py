"""Issue 19: the gateway's own OTLP encoder (mcpgw.tracing.otlp) against the OpenTelemetry SDK's, and its export queue.

Spans are made by the production tracer (mcpgw.tracing.otel) with a sink that keeps them; each
batch is encoded twice, by ``Encoder.request`` and by the SDK's ``encode_spans`` over the same spans
as ReadableSpans (mcpgw.tracing.sdk, the ``exporter`` seam's conversion): the bytes must be the same,
and decode (opentelemetry-proto) to the same message. Then mcpgw.tracing.export's queue: batches,
the flush at shutdown, a full queue dropping and counting, a collector that refuses, gzip, and the
SDK's environment variables.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import pytest_twisted
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from mcpgw import __version__
from mcpgw.config.observability import TracingConfig
from mcpgw.tracing.export import BatchExport, OtlpHttp, Settings
from mcpgw.tracing.otel import SCOPE, OtelSpan, OtelTracer, resource_for
from mcpgw.tracing.otlp import KIND_INTERNAL, Encoder
from mcpgw.tracing.sdk import readable
from tests.otlp_receiver import OtlpReceiver

CLIENT_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Kept:
    """An OtelTracer whose ended spans are kept as they are."""

    def __init__(self, config: TracingConfig | None = None):
        self.config = config or TracingConfig(enabled=True, serviceName="enc-test", recordArguments=True)
        self.spans: list[OtelSpan] = []
        self.tracer = OtelTracer(self.spans.append, lambda: None, None, self.config)

    def both(self, spans: list[Any] | None = None) -> tuple[bytes, bytes]:
        """(ours, the SDK's) encodings of the kept spans."""
        spans = self.spans if spans is None else spans
        resource = resource_for(self.config)
        ours = Encoder(resource.attributes, SCOPE, __version__).request(spans)
        scope = InstrumentationScope(SCOPE, __version__)
        theirs = encode_spans([readable(s, resource, scope) for s in spans]).SerializeToString()
        return ours, theirs


def assert_same(ours: bytes, theirs: bytes) -> ExportTraceServiceRequest:
    decoded, expected = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    decoded.ParseFromString(ours)
    expected.ParseFromString(theirs)
    assert decoded == expected
    assert ours == theirs
    return decoded


def test_a_proxied_call_encodes_as_the_sdk_encodes_it() -> None:
    kept = Kept()
    span = kept.tracer.request("tools/call", {"name": "get_time", "arguments": {"tz": "UTC"}}, server="time",
                               transport="streamable", request_id=7, session_id="sess", identity="token:ci",
                               client_ip="10.0.0.7")
    spawn = span.child("spawn", server="time")
    spawn.set(pid=4242)
    spawn.end()
    span.upstream("stdio", server="time", pid=4242).end()
    span.upstream("remote", server="docs", url="https://docs.example:8443/mcp").end("timeout")
    span.set(protocol_version="2025-06-18", http_status=200)
    span.end("error", -32603)
    decoded = assert_same(*kept.both())
    [resource_spans] = decoded.resource_spans
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == "mcpgw" and len(scope_spans.spans) == 4
    assert {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}["service.name"] == "enc-test"


def test_remote_parents_tracestate_and_links_encode_as_the_sdks() -> None:
    kept = Kept()
    params = {"name": "t", "_meta": {"traceparent": CLIENT_PARENT, "tracestate": "rojo=00f067aa0ba902b7,congo=t61"}}
    span = kept.tracer.request("tools/call", params, server="s", transport="ws",
                               headers={"traceparent": OTHER_PARENT})
    span.upstream("cluster", node="node-b").end()
    span.end()
    kept.tracer.request("prompts/get", {"name": "p"}, server="s", transport="sse",
                        parent={"traceparent": OTHER_PARENT}).end("tool_error")
    decoded = assert_same(*kept.both())
    server = decoded.resource_spans[0].scope_spans[0].spans[1]
    assert server.links[0].trace_id.hex() == OTHER_PARENT[3:35] and server.trace_state.startswith("rojo=")


def test_long_unicode_and_every_value_type_encode_as_the_sdks() -> None:
    """Multi-byte lengths (a 4 KiB argument, a 256-character URI), non-ASCII text, bool, double, a negative int."""
    kept = Kept()
    kept.tracer.request("tools/call", {"name": "ünïcødé-" + "x" * 300, "arguments": {"blob": "y" * 5000}},
                        server="s", transport="streamable", request_id=-3).end()
    kept.tracer.request("resources/read", {"uri": "file:///" + "z" * 400}, server="s", transport="streamable").end()
    span = kept.tracer.request("ping", None, server=None, transport="streamable")
    span._own().update({"x.bool": True, "x.false": False, "x.double": 0.25, "x.negative": -(2**40), "x.zero": 0})
    span.end()
    assert_same(*kept.both())


def test_many_spans_in_one_request_and_the_cache_starting_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcpgw.tracing.otlp.MAX_CACHED", 8)
    kept = Kept()
    for i in range(40):
        kept.tracer.request("tools/call", {"name": f"tool-{i % 11}"}, server="s", transport="streamable",
                            request_id=i, session_id=f"session-{i}").end()
    assert_same(*kept.both())
    encoder = Encoder(resource_for(kept.config).attributes, SCOPE, __version__)
    first = encoder.request(kept.spans)
    assert encoder.request(kept.spans) == first  # from the cache (started over several times) as when new


class Pairs(Kept):
    """A Kept whose spans ended with their leg are kept as the pair they went out as. Arguments are not
    recorded (the default): a known tool's spans share kept templates, as in production."""

    def __init__(self) -> None:
        super().__init__(TracingConfig(enabled=True, serviceName="enc-test"))
        self.pairs: list[tuple[OtelSpan, OtelSpan]] = []
        self.tracer.sink_pair = lambda leg, span: self.pairs.append((leg, span))


PAIRED = {
    "ok": dict(request_id=7),
    "error": dict(request_id="r-1", outcome=("error", -32603)),
    "tool error": dict(request_id=8, outcome=("tool_error", None)),
    "long unicode request id": dict(request_id="ï" * 200),
    "remote parent": dict(request_id=9, headers={"traceparent": CLIENT_PARENT}),
    "tracestate": dict(request_id=10, headers={"traceparent": CLIENT_PARENT, "tracestate": "rojo=1"}),
    "no request id": dict(request_id=None),
}


@pytest.mark.parametrize("case", PAIRED.values(), ids=PAIRED.keys())
def test_a_span_and_its_leg_encode_together_as_the_sdk_encodes_them(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """OtelSpan.end ends the leg still open with the span and sends both at once (Encoder.pair, which
    packs the usual pair in one form kept for its templates): the same bytes as each on its own, and as
    the SDK's."""
    forms: list[int] = []
    made = Encoder._form
    monkeypatch.setattr(Encoder, "_form", lambda self, kept, n, parent: forms.append(n) or made(self, kept, n, parent))
    pairs = Pairs()
    outcome = case.get("outcome", ("ok", None))
    for _ in range(3):  # the first calls of a tool make its templates; the later ones take the kept path
        span = pairs.tracer.request("tools/call", {"name": "get_time"}, server="time", transport="streamable",
                                    request_id=case["request_id"], session_id="s", headers=case.get("headers"))
        span.upstream("stdio", server="time", pid=42)
        span.end(*outcome)
    encoder = Encoder(resource_for(pairs.config).attributes, SCOPE, __version__)
    for leg, span in pairs.pairs:
        assert leg.stop == span.stop and (leg.outcome, leg.error_code) == outcome
        assert encoder.pair(leg, span) == encoder.span(leg) + encoder.span(span)
    ours = encoder.envelope([encoder.pair(leg, span) for leg, span in pairs.pairs])
    assert_same(ours, pairs.both([s for pair in pairs.pairs for s in pair])[1])
    # The form is the usual ("ok", a short request id) pair's, made once per request id length.
    usual = (outcome == ("ok", None) and "tracestate" not in case.get("headers", {})
             and case["request_id"] is not None and len(str(case["request_id"]).encode()) < 100)
    assert forms == ([len(str(case["request_id"]))] if usual else [])


def test_a_leg_ended_before_its_span_goes_alone() -> None:
    kept = Kept()
    span = kept.tracer.request("tools/call", {"name": "t"}, server="s", transport="streamable")
    leg = span.upstream("remote", server="s", url="http://up:1/mcp")
    leg.end("timeout")
    span.end("error", -32001)
    assert kept.spans == [leg, span] and leg.outcome == "timeout" and span.outcome == "error"


def test_an_unsampled_span_is_not_kept() -> None:
    kept = Kept(TracingConfig(enabled=True, sampleRatio=0.0))
    span = kept.tracer.request("ping", None, server="s", transport="streamable")
    span.child("spawn").end()
    span.end()
    assert kept.spans == [] and span.traceparent() is not None and span.traceparent().endswith("-00")  # type: ignore[union-attr]
    assert span.child("x").kind == KIND_INTERNAL


# -- the export queue ------------------------------------------------------------------


class Collector:
    """A send function that keeps each body and says whether it was taken."""

    def __init__(self, takes: bool = True):
        self.bodies: list[Any] = []
        self.takes = takes
        self.arrived = threading.Event()

    def __call__(self, body: Any) -> bool:
        self.bodies.append(body)
        self.arrived.set()
        return self.takes


def test_a_full_batch_goes_at_once_and_the_rest_at_shutdown() -> None:
    collector = Collector()
    export = BatchExport(list, collector, max_batch=4, max_queue=100, interval=3600)
    for i in range(6):
        export.put(i)
    assert collector.arrived.wait(10)  # the fourth span woke the thread: no hour's wait
    export.shutdown()
    assert [x for body in collector.bodies for x in body] == list(range(6))
    assert collector.bodies[0] == [0, 1, 2, 3]
    assert (export.exported, export.dropped, export.failed) == (6, 0, 0)


def test_a_wake_for_a_full_batch_sends_full_batches_only() -> None:
    """What arrives while a batch is out waits for the next full one (one POST per max_batch spans
    under load, not one per wake-up with what trickled in); the interval or the stop sends the rest."""
    collector = Collector()
    sending = threading.Event()
    go = threading.Event()

    def send(body: Any) -> bool:
        sending.set()
        assert go.wait(10)
        return collector(body)

    export = BatchExport(list, send, max_batch=4, max_queue=100, interval=3600)
    for i in range(4):
        export.put(i)
    assert sending.wait(10)  # the first batch is out; what follows arrives meanwhile
    export.put(4)
    go.set()
    for i in range(5, 8):
        export.put(i)
    export.shutdown()
    assert collector.bodies == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_full_queue_drops_and_counts() -> None:
    collector = Collector(takes=False)
    gate = threading.Event()
    export = BatchExport(lambda batch: gate.wait(10) and batch, collector, max_batch=1000, max_queue=3, interval=3600)
    for i in range(5):
        export.put(i)
    assert export.dropped == 2
    gate.set()
    export.shutdown()
    assert collector.bodies == [[0, 1, 2]] and export.failed == 3
    export.put(9)  # after shutdown: dropped, never queued for a thread that is gone
    assert export.dropped == 3


def test_a_refusing_collector_is_a_failed_batch_not_an_exception() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        sender = OtlpHttp(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces", {"x-api-key": "k"}, Settings(timeout=5))
        assert sender.send(b"\x0a\x00") is False
        sender.close()
    finally:
        listener.close()



def test_the_sdks_environment_variables_apply() -> None:
    assert Settings.from_environ({}) == Settings()
    settings = Settings.from_environ({
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64", "OTEL_BSP_MAX_QUEUE_SIZE": "1000", "OTEL_BSP_SCHEDULE_DELAY": "500",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "4", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem"})
    assert settings == Settings(max_batch=64, max_queue=1000, interval=0.5, timeout=4.0, gzip=True, cafile="/etc/ca.pem")
    unusable = Settings.from_environ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots", "OTEL_BSP_SCHEDULE_DELAY": "-1"})
    assert unusable == Settings()


@pytest_twisted.ensureDeferred
async def test_a_gzipped_batch_reaches_the_collector() -> None:
    receiver = OtlpReceiver(reactor)
    base_url = receiver.start()
    kept = Kept()
    kept.tracer.request("ping", None, server="s", transport="ws").end()
    body = Encoder(resource_for(kept.config).attributes, SCOPE, __version__).request(kept.spans)
    sender = OtlpHttp(f"{base_url}/v1/traces", {"x-api-key": "k-3"}, Settings(gzip=True))
    try:
        arrived = receiver.received(1)
        assert await deferToThread(sender.send, body)  # blocking HTTP: off the reactor that serves the receiver
        [span] = await arrived
    finally:
        sender.close()
        await receiver.stop()
    assert span.name == "ping" and receiver.headers[0]["content-encoding"] == "gzip"
    assert receiver.headers[0]["x-api-key"] == "k-3"


def test_the_thread_starts_with_the_first_span() -> None:
    """Not at construction: twistd builds the service before it forks into the background."""
    collector = Collector()
    export = BatchExport(list, collector, max_batch=1, interval=3600)
    assert export._thread is None
    export.put("span")
    assert collector.arrived.wait(10)
    export.shutdown()
    assert collector.bodies == [["span"]]
    BatchExport(list, collector).shutdown()  # never started: nothing to join
