"""The Resource tree: status pages, every server's transports, and the guards in front of them."""

from __future__ import annotations

import io
import os
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mcpgw import __version__, dispatch, jsonrpc, logs
from mcpgw.aggregate import AggregateUpstream
from mcpgw.auth import Authenticator, InsufficientScope, Principal, Unauthorized, principal_of
from mcpgw.channel import ADMIT, ChannelLimits, Connections, GatewayChannel
from mcpgw.config import ServerConfig
from mcpgw.connections import ClosedAtOnce
from mcpgw.oauth.metadata import well_known
from mcpgw.origin import HostPolicy
from mcpgw.ratelimit import Decision
from mcpgw.request import GatewayRequest, HeadChecked, IHeadChecked, head_decision
from mcpgw.responding import gone
from mcpgw.toolpolicy import forbidden_reply
from mcpgw.transports.common import GatewayContext, error_reply
from mcpgw.transports.legacy import MessagesEndpoint, SseEndpoint
from mcpgw.transports.streamable import StreamableEndpoint
from mcpgw.transports.websocket import websocket_resource
from mcpgw.upstream import innermost

ALLOW_HEADERS = b"Content-Type, Authorization, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, Mcp-Method, Mcp-Name"


def _json(request: Request, obj: Any, status: int = 200) -> bytes:
    body = jsonrpc.dumps(obj)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _param_headers(request: Request) -> bytes:
    """The ``Mcp-Param-*`` headers a preflight asks for (MCP 2026-07-28 x-mcp-header), to allow them too."""
    asked = request.getHeader(b"access-control-request-headers") or b""
    names = [n.strip() for n in asked.split(b",")]
    params = [n for n in names if n.lower().startswith(b"mcp-param-") and re.fullmatch(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+", n)]
    return b"".join(b", " + n for n in params)


def unauthorized_reply(auth: Authenticator, request: Request, e: Unauthorized) -> bytes:
    """401 with ``WWW-Authenticate: Bearer ...`` (RFC 6750; with ``resource_metadata``, RFC 9728); 503 with
    ``Retry-After`` when the authorization server that would decide cannot be asked."""
    if e.status == 503:
        request.setHeader(b"retry-after", b"5")
        return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.description}")
    request.setHeader(b"www-authenticate", auth.challenge(e, request))
    return error_reply(request, 401, jsonrpc.CONNECTION_CLOSED, f"Unauthorized: {e.description}")


def _refusal(failure: Failure) -> Unauthorized:
    failure.trap(Unauthorized)
    assert isinstance(failure.value, Unauthorized)
    return failure.value


class Guard(Resource):
    """Everything a request to an MCP endpoint passes first, in this order:

    1. Host: one of the gateway's own names when the listen interfaces or
       ``allowedHosts`` say which (DNS rebinding; spec basic/transports, security
       warning; mcpgw.origin.HostPolicy); 403.
    2. Origin: 403 unless allowed; CORS headers, and preflights answered here.
    3. Authentication (``ctx.auth``): the credentials are checked and removed,
       a Principal is attached; 401 with ``WWW-Authenticate: Bearer``.
    4. Rate limit (``ctx.limiter``, keyed by identity, else client IP): 429 with
       ``Retry-After``; ``RateLimit-*`` on every answer. Counted before the 401,
       so guessing tokens is limited per address too.

    Every transport (Streamable HTTP, HTTP+SSE, the WebSocket upgrade) sits
    behind one; ``/health`` and ``/ready`` do not.
    """

    isLeaf = True
    log = Logger(observer=logs.observer)
    #: The endpoint's labels for mcp_gateway_rate_limited_requests_total (set by ServerResource).
    transport = "other"
    server_name = "other"

    def __init__(self, inner: IResource, ctx: GatewayContext):
        super().__init__()
        self._inner = inner
        self._metrics = ctx.metrics
        self._cors = ctx.config.cors
        #: Host and Origin rules from the interfaces the gateway listens on (mcpgw.origin).
        self._policy: HostPolicy = ctx.hosts if ctx.hosts is not None else HostPolicy.for_listens(ctx.config)
        self._auth: Authenticator = ctx.auth
        self._limiter = ctx.limiter
        #: Its tracer and audit trail, read at each refusal (mcpgw.dispatch.refused_http).
        self._ctx = ctx

    def origin_allowed(self, origin: str, request: Request) -> bool:
        """Listed; or any with ``*`` (only loopback origins on a loopback bind); or same-origin with
        a Host that is the gateway's own (HostPolicy.origin_allowed)."""
        return self._policy.origin_allowed(origin, request.getHeader(b"host"))

    @staticmethod
    def decided(verdict: Any, request: Any) -> Any:
        """A limiter that answered later decided on ``request``'s head (GatewaySite.head_received)."""
        request.guard_verdict = verdict
        if verdict is not ADMIT:
            request.head_reply = verdict
        return verdict

    def render(self, request: Request) -> Any:
        reply, verdict = head_decision(request)
        if reply is not None:
            return reply  # refused on the head (or its body was over maxBodyBytes)
        if verdict is None:
            verdict = self.check(request)  # a request that did not come through GatewayChannel
        if verdict is ADMIT:
            return self._inner.render(request)
        if isinstance(verdict, Deferred):
            # A limiter that answers later (a shared store): finish the request then.
            verdict.addCallback(self._render_later, request)
            verdict.addErrback(lambda f: self.log.failure("guard failed", f))
            return NOT_DONE_YET
        return verdict

    def check(self, request: Request) -> Any:
        """Host, Origin, authentication, rate limit: ADMIT, or the body of the refusal (status and
        headers set on ``request``), or a Deferred firing with one of them."""
        if not self._policy.host_allowed(request.getHeader(b"host")):
            return error_reply(request, 403, jsonrpc.CONNECTION_CLOSED, "Forbidden: invalid Host header")
        origin_b = request.getHeader(b"origin")
        if origin_b is not None:
            origin = origin_b.decode("latin-1")
            if not self.origin_allowed(origin, request):
                return error_reply(request, 403, jsonrpc.CONNECTION_CLOSED, "Forbidden: Origin not allowed")
            if self._cors.enabled:
                self._cors_headers(request, origin, origin_b)
                if request.method == b"OPTIONS":
                    request.setResponseCode(204)
                    request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS")
                    request.setHeader(b"access-control-allow-headers", ALLOW_HEADERS + _param_headers(request))
                    request.setHeader(b"access-control-max-age", b"86400")
                    return b""
        server = self.server_name if self.server_name != "other" else None
        try:
            found = self._auth.principal(request, server)
        except Unauthorized as e:
            return self._limit(request, e)
        if isinstance(found, Principal):  # (rather than isinstance(found, Deferred): an ABC check, slower)
            if self._limiter is None and self._auth.oauth is None:
                return ADMIT  # no limit to count, no scopes to check
            return self._limit(request, self._auth.scope_refusal(found, server))
        # A Deferred: an OAuth access token, checked by its authorization server's keys or introspection.
        return found.addCallbacks(lambda principal: self._limit(request, self._auth.scope_refusal(principal, server)),
                                  lambda failure: self._limit(request, _refusal(failure)))

    def _limit(self, request: Request, refusal: Unauthorized | InsufficientScope | None) -> Any:
        """The rate limit, then ``refusal`` (counted first, so guessing tokens is limited per address too)."""
        if self._limiter is None:
            return self._admit(request, None, refusal)
        principal = principal_of(request)
        assert principal is not None  # attached by Authenticator.principal, even when refused
        outcome: list[Any] = []
        try:
            d = self._limiter.hit(principal.rate_key)
        except Exception:  # noqa: BLE001 - a failing limiter lets the request through (logged in _admit)
            outcome.append(Failure())
        else:
            d.addBoth(outcome.append)
        if outcome:
            return self._admit(request, outcome[0], refusal)
        decided: Deferred[Any] = Deferred()
        d.addCallback(lambda _: decided.callback(self._admit(request, outcome[0], refusal)))
        d.addErrback(lambda f: self.log.failure("guard failed", f))
        return decided

    def _cors_headers(self, request: Request, origin: str, origin_b: bytes) -> None:
        """Fetch spec: ``*`` is sent literally (and never with credentials); a listed origin is
        echoed with ``Vary: Origin`` and may send credentials."""
        listed = self._policy.listed(origin)
        if self._policy.literal_wildcard(origin):
            request.setHeader(b"access-control-allow-origin", b"*")
        else:
            request.setHeader(b"access-control-allow-origin", origin_b)
            request.setHeader(b"vary", b"Origin")
            if listed:
                request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(b"access-control-expose-headers", b"Mcp-Session-Id")

    def _admit(self, request: Request, outcome: Decision | Failure | None,
               refusal: Unauthorized | InsufficientScope | None) -> Any:
        if isinstance(outcome, Failure):
            self.log.failure("rate limiter failed; request let through", outcome)
        elif outcome is not None:
            for name, value in outcome.headers():
                request.setHeader(name, value)
            if not outcome.allowed:
                self._metrics.rate_limited(self.transport, self.server_name)
                body = error_reply(
                    request, 429, jsonrpc.CONNECTION_CLOSED,
                    f"Too Many Requests: more than {outcome.limit} per {outcome.window:g} s; retry after {outcome.retry_after} s",
                )
                request.setResponseCode(429, b"Too Many Requests")
                dispatch.refused_http(self._ctx, request, "rate_limited", 429, server=self.server_name, transport=self.transport)
                return body
        if isinstance(refusal, Unauthorized):
            dispatch.refused_http(self._ctx, request, "unauthorized" if refusal.status != 503 else "unavailable",
                                  refusal.status, server=self.server_name, transport=self.transport)
            return unauthorized_reply(self._auth, request, refusal)
        if refusal is not None:
            dispatch.refused_http(self._ctx, request, "forbidden", 403, server=self.server_name, transport=self.transport)
            return forbidden_reply(self._auth, request, refusal)
        return ADMIT

    def _render_later(self, verdict: Any, request: Request) -> Any:
        if gone(request):
            return verdict
        try:
            body = self._inner.render(request) if verdict is ADMIT else verdict
        except Exception:  # noqa: BLE001 - what twisted.web does for a render that raises
            request.processingFailed(Failure())
            return verdict
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()
        return verdict


class ServerResource(Resource):
    """``/servers/NAME/{sse,messages,mcp}`` (and the root paths for the default server)."""

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__()
        self.putChild(b"sse", _guarded(SseEndpoint(ctx, server), ctx, "sse", server.name))
        self.putChild(b"messages", _guarded(MessagesEndpoint(ctx, server), ctx, "sse", server.name))
        self.putChild(b"mcp", _guarded(StreamableEndpoint(ctx, server), ctx, "streamable", server.name))
        self.putChild(b"ws", _guarded(websocket_resource(ctx, server), ctx, "ws", server.name))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        return NotFound().render(request)


def _guarded(inner: IResource, ctx: GatewayContext, transport: str, server: str) -> Resource:
    """``inner`` behind its Guard, with its error replies counted (``Metrics.wrap``; as is without metrics)."""
    guard = Guard(inner, ctx)
    guard.transport, guard.server_name = transport, server
    return HeadChecked(ctx.metrics.wrap(guard, transport, server), guard)


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, {"error": "not found", "path": request.path.decode("latin-1")}, 404)


