"""The Resource tree: status pages, every server's transports, and the guards in front of them."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mcpgw import __version__, jsonrpc
from mcpgw.config import GatewayConfig, ServerConfig
from mcpgw.transports.common import GatewayContext, error_reply
from mcpgw.transports.legacy import MessagesEndpoint, SseEndpoint
from mcpgw.transports.streamable import StreamableEndpoint
from mcpgw.transports.websocket import websocket_resource

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
ALLOW_HEADERS = b"Content-Type, Authorization, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, Mcp-Method, Mcp-Name"


def _json(request: Request, obj: Any, status: int = 200) -> bytes:
    body = jsonrpc.dumps(obj)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _hostname(value: str) -> str:
    """The host part of a Host header or an origin's netloc ('[::1]:3000' -> '::1')."""
    try:
        return (urlsplit("//" + value).hostname or "").lower()
    except ValueError:
        return ""


class Guard(Resource):
    """DNS-rebinding defence and CORS in front of one MCP endpoint.

    Spec (basic/transports, security warning): servers MUST validate Origin
    and, bound to loopback, should only answer loopback Host names.
    """

    isLeaf = True

    def __init__(self, inner: Resource, config: GatewayConfig):
        super().__init__()
        self._inner = inner
        self._cors = config.cors
        self._loopback = config.host in LOOPBACK_HOSTS

    def origin_allowed(self, origin: str, request: Request) -> bool:
        if origin in self._cors.origins:
            return True
        host = _hostname(origin.split("://", 1)[-1]) if "://" in origin else ""
        if self._loopback:
            return host in LOOPBACK_HOSTS
        if "*" in self._cors.origins:
            return True
        own = request.getHeader(b"host")
        return own is not None and origin.split("://", 1)[-1] == own.decode("latin-1")

    def render(self, request: Request) -> Any:
        if self._loopback:
            host = request.getHeader(b"host")
            if host is None or _hostname(host.decode("latin-1")) not in LOOPBACK_HOSTS:
                return error_reply(request, 403, jsonrpc.CONNECTION_CLOSED, "Forbidden: invalid Host header")
        origin_b = request.getHeader(b"origin")
        if origin_b is not None:
            origin = origin_b.decode("latin-1")
            if not self.origin_allowed(origin, request):
                return error_reply(request, 403, jsonrpc.CONNECTION_CLOSED, "Forbidden: Origin not allowed")
            if self._cors.enabled:
                request.setHeader(b"access-control-allow-origin", origin_b)
                request.setHeader(b"vary", b"Origin")
                request.setHeader(b"access-control-expose-headers", b"Mcp-Session-Id")
                if request.method == b"OPTIONS":
                    request.setResponseCode(204)
                    request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS")
                    request.setHeader(b"access-control-allow-headers", ALLOW_HEADERS)
                    request.setHeader(b"access-control-max-age", b"86400")
                    return b""
        return self._inner.render(request)


class ServerResource(Resource):
    """``/servers/NAME/{sse,messages,mcp}`` (and the root paths for the default server)."""

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__()
        config = ctx.config
        self.putChild(b"sse", Guard(SseEndpoint(ctx, server), config))
        self.putChild(b"messages", Guard(MessagesEndpoint(ctx, server), config))
        self.putChild(b"mcp", Guard(StreamableEndpoint(ctx, server), config))
        self.putChild(b"ws", Guard(websocket_resource(ctx, server), config))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        return NotFound().render(request)


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

    def render_GET(self, request: Request) -> bytes:
        ctx = self._ctx
        default = ctx.config.default_server.name
        servers = []
        for name, server in ctx.config.servers.items():
            base = f"/servers/{name}"
            servers.append({
                "name": name,
                "default": name == default,
                "command": server.command,
                "paths": {"sse": f"{base}/sse", "messages": f"{base}/messages", "mcp": f"{base}/mcp", "ws": f"{base}/ws"},
                "sessions": ctx.sessions.count(name),
            })
        return _json(request, {"servers": servers})


class Health(Resource):
    isLeaf = True

    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self._ctx = ctx
        self._started = ctx.reactor.seconds()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, {
            "status": "healthy",
            "version": __version__,
            "sessions": len(self._ctx.sessions.sessions),
            "uptime": round(self._ctx.reactor.seconds() - self._started, 3),
        })


class Ready(Resource):
    """``GET /ready``: 200 when new sessions can be served, 503 with the reason otherwise."""

    isLeaf = True

    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self._ctx = ctx

    def render_GET(self, request: Request) -> bytes:
        problems = []
        if not self._ctx.sessions.accepting:
            problems.append("shutting down")
        for server in self._ctx.config.servers.values():
            if not os.access(server.executable, os.X_OK):
                problems.append(f"{server.name}: {server.executable} is not executable")
        if problems:
            return _json(request, {"status": "unavailable", "problems": problems}, 503)
        return _json(request, {"status": "ready"})


class Root(Resource):
    def __init__(self, ctx: GatewayContext):
        super().__init__()
        self.putChild(b"health", Health(ctx))
        self.putChild(b"ready", Ready(ctx))
        self.putChild(b"servers", ServersIndex(ctx))
        default = ServerResource(ctx, ctx.config.default_server)
        for name in (b"sse", b"messages", b"mcp", b"ws"):
            self.putChild(name, default.children[name])

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, {"name": "mcpgw", "version": __version__, "health": "/health", "servers": "/servers"})


class GatewaySite(Site):
    """A Site without the per-request costs a gateway does not need.

    No form parsing of POST bodies (36% of request time, PERFORMANCE_NOTES)
    and no access log line per request (21%).
    """

    def __init__(self, resource: Resource, **kw: Any):
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)

    def log(self, request: Request) -> None:
        pass


def build_site(ctx: GatewayContext) -> GatewaySite:
    return GatewaySite(Root(ctx))
