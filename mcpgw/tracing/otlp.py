"""Finished spans as the body of an OTLP/HTTP export: an ``ExportTraceServiceRequest`` in protobuf wire format.

Written by hand for exactly the fields the gateway's spans use (opentelemetry-proto's
``trace/v1/trace.proto``), because the SDK's generic encoder builds a protobuf message object per
span, attribute and value, which costs the gateway more than everything else tracing does. Here a
batch is one ``bytes.join``: the resource and scope are encoded once per tracer, and a span's
attributes once per distinct set (a session's calls repeat the same method, tool, server, session
and outcome; only the request id, kept apart, differs). The gateway's attribute values are text or
integers (a cache key cannot tell ``True`` from ``1``). Fields come out in field-number order with
the SDK encoder's choices (an UNSET status present but empty, ``flags`` saying whether the parent is
remote), so a collector decodes the same spans as from the SDK's exporter: tests/test_otlp_encoder.py
compares both.

No OpenTelemetry import: the records are mcpgw.tracing.otel's spans, read through ``SpanRecord``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

#: OTLP's Span.SpanKind values.
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
#: Span.flags: the parent's "is remote" is known (bit 8), and it is remote (bit 9).
_FLAGS_LOCAL = b"\x85\x01" + (0x100).to_bytes(4, "little")
_FLAGS_REMOTE = b"\x85\x01" + (0x300).to_bytes(4, "little")
_LINK_FLAGS_REMOTE = b"\x35" + (0x300).to_bytes(4, "little")
_STATUS_UNSET = b"\x7a\x00"
_STATUS_ERROR = b"\x7a\x02\x18\x02"
_KINDS = {kind: b"\x30" + bytes([kind]) for kind in (KIND_INTERNAL, KIND_SERVER, KIND_CLIENT)}
_DOUBLE = struct.Struct("<d")
#: start_time_unix_nano and end_time_unix_nano (fixed64), with their tags.
_TIMES = struct.Struct("<BQBQ")
REQUEST_ID = "jsonrpc.request.id"
_REQUEST_ID_KEY = b"\x0a" + bytes((len(REQUEST_ID),)) + REQUEST_ID.encode()
#: Distinct attribute sets (and span names) kept encoded; past this the cache starts over.
MAX_CACHED = 8192


class SpanRecord(Protocol):
    """What the encoder reads of a finished span (mcpgw.tracing.otel.OtelSpan)."""

    @property
    def trace(self) -> int: ...
    @property
    def span_id(self) -> int: ...
    @property
    def parent_id(self) -> int:
        """0 for a root span."""
    @property
    def parent_remote(self) -> bool: ...
    @property
    def state(self) -> str | None:
        """The W3C ``tracestate`` header value, or None."""
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def stop(self) -> int: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...
    @property
    def request_id(self) -> str | None:
        """``jsonrpc.request.id``, after ``attributes``: it differs on every request, they repeat."""
    @property
    def error(self) -> bool: ...
    @property
    def links(self) -> Sequence[tuple[int, int]]:
        """The linked contexts: (trace id, span id), all remote."""


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` message: string, bool, int or double (what span attributes hold)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8", "replace"))
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _field(b"\x0a", str(value).encode("utf-8", "replace"))


def _text_attribute(key: bytes, text: str) -> bytes:
    """A text attribute as a Span's ``attributes`` field; ``key``: the KeyValue's encoded key field."""
    value = _field(b"\x0a", text.encode("utf-8", "replace"))
    return _field(b"\x4a", key + _field(b"\x12", value))


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message."""
    return _field(b"\x0a", key.encode("utf-8")) + _field(b"\x12", any_value(value))


class Encoder:
    """Encodes batches of one tracer's spans: its resource and scope are fixed, the attribute cache is its own.

    Used from one thread at a time (the export thread)."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None):
        self._resource = _field(b"\x0a", b"".join(_field(b"\x0a", key_value(k, v)) for k, v in resource.items()))
        scope = _field(b"\x0a", scope_name.encode()) + (_field(b"\x12", scope_version.encode()) if scope_version else b"")
        self._scope = _field(b"\x0a", scope)
        #: A span's attributes (all but the request id) encoded, by their items: a session's spans repeat them.
        self._attributes: dict[tuple[tuple[str, Any], ...], bytes] = {}
        self._names: dict[tuple[str, int], bytes] = {}

    def request(self, spans: Iterable[SpanRecord]) -> bytes:
        """The ``ExportTraceServiceRequest`` of ``spans`` (one resource, one scope)."""
        encoded = b"".join([self.span(s) for s in spans])
        scope_spans = _field(b"\x12", self._scope + encoded)
        return _field(b"\x0a", self._resource + scope_spans)

    def span(self, s: SpanRecord) -> bytes:
        """One ``Span`` as the ``spans`` field of a ``ScopeSpans`` (tag, length, message)."""
        head = b"\x0a\x10" + s.trace.to_bytes(16, "big") + b"\x12\x08" + s.span_id.to_bytes(8, "big")
        if s.state:
            head += _field(b"\x1a", s.state.encode())
        if s.parent_id:
            head += b"\x22\x08" + s.parent_id.to_bytes(8, "big")
        name = self._names.get((s.name, s.kind)) or self._name(s.name, s.kind)
        items = tuple(s.attributes.items())
        attributes = self._attributes.get(items)
        if attributes is None:
            attributes = self._cached(items)
        request_id = b"" if s.request_id is None else _text_attribute(_REQUEST_ID_KEY, s.request_id)
        links = b"".join([_field(b"\x6a", b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
                                 + _LINK_FLAGS_REMOTE) for trace_id, span_id in s.links]) if s.links else b""
        body = b"".join((head, name, _TIMES.pack(0x39, s.start, 0x41, s.stop), attributes, request_id, links,
                         _STATUS_ERROR if s.error else _STATUS_UNSET, _FLAGS_REMOTE if s.parent_remote else _FLAGS_LOCAL))
        return b"\x12" + varint(len(body)) + body

    def _cached(self, attributes: tuple[tuple[str, Any], ...]) -> bytes:
        if len(self._attributes) >= MAX_CACHED:
            self._attributes.clear()
        encoded = self._attributes[attributes] = b"".join([_field(b"\x4a", key_value(k, v)) for k, v in attributes])
        return encoded

    def _name(self, name: str, kind: int) -> bytes:
        """The ``name`` and ``kind`` fields."""
        if len(self._names) >= MAX_CACHED:
            self._names.clear()
        encoded = self._names[(name, kind)] = _field(b"\x2a", name.encode("utf-8", "replace")) + _KINDS[kind]
        return encoded