class ServersIndex(Resource):
    """``GET /servers``: the configured servers, their paths and live sessions."""

    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self._ctx = ctx
        for name, server in ctx.config.servers.items():
            self.putChild(name.encode(), ServerResource(ctx, server))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NotFound()

    def render_GET(self, request: Request) -> Any:
        ctx = self._ctx
        try:
            found = ctx.auth.principal(request)  # what the gateway runs is not for anonymous eyes
        except Unauthorized as e:
            return unauthorized_reply(ctx.auth, request, e)
        if isinstance(found, Principal):
            return self._index(request)
        # An OAuth access token: answered once it is checked.
        body: Deferred[bytes] = found.addCallbacks(lambda _: self._index(request),
                                                   lambda f: unauthorized_reply(ctx.auth, request, _refusal(f)))
        body.addCallback(_finish, request)
        return NOT_DONE_YET

    def _index(self, request: Request) -> bytes:
        ctx = self._ctx
        default = ctx.config.default_server.name
        servers = []
        for name, server in ctx.config.servers.items():
            base = f"/servers/{name}"
            servers.append({
                "name": name,
                "default": name == default,
                "command": server.command if server.kind == "stdio" else "",
                **_server_kind(ctx, server),
                "paths": {"sse": f"{base}/sse", "messages": f"{base}/messages", "mcp": f"{base}/mcp", "ws": f"{base}/ws"},
                "sessions": ctx.sessions.count(name),
            })
        return _json(request, {"servers": servers})


