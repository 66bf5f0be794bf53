"""Traces of client requests (OpenTelemetry over OTLP/HTTP), or nothing at all.

``build(config, reactor)`` gives ``NOOP`` unless ``tracing.enabled``; only then is OpenTelemetry
imported (mcpgw.tracing.otel, the ``otel`` extra). The request path holds one Tracer and calls it
the same way either way::

    span = tracer.request(method, msg.get("params"), server=server.name, transport="streamable",
                          request_id=msg["id"], session_id=session.id, identity=owner, client_ip=ip,
                          headers=request.requestHeaders)
    leg = span.upstream("stdio", server=server.name, pid=upstream.pid)
    upstream.send(inject_raw(msg, raw, leg), msg)   # the child's span continues the gateway's
    ...                                             # (a remote server: leg.carrier() as headers)
    leg.end(); span.end("error", -32603)            # or span.end(), span.end("timeout"), ...
    audit.record(AuditEvent(..., trace_id=span.trace_id))

Modules: ``api`` (the Tracer and Span protocols, ``NOOP``), ``attributes`` (the semantic
conventions' names), ``propagation`` (``traceparent`` in and out), ``otel`` (the spans, over the SDK's
propagator, resource and sampler arithmetic), ``otlp`` (their OTLP protobuf encoding), ``export``
(the queue and thread that POST them), ``sdk`` (them as the SDK's ReadableSpan, for ``exporter=``).
"""

from __future__ import annotations

from typing import Any

from mcpgw.config.checks import ConfigError
from mcpgw.config.observability import TracingConfig
from mcpgw.tracing.api import NOOP, NOOP_SPAN, Span, Tracer
from mcpgw.tracing.propagation import extract, inject, inject_line, inject_meta, inject_raw

__all__ = ["NOOP", "NOOP_SPAN", "Span", "Tracer", "build", "extract", "inject", "inject_line", "inject_meta", "inject_raw"]


def build(config: TracingConfig | None, reactor: Any = None, *, exporter: Any = None) -> Tracer:
    """``NOOP`` when tracing is off (None, or not ``enabled``), else the OpenTelemetry tracer ``config`` describes.

    ``reactor``: whose thread pool runs the final flush (default: the global reactor). ``exporter``: an
    SDK SpanExporter that gets every span as it ends, in place of the batched OTLP export (tests give the
    SDK's InMemorySpanExporter). Raises ConfigError when tracing is on and the OpenTelemetry SDK is not
    installed."""
    if config is None or not config.enabled:
        return NOOP
    try:
        from mcpgw.tracing import otel
    except ImportError as e:
        if not (e.name or "").startswith("opentelemetry"):
            raise
        raise ConfigError("tracing.enabled", f"needs the OpenTelemetry SDK ({e.name} is not installed): pip install 'mcpgw[otel]'") from None
    if reactor is None:
        from twisted.internet import reactor
    return otel.from_config(config, reactor, exporter=exporter)
