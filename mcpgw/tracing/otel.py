"""The tracer behind ``tracing.enabled``: spans recorded by the gateway, exported over OTLP/HTTP.

The only module the request path reaches that imports OpenTelemetry (the ``otel`` extra);
mcpgw.tracing.build imports it only when tracing is on. What comes from the OpenTelemetry SDK: the
W3C propagator that parses a client's ``traceparent`` / ``tracestate``, the ``Resource`` (service
name and version, the SDK's telemetry attributes and ``OTEL_RESOURCE_ATTRIBUTES``), the sampler's
arithmetic (TraceIdRatioBased, ParentBased) and, behind the ``exporter`` seam, its span exporters.

What is the gateway's own: the span objects and the export. A span is a small object with its
attributes in one dict given at its start (a template the tracer keeps, shared by a session's
spans), and ids from ``random.getrandbits``; its end encodes it straight to OTLP protobuf
(mcpgw.tracing.otlp), with its upstream leg when that ends with it, and queues the bytes for a
thread that POSTs batches (mcpgw.tracing.export). The SDK's span (locks, BoundedAttributes, a
Resource per span, one call per attribute) and its generic encoder (a protobuf object per
attribute) cost more than the rest of a proxied call; the wire format, names, kinds, parents,
links and attributes are the same (the SDK's encoder and ours are compared in
tests/test_otlp_encoder.py).

Every span has an explicit parent (a remote carrier, or the span it is under): nothing is read from
or attached to OpenTelemetry's ambient context, which lives in contextvars that do not follow a
Deferred's callbacks from one reactor turn to the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from random import getrandbits
from time import time_ns
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.web.http_headers import Headers

import mcpgw.tracing.attributes as a
from mcpgw import __version__
from mcpgw.config.observability import TracingConfig
from mcpgw.jsonrpc import dumps
from mcpgw.tracing.export import BatchExport, OtlpHttp, Settings
from mcpgw.tracing.otlp import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, Encoder
from mcpgw.tracing.propagation import TRACEPARENT, TRACESTATE, from_headers, from_meta

_W3C = TraceContextTextMapPropagator()
SCOPE = "mcpgw"
#: Tool names whose span name and attributes are kept (past this the cache starts over).
MAX_TOOLS = 1024
MAX_TEMPLATES = 4096
#: A remote parent: trace id, span id, sampled, tracestate header (or None).
Remote = tuple[int, int, bool, "str | None"]


def from_config(config: TracingConfig, reactor: Any, exporter: SpanExporter | None = None) -> OtelTracer:
    """The tracer ``config`` describes: sampled by trace id, batched, exported to ``config.endpoint``.

    ``exporter``: given (an SDK SpanExporter: a test's InMemorySpanExporter, or the SDK's own
    OTLPSpanExporter), each sampled span goes to it as an SDK ReadableSpan as it ends, on the thread
    that ends it, and nothing else is sent."""
    resource = resource_for(config)
    if exporter is not None:
        from mcpgw.tracing.sdk import SdkSink

        sdk = SdkSink(exporter, resource, SCOPE, __version__)
        return OtelTracer(sdk.put, sdk.shutdown, reactor, config)
    settings = Settings.from_environ(os.environ)
    http = OtlpHttp(config.endpoint, config.headers, settings)
    encoder = Encoder(resource.attributes, SCOPE, __version__)
    batches = BatchExport(encoder.envelope, http.send,
                          max_batch=settings.max_batch, max_queue=settings.max_queue, interval=settings.interval)

    def ended(span: OtelSpan, encode: Callable[[OtelSpan], bytes] = encoder.span, put: Callable[[bytes], None] = batches.put) -> None:
        put(encode(span))  # encoded as it ends: see mcpgw.tracing.export

    def ended_pair(leg: OtelSpan, span: OtelSpan, encode: Callable[[OtelSpan, OtelSpan], bytes] = encoder.pair,
                   put: Callable[[bytes], None] = batches.put) -> None:
        put(encode(leg, span))

    def stop() -> None:
        batches.shutdown()
        http.close()

    return OtelTracer(ended, stop, reactor, config, sink_pair=ended_pair)


def resource_for(config: TracingConfig) -> Resource:
    """The SDK's resource of the gateway (``OTEL_RESOURCE_ATTRIBUTES`` and the telemetry.sdk.* attributes included)."""
    return Resource.create({"service.name": config.serviceName, "service.version": __version__})


