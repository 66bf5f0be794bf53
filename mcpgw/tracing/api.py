"""The tracer and span every call site uses, and the no-op pair that stands for them when tracing is off.

Call sites never branch on whether tracing is on: they call the same methods on ``NOOP`` (a tracer
whose every method returns a shared constant) or on the OpenTelemetry-backed tracer
(mcpgw.tracing.otel). Every optional fact is a keyword-only parameter, not ``**attributes``: a call
to the no-op then builds no dict, so tracing off costs one method call per call site and allocates
nothing. tests/test_tracing_unit.py holds the two implementations to the same signatures.

Parents are always passed explicitly (a span's ``upstream`` / ``child``, or a carrier given to
``request``): OpenTelemetry's ambient context lives in contextvars, which do not follow a
Deferred's callbacks from one reactor turn to the next, so no span is ever made "current".
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

#: The carrier of a span that propagates nothing.
EMPTY_CARRIER: Mapping[str, str] = MappingProxyType({})


class Span(Protocol):
    """One timed operation: a client request, an upstream leg, a setup step."""

    @property
    def trace_id(self) -> str | None:
        """The trace's id, 32 hex digits (for audit lines and the console); None when tracing is off."""

    def upstream(self, leg: str, *, server: str | None = None, pid: int | None = None, member: str | None = None,
                 node: str | None = None, url: str | None = None) -> Span:
        """The MCP client span of this request's call upstream (kind CLIENT, named like the request).

        ``leg``: "stdio" (write to the child -> its reply), "remote" (the HTTP POST), "pool" (dispatch
        to a pooled child), "aggregate" (one member, ``member``), "cluster" (the hop to ``node``)."""

    def child(self, name: str, *, server: str | None = None, pid: int | None = None) -> Span:
        """An internal step under this span: "spawn", "initialize", a queue wait."""

    def set(self, *, server: str | None = None, tool: str | None = None, prompt: str | None = None,
            uri: str | None = None, protocol_version: str | None = None, session_id: str | None = None,
            pid: int | None = None, member: str | None = None, http_status: int | None = None) -> None:
        """Facts learned after the span began (None: not given); ``session_id`` is hashed."""

    def end(self, outcome: str = "ok", error_code: int | str | None = None) -> None:
        """Close it: "ok" (or "input_required", no failure either), or the failure ("error", "tool_error",
        "timeout", "cancelled", ...) and the JSON-RPC error code if there is one. A second call changes nothing.
        Its latest ``upstream`` leg, if still open, ends with it (the same moment and outcome)."""

    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` that makes the receiver's span a child of this one; None when off."""

    def tracestate(self) -> str | None:
        """The W3C ``tracestate`` carried along (a client's vendors' entries), or None."""

    def carrier(self) -> Mapping[str, str]:
        """``traceparent`` / ``tracestate`` as headers for a remote upstream or a cluster message (empty when off)."""


class Tracer(Protocol):
    """Makes the span of each client request; ``NOOP`` or mcpgw.tracing.otel.OtelTracer."""

    @property
    def enabled(self) -> bool:
        """False for ``NOOP``: a caller may skip work whose only use is tracing (re-encoding a message)."""

    def request(self, method: str, params: Any = None, *, server: str | None, transport: str,
                request_id: Any = None, session_id: str | None = None, identity: str | None = None,
                client_ip: str | None = None, headers: Any = None, parent: Mapping[str, str] | None = None) -> Span:
        """The MCP server span of one client request.

        ``params``: the request's params as the client sent them (its tool, prompt or URI and its
        ``_meta`` trace context are read from it; arguments only with ``tracing.recordArguments``).
        ``transport``: "streamable", "sse" or "ws". ``headers``: the client's HTTP request headers (a
        twisted.web ``Headers``, or a mapping with lowercase names), whose ``traceparent`` is the parent
        when ``params._meta`` has none. ``parent``: a carrier from the gateway's own earlier hop (the
        cluster message), which wins over both."""

    def shutdown(self) -> Deferred[None]:
        """Export what is buffered and stop (the service's stopService); fires when done."""


class NoopSpan:
    """The span of every request while tracing is off: each method does nothing and returns a constant."""

    __slots__ = ()

    trace_id: str | None = None

    def upstream(self, leg: str, *, server: str | None = None, pid: int | None = None, member: str | None = None,
                 node: str | None = None, url: str | None = None) -> NoopSpan:
        return self

    def child(self, name: str, *, server: str | None = None, pid: int | None = None) -> NoopSpan:
        return self

    def set(self, *, server: str | None = None, tool: str | None = None, prompt: str | None = None,
            uri: str | None = None, protocol_version: str | None = None, session_id: str | None = None,
            pid: int | None = None, member: str | None = None, http_status: int | None = None) -> None:
        return None

    def end(self, outcome: str = "ok", error_code: int | str | None = None) -> None:
        return None

    def traceparent(self) -> str | None:
        return None

    def tracestate(self) -> str | None:
        return None

    def carrier(self) -> Mapping[str, str]:
        return EMPTY_CARRIER


NOOP_SPAN = NoopSpan()


class NoopTracer:
    """The tracer while tracing is off (``NOOP``)."""

    __slots__ = ()

    enabled = False

    def request(self, method: str, params: Any = None, *, server: str | None, transport: str,
                request_id: Any = None, session_id: str | None = None, identity: str | None = None,
                client_ip: str | None = None, headers: Any = None, parent: Mapping[str, str] | None = None) -> NoopSpan:
        return NOOP_SPAN

    def shutdown(self) -> Deferred[None]:
        return succeed(None)


NOOP = NoopTracer()
