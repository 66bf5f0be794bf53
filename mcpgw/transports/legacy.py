"""MCP 2024-11-05 HTTP+SSE: ``GET /sse`` streams events, ``POST /messages?sessionId=`` sends.

One SSE stream per session carries everything the child says; the stream's
end is the session's end.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.logger import Logger
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpgw import dispatch, jsonrpc, logs, toolpolicy
from mcpgw.auth import identity_of, principal_of
from mcpgw.config import ServerConfig
from mcpgw.interfaces import IOutlet, IRoute
from mcpgw.session import Session, SessionRefused
from mcpgw.transports.common import (
    GatewayContext,
    HttpError,
    error_reply,
    http_error_reply,
    parse_messages,
    read_body,
    refuse_new_session,
)
from mcpgw.transports.sse import Heartbeat, SseResponse, frame
from mcpgw.transports.streamable import when_found

MESSAGE = b"message"


@implementer(IRoute, IOutlet)
class LegacyStream:
    """The one SSE stream of a 2024-11-05 session: its Route and its Outlet."""

    #: Not a POST's response: as the outlet, it gets every server message no request claims anyway.
    open_stream = False

    def __init__(self, session: Session, request: Request, heartbeat: Heartbeat):
        self.session = session
        self._request = request
        self._heartbeat = heartbeat
        #: The SSE response, from ``open()`` on.
        self.response: SseResponse | None = None

    def open(self) -> SseResponse:
        """Start the SSE response (status line and headers). Called once the session has started, so
        that a session that cannot start is still answered with an HTTP error."""
        response = self.response = SseResponse(self._request, self._heartbeat, producer=self.session,
                                               metrics=self.session.metrics)
        response.on_close(self._closed)
        return response

    def _write(self, raw: bytes) -> None:
        if self.response is not None:
            self.response.write_event(raw, MESSAGE)

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self._write(raw)

    def deliver(self, raw: bytes) -> None:
        self._write(raw)

    def forget(self, id: Any) -> None:
        pass

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        self._write(raw)

    def session_ended(self, reason: str) -> None:
        if self.response is not None:
            self.response.finish()

    def _closed(self, _: SseResponse) -> None:
        if not self.session.ended:
            self.session.close("SSE stream closed")


class SseEndpoint(Resource):
    """``GET /sse``: start a session and stream its events."""

    isLeaf = True
    log = Logger(observer=logs.observer)

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__()
        self._ctx = ctx
        self._server = server

    def render_GET(self, request: Request) -> Any:
        if not self._ctx.sessions.accepting:
            return refuse_new_session(request, self._ctx.sessions)
        heartbeat = self._ctx.heartbeat
        try:
            # The child is started by the session's first POSTed message: an idle stream holds
            # one descriptor (its socket), not four (the child's pipes too).
            session = self._ctx.sessions.create(self._server, "sse", identity_of(request), lazy=True,
                                                principal=principal_of(request),
                                                outlet=lambda s: LegacyStream(s, request, heartbeat))
        except SessionRefused as e:
            request.setHeader(b"retry-after", b"%d" % e.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}")
        response = cast(LegacyStream, session.outlet).open()
        # The endpoint sits beside this resource: /sse -> /messages, /servers/x/sse -> /servers/x/messages
        # (prepath, not path: "/sse/" must not give "/sse/messages").
        base = b"".join(b"/" + segment for segment in (request.prepath or [])[:-1])
        endpoint = frame(base + b"/messages?sessionId=" + session.id.encode(), b"endpoint")
        # Once the session's record is stored (at once in memory; with Redis, the other instances
        # behind the same proxy can find it before the client POSTs there).
        session.recorded.addCallback(lambda _: response.write(endpoint))
        return NOT_DONE_YET


class MessagesEndpoint(Resource):
    """``POST /messages?sessionId=ID``: relay a message to the session's child; 202."""

    isLeaf = True

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__()
        self._ctx = ctx
        self._server = server

    def render_HEAD(self, request: Request) -> bytes:
        """(twisted.web's default HEAD calls a render_GET this resource does not have: a 500.)"""
        raise UnsupportedMethod((b"POST",))

    def render_POST(self, request: Request) -> bytes | int:
        ids = request.args.get(b"sessionId") or []
        if not ids:
            return error_reply(request, 400, jsonrpc.INVALID_REQUEST, "sessionId query parameter is required")
        try:
            session_id = ids[0].decode("ascii")
        except UnicodeDecodeError:
            session_id = ""
        session = self._ctx.sessions.get(session_id, identity_of(request))
        if session is None and self._ctx.cluster is not None:
            # Owned by another instance? The cluster looks it up (the first time, in Redis).
            found = self._ctx.cluster.lookup(session_id, identity_of(request))
            try:
                body: bytes | int = when_found(request, found, lambda s: self._post(request, s))
            except HttpError as e:
                return http_error_reply(request, e)
            return body
        return self._post(request, session)

    def _post(self, request: Request, session: Any) -> bytes:
        if session is None or session.transport != "sse" or session.server is not self._server:
            return error_reply(request, 404, jsonrpc.SESSION_NOT_FOUND, "Session not found")
        try:
            messages, _ = parse_messages(read_body(request, self._ctx.config.maxBodyBytes),
                                         max_batch=self._ctx.config.limits.maxBatchMessages)
        except HttpError as e:
            return http_error_reply(request, e)
        principal, headers = principal_of(request), request.requestHeaders
        refused = dispatch.refusal(self._ctx, principal, self._server.name, messages, transport="sse", headers=headers)
        if refused is not None:  # auth.oauth.toolScopes: refused before any of the POST's messages goes on
            return toolpolicy.forbidden_reply(self._ctx.auth, request, refused[1], refused[0].msg["id"])
        for m in messages:
            dispatch.relay(self._ctx, session, m, session.outlet, principal=principal, transport="sse", headers=headers)
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"text/plain")
        return b"Accepted"
