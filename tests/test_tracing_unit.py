"""Issue 19: the tracer (mcpgw.tracing) against OpenTelemetry's own SDK, and the ``tracing`` config.

Spans go through the production tracer (``mcpgw.tracing.build``) into the SDK's InMemorySpanExporter
(the ``exporter`` seam, which hands over each span as the SDK's ReadableSpan): the span tree, the
semantic conventions' attributes, the parents taken from a client's headers or ``params._meta``,
sampling; then the no-op tracer's promise (the same signatures, nothing allocated) and
``parse_tracing``.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.web.http_headers import Headers

import mcpgw.tracing
from mcpgw import jsonrpc
from mcpgw.config.checks import ConfigError
from mcpgw.config.observability import DEFAULT_TRACES_ENDPOINT, TracingConfig, parse_tracing
from mcpgw.dispatch import outcome_of
from mcpgw.tracing import NOOP, NOOP_SPAN, build, extract, inject_line, inject_meta, inject_raw
from mcpgw.tracing import api as tracing_api
from mcpgw.tracing.api import EMPTY_CARRIER, NoopSpan, NoopTracer
from mcpgw.tracing.attributes import session_hash
from mcpgw.tracing.otel import OtelSpan, OtelTracer

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_PARENT = f"00-{OTHER_TRACE}-b7ad6b7169203331-01"
SESSION = "c2Vzc2lvbi1pZC1mb3ItdGVzdHM.tag"


class Traced:
    """An OtelTracer whose spans land in an InMemorySpanExporter."""

    def __init__(self, config: TracingConfig | None = None):
        config = config or TracingConfig(enabled=True)
        self.exporter = InMemorySpanExporter()
        tracer = build(config, None, exporter=self.exporter)
        assert isinstance(tracer, OtelTracer)
        self.tracer = tracer

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


@pytest.fixture
def traced() -> Traced:
    return Traced()


def call(tracer: Any, params: Any = None, **kw: Any) -> Any:
    """A tools/call span as the streamable transport would start it."""
    args: dict[str, Any] = dict(server="time", transport="streamable", request_id=7, session_id=SESSION,
                                identity="token:ci", client_ip="10.0.0.7")
    args.update(kw)
    return tracer.request("tools/call", {"name": "get_time", "arguments": {"tz": "UTC"}} if params is None else params, **args)


def hex_trace(span: ReadableSpan) -> str:
    return trace.format_trace_id(span.context.trace_id)


def hex_span(span_id: int) -> str:
    return trace.format_span_id(span_id)


# -- the span tree ---------------------------------------------------------------------


def test_request_upstream_and_setup_spans_form_one_tree(traced: Traced) -> None:
    span = call(traced.tracer)
    spawn = span.child("spawn", server="time")
    spawn.set(pid=4242)
    spawn.end()
    leg = span.upstream("stdio", server="time", pid=4242)
    leg.end()
    span.end()
    server_span = next(s for s in traced.spans() if s.kind is SpanKind.SERVER)
    assert server_span.name == "tools/call get_time" and server_span.parent is None
    children = [s for s in traced.spans() if s is not server_span]
    assert {s.name for s in children} == {"spawn", "tools/call get_time"}
    for child in children:
        assert child.parent is not None and child.parent.span_id == server_span.context.span_id
        assert child.context.trace_id == server_span.context.trace_id
    client_leg = next(s for s in children if s.kind is SpanKind.CLIENT)
    assert client_leg.attributes is not None
    assert client_leg.attributes["mcpgw.upstream"] == "stdio"
    assert client_leg.attributes["network.transport"] == "pipe"
    assert client_leg.attributes["mcpgw.child.pid"] == 4242
    # The leg is an MCP client call: it names the method and tool as the request does.
    assert client_leg.attributes["mcp.method.name"] == "tools/call"
    assert client_leg.attributes["gen_ai.tool.name"] == "get_time"
    spawn_span = next(s for s in children if s.name == "spawn")
    assert spawn_span.kind is SpanKind.INTERNAL
    assert dict(spawn_span.attributes or {}) == {"mcpgw.server": "time", "mcpgw.child.pid": 4242, "mcpgw.outcome": "ok"}


def test_legs_of_every_kind_say_what_they_reach(traced: Traced) -> None:
    span = traced.tracer.request("tools/list", None, server="all", transport="ws")
    span.upstream("remote", server="docs", url="https://docs.example:8443/mcp").end()
    span.upstream("aggregate", member="docs").end()
    span.upstream("cluster", node="node-b").end()
    span.upstream("pool", server="files", pid=99).end()
    span.end()
    client_spans = [dict(s.attributes or {}) for s in traced.spans() if s.kind is SpanKind.CLIENT]
    legs = {attributes["mcpgw.upstream"]: attributes for attributes in client_spans}
    assert legs["remote"]["server.address"] == "docs.example" and legs["remote"]["server.port"] == 8443
    assert legs["remote"]["network.transport"] == "tcp"
    assert legs["aggregate"]["mcpgw.aggregate.member"] == "docs" and "network.transport" not in legs["aggregate"]
    assert legs["cluster"]["mcpgw.cluster.node"] == "node-b"
    assert legs["pool"]["network.transport"] == "pipe" and legs["pool"]["mcpgw.child.pid"] == 99
    request = next(s for s in traced.spans() if s.kind is SpanKind.SERVER)
    assert request.attributes is not None
    assert request.attributes["network.protocol.name"] == "websocket"
    assert "gen_ai.tool.name" not in request.attributes and "jsonrpc.request.id" not in request.attributes


def test_request_attributes_follow_the_mcp_conventions(traced: Traced) -> None:
    span = call(traced.tracer)
    span.set(protocol_version="2025-06-18")
    span.end()
    attrs = dict(traced.one("tools/call get_time").attributes or {})
    assert attrs == {
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "get_time",
        "gen_ai.operation.name": "execute_tool",
        "jsonrpc.request.id": "7",
        "mcp.session.id": session_hash(SESSION),
        "mcp.protocol.version": "2025-06-18",
        "mcpgw.server": "time",
        "mcpgw.transport": "streamable",
        "mcpgw.identity": "token:ci",
        "mcpgw.outcome": "ok",
        "network.transport": "tcp",
        "network.protocol.name": "http",
        "client.address": "10.0.0.7",
    }
    assert SESSION not in str(attrs)
    assert len(session_hash(SESSION)) == 16 and int(session_hash(SESSION), 16) >= 0


@pytest.mark.parametrize(("method", "params", "name", "expected"), [
    ("prompts/get", {"name": "review", "arguments": {"code": "x"}}, "prompts/get review", {"gen_ai.prompt.name": "review"}),
    ("resources/read", {"uri": "file:///etc/motd"}, "resources/read", {"mcp.resource.uri": "file:///etc/motd"}),
    ("resources/subscribe", {"uri": "db://t"}, "resources/subscribe", {"mcp.resource.uri": "db://t"}),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "review"}}, "completion/complete review",
     {"gen_ai.prompt.name": "review"}),
    ("tools/call", {"name": ["not", "a", "name"]}, "tools/call", {}),
    ("ping", [1, 2], "ping", {}),
])
def test_the_target_names_the_span_but_a_uri_does_not(traced: Traced, method: str, params: Any, name: str,
                                                      expected: dict[str, str]) -> None:
    traced.tracer.request(method, params, server="s", transport="sse").end()
    span = traced.one(name)
    for key, value in expected.items():
        assert span.attributes is not None and span.attributes[key] == value
    assert "gen_ai.operation.name" not in (span.attributes or {})


def test_a_huge_client_sent_name_is_cut(traced: Traced) -> None:
    call(traced.tracer, {"name": "t" * 1_000_000}, request_id="r" * 10_000).end()
    span = traced.spans()[0]
    assert len(span.name) == len("tools/call ") + 128
    assert span.attributes is not None
    assert len(span.attributes["gen_ai.tool.name"]) == 256  # type: ignore[arg-type]
    assert len(span.attributes["jsonrpc.request.id"]) == 256  # type: ignore[arg-type]


# -- outcomes --------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "code", "error_type"), [
    ("error", -32603, "-32603"),
    ("tool_error", None, "tool_error"),
    ("timeout", None, "timeout"),
    ("rate_limited", None, "rate_limited"),
])
def test_a_failure_sets_error_type_and_status(traced: Traced, outcome: str, code: int | None, error_type: str) -> None:
    call(traced.tracer).end(outcome, code)
    span = traced.spans()[0]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None  # an error message may quote the arguments
    assert span.attributes is not None
    assert span.attributes["error.type"] == error_type
    assert span.attributes["mcpgw.outcome"] == outcome
    assert span.attributes.get("rpc.response.status_code") == (None if code is None else str(code))


def test_success_leaves_the_status_unset_and_a_second_end_changes_nothing(traced: Traced) -> None:
    span = call(traced.tracer)
    span.end()
    span.end("timeout")
    assert len(traced.spans()) == 1
    finished = traced.spans()[0]
    assert finished.status.status_code is StatusCode.UNSET
    assert finished.attributes is not None
    assert "error.type" not in finished.attributes and finished.attributes["mcpgw.outcome"] == "ok"


# -- parents: headers, _meta, the cluster hop ------------------------------------------


def test_continues_the_trace_of_the_clients_http_headers(traced: Traced) -> None:
    headers = Headers({b"traceparent": [CLIENT_PARENT.encode()], b"tracestate": [b"rojo=00f067aa0ba902b7"]})
    span = call(traced.tracer, headers=headers)
    assert span.trace_id == CLIENT_TRACE
    assert span.tracestate() == "rojo=00f067aa0ba902b7"
    span.end()
    finished = traced.spans()[0]
    assert hex_trace(finished) == CLIENT_TRACE
    assert finished.parent is not None and finished.parent.is_remote and hex_span(finished.parent.span_id) == CLIENT_SPAN


@pytest.mark.parametrize("meta", [None, {"progressToken": 5}], ids=["no _meta", "a progress token"])
def test_a_known_tools_calls_take_the_headers_context_every_time(traced: Traced, meta: Any) -> None:
    """The first call of a tool and the later ones (found in one lookup) continue the same way: a
    progress token in ``_meta`` is no trace context, the headers' traceparent is the parent."""
    headers = Headers({b"traceparent": [CLIENT_PARENT.encode()]})
    params = {"name": "get_time", **({"_meta": meta} if meta else {})}
    for _ in range(3):
        call(traced.tracer, params, headers=headers).end()
        call(traced.tracer, params).end()
    spans = traced.spans()
    assert [hex_trace(s) == CLIENT_TRACE for s in spans] == [True, False] * 3
    assert len({hex_trace(s) for s in spans[1::2]}) == 3  # each call without a context: a trace of its own
    assert all(s.parent is not None and hex_span(s.parent.span_id) == CLIENT_SPAN for s in spans[::2])