def _finish(body: bytes, request: Request) -> None:
    if not gone(request):
        request.write(body)
        request.finish()


def _server_kind(ctx: GatewayContext, server: ServerConfig) -> dict[str, Any]:
    """``kind`` and what belongs to it in ``/servers``: a remote's URL (never its headers), an aggregate's
    members with the number of its live sessions in which each one is down (mcpgw.aggregate)."""
    if server.kind == "remote":
        return {"kind": "remote", "url": server.url, "transport": server.transport}
    if server.kind == "aggregate":
        sessions = [s for s in ctx.sessions.sessions.values() if s.server.name == server.name]
        members = []
        for member in server.members:
            down = [up.member_down(member.name) for s in sessions
                    if isinstance(up := innermost(s.upstream), AggregateUpstream)]
            reasons = sorted({r for r in down if r})
            members.append({"name": member.name, "kind": member.kind, "downIn": sum(1 for r in down if r),
                            "reasons": reasons[:5]})
        return {"kind": "aggregate", "members": members, "separator": server.separator, "prefix": server.prefix}
    return {"kind": server.kind}


class Health(Resource):
    isLeaf = True

    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self._ctx = ctx
        self._started = ctx.reactor.seconds()

    def render_GET(self, request: Request) -> bytes:
        body = {
            "status": "healthy",
            "version": __version__,
            "sessions": len(self._ctx.sessions.sessions),
            "uptime": round(self._ctx.reactor.seconds() - self._started, 3),
        }
        if self._ctx.cluster is not None:
            body["instance"] = self._ctx.cluster.instance  # this replica's id in Redis (mcpgw.cluster)
        return _json(request, body)


