"""Sessions: one client conversation bound to one child MCP server.

A Session knows which client stream waits for which request id and which
stream carried which progress token; everything else the child says goes to
the transport's ``outlet`` (the SSE stream, or Streamable HTTP's GET stream).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw import logs
from mcpgw import jsonrpc
from mcpgw.config import GatewayConfig, ServerConfig
from mcpgw.store import SessionRecord
from mcpgw.store.memory import MemorySessionStore
from mcpgw.upstream.stdio import StdioUpstream


class Route(Protocol):
    """A client stream that waits for responses (a POST exchange, an SSE stream)."""

    def answer(self, id: Any, raw: bytes) -> None:
        """The response to request ``id`` that this route carried."""

    def deliver(self, raw: bytes) -> None:
        """Any other message that belongs on this route (progress, related requests)."""

    def forget(self, id: Any) -> None:
        """Request ``id`` will get no response (cancelled by the client)."""


class Outlet(Protocol):
    """Where a session sends what no pending request claims, and hears of its end."""

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None: ...

    def session_ended(self, reason: str) -> None: ...


class SessionIds:
    """Unguessable, self-authenticating session ids: 128 random bits + HMAC tag.

    A forged or altered id is rejected without any store lookup.
    """

    def __init__(self, secret: str | None):
        self._key = (secret or secrets.token_hex(32)).encode()

    def new(self) -> str:
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._tag(nonce)}"

    def valid(self, session_id: str) -> bool:
        nonce, dot, tag = session_id.partition(".")
        if not dot or len(nonce) != 22 or len(tag) != 22:
            return False
        # Bytes: compare_digest raises TypeError on non-ASCII str (a latin-1 decoded header).
        return hmac.compare_digest(tag.encode(), self._tag(nonce).encode())

    def _tag(self, nonce: str) -> str:
        digest = hmac.new(self._key, nonce.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _routable(value: Any) -> bool:
    """Ids and progress tokens are strings or numbers; anything else (unhashable) matches nothing."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


class Session:
    """One client session and its child process."""

    log = Logger(observer=logs.observer)

    def __init__(self, id: str, server: ServerConfig, transport: str, reactor: Any, on_end: Callable[["Session"], None]):
        self.id = id
        self.server = server
        self.transport = transport
        self._reactor = reactor
        self._on_end = on_end
        self.protocol_version: str | None = None
        self.created = reactor.seconds()
        self.last_seen = self.created
        self.ended = False
        self.end_reason = ""
        self.outlet: Outlet | None = None
        self._requests: dict[Any, Route] = {}
        self._token_route: dict[Any, Route] = {}
        self._request_token: dict[Any, Any] = {}
        self._initialize_id: Any = None
        self._pauses = 0
        self.upstream = StdioUpstream(server, self, reactor)

    def start(self) -> None:
        self.upstream.spawn()

    # -- client -> child --------------------------------------------------

    def request(self, msg: dict[str, Any], raw: bytes, route: Route) -> None:
        """Forward a client request; its response will go to ``route``."""
        self.last_seen = self._reactor.seconds()
        id = msg["id"]
        if self.ended:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, self.end_reason))
            return
        if id in self._requests:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST, f"request id {id!r} is already in flight"))
            return
        self._requests[id] = route
        token = jsonrpc.progress_token(msg)
        if _routable(token):
            self._token_route[token] = route
            self._request_token[id] = token
        if msg["method"] == "initialize":
            self._initialize_id = id
        if not self.upstream.send(raw):
            self._fail(id, self.end_reason or "MCP server is stopping")

    def notify(self, msg: dict[str, Any], raw: bytes) -> None:
        """Forward a client notification or a response to a server request."""
        self.last_seen = self._reactor.seconds()
        if msg.get("method") == "notifications/cancelled":
            params = msg.get("params")
            if isinstance(params, dict) and _routable(params.get("requestId")):
                # The child will not answer a cancelled request (spec: cancellation).
                route = self._pop(params["requestId"])
                if route is not None:
                    route.forget(params["requestId"])
        self.upstream.send(raw)

    def has_pending(self) -> bool:
        return bool(self._requests)

    def pending_routes(self) -> list[Route]:
        return list(self._requests.values())

    # -- child -> client --------------------------------------------------

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        if "method" not in msg and "id" in msg:
            id = msg["id"]
            route = self._pop(id) if _routable(id) else None
            if route is None:
                self.log.debug("session {session}: response for unknown id {id} dropped", session=self.id, id=id)
                return
            if id == self._initialize_id and self._initialize_id is not None:
                result = msg.get("result")
                if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                    self.protocol_version = result["protocolVersion"]
                self._initialize_id = None
            route.answer(id, raw)
            return
        if msg.get("method") == "notifications/progress":
            params = msg.get("params")
            if isinstance(params, dict):
                token = params.get("progressToken")
                route = self._token_route.get(token) if _routable(token) else None
                if route is not None:
                    route.deliver(raw)
                    return
        if self.outlet is not None:
            self.outlet.unbound(raw, msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self.close(reason)

    def upstreamEnded(self, reason: str) -> None:
        self._end(f"MCP server {reason}")

    # -- backpressure from slow clients -----------------------------------

    def pauseProducing(self) -> None:
        self._pauses += 1
        if self._pauses == 1:
            self.upstream.pauseProducing()

    def resumeProducing(self) -> None:
        if self._pauses:
            self._pauses -= 1
            if self._pauses == 0:
                self.upstream.resumeProducing()

    def stopProducing(self) -> None:
        """A client connection went away: that is not the end of the session."""

    # -- ending -----------------------------------------------------------

    def close(self, reason: str = "session closed") -> defer.Deferred[None]:
        """End the session and stop its child; fires when the child has exited."""
        self._end(reason)
        return self.upstream.stop()

    def _pop(self, id: Any) -> Route | None:
        route = self._requests.pop(id, None)
        token = self._request_token.pop(id, None)
        if token is not None:
            self._token_route.pop(token, None)
        return route

    def _fail(self, id: Any, message: str) -> None:
        route = self._pop(id)
        if route is not None:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, message))

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self.log.info("session {session} ({server}/{transport}) ended: {reason}",
                      session=self.id, server=self.server.name, transport=self.transport, reason=reason)
        for id in list(self._requests):
            self._fail(id, reason)
        if self._pauses:
            self._pauses = 0
            self.upstream.resumeProducing()
        if self.outlet is not None:
            self.outlet.session_ended(reason)
        self._on_end(self)
        if not self.upstream.ended:
            self.upstream.stop()