def test_continues_the_trace_of_params_meta_and_links_the_http_one(traced: Traced) -> None:
    params = {"name": "get_time", "_meta": {"traceparent": CLIENT_PARENT, "progressToken": 3}}
    call(traced.tracer, params, headers={"traceparent": OTHER_PARENT}).end()
    finished = traced.spans()[0]
    assert hex_trace(finished) == CLIENT_TRACE  # the message's own context is the parent
    assert [trace.format_trace_id(link.context.trace_id) for link in finished.links] == [OTHER_TRACE]


def test_the_gateways_own_hop_wins_over_the_clients_context(traced: Traced) -> None:
    """Node B continues node A's cluster-hop span, not the client's (an ancestor of it)."""
    hop = {"traceparent": OTHER_PARENT}
    params = {"name": "get_time", "_meta": {"traceparent": CLIENT_PARENT}}
    call(traced.tracer, params, headers={"traceparent": CLIENT_PARENT}, parent=hop).end()
    finished = traced.spans()[0]
    assert hex_trace(finished) == OTHER_TRACE and not finished.links


@pytest.mark.parametrize("bad", ["garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "ff-" + CLIENT_TRACE + "-" + CLIENT_SPAN + "-01",
                                 CLIENT_PARENT[:20] + "\n" + CLIENT_PARENT[20:], "x" * 5000])
