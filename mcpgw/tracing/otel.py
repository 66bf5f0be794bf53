"""The tracer behind ``tracing.enabled``: OpenTelemetry's SDK, spans exported over OTLP/HTTP.

The only module that imports OpenTelemetry (the ``otel`` extra); mcpgw.tracing.build imports it
only when tracing is on.

The reactor never waits on an export: a span's end puts it on the BatchSpanProcessor's queue (a
deque; full, it drops the span), and the processor's own thread encodes the batch and POSTs it to
the collector. ``shutdown`` runs the final flush in the reactor's thread pool.

Every span is started with an explicit parent context (an empty ``Context()`` for a new trace):
nothing is ever attached as the current context, because contextvars do not follow a Deferred's
callbacks from one reactor turn to the next. The provider stays private to the gateway (never the
global one), so an application that embeds mcpgw keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

import mcpgw.tracing.attributes as a
from mcpgw import __version__
from mcpgw.config.observability import TracingConfig
from mcpgw.jsonrpc import dumps
from mcpgw.tracing.api import EMPTY_CARRIER
from mcpgw.tracing.propagation import TRACEPARENT, TRACESTATE, from_headers, from_meta

_W3C = TraceContextTextMapPropagator()


def from_config(config: TracingConfig, reactor: Any, exporter: SpanExporter | None = None) -> OtelTracer:
    """The tracer ``config`` describes: sampled by trace id, batched, exported to ``config.endpoint``.

    ``exporter``: given (a test's InMemorySpanExporter), each span goes to it as it ends, on the
    thread that ends it, and nothing is sent over the network."""
    provider = provider_for(config)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers))))
    return OtelTracer(provider, reactor, record_arguments=config.recordArguments)


def provider_for(config: TracingConfig) -> TracerProvider:
    """A private TracerProvider with ``config``'s sampler and resource, and no span processor yet."""
    sampler: Sampler = TraceIdRatioBased(config.sampleRatio)
    if config.parentBased:
        sampler = ParentBased(sampler)
    resource = Resource.create({"service.name": config.serviceName, "service.version": __version__})
    # shutdown_on_exit=False: the service flushes in stopService (``shutdown``), not an atexit hook
    # that would hold the process for an unreachable collector's timeout.
    return TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)