class Ready(Resource):
    """``GET /ready``: 200 when new sessions can be served, 503 with the reason otherwise."""

    isLeaf = True

    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self._ctx = ctx

    def render_GET(self, request: Request) -> bytes:
        problems = []
        if not self._ctx.sessions.accepting:
            problems.append("draining" if self._ctx.sessions.draining else "shutting down")
        for server in self._ctx.config.servers.values():
            if server.kind == "stdio" and not os.access(server.executable, os.X_OK):
                problems.append(f"{server.name}: {server.executable} is not executable")
        if self._ctx.cluster is not None and self._ctx.cluster.problem() is not None:
            problems.append(self._ctx.cluster.problem())
        if problems:
            return _json(request, {"status": "unavailable", "problems": problems}, 503)
        return _json(request, {"status": "ready"})


class Root(Resource):
    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self.putChild(b"health", Health(ctx))
        self.putChild(b"ready", Ready(ctx))
        self.putChild(b"servers", ServersIndex(ctx))
        if ctx.auth.resources is not None:
            # RFC 9728: public, outside every Guard (a client reads it to learn how to get a token).
            self.putChild(b".well-known", well_known(ctx.auth.resources))
        default = ServerResource(ctx, ctx.config.default_server)
        for name in (b"sse", b"messages", b"mcp", b"ws"):
            self.putChild(name, default.children[name])

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, {"name": "mcpgw", "version": __version__, "health": "/health", "servers": "/servers"})