def test_a_malformed_traceparent_starts_a_new_trace(traced: Traced, bad: str) -> None:
    call(traced.tracer, {"name": "t", "_meta": {"traceparent": bad}}).end()
    finished = traced.spans()[0]
    assert finished.parent is None and hex_trace(finished) != CLIENT_TRACE


def test_a_malformed_meta_traceparent_falls_back_to_the_headers(traced: Traced) -> None:
    call(traced.tracer, {"name": "t", "_meta": {"traceparent": "garbage"}}, headers={"traceparent": CLIENT_PARENT}).end()
    finished = traced.spans()[0]
    assert hex_trace(finished) == CLIENT_TRACE and not finished.links


def test_two_traceparent_headers_are_no_parent() -> None:
    assert extract(Headers({b"traceparent": [CLIENT_PARENT.encode(), OTHER_PARENT.encode()]}), None) is None
    assert extract(Headers({b"traceparent": [CLIENT_PARENT.encode()], b"tracestate": [b"a=1", b"b=2"]}), None) == {
        "traceparent": CLIENT_PARENT, "tracestate": "a=1,b=2"}
    assert extract({"traceparent": OTHER_PARENT}, {"traceparent": CLIENT_PARENT}) == {"traceparent": CLIENT_PARENT}
    assert extract(None, {"traceparent": 5}) is None