class OtelTracer:
    """mcpgw.tracing.api.Tracer: ``sink`` takes each sampled span as it ends, ``stop`` flushes (blocking)."""

    enabled = True

    def __init__(self, sink: Callable[[OtelSpan], None], stop: Callable[[], None], reactor: Any, config: TracingConfig,
                 sink_pair: Callable[[OtelSpan, OtelSpan], None] | None = None):
        self.sink = sink
        #: Takes a span and its upstream leg that ended with it (``OtelSpan.end``), the leg first.
        self.sink_pair = sink_pair or self._each
        self._stop = stop
        self._reactor = reactor
        self._record_arguments = config.recordArguments
        #: The sampler's threshold on a trace id's low 64 bits (TraceIdRatioBased's arithmetic).
        self._bound = TraceIdRatioBased.get_bound_for_rate(config.sampleRatio)
        #: Every trace is sampled (ratio 1): no trace id is read.
        self._every = self._bound > 0xFFFFFFFFFFFFFFFF
        self._parent_based = config.parentBased
        self._tools: dict[str, tuple[str, dict[str, str]]] = {}
        self._templates = Templates()
        #: (tool, transport, server, session, identity, client address) -> the span name, the MCP
        #: attributes and the attribute template of a call of that tool (``request``'s usual case).
        self._calls: dict[tuple[Any, ...], tuple[str, dict[str, str], dict[str, Any]]] = {}

    def _sampled(self, trace: bytes) -> bool:
        """TraceIdRatioBased's decision: the trace id's low 64 bits under the bound (every one at ratio 1)."""
        return self._every or int.from_bytes(trace[8:], "big") < self._bound

    def _each(self, leg: OtelSpan, span: OtelSpan) -> None:
        self.sink(leg)
        self.sink(span)

    def request(self, method: str, params: Any = None, *, server: str | None, transport: str,
                request_id: Any = None, session_id: str | None = None, identity: str | None = None,
                client_ip: str | None = None, headers: Any = None, parent: Mapping[str, str] | None = None) -> OtelSpan:
        # The usual request first, in one lookup: a tool this session called before, no trace context
        # but perhaps the headers'. Anything else (and the first call) takes ``_request``, which keeps
        # what this one looks up.
        if method == "tools/call" and parent is None and type(params) is dict:
            tool = params.get("name")
            meta = params.get("_meta")
            if type(tool) is str and (meta is None or (type(meta) is dict and TRACEPARENT not in meta)):  # (a progress token is no context)
                known = self._calls.get((tool, transport, server, session_id, identity, client_ip))
                # (from_headers, inlined for the usual request: no traceparent header)
                if known is not None and (headers is None or (type(headers) is Headers and not headers.hasHeader(b"traceparent"))):
                    trace = (getrandbits(128) or 1).to_bytes(16, "big")
                    sampled = self._every or self._sampled(trace)
                    span = OtelSpan(self, trace, b"", sampled, None, known[0], KIND_SERVER, known[1])
                    if sampled:
                        span.base = known[2]
                        if request_id is not None:
                            text = request_id if type(request_id) is str else str(request_id)
                            span.request_id = text if len(text) <= a.MAX_VALUE else text[:a.MAX_VALUE]  # (a.cut)
                    return span
        return self._request(method, params, server, transport, request_id, session_id, identity, client_ip, headers, parent)

    def _request(self, method: str, params: Any, server: str | None, transport: str, request_id: Any,
                 session_id: str | None, identity: str | None, client_ip: str | None, headers: Any,
                 parent: Mapping[str, str] | None) -> OtelSpan:
        name, mcp, known_tool = self._named(method, params)
        links: tuple[tuple[int, int], ...] = ()
        if parent is None and (params is None or (type(params) is dict and "_meta" not in params)):
            remote = _remote(from_headers(headers))  # the usual case: the headers' context or none
        else:
            remote, links = self._parent(params, headers, parent)
        if remote is None:
            trace = (getrandbits(128) or 1).to_bytes(16, "big")
            span = OtelSpan(self, trace, b"", self._sampled(trace), None, name, KIND_SERVER, mcp)
        else:
            trace_id, parent_id, parent_sampled, state = remote
            trace = trace_id.to_bytes(16, "big")
            sampled = parent_sampled if self._parent_based else self._sampled(trace)
            span = OtelSpan(self, trace, parent_id.to_bytes(8, "big"), sampled, state, name, KIND_SERVER, mcp)
        if span.sampled:
            span.links = links
            if self._record_arguments or not known_tool:
                span.base = self._request_attributes(mcp, method, params, server, transport, session_id,
                                                     identity, client_ip)
                span.private = True
            else:  # a known tool's: the same attributes as the session's last call of it
                key = (id(mcp), transport, server, session_id, identity, client_ip)
                known = self._templates.get(key)
                if known is None:
                    known = self._templates.keep(key, mcp, self._request_attributes(mcp, method, params, server, transport,
                                                                               session_id, identity, client_ip))
                span.base = known
                if len(self._calls) >= MAX_TEMPLATES:
                    self._calls.clear()
                self._calls[(params["name"], transport, server, session_id, identity, client_ip)] = (name, mcp, known)
            if request_id is not None:
                span.request_id = a.cut(request_id)
        return span

    def _named(self, method: str, params: Any) -> tuple[str, dict[str, str], bool]:
        """The span's name and MCP attributes (never changed once made: the request's spans share them),
        and whether they are a known tool's.

        A ``tools/call``'s are kept by tool name: the same few tools are called over and over."""
        tool = params.get("name") if method == "tools/call" and type(params) is dict else None
        if type(tool) is str:
            known = self._tools.get(tool)
            if known is not None:
                return known[0], known[1], True
        target, mcp = a.target_of(method, params)
        mcp[a.METHOD] = a.cut(method)
        name = a.span_name(mcp[a.METHOD], target)
        if type(tool) is str and len(tool) <= a.MAX_NAME_TARGET:
            if len(self._tools) >= MAX_TOOLS:
                self._tools.clear()
            self._tools[tool] = (name, mcp)
        return name, mcp, False

    def _request_attributes(self, mcp: dict[str, str], method: str, params: Any, server: str | None, transport: str,
                            session_id: str | None, identity: str | None, client_ip: str | None) -> dict[str, Any]:
        """The server span's attributes but ``jsonrpc.request.id`` (the span's ``request_id``)."""
        attributes: dict[str, Any] = {
            **mcp,
            a.TRANSPORT: transport,
            a.NETWORK_TRANSPORT: "tcp",
            a.NETWORK_PROTOCOL: "websocket" if transport == "ws" else "http",
        }
        if server is not None:
            attributes[a.SERVER] = server
        if session_id:
            attributes[a.SESSION_ID] = a.session_hash(session_id)
        if identity is not None:
            attributes[a.IDENTITY] = a.cut(identity)
        if client_ip is not None:
            attributes[a.CLIENT_ADDRESS] = client_ip
        if self._record_arguments and method == "tools/call" and isinstance(params, dict) and "arguments" in params:
            _put(attributes, a.TOOL_ARGUMENTS, _json(params["arguments"]))
        return attributes

    def _parent(self, params: Any, headers: Any, parent: Mapping[str, str] | None) -> tuple[Remote | None, tuple[tuple[int, int], ...]]:
        """The remote parent, and a link to the HTTP request's context when the message's own is the parent.

        A carrier whose ``traceparent`` does not parse counts as absent (the next one is tried)."""
        hop = _remote(parent)
        if hop is not None:
            return hop, ()
        from_message = _remote(from_meta(params.get("_meta")) if isinstance(params, dict) else None)
        from_http = _remote(from_headers(headers))
        if from_message is None:
            return from_http, ()
        if from_http is not None and from_http[:3] != from_message[:3]:
            # The transport's context is not the parent but is worth a link (MCP conventions).
            return from_message, ((from_http[0], from_http[1]),)
        return from_message, ()

    def shutdown(self) -> Deferred[None]:
        """Flush and stop the export in the reactor's thread pool (the last POST may wait on the network)."""
        if self._reactor is None:
            self._stop()
            return succeed(None)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._stop)