class GatewaySite(Site):
    """A Site without the per-request costs a gateway does not need, and with the connection
    limits of mcpgw.channel.

    No form parsing of POST bodies and no access log line per request: both are large shares of
    a small request's time in twisted.web (docs/performance.md).
    """

    protocol = GatewayChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, **kw: Any):
        super().__init__(resource, parsePOSTFormSubmission=False, requestFactory=GatewayRequest, **kw)
        #: What one connection may send (build_site sets it from maxBodyBytes and limits).
        self.limits = ChannelLimits()
        #: Connection caps and descriptor pressure (build_site sets them from limits).
        self.connections = Connections(self.reactor)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """While descriptors are exhausted in this turn of the reactor, a connection is answered
        and closed before the next accept (ClosedAtOnce); a channel's 503 would hold its
        descriptor for another turn."""
        if self.connections.exhausted:
            self.connections.refused_total += 1
            return ClosedAtOnce()
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        pass

    def head_received(self, request: GatewayRequest, method: bytes, uri: bytes, version: bytes) -> Deferred[Any] | None:
        """Route ``request`` on its head and let the path's Guard decide, before the body is read.

        The resource found is kept for ``getResourceFor`` (the tree is walked once). Returns the
        Guard's Deferred while its rate limiter has not answered, else None; a refusal is left in
        ``request.head_reply``."""
        request.method, request.uri, request.clientproto = method, uri, version
        path = request.path = uri.split(b"?", 1)[0]
        if path == b"*":
            return None
        request.prepath = []
        segments = path[1:].split(b"/")
        request.postpath = [unquote_to_bytes(p) for p in segments] if b"%" in path else segments
        resource = Site.getResourceFor(self, request)
        request.head_route = (resource, request.prepath, request.postpath)
        if not IHeadChecked.providedBy(resource):
            return None
        guard = resource.head_guard
        request.head_guard = guard
        verdict = request.guard_verdict = guard.check(request)
        if verdict is not ADMIT:
            verdict = request.guard_verdict = _settled(verdict)
        if verdict is ADMIT:
            return None
        if isinstance(verdict, Deferred):
            return verdict.addCallback(Guard.decided, request)
        request.head_reply = verdict
        return None

    def getResourceFor(self, request: Any) -> Any:
        route = request.head_route if isinstance(request, GatewayRequest) else None
        if route is None:
            return super().getResourceFor(request)
        request.head_route = None
        resource, request.prepath, request.postpath = route
        request.site = self
        request.sitepath = []
        return resource

    def getContentFile(self, length: int | None) -> Any:
        """Bodies are kept in memory, never spooled to disk (maxBodyBytes bounds them)."""
        return io.BytesIO()


def _settled(verdict: Any) -> Any:
    """A Deferred verdict that has already fired (a token checked against cached keys), as its result: the
    channel then goes on as for any verdict decided at once, without holding the body for a later one."""
    if verdict is ADMIT or not isinstance(verdict, Deferred):
        return verdict
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    verdict.addBoth(keep)
    if box and not isinstance(box[0], Failure):
        verdict.addErrback(lambda f: None)  # (the result is taken: nothing is left to fail)
        return box[0]
    return verdict


def build_site(ctx: GatewayContext) -> GatewaySite:
    site = GatewaySite(Root(ctx), reactor=ctx.reactor)
    limits = ctx.config.limits
    site.limits = ChannelLimits(
        max_header_bytes=limits.maxHeaderBytes, max_body_bytes=ctx.config.maxBodyBytes,
        header_timeout=limits.headerTimeout, body_timeout=limits.bodyTimeout, max_pipelined=limits.maxPipelined,
    )
    site.connections = Connections(ctx.reactor, limits.maxConnections, limits.maxConnectionsPerIp)
    return site