def test_the_ambient_context_is_never_the_parent(traced: Traced) -> None:
    """A span left current in a contextvar (another library's, an earlier reactor turn's) is ignored."""
    ambient = trace.NonRecordingSpan(trace.SpanContext(int(OTHER_TRACE, 16), 0x1234, is_remote=False,
                                                       trace_flags=trace.TraceFlags(1)))
    token = otel_context.attach(trace.set_span_in_context(ambient))
    try:
        span = call(traced.tracer)
        span.child("spawn").end()
        span.end()
    finally:
        otel_context.detach(token)
    for finished in traced.spans():
        assert hex_trace(finished) != OTHER_TRACE


def test_traceparent_and_carrier_name_this_span(traced: Traced) -> None:
    span = call(traced.tracer, headers={"traceparent": CLIENT_PARENT, "tracestate": "rojo=1"})
    leg = span.upstream("remote", url="http://up:9000/mcp")
    traceparent, carrier = leg.traceparent(), leg.carrier()
    leg.end()
    span.end()
    context = next(s for s in traced.spans() if s.kind is SpanKind.CLIENT).context
    expected = f"00-{CLIENT_TRACE}-{trace.format_span_id(context.span_id)}-{context.trace_flags:02x}"
    assert context.trace_flags.sampled  # the client's decision (flags 01) carried on
    assert traceparent == expected
    assert carrier == {"traceparent": expected, "tracestate": "rojo=1"}


# -- injecting into params._meta ---------------------------------------------------------


def test_inject_meta_copies_and_never_changes_the_clients_params(traced: Traced) -> None:
    span = call(traced.tracer)
    params = {"name": "get_time", "arguments": {"tz": "UTC"}, "_meta": {"progressToken": 1, "tracestate": "theirs=1"}}
    before = copy.deepcopy(params)
    meta_before = params["_meta"]
    injected = inject_meta(params, span)
    assert params == before and params["_meta"] is meta_before
    assert injected is not params and injected["_meta"] is not meta_before
    assert injected["_meta"] == {"progressToken": 1, "traceparent": span.traceparent()}
    assert injected["arguments"] is params["arguments"]  # a shallow copy: the arguments are not walked
    assert inject_meta(None, span) == {"_meta": {"traceparent": span.traceparent()}}
    positional = [1, 2]
    assert inject_meta(positional, span) is positional
    span.end()


