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
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import aggregate, jsonrpc, logs
from mcpgw.config import GatewayConfig, ServerConfig
from mcpgw.deadlines import DeadlineQueue
from mcpgw.interfaces import ILocalSession, IRoute
from mcpgw.metrics import NULL_BOUND, BoundMetrics, Metrics, NoMetrics
from mcpgw.store import SessionRecord
from mcpgw.store.memory import MemorySessionStore
from mcpgw.upstream import innermost, make_upstream
from mcpgw.upstream.stdio import ServerActivity, StdioUpstream, UnreadableReply, tune_allocator
from mcpgw.upstream.warm import WarmChildren, warmable

#: mcpgw.upstream registers stdio and remote; the aggregate kind registers itself when imported.
SERVED_KINDS = (aggregate.AggregateUpstream,)
#: What SessionManager.create makes a session with: ``(id, server, transport, reactor, on_end, metrics=, **settings)``.
SessionFactory = Callable[..., "Session"]


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


def quota_key(owner: str | None, principal: Any = None) -> str | None:
    """Whose sessions count together for limits.maxSessionsPerIdentity: the identity, else the
    client's address (``Principal.rate_key``: an IPv4 address or an IPv6 /64), as the rate limiter keys them."""
    if principal is not None:
        return principal.rate_key
    return None if owner is None else "id:" + owner


class SessionRefused(Exception):
    """No new session now (a session cap is reached): answer 503 with ``Retry-After``."""

    def __init__(self, reason: str, retry_after: int = 5):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@implementer(ILocalSession)
