"""The gateway's spans as the OpenTelemetry SDK's ``ReadableSpan``: for an SDK ``SpanExporter``.

``tracing.build(..., exporter=)`` hands each span to an SDK exporter as it ends, as the SDK's
SimpleSpanProcessor would: the tests' InMemorySpanExporter, or the SDK's own OTLPSpanExporter
(whose generic encoder tests/test_otlp_encoder.py compares with mcpgw.tracing.otlp's).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from mcpgw.tracing.otlp import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, REQUEST_ID, SpanRecord

_KINDS = {KIND_INTERNAL: SpanKind.INTERNAL, KIND_SERVER: SpanKind.SERVER, KIND_CLIENT: SpanKind.CLIENT}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def readable(span: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """``span`` (ended) as the SDK's ReadableSpan."""
    state = TraceState.from_header([span.state]) if span.state else TraceState()
    context = SpanContext(span.trace, span.span_id, is_remote=False, trace_flags=_SAMPLED, trace_state=state)
    parent = None
    if span.parent_id:
        parent = SpanContext(span.trace, span.parent_id, is_remote=span.parent_remote, trace_flags=_SAMPLED,
                             trace_state=state)
    attributes = dict(span.attributes)
    if span.request_id is not None:
        attributes[REQUEST_ID] = span.request_id
    links = [Link(SpanContext(trace_id, span_id, is_remote=True, trace_flags=_SAMPLED)) for trace_id, span_id in span.links]
    return ReadableSpan(
        name=span.name, context=context, parent=parent, resource=resource,
        attributes=MappingProxyType(attributes), links=links, kind=_KINDS[span.kind],
        status=Status(StatusCode.ERROR if span.error else StatusCode.UNSET),
        start_time=span.start, end_time=span.stop, instrumentation_scope=scope,
    )


class SdkSink:
    """Gives each ended span to an SDK ``SpanExporter``, on the thread that ends it."""

    def __init__(self, exporter: SpanExporter, resource: Resource, scope_name: str, scope_version: str):
        self._exporter = exporter
        self._resource = resource
        self._scope = InstrumentationScope(scope_name, scope_version)

    def put(self, span: Any) -> None:
        self._exporter.export((readable(span, self._resource, self._scope),))

    def shutdown(self) -> None:
        self._exporter.shutdown()