def test_inject_raw_encodes_again_only_when_tracing(traced: Traced) -> None:
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_time"}}
    raw = orjson.dumps(msg)
    assert inject_raw(msg, raw, NOOP_SPAN) is raw
    assert inject_meta(msg["params"], NOOP_SPAN) is msg["params"]
    span = call(traced.tracer)
    sent = orjson.loads(inject_raw(msg, raw, span))
    assert sent["params"]["_meta"]["traceparent"] == span.traceparent()
    assert sent["id"] == 1 and sent["params"]["name"] == "get_time"
    assert msg["params"] == {"name": "get_time"}
    span.end()


LINES = [
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_time", "arguments": {"tz": "UTC"}}},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
    {"jsonrpc": "2.0", "id": 3, "method": "ping"},
    # a "params" key nested in a member before the top level's: the splice must not take it
    {"jsonrpc": "2.0", "x": {"params": {}}, "id": 4, "method": "m", "params": {"a": 1}},
    # braces and the key's own spelling inside strings before params
    {"jsonrpc": "2.0", "id": '"params":{', "method": "m{", "params": {"a": 1}},
    # the client's own _meta (its progress token) is kept: the message is encoded again
    {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "t", "_meta": {"progressToken": 6}}},
    {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "t", "arguments": {"params": {"_meta": 1}}}},
    # a member the gateway does not know (an object could open before params): encoded again
    {"jsonrpc": "2.0", "id": 8, "x": 1, "method": "m", "params": {"a": 1}},
    {"jsonrpc": "2.0", "id": 9, "method": "m", "params": {"a": 1}, "x": {"params": {}}},
]


@pytest.mark.parametrize("msg", LINES)
@pytest.mark.parametrize("dumps", [orjson.dumps, lambda m: orjson.dumps(m, option=orjson.OPT_INDENT_2)], ids=["compact", "indented"])
def test_inject_line_gives_the_child_what_inject_raw_does(traced: Traced, msg: dict[str, Any], dumps: Any) -> None:
    """A stdio child gets the gateway's traceparent in ``params._meta`` (MCP semantic conventions,
    SEP-414) whether the line is written into as it is or encoded again; the client's message is unchanged."""
    span = call(traced.tracer)
    raw = dumps(msg)
    before = copy.deepcopy(msg)
    sent = inject_line(msg, raw, span)
    assert orjson.loads(sent) == orjson.loads(inject_raw(msg, raw, span))
    assert orjson.loads(sent).get("params", {}).get("_meta", {}).get("traceparent") == span.traceparent()
    assert msg == before
    span.end()


def test_inject_line_writes_into_a_compact_line_without_encoding_it_again(traced: Traced) -> None:
    span = call(traced.tracer)
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":1.50}}}'
    msg = orjson.loads(raw)
    sent = inject_line(msg, raw, span)
    # The client's bytes around the context are the client's (1.50 is not re-encoded as 1.5).
    assert sent == raw.replace(b'"params":{', b'"params":{"_meta":{"traceparent":"%s"},' % span.traceparent().encode())
    assert inject_line(msg, raw, NOOP_SPAN) is raw
    span.end()


# -- sampling and what is recorded -------------------------------------------------------


def test_sample_ratio_zero_records_nothing_but_still_propagates() -> None:
    traced = Traced(TracingConfig(enabled=True, sampleRatio=0.0))
    for _ in range(50):
        span = call(traced.tracer)
        span.upstream("stdio").end()
        span.end("error", -32603)
    assert traced.spans() == []
    # The decision travels on (the sampled flag clear), so the upstream does not record it either.
    traceparent = span.traceparent()
    assert traceparent is not None and int(traceparent.rsplit("-", 1)[1], 16) & 1 == 0


