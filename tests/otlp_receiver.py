"""An OTLP/HTTP trace receiver on 127.0.0.1: what a collector does with ``POST /v1/traces``.

It decodes the body as an ``ExportTraceServiceRequest`` (opentelemetry-proto's own message, gzip
or not), keeps every span with its resource's attributes and the request's headers, and answers
200 with an ``ExportTraceServiceResponse``, as the OTLP/HTTP specification has a collector do. A
body of another content type gets 415, one that does not decode 400, another path 404.

``received(n)`` is a Deferred that fires with the spans once ``n`` have arrived: a test waits on it,
not on a clock.
"""

from __future__ import annotations

import gzip
from typing import Any

import attrs
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

PROTOBUF = b"application/x-protobuf"


@attrs.frozen
class ReceivedSpan:
    """One exported span as the receiver decoded it."""

    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        result[pair.key] = value(pair.value)
    return result


class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port) once ``start`` is called; ``stop`` closes it."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self.spans: list[ReceivedSpan] = []
        #: The headers of each export request (lowercase names).
        self.headers: list[dict[str, str]] = []
        self._waiters: list[tuple[int, Deferred[list[ReceivedSpan]]]] = []
        self._port: Any = None

    def start(self) -> str:
        """Listen; the base URL (``http://127.0.0.1:<port>``) an exporter appends ``/v1/traces`` to."""
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"traces", _Traces(self))
        self._port = self._reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def stop(self) -> Deferred[None]:
        return self._port.stopListening()

    def received(self, count: int) -> Deferred[list[ReceivedSpan]]:
        """Fires with every span kept once there are at least ``count``."""
        d: Deferred[list[ReceivedSpan]] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def keep(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        self.headers.append(headers)
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(span, resource, scope_spans.scope.name))
        self._wake()

    def _wake(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.spans) >= n]
        self._waiters = [(n, d) for n, d in self._waiters if len(self.spans) < n]
        for _, d in ready:
            d.callback(list(self.spans))


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: OtlpReceiver):
        super().__init__()
        self._receiver = receiver

    def render_POST(self, request: Request) -> bytes:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != PROTOBUF:
            request.setResponseCode(415)
            return b"only application/x-protobuf"
        assert request.content is not None
        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"").lower() == b"gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(body)
        except DecodeError:
            request.setResponseCode(400)
            return b"not an ExportTraceServiceRequest"
        headers = {name.decode().lower(): values[-1].decode() for name, values in request.requestHeaders.getAllRawHeaders()}
        self._receiver.keep(message, headers)
        request.setHeader(b"content-type", PROTOBUF)
        return ExportTraceServiceResponse().SerializeToString()
