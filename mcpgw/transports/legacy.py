"""MCP 2024-11-05 HTTP+SSE: ``GET /sse`` streams events, ``POST /messages?sessionId=`` sends.

One SSE stream per session carries everything the child says; the stream's
end is the session's end.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpgw import jsonrpc, logs
from mcpgw.auth import identity_of, principal_of
from mcpgw.config import ServerConfig
from mcpgw.session import Session, SessionRefused
from mcpgw.transports.common import (
    GatewayContext,
    HttpError,
    error_reply,
    http_error_reply,
    parse_messages,
    read_body,
    refuse_new_session,
    relay,
)
from mcpgw.transports.sse import SseResponse, frame
from mcpgw.transports.streamable import when_found

MESSAGE = b"message"


class LegacyStream:
    """The one SSE stream of a 2024-11-05 session: its Route and its Outlet."""

    def __init__(self, session: Session, response: SseResponse):
        self.session = session
        self.response = response
        response.on_close(self._closed)

    def answer(self, id: Any, raw: bytes) -> None:
        self.response.write_event(raw, MESSAGE)

    def deliver(self, raw: bytes) -> None:
        self.response.write_event(raw, MESSAGE)

    def forget(self, id: Any) -> None:
        pass

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.response.write_event(raw, MESSAGE)

    def session_ended(self, reason: str) -> None:
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
        try:
            # The child is started by the session's first POSTed message: an idle stream holds
            # one descriptor (its socket), not four (the child's pipes too).
            session = self._ctx.sessions.create(self._server, "sse", identity_of(request), lazy=True,
                                                principal=principal_of(request))
        except SessionRefused as e:
            request.setHeader(b"retry-after", b"%d" % e.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}")
        response = SseResponse(request, self._ctx.heartbeat, producer=session, metrics=session.metrics)
        session.outlet = LegacyStream(session, response)
        # The endpoint sits beside this resource: /sse -> /messages, /servers/x/sse -> /servers/x/messages
        # (prepath, not path: "/sse/" must not give "/sse/messages").
        base = b"".join(b"/" + segment for segment in (request.prepath or [])[:-1])
        endpoint = frame(base + b"/messages?sessionId=" + session.id.encode(), b"endpoint")
        # Once the session's record is stored (at once in memory; with Redis, the other instances
        # behind the same proxy can find it before the client POSTs there).
        if session.recorded is None:
            response.write(endpoint)
        else:
            session.recorded.addBoth(lambda _: response.write(endpoint))
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
        stream = session.outlet
        for m in messages:
            relay(session, m, stream)
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"text/plain")
        return b"Accepted"