def test_a_sampled_client_decides_unless_parent_based_is_off() -> None:
    headers = {"traceparent": CLIENT_PARENT}
    parent_based = Traced(TracingConfig(enabled=True, sampleRatio=0.0))
    call(parent_based.tracer, headers=headers).end()
    assert len(parent_based.spans()) == 1
    ratio_only = Traced(TracingConfig(enabled=True, sampleRatio=0.0, parentBased=False))
    call(ratio_only.tracer, headers=headers).end()
    assert ratio_only.spans() == []


def test_arguments_are_recorded_only_when_asked() -> None:
    secret = "hunter2-secret-value"
    params = {"name": "login", "arguments": {"password": secret}}
    off = Traced()
    call(off.tracer, params).end()
    assert secret not in repr(off.spans()[0].attributes)
    assert "gen_ai.tool.call.arguments" not in (off.spans()[0].attributes or {})
    on = Traced(TracingConfig(enabled=True, recordArguments=True))
    call(on.tracer, params).end()
    assert orjson.loads(on.spans()[0].attributes["gen_ai.tool.call.arguments"]) == {"password": secret}  # type: ignore[arg-type,index]


def test_the_resource_names_the_service() -> None:
    traced = Traced(TracingConfig(enabled=True, serviceName="gw-eu"))
    call(traced.tracer).end()
    assert traced.spans()[0].resource.attributes["service.name"] == "gw-eu"


# -- the no-op tracer ----------------------------------------------------------------------


@pytest.mark.parametrize(("noop", "real", "method"), [
    (NoopTracer, OtelTracer, "request"), (NoopTracer, OtelTracer, "shutdown"),
    (NoopSpan, OtelSpan, "upstream"), (NoopSpan, OtelSpan, "child"), (NoopSpan, OtelSpan, "set"),
    (NoopSpan, OtelSpan, "end"), (NoopSpan, OtelSpan, "traceparent"), (NoopSpan, OtelSpan, "tracestate"),
    (NoopSpan, OtelSpan, "carrier"),
])
def test_noop_and_otel_share_every_signature(noop: type, real: type, method: str) -> None:
    """A call site written against one works against the other: the same parameters, kinds and defaults."""
    protocol = tracing_api.Tracer if noop is NoopTracer else tracing_api.Span
    expected = list(inspect.signature(getattr(protocol, method)).parameters.values())
    for cls in (noop, real):
        assert list(inspect.signature(getattr(cls, method)).parameters.values()) == expected, cls


def test_noop_does_nothing_and_allocates_nothing() -> None:
    """Off, a call site costs its method call: every no-op method takes named parameters only (no
    ``*args`` / ``**kwargs`` tuple or dict is built for the call) and returns a shared constant."""
    assert build(None) is NOOP and build(TracingConfig(enabled=False)) is NOOP
    assert NOOP.enabled is False
    for cls in (NoopTracer, NoopSpan):
        assert cls.__slots__ == ()
        for name, method in inspect.getmembers(cls, inspect.isfunction):
            kinds = {p.kind for p in inspect.signature(method).parameters.values()}
            assert not kinds & {inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL}, name
    headers = Headers({b"traceparent": [CLIENT_PARENT.encode()]})
    span = NOOP.request("tools/call", {"name": "get_time"}, server="time", transport="streamable", request_id=1,
                        session_id=SESSION, identity="token:ci", client_ip="10.0.0.7", headers=headers)
    assert span is NOOP_SPAN
    assert span.upstream("stdio", server="time", pid=1) is span and span.child("spawn") is span
    span.set(pid=2, protocol_version="2025-06-18")
    span.end("error", -32603)
    assert span.trace_id is None and span.traceparent() is None and span.tracestate() is None
    assert span.carrier() is EMPTY_CARRIER and span.carrier() is span.carrier()
    fired: list[Any] = []
    NOOP.shutdown().addCallback(fired.append)
    assert fired == [None]


