"""What every HTTP transport shares: the gateway context, body reading, error replies."""

from __future__ import annotations

import io
from typing import Any

import attrs
from twisted.web.server import Request

from mcpgw import jsonrpc
from mcpgw.audit import NOOP_AUDIT, Audit
from mcpgw.auth import Authenticator
from mcpgw.config import GatewayConfig
from mcpgw.failures import RecentFailures
from mcpgw.metrics import Metrics, NoMetrics
from mcpgw.origin import HostPolicy
from mcpgw.pool import PoolManager
from mcpgw.ratelimit import IRateLimiter, MemoryRateLimiter
from mcpgw.session import SessionManager
from mcpgw.tracing import NOOP, Tracer
from mcpgw.transports.sse import Heartbeat

# Re-exported: the transports import them from here (they live in mcpgw.versions so that pools and
# upstreams can use them without importing the transports).
from mcpgw.versions import DEFAULT_VERSION as DEFAULT_VERSION
from mcpgw.versions import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS


def _authenticator(ctx: GatewayContext) -> Authenticator:
    config = ctx.config
    return Authenticator(config.auth, ctx.reactor, config.trustedProxies, servers=config.servers,
                         default=config.default_server.name)


def _limiter(ctx: GatewayContext) -> IRateLimiter | None:
    rl = ctx.config.rateLimit
    return MemoryRateLimiter(rl.max, rl.window_seconds, ctx.reactor, rl.maxKeys) if rl.enabled else None


@attrs.define
class GatewayContext:
    """What the resources of one gateway share: complete once made (what is not given is built from
    ``config``), so no resource changes it afterwards. The one later change is ``config`` itself,
    replaced whole by mcpgw.control when servers are added or removed at run time."""

    config: GatewayConfig
    sessions: SessionManager
    heartbeat: Heartbeat
    reactor: Any
    #: Who sent each request (``auth``; with it off, every request is anonymous).
    auth: Authenticator = attrs.field(default=attrs.Factory(_authenticator, takes_self=True))
    #: ``rateLimit`` (None: off); mcpgw.tap gives a cluster the Redis one, shared by every instance.
    limiter: IRateLimiter | None = attrs.field(default=attrs.Factory(_limiter, takes_self=True))
    #: mcpgw.metrics.Metrics (NoMetrics: metrics.enabled is false, or a context built in a test).
    metrics: Metrics = attrs.field(factory=NoMetrics)
    #: mcpgw.cluster.Cluster (None: no ``redis`` configured, one instance). Typed Any: the cluster is
    #: built on the transports (its outlets are theirs), so naming its class here would be an import cycle.
    cluster: Any = None
    #: The children of "sessions": "pooled" servers (None: a context built in a test).
    pools: PoolManager | None = None
    #: Host and Origin rules of the listening site (None: the Guards derive them from ``config.host``).
    hosts: HostPolicy | None = None
    #: mcpgw.tracing's Tracer of client requests (NOOP: ``tracing`` is off, or a context built in a test).
    tracer: Tracer = NOOP
    #: mcpgw.audit's trail (NOOP_AUDIT: no ``auditLog``, or a context built in a test).
    audit: Audit = NOOP_AUDIT
    #: The last failed traced or audited calls, with their trace ids (the admin API's /admin/failures).
    failures: RecentFailures = attrs.field(factory=RecentFailures)


@attrs.frozen
class Incoming:
    """One client message: decoded, classified, and the exact bytes to relay."""

    msg: dict[str, Any]
    raw: bytes
    kind: str


