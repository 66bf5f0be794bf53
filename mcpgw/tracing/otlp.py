"""Finished spans as the body of an OTLP/HTTP export: an ``ExportTraceServiceRequest`` in protobuf wire format.

Written by hand for exactly the fields the gateway's spans use (opentelemetry-proto's
``trace/v1/trace.proto``), because the SDK's generic encoder builds a protobuf message object per
span, attribute and value, which costs the gateway more than everything else tracing does. Here a
span is one ``bytes.join`` of parts mostly encoded before: the resource and scope once per tracer,
a span's attributes once per template the tracer keeps (a session's calls repeat the same method,
tool, server and session), its outcome's once per outcome and code; only the ids, times and request
id are new. The gateway's attribute values are text or integers (a cache key cannot tell ``True``
from ``1``). Fields come out in field-number order with the SDK encoder's choices (an UNSET status
present but empty, ``flags`` saying whether the parent is remote), so a collector decodes the same
spans as from the SDK's exporter: tests/test_otlp_encoder.py compares both.

No OpenTelemetry import: the records are mcpgw.tracing.otel's spans, read through ``SpanRecord``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mcpgw.tracing.attributes import outcome_attributes

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
#: status and flags, by (error, parent remote).
_TAILS = ((_STATUS_UNSET + _FLAGS_LOCAL, _STATUS_UNSET + _FLAGS_REMOTE),
          (_STATUS_ERROR + _FLAGS_LOCAL, _STATUS_ERROR + _FLAGS_REMOTE))
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
    def attributes(self) -> Mapping[str, Any]:
        """``base`` and the outcome's, as encoded (all but the request id)."""
    @property
    def trace_bytes(self) -> bytes:
        """The trace id's 16 bytes."""
    @property
    def id_bytes(self) -> bytes:
        """The span id's 8 bytes."""
    @property
    def parent_bytes(self) -> bytes:
        """The parent span id's 8 bytes, empty for a root span."""
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
    def base(self) -> Mapping[str, Any]:
        """The attributes it started with: read only and shared by other spans unless ``private``."""
    @property
    def private(self) -> bool:
        """Whether ``base`` is the span's own (made or changed for it) rather than a kept template."""
    @property
    def outcome(self) -> str | None:
        """How it ended (``mcpgw.outcome``, after ``base``), None if it has not."""
    @property
    def error_code(self) -> int | str | None: ...
    @property
    def request_id(self) -> str | None:
        """``jsonrpc.request.id``, after the outcome: it differs on every request, the rest repeat."""
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
    """Encodes one tracer's spans: its resource and scope are fixed, the caches are its own.

    ``span`` runs where spans end (the reactor: a span is a few dozen bytes by then, and nothing
    holds its objects until an export), ``envelope`` where batches go out (the export thread)."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None):
        self._resource = _field(b"\x0a", b"".join(_field(b"\x0a", key_value(k, v)) for k, v in resource.items()))
        scope = _field(b"\x0a", scope_name.encode()) + (_field(b"\x12", scope_version.encode()) if scope_version else b"")
        self._scope = _field(b"\x0a", scope)
        #: A span's own attributes encoded, by their items; a kept template's by its id (the entry holds
        #: the template, so the id is not another's while the entry lasts); outcomes by outcome and code.
        self._attributes: dict[tuple[tuple[str, Any], ...], bytes] = {}
        self._templates: dict[int, tuple[Any, ...]] = {}
        self._outcomes: dict[tuple[str | None, Any], bytes] = {}
        self._names: dict[tuple[str, int], bytes] = {}
        #: A request's template (by id) -> its leg's, and the pair's forms (``_form``) by request id length.
        self._pairs: dict[int, tuple[Any, ...]] = {}

    def request(self, spans: Iterable[SpanRecord]) -> bytes:
        """The ``ExportTraceServiceRequest`` of ``spans`` (one resource, one scope)."""
        return self.envelope([self.span(s) for s in spans])

    def envelope(self, spans: list[bytes]) -> bytes:
        """The ``ExportTraceServiceRequest`` of spans encoded by ``span`` (their bytes copied once)."""
        size = len(self._scope) + sum(map(len, spans))
        head = b"\x12" + varint(size)
        return b"".join((b"\x0a", varint(len(self._resource) + len(head) + size), self._resource, head, self._scope, *spans))

    def pair(self, leg: SpanRecord, s: SpanRecord) -> bytes:
        """``span`` of both, a request's span and the upstream leg under it that ended with it (the leg first).

        The usual pair (answered "ok", no trace state or links, a short request id, both attributes from
        kept templates) is one ``Struct.pack`` of a form kept for its templates, parent and request id
        length (``_form``): its constant bytes made once, only the ids, times and request id given."""
        kept = self._pairs.get(id(s.base))
        request_id = s.request_id
        if (kept is not None and kept[0] is s.base and kept[1] is leg.base and request_id is not None
                and s.outcome == "ok" and s.error_code is None and not s.state and not s.links):
            try:
                rid = request_id.encode()
            except UnicodeEncodeError:  # (a lone surrogate: "replace"d by ``span``)
                rid = b""
            n = len(rid)
            parent = s.parent_bytes
            if 0 < n < _SHORT_ID and (not parent or s.parent_remote):
                trace, span_id, stop = s.trace_bytes, s.id_bytes, s.stop
                if parent:
                    form = kept[3][n] or self._form(kept, n, True)
                    return form[0](form[1], trace, b"\x12\x08", leg.id_bytes, b"\x22\x08", span_id, form[2], leg.start,
                                   b"\x41", stop, form[3], trace, b"\x12\x08", span_id, b"\x22\x08", parent, form[4],
                                   s.start, b"\x41", stop, form[5], rid, form[6])
                form = kept[2][n] or self._form(kept, n, False)
                return form[0](form[1], trace, b"\x12\x08", leg.id_bytes, b"\x22\x08", span_id, form[2], leg.start,
                               b"\x41", stop, form[3], trace, b"\x12\x08", span_id, form[4], s.start, b"\x41", stop,
                               form[5], rid, form[6])
        encoded = self.span(leg) + self.span(s)  # (which keeps the templates, for the form of the next)
        if not s.private and not leg.private and s.kind == KIND_SERVER:
            entry = self._templates.get(id(s.base))
            leg_entry = self._templates.get(id(leg.base))
            if entry is not None and leg_entry is not None and entry[0] is s.base and leg_entry[0] is leg.base:
                if len(self._pairs) >= MAX_CACHED:
                    self._pairs.clear()
                self._pairs[id(s.base)] = (s.base, leg.base, [None] * _SHORT_ID, [None] * _SHORT_ID, entry, leg_entry)
        return encoded

    def _form(self, kept: tuple[Any, ...], n: int, parent: bool) -> tuple[Any, ...]:
        """The pair's form for a request id of ``n`` bytes (and a remote parent, or none): the ``pack`` of a
        Struct and the constant parts between its ids, times and request id, as ``span`` encodes them."""
        entry, leg_entry = kept[4], kept[5]
        tail = _TAILS[False][parent]
        leg_tail = _TAILS[False][False]
        prefix = _REQUEST_ID_PREFIXES[n]
        leg_n = 38 + len(leg_entry[3]) + 18 + len(leg_entry[4]) + len(_OUTCOME_OK) + len(leg_tail)
        span_n = 28 + (10 if parent else 0) + len(entry[3]) + 18 + len(entry[4]) + len(_OUTCOME_OK) + len(prefix) + n + len(tail)
        parts = (
            b"\x12" + varint(leg_n) + b"\x0a\x10",
            leg_entry[3] + b"\x39",
            leg_entry[4] + _OUTCOME_OK + leg_tail + b"\x12" + varint(span_n) + b"\x0a\x10",
            entry[3] + b"\x39",
            entry[4] + _OUTCOME_OK + prefix,
            tail,
        )
        layout = (f"<{len(parts[0])}s16s2s8s2s8s{len(parts[1])}sQ1sQ{len(parts[2])}s16s2s8s"
                  + ("2s8s" if parent else "") + f"{len(parts[3])}sQ1sQ{len(parts[4])}s{n}s{len(parts[5])}s")
        form = (struct.Struct(layout).pack, *parts)
        kept[3 if parent else 2][n] = form
        return form

    def span(self, s: SpanRecord) -> bytes:
        """One ``Span`` as the ``spans`` field of a ``ScopeSpans`` (tag, length, message)."""
        parent = s.parent_bytes
        head = b"".join((b"\x0a\x10", s.trace_bytes, b"\x12\x08", s.id_bytes,
                         _field(b"\x1a", s.state.encode()) if s.state else b"", b"\x22\x08" + parent if parent else b""))
        name = self._names.get((s.name, s.kind)) or self._name(s.name, s.kind)
        base = s.base
        if s.private:
            items = tuple(base.items())
            attributes = self._attributes.get(items) or self._cached(items)
        else:
            kept = self._templates.get(id(base))
            if kept is None or kept[0] is not base or kept[1] is not s.name or kept[2] != s.kind:
                kept = self._template(base, s.name, s.kind)
            attributes = kept[4]
        if s.outcome == "ok" and s.error_code is None:
            outcome = _OUTCOME_OK
        else:
            outcome = self._outcomes.get((s.outcome, s.error_code)) or self._outcome(s.outcome, s.error_code)
        request_id = b"" if s.request_id is None else _request_id(s.request_id)
        links = b"".join([_field(b"\x6a", b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
                                 + _LINK_FLAGS_REMOTE) for trace_id, span_id in s.links]) if s.links else b""
        body = b"".join((head, name, _TIMES.pack(0x39, s.start, 0x41, s.stop), attributes, outcome, request_id, links,
                         _TAILS[s.error][s.parent_remote]))
        n = len(body)
        return (_SPAN_TAGS[n] if n < len(_SPAN_TAGS) else b"\x12" + varint(n)) + body

    def _cached(self, attributes: tuple[tuple[str, Any], ...]) -> bytes:
        if len(self._attributes) >= MAX_CACHED:
            self._attributes.clear()
        encoded = self._attributes[attributes] = _attribute_fields(attributes)
        return encoded

    def _template(self, base: Mapping[str, Any], name: str, kind: int) -> tuple[Any, ...]:
        """A kept template's entry: itself, the span name and kind it is used with, their fields, its attributes'."""
        if len(self._templates) >= MAX_CACHED:
            self._templates.clear()
        kept = self._templates[id(base)] = (base, name, kind, self._names.get((name, kind)) or self._name(name, kind),
                                            _attribute_fields(base.items()))
        return kept

    def _outcome(self, outcome: str | None, error_code: Any) -> bytes:
        if len(self._outcomes) >= MAX_CACHED:
            self._outcomes.clear()
        encoded = b"" if outcome is None else _attribute_fields(outcome_attributes(outcome, error_code).items())
        self._outcomes[(outcome, error_code)] = encoded
        return encoded

    def _name(self, name: str, kind: int) -> bytes:
        """The ``name`` and ``kind`` fields."""
        if len(self._names) >= MAX_CACHED:
            self._names.clear()
        encoded = self._names[(name, kind)] = _field(b"\x2a", name.encode("utf-8", "replace")) + _KINDS[kind]
        return encoded


def _request_id(value: str) -> bytes:
    """The ``jsonrpc.request.id`` attribute field (``_text_attribute``, its prefix looked up when short)."""
    encoded = value.encode("utf-8", "replace")
    if len(encoded) < len(_REQUEST_ID_PREFIXES):
        return _REQUEST_ID_PREFIXES[len(encoded)] + encoded
    return _text_attribute(_REQUEST_ID_KEY, value)


def _attribute_fields(attributes: Iterable[tuple[str, Any]]) -> bytes:
    """Span ``attributes`` fields (KeyValue messages)."""
    return b"".join([_field(b"\x4a", key_value(k, v)) for k, v in attributes])


#: The attribute fields ``Span.end`` adds for ("ok", no code), and the request id's field up to its
#: value, by the value's length in bytes (one-byte lengths only).
_OUTCOME_OK = _attribute_fields(outcome_attributes("ok", None).items())
#: Request ids shorter than this (in bytes) have a pair form of their own.
_SHORT_ID = 100
_REQUEST_ID_PREFIXES = tuple(_text_attribute(_REQUEST_ID_KEY, "x" * n)[:-n or None] for n in range(100))
#: A ``spans`` field's tag and length, by the length of a span (up to 2 KiB; few are over 500 bytes).
_SPAN_TAGS = tuple(b"\x12" + varint(n) for n in range(2048))