def test_build_without_the_sdk_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mcpgw.tracing.otel")
    monkeypatch.delattr(mcpgw.tracing, "otel")
    for name in [n for n in sys.modules if n.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed: the import stops there
    with pytest.raises(ConfigError, match=r"tracing.enabled: .*mcpgw\[otel\]"):
        build(TracingConfig(enabled=True))
    with pytest.raises(ConfigError, match=r"tracing.enabled: .*opentelemetry.sdk.*mcpgw\[otel\]"):
        parse_tracing({"enabled": True}, environ={})


def test_build_with_the_sdk_gives_the_otel_tracer() -> None:
    tracer = build(TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"), reactor=object())
    assert isinstance(tracer, OtelTracer) and tracer.enabled
    tracer._stop()  # nothing was recorded: no export thread started, nothing is sent


# -- the tracing section of the config --------------------------------------------------------


def test_absent_section_is_off_and_a_present_one_is_on() -> None:
    assert parse_tracing(None, environ={}) == TracingConfig(enabled=False)
    config = parse_tracing({}, environ={})
    assert config.enabled and config.endpoint == DEFAULT_TRACES_ENDPOINT and config.serviceName == "mcpgw"
    assert config.sampleRatio == 1.0 and config.parentBased and not config.recordArguments
    assert not parse_tracing({"enabled": False}, environ={}).enabled


def test_file_values_are_taken() -> None:
    config = parse_tracing({"endpoint": "http://collector:4318", "serviceName": "gw", "sampleRatio": 0.25,
                            "headers": {"x-api-key": "${KEY}"}, "recordArguments": True, "parentBased": False},
                           environ={"KEY": "k-123"})
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert config.serviceName == "gw" and config.sampleRatio == 0.25 and not config.parentBased
    assert config.headers == {"x-api-key": "k-123"} and config.recordArguments
    assert "k-123" not in repr(config)
    assert parse_tracing({"endpoint": "https://c/otlp/v1/traces"}, environ={}).endpoint == "https://c/otlp/v1/traces"


def test_otel_variables_override_the_file() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318/",
        "OTEL_SERVICE_NAME": "mcpgw-prod",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=env%20key,x-team=gw",
    }
    config = parse_tracing({"endpoint": "http://file:4318", "serviceName": "file", "sampleRatio": 1,
                            "headers": {"x-api-key": "file", "x-other": "o"}}, environ=environ)
    assert config.endpoint == "http://otel-collector:4318/v1/traces"
    assert config.serviceName == "mcpgw-prod"
    assert config.sampleRatio == 0.1 and config.parentBased
    assert config.headers == {"x-api-key": "env key", "x-other": "o", "x-team": "gw"}
    traces = parse_tracing({}, environ={**environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/custom"})
    assert traces.endpoint == "http://t:1/custom"


@pytest.mark.parametrize(("environ", "ratio", "parent_based"), [
    ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0, False),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0, True),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 0.5, False),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, 0.3, True),
])
def test_the_sampler_variables(environ: dict[str, str], ratio: float, parent_based: bool) -> None:
    config = parse_tracing({"sampleRatio": 0.3}, environ=environ)
    assert (config.sampleRatio, config.parentBased) == (ratio, parent_based)


def test_service_name_from_resource_attributes() -> None:
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=from%20attrs"}
    assert parse_tracing({"serviceName": "file"}, environ=environ).serviceName == "from attrs"
    assert parse_tracing({}, environ={**environ, "OTEL_SERVICE_NAME": "svc"}).serviceName == "svc"


@pytest.mark.parametrize("environ", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_the_sdk_switches_turn_it_off(environ: dict[str, str]) -> None:
    assert not parse_tracing({"enabled": True}, environ=environ).enabled


def test_otel_traces_exporter_otlp_turns_it_on() -> None:
    """A deployment turns tracing on without editing the file (the compose stack's ``tracing`` profile)."""
    assert parse_tracing(None, environ={"OTEL_TRACES_EXPORTER": "otlp"}).enabled
    assert parse_tracing({"enabled": False}, environ={"OTEL_TRACES_EXPORTER": " OTLP "}).enabled
    assert not parse_tracing(None, environ={}).enabled
    assert not parse_tracing(None, environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}).enabled