class HttpError(Exception):
    """A request refused before any message was relayed."""

    def __init__(self, status: int, code: int, message: str, id: Any = None, headers: dict[bytes, bytes] | None = None,
                 data: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.id = id
        self.headers = headers or {}
        self.data = data


def error_reply(request: Request, status: int, code: int, message: str, id: Any = None, data: Any = None) -> bytes:
    """Set a JSON-RPC error response and return its body for ``render_*``."""
    body = jsonrpc.error_bytes(id, code, message, data)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


#: A new session refused while an operator drains this instance (POST /admin/drain; DELETE undoes it):
#: not a shutdown, so its own reason phrase and message. (HTTP reason phrase, ``error.data.reason``, message.)
DRAINING = ("Draining", "draining", "Service Unavailable: draining: this gateway instance takes no new sessions "
                                    "for now (open sessions go on); retry later or use another instance")
SHUTTING_DOWN = ("Service Unavailable", "shutting down", "gateway is shutting down")


def not_accepting(sessions: Any) -> tuple[str, str, str]:
    """Why ``sessions`` takes no new session: DRAINING or SHUTTING_DOWN."""
    return DRAINING if sessions.draining else SHUTTING_DOWN


def refuse_new_session(request: Request, sessions: Any, id: Any = None) -> bytes:
    """503 (``Retry-After: 5``) for a new session while ``sessions.accepting`` is false."""
    phrase, reason, message = not_accepting(sessions)
    request.setHeader(b"retry-after", b"5")
    body = error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, message, id, data={"reason": reason})
    request.setResponseCode(503, phrase.encode("ascii"))
    return body


def http_error_reply(request: Request, e: HttpError) -> bytes:
    for name, value in e.headers.items():
        request.setHeader(name, value)
    return error_reply(request, e.status, e.code, e.message, e.id, e.data)


def read_body(request: Request, limit: int) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0, 2)
    size = content.tell()
    if size > limit:
        raise HttpError(413, jsonrpc.INVALID_REQUEST, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    content.seek(0)
    # A BytesIO (GatewaySite keeps bodies in memory) hands its buffer over without a copy;
    # read() copies it (its buffer is over-allocated), a MiB per large body.
    return content.getvalue() if isinstance(content, io.BytesIO) else content.read()


def parse_messages(body: bytes, allow_batch: bool = True, max_batch: int | None = None) -> tuple[list[Incoming], bool]:
    """Decode a client body into checked messages; (messages, was_a_batch).

    A body that is one message on one line is relayed as sent; anything else
    is re-encoded onto one line, since the child reads newline-delimited JSON.
    """
    try:
        doc = jsonrpc.parse_body(body)
    except jsonrpc.MessageError as e:
        raise HttpError(400, e.code, e.message) from None
    if isinstance(doc, list):
        if not allow_batch:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "JSON-RPC batches are not supported in this protocol version")
        if not doc:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "empty JSON-RPC batch")
        if max_batch is not None and len(doc) > max_batch:
            raise HttpError(413, jsonrpc.INVALID_REQUEST,
                            f"a batch of {len(doc)} messages exceeds limits.maxBatchMessages ({max_batch})")
        return [_incoming(m, _encode(m)) for m in doc], True
    raw = body.strip()
    if b"\n" in raw or b"\r" in raw:
        raw = _encode(doc)
    return [_incoming(doc, raw)], False


def _encode(msg: Any) -> bytes:
    """One message on one line; a document the encoder refuses (nested too deep) is a 400."""
    try:
        return jsonrpc.dumps(msg)
    except (TypeError, ValueError) as e:
        raise HttpError(400, jsonrpc.INVALID_REQUEST, f"message cannot be relayed: {e}") from None


def _incoming(msg: Any, raw: bytes) -> Incoming:
    try:
        kind = jsonrpc.classify(msg)
    except jsonrpc.MessageError as e:
        id = msg.get("id") if isinstance(msg, dict) and jsonrpc._valid_id(msg.get("id")) else None
        raise HttpError(400, e.code, e.message, id) from None
    return Incoming(msg, raw, kind)


def media_types(header: bytes | None) -> set[str]:
    if not header:
        return set()
    return {part.split(";")[0].strip().lower() for part in header.decode("latin-1").split(",")}


def accepts(types: set[str], wanted: str) -> bool:
    major = wanted.split("/")[0]
    return wanted in types or f"{major}/*" in types or "*/*" in types


def discover_unsupported(id: Any) -> bytes:
    """``server/discover`` (MCP 2026-07-28) answered at once so the client falls back to initialize."""
    return jsonrpc.error_bytes(id, jsonrpc.METHOD_NOT_FOUND, "Method not found: server/discover (use initialize)")
