"""What the request-path tests of issue 19 observe a gateway with: its spans and its audit trail, in memory.

``observe(harness)`` puts a real OpenTelemetry tracer (``mcpgw.tracing.build`` with the SDK's
InMemorySpanExporter in place of the OTLP export) and an ``AuditTrail`` on the gateway's context,
where the request path (mcpgw.dispatch) reads them at each request. The tracer is the production
one (mcpgw.tracing.otel): only where its finished spans go differs.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet.defer import Deferred, succeed

from mcpgw import tracing
from mcpgw.audit import AuditEvent, encode
from mcpgw.config.observability import TracingConfig
from tests.harness import HOST, PORT, Connection, Harness

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


class Traced:
    """The production tracer, its finished spans kept in memory."""

    def __init__(self, config: TracingConfig | None = None):
        self.exporter = InMemorySpanExporter()
        self.tracer = tracing.build(config or TracingConfig(enabled=True), None, exporter=self.exporter)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name and (kind is None or s.kind == kind)]

    def one(self, name: str, kind: SpanKind | None = None) -> ReadableSpan:
        found = self.named(name, kind)
        assert len(found) == 1, [(s.name, s.kind) for s in self.spans()]
        return found[0]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]

    def clear(self) -> None:
        self.exporter.clear()


class AuditTrail:
    """An audit trail (mcpgw.audit.Audit) that keeps its events: ``lines()`` are what AuditLog would write."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(encode(event)) for event in self.events]

    def text(self) -> bytes:
        return b"".join(encode(event) for event in self.events)


def observe(harness: Harness, traced: Traced | None = None, audit: AuditTrail | None = None) -> None:
    """Give ``harness``'s gateway this tracer and audit trail (its context is read at each request)."""
    ctx = harness.gateway.service.context  # type: ignore[attr-defined]
    if traced is not None:
        ctx.tracer = traced.tracer
    if audit is not None:
        ctx.audit = audit


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


def span_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_span_id(span.context.span_id)


def parent_hex(span: ReadableSpan) -> str | None:
    return None if span.parent is None else trace.format_span_id(span.parent.span_id)


def traceparent_of(span: ReadableSpan) -> str:
    return f"00-{trace_hex(span)}-{span_hex(span)}-01"


# -- a WebSocket client over a harness Connection ----------------------------------------


def ws_open(harness: Harness, path: str = "/ws", headers: dict[str, str] | None = None) -> Connection:
    """The upgrade, as a browser or the SDK sends it; the connection once the gateway answered 101."""
    conn = harness.connect()
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{PORT}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: mcp",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    conn.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert harness.run_until(lambda: b"\r\n\r\n" in conn.received, 5.0), conn.received
    assert conn.received.startswith(b"HTTP/1.1 101"), conn.received
    # The upgrade hands the socket to the WebSocket protocol (Autobahn sets it as the transport's protocol):
    # what the client sends from now on is read by it, as a socket's reads would be.
    conn.channel = conn.transport.protocol
    return conn


def ws_send(conn: Connection, message: Any) -> None:
    """One JSON-RPC message as a masked text frame (RFC 6455 section 5.2)."""
    payload = json.dumps(message).encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    conn.send(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def ws_messages(conn: Connection) -> list[Any]:
    """Every text frame the gateway sent on ``conn``, decoded."""
    data = conn.received[conn.received.index(b"\r\n\r\n") + 4:]
    out = []
    while len(data) >= 2:
        opcode, n, i = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, i = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, i = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < i + n:
            break
        if opcode == 0x1:
            out.append(json.loads(data[i:i + n]))
        data = data[i + n:]
    return out


def ws_answer(harness: Harness, conn: Connection, id: Any, timeout: float = 10.0) -> Any:
    """The answer to request ``id`` once it has come."""
    def answered() -> bool:
        return any(isinstance(m, dict) and m.get("id") == id and "method" not in m for m in ws_messages(conn))

    assert harness.run_until(answered, timeout), ws_messages(conn)
    return next(m for m in ws_messages(conn) if isinstance(m, dict) and m.get("id") == id and "method" not in m)