class SessionManager(Service):
    """Creates, finds and ends sessions; stops every child on shutdown."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: GatewayConfig, reactor: Any, store: Any = None):
        self.config = config
        self._reactor = reactor
        self.ids = SessionIds(config.session.secret)
        self.store = store if store is not None else MemorySessionStore()
        self.sessions: dict[str, Session] = {}
        self._ending: set[defer.Deferred[None]] = set()
        self._reaper: LoopingCall | None = None
        self.accepting = True

    def create(self, server: ServerConfig, transport: str) -> Session:
        session = Session(self.ids.new(), server, transport, self._reactor, self._ended)
        self.sessions[session.id] = session
        session.start()
        self.store.add(SessionRecord(session.id, server.name, transport, session.created))
        self.log.info("session {session} started ({server}/{transport})", session=session.id, server=server.name, transport=transport)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (forged ids never reach the dict)."""
        if not session_id or not self.ids.valid(session_id):
            return None
        return self.sessions.get(session_id)

    def count(self, server: str | None = None) -> int:
        if server is None:
            return len(self.sessions)
        return sum(1 for s in self.sessions.values() if s.server.name == server)

    def _ended(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.store.remove(session.id)
        if not session.upstream.ended:
            d = session.upstream.stop()
            self._ending.add(d)
            d.addBoth(lambda _: self._ending.discard(d))

    def reap(self) -> None:
        """End sessions idle for longer than ``session.maxAge``."""
        limit = self._reactor.seconds() - self.config.session.maxAge / 1000.0
        for session in list(self.sessions.values()):
            if session.last_seen < limit and not session.has_pending() and session.transport not in ("sse", "ws"):
                session.close("idle for longer than session.maxAge")

    def startService(self) -> None:
        super().startService()
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = self._reactor
        interval = min(60.0, self.config.session.maxAge / 1000.0)
        self._reaper.start(interval, now=False).addErrback(lambda f: self.log.failure("reaper stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        """Close every session; fires when every child has exited."""
        super().stopService()
        self.accepting = False
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        waits = [s.close("gateway shutting down") for s in list(self.sessions.values())]
        waits.extend(self._ending)
        return defer.DeferredList(waits).addCallback(lambda _: None)