@pytest.mark.parametrize(("raw", "environ", "key"), [
    ([], {}, "tracing: must be an object"),
    ({"enabled": "yes"}, {}, "tracing.enabled: must be true or false"),
    ({"sampleRate": 1}, {}, "tracing.sampleRate: unknown key"),
    ({"sampleRatio": 1.5}, {}, "tracing.sampleRatio: must be between 0 and 1"),
    ({"sampleRatio": True}, {}, "tracing.sampleRatio: must be a number"),
    ({"endpoint": "collector:4318"}, {}, "tracing.endpoint: must be an http:// or https:// URL"),
    ({"endpoint": "http://u:p@c:4318"}, {}, "tracing.endpoint: must not carry credentials"),
    ({"serviceName": " "}, {}, "tracing.serviceName: must not be empty"),
    ({"headers": {"x key": "v"}}, {}, "tracing.headers.x key: 'x key' is not a usable header name"),
    ({"headers": {"x-key": "${NOPE}"}}, {}, "tracing.headers.x-key: refers to ${NOPE}, which is not set"),
    ({"headers": {"x-key": "a\nb"}}, {}, "tracing.headers.x-key: must not contain line breaks"),
    ({}, {"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG: must be a number between 0 and 1"),
    ({}, {"OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG: must be between 0 and 1"),
    ({}, {"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER: must be one of"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT: must be an http://"),
    ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, 'OTEL_EXPORTER_OTLP_PROTOCOL: must be "http/protobuf"'),
    ({}, {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS: must be name=value pairs"),
    ({}, {"OTEL_TRACES_EXPORTER": "zipkin"}, 'OTEL_TRACES_EXPORTER: must be "otlp" or "none"'),
])
def test_errors_name_the_key(raw: Any, environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tracing(raw, environ=environ)
    assert str(caught.value).startswith(key), str(caught.value)


def test_the_key_prefix_is_the_callers() -> None:
    with pytest.raises(ConfigError, match=r"^observability\.tracing\.enabled:"):
        parse_tracing({"enabled": 1}, "observability.tracing", environ={})


@pytest.fixture(autouse=True)
def _no_leaked_context() -> Iterator[None]:
    """No test leaves a span current for the next (the tracer never attaches one)."""
    yield
    assert not trace.get_current_span().get_span_context().is_valid


# -- how an answer ended a request (mcpgw.dispatch.outcome_of) -------------------------------

OUTCOMES = [
    (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}', ("ok", None)),
    (b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}', ("tool_error", None)),
    (b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}', ("ok", None)),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}', ("error", -32601)),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"timed out"}}', ("timeout", -32001)),
    (b'{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{}}}', ("input_required", None)),
    # The same members spelled with escapes: an upstream cannot pass a failure off as a success.
    (b'{"jsonrpc":"2.0","id":1,"\\u0065rror":{"code":-32000,"message":"x"}}', ("error", -32000)),
    (b'{"jsonrpc":"2.0","id":1,"result":{"\\u0069sError":true}}', ("tool_error", None)),
    # The words inside text are not members: decoded, and found to be a success.
    (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"\\"error\\" isError"}]}}', ("ok", None)),
]


@pytest.mark.parametrize(("raw", "expected"), OUTCOMES)
def test_an_answers_outcome_whether_or_not_it_is_decoded(raw: bytes, expected: tuple[str, int | None]) -> None:
    """From the bytes alone (a cluster's answer), and from what the session's upstream decoded: the whole
    message, or a large one's route view (its result undecoded)."""
    assert outcome_of(raw) == expected
    assert outcome_of(raw, orjson.loads(raw)) == expected
    assert outcome_of(raw, jsonrpc.route_view(raw)) == expected
