"""W3C trace context in and out of the gateway: HTTP headers, ``params._meta``, the cluster's messages.

In: a client's trace continues from its ``params._meta`` (``traceparent`` / ``tracestate``, the MCP
semantic conventions' carrier, SEP-414) or else from its HTTP request's headers. Out: the gateway's
span goes to a stdio or pooled child in ``params._meta`` (``inject_meta`` / ``inject_raw``, copies:
the client's own objects are never changed) and to a remote server or another cluster node as
headers (``Span.carrier()``).

Values are only picked out and bounded here; the OpenTelemetry propagator (mcpgw.tracing.otel)
parses them, and a malformed one starts a new trace. No OpenTelemetry import: this module works,
and does nothing, without the ``otel`` extra.
"""

from __future__ import annotations

from typing import Any

from mcpgw.jsonrpc import dumps
from mcpgw.tracing.api import Span

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: A version-00 traceparent is 55 characters; later versions may append fields.
MAX_TRACEPARENT = 128
#: W3C Trace Context: 32 list members, and a receiver should pass on at least 512 characters.
MAX_TRACESTATE = 512


def from_headers(headers: Any) -> dict[str, str] | None:
    """The carrier in a client's HTTP headers: a twisted.web ``Headers`` or a mapping with lowercase names."""
    if headers is None:
        return None
    get_raw = getattr(headers, "getRawHeaders", None)
    if get_raw is not None:
        parents = get_raw(b"traceparent")
        if not parents or len(parents) != 1:  # W3C: more than one traceparent is no parent
            return None
        states = get_raw(b"tracestate")
    else:
        parents = _as_list(headers.get(TRACEPARENT))
        if not parents or len(parents) != 1:
            return None
        states = _as_list(headers.get(TRACESTATE))
    # Several tracestate headers are one list, joined with commas (RFC 9110 field lines).
    return _carrier(parents[0], b",".join(_bytes(s) for s in states) if states else None)


def from_meta(meta: Any) -> dict[str, str] | None:
    """The carrier in a request's ``params._meta``."""
    if not isinstance(meta, dict):
        return None
    return _carrier(meta.get(TRACEPARENT), meta.get(TRACESTATE))


def extract(headers: Any, meta: Any) -> dict[str, str] | None:
    """The parent of a client request's span: ``params._meta``'s context, else the HTTP headers'.

    The MCP conventions put the message's own context first: one HTTP request can carry several
    MCP messages (a batch, a WebSocket), and an MCP message outlives a retried HTTP request."""
    return from_meta(meta) or from_headers(headers)


def inject_meta(params: Any, span: Span) -> Any:
    """``params`` with ``_meta.traceparent`` (and ``tracestate``) of ``span``, as a new object.

    The client's ``params`` and ``_meta`` are copied, never changed (they may be referred to
    elsewhere: a replay buffer, a retry). ``params`` itself when ``span`` propagates nothing (tracing
    off) or when it is not an object (positional params, which MCP does not use)."""
    traceparent = span.traceparent()
    if traceparent is None or not (params is None or isinstance(params, dict)):
        return params
    old_meta = params.get("_meta") if params is not None else None
    meta = dict(old_meta) if isinstance(old_meta, dict) else {}
    meta[TRACEPARENT] = traceparent
    tracestate = span.tracestate()
    if tracestate:
        meta[TRACESTATE] = tracestate
    else:
        meta.pop(TRACESTATE, None)  # the client's, which belongs to the client's span, not ours
    return {**(params or {}), "_meta": meta}


def inject_raw(msg: dict[str, Any], raw: bytes, span: Span) -> bytes:
    """The bytes to send upstream for request ``msg`` (``raw`` as received): ``raw`` itself when ``span``
    propagates nothing, else ``msg`` encoded again with ``inject_meta``'s params. ``msg`` is not changed."""
    params = msg.get("params")
    injected = inject_meta(params, span)
    if injected is params:
        return raw
    return dumps({**msg, "params": injected})


def inject(msg: dict[str, Any], raw: bytes, span: Span) -> tuple[dict[str, Any], bytes]:
    """Request ``msg`` (``raw`` as received) as it goes upstream under ``span``: both unchanged when ``span``
    propagates nothing, else a new message whose ``params._meta`` carries its context, and its encoding.

    Both, because an upstream may read either: a stdio child gets the bytes, a pool re-encodes the message,
    a remote upstream reads its ``traceparent`` header off the message (``trace_headers``)."""
    params = msg.get("params")
    injected = inject_meta(params, span)
    if injected is params:
        return msg, raw
    sent = {**msg, "params": injected}
    return sent, dumps(sent)


def inject_line(msg: dict[str, Any], raw: bytes, span: Span) -> bytes:
    """What ``inject_raw`` gives, for an upstream that reads only the bytes (a stdio child): when request
    ``msg`` (``raw`` decoded, as jsonrpc.classify accepted it) has no member but ``jsonrpc``, ``id``,
    ``method`` and an object ``params`` without ``_meta`` (what the SDKs send), the context is written into
    ``raw`` as it is, with no decoding or encoding again; anything else goes through ``inject_raw``."""
    params = msg.get("params")
    traceparent = span.traceparent()
    if traceparent is None or type(params) is not dict or "_meta" in params or len(msg) != 4 or span.tracestate():
        return inject_raw(msg, raw, span)
    # The first ``"params":{`` is the top level's: every other member is a scalar (classify), so no object
    # opens before it, and a JSON string cannot hold it (its quotes are escaped).
    head, key, tail = raw.partition(b'"params":{')
    if not key:  # (whitespace in it: encoded again)
        return inject_raw(msg, raw, span)
    return b"".join((head, b'"params":{"_meta":{"traceparent":"', traceparent.encode(),
                     b'"}' if tail[0] == 0x7D else b'"},', tail))


def trace_headers(msg: Any) -> dict[bytes, bytes] | None:
    """The ``traceparent`` (and ``tracestate``) a message carries in ``params._meta``, checked as a
    client's are, as HTTP headers for a remote upstream; None when it carries none."""
    params = msg.get("params") if isinstance(msg, dict) else None
    carrier = from_meta(params.get("_meta")) if isinstance(params, dict) else None
    if carrier is None:
        return None
    return {name.encode("ascii"): value.encode("ascii") for name, value in carrier.items()}


def _carrier(traceparent: Any, tracestate: Any) -> dict[str, str] | None:
    parent = _text(traceparent, MAX_TRACEPARENT)
    if parent is None:
        return None
    state = _text(tracestate, MAX_TRACESTATE)
    return {TRACEPARENT: parent, TRACESTATE: state} if state else {TRACEPARENT: parent}


def _text(value: Any, limit: int) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > limit:
        return None
    value = value.strip()
    return value if value and value.isprintable() else None


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("ascii", "replace")