class Templates:
    """Attribute dicts a span starts with, kept by what they are made of: a session's calls repeat them.

    A key holds ``id()`` of the MCP attributes it was made from; the entry holds that dict, so the id
    cannot be reused by another while the entry exists. Past ``MAX_TEMPLATES`` entries it starts over.
    A template is used with one span name and kind only (a request's: its tool's; a leg's: its
    request's, CLIENT): the OTLP encoder keeps each one's encoded name and attributes by its id."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], tuple[dict[str, str], dict[str, Any]]] = {}

    def get(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        kept = self.entries.get(key)
        return None if kept is None else kept[1]

    def keep(self, key: tuple[Any, ...], mcp: dict[str, str], attributes: dict[str, Any]) -> dict[str, Any]:
        if len(self.entries) >= MAX_TEMPLATES:
            self.entries.clear()
        self.entries[key] = (mcp, attributes)
        return attributes


class OtelSpan:
    """mcpgw.tracing.api.Span, and the record mcpgw.tracing.otlp encodes (its ``SpanRecord`` fields): a
    request's span (SERVER), its upstream leg (CLIENT), a step under it (INTERNAL).

    A span that is not sampled keeps its ids (they propagate, with the sampled flag clear) and
    records nothing."""

    __slots__ = ("_leg", "_mcp", "_tracer", "base", "error_code", "id_bytes", "kind", "links", "name", "outcome",
                 "parent_bytes", "private", "request_id", "sampled", "start", "state", "stop", "trace_bytes")

    def __init__(self, tracer: OtelTracer, trace_bytes: bytes, parent_bytes: bytes, sampled: bool, state: str | None,
                 name: str, kind: int, mcp: dict[str, str]):
        self._tracer = tracer
        #: The ids as they are written (OTLP, ``traceparent``): the trace's 16 bytes, its own 8, its
        #: parent's 8 (empty for a root span), made once and shared with the spans under it.
        self.trace_bytes = trace_bytes
        self.id_bytes = (getrandbits(64) or 1).to_bytes(8, "big")
        self.parent_bytes = parent_bytes
        self.sampled = sampled
        self.state = state
        self.name = name
        self.kind = kind
        #: The request's MCP attributes (method, tool / prompt / URI): its upstream legs carry them too.
        self._mcp = mcp
        #: The attributes given at its start: a template the tracer keeps and other spans share (read
        #: only) unless ``private``, the span's own dict.
        self.base: dict[str, Any] = _NONE
        self.private = False
        #: How it ended (``end``): its outcome attributes are added to ``base``'s when it is encoded.
        self.outcome: str | None = None
        self.error_code: int | str | None = None
        self.links: tuple[tuple[int, int], ...] = ()
        #: Its latest upstream leg (``upstream``), ended with it if still open.
        self._leg: OtelSpan | None = None
        self.request_id: str | None = None
        self.start = time_ns()
        #: 0 until it ends.
        self.stop = 0

    @property
    def parent_remote(self) -> bool:
        """A request's span has a remote parent if any (a client's, another instance's); a step's is local."""
        return self.kind == KIND_SERVER and bool(self.parent_bytes)

    @property
    def trace_id(self) -> str | None:
        return self.trace_bytes.hex()

    @property
    def trace(self) -> int:
        return int.from_bytes(self.trace_bytes, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.id_bytes, "big")

    @property
    def parent_id(self) -> int:
        """0 for a root span."""
        return int.from_bytes(self.parent_bytes, "big")

    @property
    def error(self) -> bool:
        """Status ERROR (without a description: a JSON-RPC error message can quote the request's arguments)."""
        return self.outcome is not None and self.outcome not in a.SUCCESSES

    @property
    def attributes(self) -> dict[str, Any]:
        """All its attributes but the request id, in the order they are encoded (mcpgw.tracing.otlp)."""
        attributes = dict(self.base)
        if self.outcome is not None:
            attributes.update(a.outcome_attributes(self.outcome, self.error_code))
        return attributes

    def _own(self) -> dict[str, Any]:
        """``base`` as the span's own dict, to change."""
        if not self.private:
            self.base = dict(self.base)
            self.private = True
        return self.base

    def upstream(self, leg: str, *, server: str | None = None, pid: int | None = None, member: str | None = None,
                 node: str | None = None, url: str | None = None) -> OtelSpan:
        # (_under, inlined: every traced request has a leg; a leg is sampled as its span is, see _under)
        span = OtelSpan(self._tracer, self.trace_bytes, self.id_bytes, self.sampled, self.state, self.name, KIND_CLIENT, self._mcp)
        if not span.sampled:  # (its ids still propagate)
            return span
        self._leg = span
        templates = self._tracer._templates
        key = (id(self._mcp), leg, server, pid, member, node, url)
        kept = templates.entries.get(key)
        span.base = (templates.keep(key, self._mcp, self._leg_attributes(leg, server, pid, member, node, url))
                     if kept is None else kept[1])
        return span

    def _leg_attributes(self, leg: str, server: str | None, pid: int | None, member: str | None, node: str | None,
                        url: str | None) -> dict[str, Any]:
        attributes = {**self._mcp, a.UPSTREAM: leg}
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
        return attributes

    def child(self, name: str, *, server: str | None = None, pid: int | None = None) -> OtelSpan:
        span = self._under(name, KIND_INTERNAL)
        if span.sampled and (server is not None or pid is not None):
            attributes = span._own()
            _put(attributes, a.SERVER, server)
            _put(attributes, a.CHILD_PID, pid)
        return span

    def _under(self, name: str, kind: int) -> OtelSpan:
        tracer = self._tracer
        sampled = self.sampled if tracer._parent_based else tracer._sampled(self.trace_bytes)
        return OtelSpan(tracer, self.trace_bytes, self.id_bytes, sampled, self.state, name, kind, self._mcp)

    def set(self, *, server: str | None = None, tool: str | None = None, prompt: str | None = None,
            uri: str | None = None, protocol_version: str | None = None, session_id: str | None = None,
            pid: int | None = None, member: str | None = None, http_status: int | None = None) -> None:
        if self.stop or not self.sampled:
            return
        attributes = self._own()
        _put(attributes, a.SERVER, server)
        _put(attributes, a.TOOL, None if tool is None else a.cut(tool))
        _put(attributes, a.PROMPT, None if prompt is None else a.cut(prompt))
        _put(attributes, a.RESOURCE_URI, None if uri is None else a.cut(uri))
        _put(attributes, a.PROTOCOL_VERSION, None if protocol_version is None else a.cut(protocol_version))
        _put(attributes, a.SESSION_ID, a.session_hash(session_id) if session_id else None)
        _put(attributes, a.CHILD_PID, pid)
        _put(attributes, a.MEMBER, member)
        _put(attributes, a.HTTP_STATUS, http_status)

    def end(self, outcome: str = "ok", error_code: int | str | None = None) -> None:
        if self.stop:
            return
        self.stop = time_ns()
        if not self.sampled:
            return
        self.outcome = outcome
        self.error_code = error_code
        leg = self._leg
        if leg is None or leg.stop:
            self._leg = None  # (a leg refers to its span: no cycle left for the collector)
            self._tracer.sink(self)
            return
        # The leg still open ends now too, as the span did (the answer that ends a request ends its
        # leg): both go out together, the leg first.
        leg.stop = self.stop
        leg.outcome = outcome
        leg.error_code = error_code
        self._tracer.sink_pair(leg, self)

    def traceparent(self) -> str | None:
        return f"00-{self.trace_bytes.hex()}-{self.id_bytes.hex()}-{'01' if self.sampled else '00'}"

    def tracestate(self) -> str | None:
        return self.state

    def carrier(self) -> Mapping[str, str]:
        traceparent = self.traceparent()
        assert traceparent is not None
        return {TRACEPARENT: traceparent, TRACESTATE: self.state} if self.state else {TRACEPARENT: traceparent}


#: The ``base`` of a span with no attributes of its own (shared, never changed).
_NONE: dict[str, Any] = {}


def _put(attributes: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        attributes[name] = value


def _json(value: Any) -> str | None:
    try:
        return a.cut(dumps(value).decode(), a.MAX_ARGUMENTS)
    except (TypeError, ValueError):  # not JSON data: nothing to record
        return None


def _remote(carrier: Mapping[str, str] | None) -> Remote | None:
    """The context ``carrier`` names (the SDK's W3C propagator parses it), or None if it names none."""
    if not carrier:
        return None
    context = trace.get_current_span(_W3C.extract(carrier, context=Context())).get_span_context()
    if not context.is_valid:
        return None
    return context.trace_id, context.span_id, context.trace_flags.sampled, context.trace_state.to_header() or None