class Session:
    """One client session and its child process."""

    log = Logger(observer=logs.observer)
    #: A large message from the child reaches upstreamMessage as ``jsonrpc.route_view`` gives it.
    routes_on_view = True
    #: The identity that created the session (mcpgw.auth); only it may use the session.
    owner: str | None = None
    #: ISession.instance: this instance runs it.
    instance: str | None = None
    #: Whose quota the session counts in (limits.maxSessionsPerIdentity; ``quota_key``), or None.
    quota_key: str | None = None
    #: limits.maxPendingRequests (given by the SessionManager).
    max_pending: int | None = None
    #: Called once the child's initialize result names the protocol version (the store records it).
    on_version: Callable[[Session], None] | None = None
    #: Called once the client has said ``notifications/initialized`` (the handshake is over: a warm
    #: pool refills then, off the session's setup path).
    on_initialized: Callable[[], None] | None = None

    def __init__(self, id: str, server: ServerConfig, transport: str, reactor: Any, on_end: Callable[[Session], None],
                 metrics: BoundMetrics = NULL_BOUND, upstream: Any = None, *, owner: str | None = None,
                 quota_key: str | None = None, max_pending: int | None = None, request_timeout: float | None = None,
                 on_version: Callable[[Session], None] | None = None, on_initialized: Callable[[], None] | None = None,
                 start_later: Callable[[Session], None] | None = None, outlet: Callable[[Session], Any] | None = None):
        """``outlet``: makes the session's IOutlet for the transport that creates it (the outlet needs
        the session, so the session makes it, as the last step of its construction)."""
        self.id = id
        self.owner = owner
        self.quota_key = quota_key
        self.max_pending = max_pending
        self.on_version = on_version
        self.on_initialized = on_initialized
        if start_later is not None:
            self.start_child = lambda: start_later(self)
        self.metrics = metrics
        self.server = server
        self.transport = transport
        self._reactor = reactor
        self._on_end = on_end
        self.protocol_version: str | None = None
        self.created = reactor.seconds()
        self.last_seen = self.created
        self.ended = False
        self.end_reason = ""
        #: Fires (with None) once the store has the session's record, so that other instances can find it,
        #: or failed to write it; the SessionManager fires it once the session has started (a session whose
        #: child cannot start is never recorded).
        self.recorded: defer.Deferred[None] = defer.Deferred()
        #: request id -> (route, method label, start time): the pending request and what its metrics need.
        self._requests: dict[Any, tuple[IRoute, str, float]] = {}
        self._token_route: dict[Any, IRoute] = {}
        self._request_token: dict[Any, Any] = {}
        self._initialize_id: Any = None
        self._pauses = 0
        #: limits.requestTimeout: one timer per session, at the oldest pending request's deadline.
        self._deadlines: DeadlineQueue[Any] = DeadlineQueue(
            reactor, request_timeout, lambda: ((id, entry[2]) for id, entry in self._requests.items()), self._expired)
        #: The child was already running (a warm child, mcpgw.upstream.warm): start() does not spawn.
        self.prespawned = upstream is not None
        self.upstream = self._upstream_for(upstream)
        self.upstream.metrics = metrics
        #: Its IOutlet (``outlet``), or None: no transport listens (a session made without one).
        self.outlet: Any = None if outlet is None else outlet(self)

    @property
    def request_timeout(self) -> float | None:
        """limits.requestTimeout (seconds), or None."""
        return self._deadlines.timeout

    def _upstream_for(self, base: Any) -> Any:
        """The session's IUpstream: stdio, remote or aggregate (mcpgw.upstream); ``base``: a warm child to adopt."""
        return make_upstream(self.server, self, self._reactor, base=base)

    def start(self) -> None:
        if self.prespawned:
            self.metrics.child_started()  # counted from now on by this session's gauges
        else:
            self.upstream.spawn()

    #: A lazily started session (legacy SSE: SessionManager.create(lazy=True)): starts its child
    #: (a warm one, or a spawn) at the session's first message; None once started.
    start_child: Callable[[], None] | None = None

    def adopt(self, upstream: Any) -> None:
        """Take a running child (a warm one) in place of the upstream not yet spawned; start() counts it."""
        self.prespawned = True
        self.upstream = make_upstream(self.server, self, self._reactor, base=upstream)
        self.upstream.metrics = self.metrics

    def _start_child_error(self) -> str | None:
        """Start a lazily started session's child now; why it could not be started, or None."""
        start, self.start_child = self.start_child, None
        if start is None:
            return None
        try:
            start()
        except Exception as e:  # noqa: BLE001 - a spawn fails in many ways (OSError, exec, setuid); each is the session's error reply
            self.metrics.error("spawn")
            reason = f"MCP server {self.server.name} could not be started: {e}"
            self.log.error("session {session}: {reason}", session=self.id, reason=reason, server=self.server.name)
            return reason
        return None

    # -- client -> child --------------------------------------------------

    def request(self, msg: dict[str, Any], raw: bytes, route: Any) -> None:
        """Forward a client request; its response will go to ``route``."""
        now = self.last_seen = self._reactor.seconds()
        id = msg["id"]
        method = self.metrics.request(msg["method"], len(raw))
        if self.start_child is not None and not self.ended:
            failed = self._start_child_error()
            if failed is not None:  # answered on its route (the SSE stream), then the session (and stream) ends
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, failed))
                self._end(failed)
                return
        if self.ended:
            self.metrics.error("rejected")
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, self.end_reason))
            return
        if id in self._requests:
            self.metrics.error("rejected")
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST, f"request id {id!r} is already in flight"))
            return
        if self.max_pending is not None and len(self._requests) >= self.max_pending:
            self.metrics.error("rejected")
            route.answer(id, jsonrpc.error_bytes(
                id, jsonrpc.CONNECTION_CLOSED,
                f"too many requests in flight on this session (limits.maxPendingRequests={self.max_pending})"))
            return
        self._requests[id] = (route, method, now)
        self._deadlines.added()
        token = jsonrpc.progress_token(msg)
        if _routable(token):
            self._token_route[token] = route
            self._request_token[id] = token
        if msg["method"] == "initialize":
            self._initialize_id = id
        if not self.upstream.send(raw, msg):
            self._fail(id, self.end_reason or "MCP server is stopping")

    def notify(self, msg: dict[str, Any], raw: bytes) -> None:
        """Forward a client notification or a response to a server request."""
        self.last_seen = self._reactor.seconds()
        self.metrics.received(len(raw))
        if self.start_child is not None and not self.ended:
            failed = self._start_child_error()
            if failed is not None:
                self._end(failed)
                return
        method = msg.get("method")
        if method == "notifications/initialized" and self.on_initialized is not None:
            hook, self.on_initialized = self.on_initialized, None
            hook()
        if method == "notifications/cancelled":
            params = msg.get("params")
            if isinstance(params, dict) and _routable(params.get("requestId")):
                # The child will not answer a cancelled request (spec: cancellation).
                route = self._pop(params["requestId"])
                if route is not None:
                    route.forget(params["requestId"])
        self.upstream.send(raw, msg)

    def has_pending(self) -> bool:
        return bool(self._requests)

    def pending_routes(self) -> list[IRoute]:
        return [entry[0] for entry in self._requests.values()]

    # -- child -> client --------------------------------------------------

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.metrics.sent(len(raw))
        if "method" not in msg and "id" in msg:
            id = msg["id"]
            entry = self._take(id) if _routable(id) else None
            if entry is None:
                self.log.debug("session {session}: response for unknown id {id} dropped", session=self.id, id=id)
                return
            route, method, started = entry
            self.metrics.answered(method, self._reactor.seconds() - started)
            if "error" in msg and not isinstance(msg, UnreadableReply):  # that one is counted as upstream_protocol
                self._upstream_error(id, method, msg["error"])
            if id == self._initialize_id and self._initialize_id is not None:
                result = jsonrpc.decoded(msg.get("result"))
                if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                    self.protocol_version = result["protocolVersion"]
                    if self.on_version is not None:
                        self.on_version(self)
                self._initialize_id = None
            route.answer(id, raw, msg)
            return
        if msg.get("method") == "notifications/progress":
            params = jsonrpc.decoded(msg.get("params"))
            if isinstance(params, dict):
                token = params.get("progressToken")
                progress_route = self._token_route.get(token) if _routable(token) else None
                if progress_route is not None:
                    progress_route.deliver(raw)
                    return
        if self.outlet is not None:
            self.outlet.unbound(raw, msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self.metrics.error("upstream_protocol")
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

    def _expired(self, id: Any) -> None:
        if _routable(id) and not self.ended:
            self._timed_out(id)

    def _timed_out(self, id: Any) -> None:
        """limits.requestTimeout passed: the client gets an error, the child a cancellation."""
        route = self._pop(id)
        if route is None:
            return
        self.metrics.error("timeout")
        reason = f"Request timed out after {self.request_timeout:g} s (limits.requestTimeout)"
        self.log.info("session {session}: request {request_id} timed out", session=self.id, request_id=id,
                      server=self.server.name)
        route.answer(id, jsonrpc.error_bytes(id, jsonrpc.REQUEST_TIMEOUT, reason))
        self.upstream.send(jsonrpc.dumps(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id, "reason": reason}}))

    def _pop(self, id: Any) -> IRoute | None:
        entry = self._take(id)
        return None if entry is None else entry[0]

    def _take(self, id: Any) -> tuple[IRoute, str, float] | None:
        """Forget pending request ``id``; its (route, method label, start time), or None."""
        entry = self._requests.pop(id, None)
        token = self._request_token.pop(id, None)
        if token is not None:
            self._token_route.pop(token, None)
        return entry

    def _upstream_error(self, id: Any, method: str, error: Any) -> None:
        """The child answered request ``id`` with a JSON-RPC error (its code is logged, not its message)."""
        self.metrics.error("upstream_error")
        error = jsonrpc.decoded(error)
        code = error.get("code") if isinstance(error, dict) else None
        self.log.info("session {session}: request {request_id} ({method}) got error {code} from {server}",
                      session=self.id, request_id=id, method=method, code=code, server=self.server.name)

    def _fail(self, id: Any, message: str) -> None:
        entry = self._take(id)
        if entry is not None:
            route, method, _ = entry
            self.metrics.error("upstream_exit")
            self.log.warn("session {session}: request {request_id} ({method}) failed: {reason}",
                          session=self.id, request_id=id, method=method, reason=message, server=self.server.name)
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, message))

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self.start_child = None
        self.log.info("session {session} ({server}/{transport}) ended: {reason}",
                      session=self.id, server=self.server.name, transport=self.transport, reason=reason,
                      duration=round(self._reactor.seconds() - self.created, 3))
        for id in list(self._requests):
            self._fail(id, reason)
        self._deadlines.stop()
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

    def __init__(self, config: GatewayConfig, reactor: Any, store: Any = None, metrics: Metrics | None = None,
                 pooled: Callable[[ServerConfig], SessionFactory | None] | None = None,
                 unavailable: Callable[[], str | None] | None = None):
        self.config = config
        #: The session factory of a "sessions": "pooled" server, None for any other (mcpgw.pool.PoolManager.session_factory,
        #: injected by mcpgw.tap.build_service; None: no pools).
        self.pooled = pooled
        self._reactor = reactor
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.ids = SessionIds(config.session.secret)
        self.store = store if store is not None else MemorySessionStore()
        self.sessions: dict[str, Session] = {}
        self.metrics.watch_sessions(lambda: len(self.sessions))
        self._ending: set[defer.Deferred[None]] = set()
        self._reaper: LoopingCall | None = None
        self.accepting = True
        #: An operator drained this instance (mcpgw.control): no new sessions, the current ones go on.
        self.draining = False
        #: Per server: recent stderr lines, children started and crashed (the admin API).
        self.activity: dict[str, ServerActivity] = {}
        #: Why no new session can start now (mcpgw.cluster.Cluster.unavailable: Redis is down), or None.
        self.unavailable = unavailable
        #: Per server with ``warmPool``: its pre-spawned children (mcpgw.upstream.warm), filled at startService.
        self.warm: dict[str, WarmChildren] = {}
        #: Live sessions per ``quota_key`` (limits.maxSessionsPerIdentity).
        self.per_identity: dict[str, int] = {}

    def room_for(self, server: ServerConfig, owner: str | None = None, principal: Any = None) -> SessionRefused | None:
        """Why a new session of ``server`` cannot start now (a cap is reached, Redis is down), or None.

        ``owner`` / ``principal`` (mcpgw.auth): whose limits.maxSessionsPerIdentity applies. One
        identity (or, anonymous, one address) that holds its quota gets the same 503 and
        Retry-After as the gateway's cap gives, while every other identity still gets sessions."""
        if self.unavailable is not None:
            reason = self.unavailable()
            if reason is not None:
                return SessionRefused(reason)
        quota = self.config.limits.maxSessionsPerIdentity
        if quota is not None:
            key = quota_key(owner, principal)
            if key is not None and self.per_identity.get(key, 0) >= quota:
                return SessionRefused(
                    f"this client already has {quota} sessions open (limits.maxSessionsPerIdentity={quota})")
        cap = self.config.limits.maxSessions
        if cap is not None and len(self.sessions) >= cap:
            return SessionRefused(f"the gateway is at its session limit (limits.maxSessions={cap})")
        if server.maxSessions is not None and self.count(server.name) >= server.maxSessions:
            return SessionRefused(f"server {server.name} is at its session limit (maxSessions={server.maxSessions})")
        return None

    def create(self, server: ServerConfig, transport: str, owner: str | None = None,
               factory: SessionFactory | None = None, lazy: bool = False, principal: Any = None,
               outlet: Callable[[Session], Any] | None = None) -> Session:
        """Start a session (and its child) for ``owner``; SessionRefused when a cap is reached.

        ``lazy`` (legacy SSE streams): a stdio server's child is started by the session's first
        message instead (``Session.start_child``), so an idle stream holds no child and no pipes.
        ``principal`` (mcpgw.auth.principal_of): keys an anonymous client's quota by its address.
        ``outlet``: makes the session's IOutlet (the transport's), given the session as it is made.
        """
        refused = self.room_for(server, owner, principal)
        if refused is not None:
            raise refused
        if factory is None and self.pooled is not None:  # "sessions": "pooled": served by the pool's children
            factory = self.pooled(server)
        lazy = lazy and factory is None and server.kind == "stdio"
        warm = self.warm.get(server.name) if factory is None else None
        if warm is not None and warm.server != server:
            warm = None
        taken = warm.take() if warm is not None and not lazy else None
        extra = {} if taken is None else {"upstream": taken}
        session = (factory or Session)(
            self.ids.new(), server, transport, self._reactor, self._ended, metrics=self.metrics.bound(transport, server.name),
            owner=owner, quota_key=quota_key(owner, principal), max_pending=self.config.limits.maxPendingRequests,
            request_timeout=self.config.limits.requestTimeout, on_version=self._version,
            on_initialized=None if warm is None else warm.settled,
            start_later=(lambda s: self._start_child(s, warm)) if lazy else None, outlet=outlet, **extra)
        session.metrics.session_started()
        child = innermost(session.upstream)
        if isinstance(child, StdioUpstream):
            child.activity = self.activity_of(server.name)
        self.sessions[session.id] = session
        if session.quota_key is not None:
            self.per_identity[session.quota_key] = self.per_identity.get(session.quota_key, 0) + 1
        if not lazy:
            try:
                session.start()
            except Exception:
                session.metrics.error("spawn")
                self._forget(session)
                raise
        stored = self.store.add(SessionRecord(session.id, server.name, transport, session.created, owner=owner))
        self._stored(stored, session)
        stored.addCallback(session.recorded.callback)
        # Logged on the next reactor turn: after the caller has sent the session's first message to
        # the child, so that formatting the line overlaps the child's work instead of preceding it.
        self._reactor.callLater(0, self.log.info, "session {session} started ({server}/{transport})",
                                session=session.id, server=server.name, transport=transport)
        return session

    def _start_child(self, session: Session, warm: WarmChildren | None) -> None:
        """The first message of a lazily started session: a warm child if there is one, else a spawn."""
        taken = warm.take() if warm is not None else None
        if taken is not None:
            session.adopt(taken)
        session.start()

    def get(self, session_id: str | None, owner: str | None = None) -> Session | None:
        """The live session with this id that ``owner`` created, or None.

        Only ids this gateway issued are ever keys of ``sessions``, so a hit needs no
        HMAC (an ``hmac.new`` on every request is a cost each call pays); a miss is still
        checked, so a forged id never reaches a store lookup.
        """
        if not session_id:
            return None
        session = self.sessions.get(session_id)
        if session is not None and session.owner != owner:
            return None  # another identity's session: as if there were none
        if session is not None or not self.ids.valid(session_id):
            return session
        return None

    def activity_of(self, server: str) -> ServerActivity:
        """The activity record of ``server`` (made on first use)."""
        activity = self.activity.get(server)
        if activity is None:
            activity = self.activity[server] = ServerActivity()
        return activity

    def count(self, server: str | None = None) -> int:
        if server is None:
            return len(self.sessions)
        return sum(1 for s in self.sessions.values() if s.server.name == server)

    def _forget(self, session: Session) -> None:
        """``session`` is no longer live here: out of ``sessions``, and out of its identity's quota."""
        if self.sessions.pop(session.id, None) is not None and session.quota_key is not None:
            left = self.per_identity.get(session.quota_key, 1) - 1
            if left > 0:
                self.per_identity[session.quota_key] = left
            else:
                self.per_identity.pop(session.quota_key, None)

    def _ended(self, session: Session) -> None:
        self._forget(session)
        self._stored(self.store.remove(session.id), session)
        if not session.upstream.ended:
            d = session.upstream.stop()
            self._ending.add(d)
            d.addBoth(lambda _: self._ending.discard(d))

    def _version(self, session: Session) -> None:
        self._stored(self.store.update(session.id, protocol_version=session.protocol_version), session)

    def _stored(self, d: defer.Deferred[Any], session: Session) -> None:
        """A store write nobody waits for: the owner has the live session, the store only a record of it."""
        d.addErrback(lambda f: self.log.info("session {session}: store not updated: {error}",
                                             session=session.id, error=f.getErrorMessage()))

    def reap(self) -> None:
        """End sessions idle for longer than ``session.maxAge``, and any older than ``session.maxLifetime``."""
        now = self._reactor.seconds()
        limit = now - self.config.session.idleSeconds
        lifetime = self.config.session.lifetimeSeconds
        for session in list(self.sessions.values()):
            if lifetime is not None and session.created <= now - lifetime:
                session.close("older than session.maxLifetime")
                continue
            if session.last_seen < limit and not session.has_pending() and session.transport not in ("sse", "ws"):
                session.close("idle for longer than session.maxAge")

    def startService(self) -> None:
        super().startService()
        tune_allocator()  # large messages: reuse heap memory instead of fresh mappings per buffer
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = self._reactor
        interval = min(60.0, self.config.session.idleSeconds, self.config.session.lifetimeSeconds or 60.0)
        self._reaper.start(interval, now=False).addErrback(lambda f: self.log.failure("reaper stopped", f))
        for server in self.config.servers.values():
            if warmable(server) and server.name not in self.warm:
                warm = self.warm[server.name] = WarmChildren(server, self._reactor, self.activity_of(server.name))
                warm.start()

    def stopService(self) -> defer.Deferred[None]:
        """Close every session; fires when every child has exited."""
        super().stopService()
        self.accepting = False
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        waits = [s.close("gateway shutting down") for s in list(self.sessions.values())]
        waits.extend(self._ending)
        waits.extend(warm.stop() for warm in self.warm.values())
        return defer.DeferredList(waits).addCallback(lambda _: None)