class OtelTracer:
    """mcpgw.tracing.api.Tracer over an SDK ``TracerProvider`` (tests give one with an in-memory exporter)."""

    enabled = True

    def __init__(self, provider: TracerProvider, reactor: Any, *, record_arguments: bool = False):
        self._provider = provider
        self._tracer = provider.get_tracer("mcpgw", __version__)
        self._reactor = reactor
        self._record_arguments = record_arguments

    def request(self, method: str, params: Any = None, *, server: str | None, transport: str,
                request_id: Any = None, session_id: str | None = None, identity: str | None = None,
                client_ip: str | None = None, headers: Any = None, parent: Mapping[str, str] | None = None) -> OtelSpan:
        target, mcp = a.target_of(method, params)
        mcp[a.METHOD] = a.cut(method)
        attributes: dict[str, Any] = {
            **mcp,
            a.TRANSPORT: transport,
            a.NETWORK_TRANSPORT: "tcp",
            a.NETWORK_PROTOCOL: "websocket" if transport == "ws" else "http",
        }
        if server is not None:
            attributes[a.SERVER] = server
        if request_id is not None:
            attributes[a.REQUEST_ID] = a.cut(request_id)
        if session_id:
            attributes[a.SESSION_ID] = a.session_hash(session_id)
        if identity is not None:
            attributes[a.IDENTITY] = a.cut(identity)
        if client_ip is not None:
            attributes[a.CLIENT_ADDRESS] = client_ip
        if self._record_arguments and method == "tools/call" and isinstance(params, dict) and "arguments" in params:
            _put(attributes, a.TOOL_ARGUMENTS, _json(params["arguments"]))
        context, links = self._parent(params, headers, parent)
        name = a.span_name(mcp[a.METHOD], target)
        span = self._tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes, links=links)
        return OtelSpan(self, span, name, mcp)

    def _parent(self, params: Any, headers: Any, parent: Mapping[str, str] | None) -> tuple[Context, list[Link]]:
        """The parent context, and a link to the HTTP request's context when the message's own is the parent.

        A carrier whose ``traceparent`` does not parse counts as absent (the next one is tried)."""
        hop = _remote(parent)
        if hop is not None:
            return hop, []
        from_message = _remote(from_meta(params.get("_meta")) if isinstance(params, dict) else None)
        from_http = _remote(from_headers(headers))
        if from_message is None:
            return from_http or Context(), []
        links = []
        linked = None if from_http is None else trace.get_current_span(from_http).get_span_context()
        if linked is not None and linked != trace.get_current_span(from_message).get_span_context():
            # The transport's context is not the parent but is worth a link (MCP conventions).
            links.append(Link(linked))
        return from_message, links

    def start(self, name: str, parent: trace.Span, kind: SpanKind, attributes: dict[str, Any], mcp: dict[str, str]) -> OtelSpan:
        span = self._tracer.start_span(name, context=trace.set_span_in_context(parent, Context()), kind=kind,
                                       attributes=attributes)
        return OtelSpan(self, span, name, mcp)

    def shutdown(self) -> Deferred[None]:
        """Flush and stop the exporter in the reactor's thread pool (the last POST may wait on the network)."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._provider.shutdown)


class OtelSpan:
    """mcpgw.tracing.api.Span over an SDK span."""

    __slots__ = ("_ended", "_mcp", "_name", "_span", "_tracer")

    def __init__(self, tracer: OtelTracer, span: trace.Span, name: str, mcp: dict[str, str]):
        self._tracer = tracer
        self._span = span
        self._name = name
        #: The request's MCP attributes (method, tool / prompt / URI): its upstream legs carry them too.
        self._mcp = mcp
        self._ended = False

    @property
    def trace_id(self) -> str | None:
        context = self._span.get_span_context()
        return trace.format_trace_id(context.trace_id) if context.is_valid else None

    def upstream(self, leg: str, *, server: str | None = None, pid: int | None = None, member: str | None = None,
                 node: str | None = None, url: str | None = None) -> OtelSpan:
        attributes: dict[str, Any] = {**self._mcp, a.UPSTREAM: leg}
        network = a.LEG_TRANSPORT.get(leg)
        if network is not None:
            attributes[a.NETWORK_TRANSPORT] = network
        _put(attributes, a.SERVER, server)
        _put(attributes, a.CHILD_PID, pid)
        _put(attributes, a.MEMBER, member)
        _put(attributes, a.NODE, node)
        if url is not None:
            parts = urlsplit(url)
            _put(attributes, a.SERVER_ADDRESS, parts.hostname)
            _put(attributes, a.SERVER_PORT, parts.port or (443 if parts.scheme == "https" else 80))
        return self._tracer.start(self._name, self._span, SpanKind.CLIENT, attributes, self._mcp)

    def child(self, name: str, *, server: str | None = None, pid: int | None = None) -> OtelSpan:
        attributes: dict[str, Any] = {}
        _put(attributes, a.SERVER, server)
        _put(attributes, a.CHILD_PID, pid)
        return self._tracer.start(name, self._span, SpanKind.INTERNAL, attributes, self._mcp)

    def set(self, *, server: str | None = None, tool: str | None = None, prompt: str | None = None,
            uri: str | None = None, protocol_version: str | None = None, session_id: str | None = None,
            pid: int | None = None, member: str | None = None, http_status: int | None = None) -> None:
        attributes: dict[str, Any] = {}
        _put(attributes, a.SERVER, server)
        _put(attributes, a.TOOL, None if tool is None else a.cut(tool))
        _put(attributes, a.PROMPT, None if prompt is None else a.cut(prompt))
        _put(attributes, a.RESOURCE_URI, None if uri is None else a.cut(uri))
        _put(attributes, a.PROTOCOL_VERSION, None if protocol_version is None else a.cut(protocol_version))
        _put(attributes, a.SESSION_ID, a.session_hash(session_id) if session_id else None)
        _put(attributes, a.CHILD_PID, pid)
        _put(attributes, a.MEMBER, member)
        _put(attributes, a.HTTP_STATUS, http_status)
        if attributes:
            self._span.set_attributes(attributes)

    def end(self, outcome: str = "ok", error_code: int | str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._span.set_attribute(a.OUTCOME, outcome)
        if error_code is not None:
            self._span.set_attribute(a.RPC_STATUS, str(error_code))
        if outcome not in a.SUCCESSES:
            self._span.set_attribute(a.ERROR_TYPE, a.error_type(outcome, error_code))
            # No description: a JSON-RPC error message can quote the request's arguments.
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()

    def traceparent(self) -> str | None:
        context = self._span.get_span_context()
        if not context.is_valid:
            return None
        return f"00-{trace.format_trace_id(context.trace_id)}-{trace.format_span_id(context.span_id)}-{context.trace_flags:02x}"

    def tracestate(self) -> str | None:
        state = self._span.get_span_context().trace_state
        return state.to_header() if state else None

    def carrier(self) -> Mapping[str, str]:
        traceparent = self.traceparent()
        if traceparent is None:
            return EMPTY_CARRIER
        tracestate = self.tracestate()
        return {TRACEPARENT: traceparent, TRACESTATE: tracestate} if tracestate else {TRACEPARENT: traceparent}


def _put(attributes: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        attributes[name] = value


def _json(value: Any) -> str | None:
    try:
        return a.cut(dumps(value).decode(), a.MAX_ARGUMENTS)
    except (TypeError, ValueError):  # not JSON data: nothing to record
        return None


def _remote(carrier: Mapping[str, str] | None) -> Context | None:
    """The context ``carrier`` names, built on an empty one (never the ambient), or None if it names none."""
    if not carrier:
        return None
    context = _W3C.extract(carrier, context=Context())
    return context if trace.get_current_span(context).get_span_context().is_valid else None
