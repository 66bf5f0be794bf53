"""Handshake-era client sessions (2024-11-05 .. 2025-11-25) served by a ChildPool.

A pooled session is a Session whose upstream is a ``PoolLease``: no child of its own, but the
pool's notifications and the resource subscriptions it holds there. mcpgw.session does not import
the pool: ``PoolManager.session_factory`` is given to the SessionManager by ``tap.build_service``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mcpgw import jsonrpc
from mcpgw.interfaces import IRoute, IUpstream
from mcpgw.metrics import NULL_BOUND, BoundMetrics
from mcpgw.pool.children import ChildPool, PooledChild
from mcpgw.pool.pending import SHARED_NOTIFICATIONS, Pending, PoolFull
from mcpgw.session import Session
from mcpgw.versions import SUPPORTED_VERSIONS, capability_refusal, params_of, undeclared


@implementer(IUpstream)
class PoolLease:
    """A pooled session's upstream: what it holds of its pool (a notification listener, the resource URIs
    it watches). It has no child of its own to spawn, pause or stop, and takes no raw messages."""

    pid = None
    delegate: Any = None

    def __init__(self, pool: ChildPool):
        self.pool = pool
        self.metrics: BoundMetrics = NULL_BOUND
        self.ended = False
        #: Resource URIs this session watches (each counted once in the pool's subscriptions).
        self.uris: set[str] = set()
        self._listener: Callable[[bytes, dict[str, Any]], None] | None = None

    def listen(self, listener: Callable[[bytes, dict[str, Any]], None]) -> None:
        """``listener`` hears the pool's notifications until the lease ends."""
        self._listener = listener
        self.pool.listeners.add(listener)

    def subscribe(self, uri: str) -> None:
        if uri not in self.uris:
            self.uris.add(uri)
            self.pool.subscribe([uri])

    def unsubscribe(self, uri: str) -> None:
        if uri in self.uris:
            self.uris.discard(uri)
            self.pool.unsubscribe([uri])

    def spawn(self) -> None:
        pass

    def send(self, raw: bytes, msg: Any = None) -> bool:
        return False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        """Give back what the session holds of the pool; the pool's children run on."""
        if not self.ended:
            self.ended = True
            if self._listener is not None:
                self.pool.listeners.discard(self._listener)
            if self.uris:
                self.pool.unsubscribe(list(self.uris))
                self.uris.clear()
        return defer.succeed(None)


@implementer(IRoute)
class _SessionRoute:
    """Between a pool and a pooled session's route: the session forgets the request once it is answered."""

    def __init__(self, session: PooledSession, route: Any, id: Any):
        self.session = session
        self.route = route
        self.id = id

    @property
    def open_stream(self) -> bool:
        """As the client's route it stands for."""
        return bool(self.route.open_stream)

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.session._inflight.pop(self.id, None)
        self.route.answer(id, raw, msg)

    def deliver(self, raw: bytes) -> None:
        self.route.deliver(raw)

    def forget(self, id: Any) -> None:
        self.session._inflight.pop(self.id, None)
        self.route.forget(id)


def pooled_session_factory(pool: ChildPool) -> Callable[..., Session]:
    """A SessionManager.create factory whose sessions are served by ``pool``."""

    def make(*args: Any, **kw: Any) -> Session:
        return PooledSession(pool, *args, **kw)

    return make


class PooledSession(Session):
    """A handshake-era client session (2024-11-05 .. 2025-11-25) served by a ChildPool.

    ``initialize`` is answered from the pool's cached result with the version negotiated for
    this client; ``ping`` and ``logging/setLevel`` by the gateway; ``resources/subscribe`` and
    ``unsubscribe`` become the pool's shared subscriptions (held by its ``PoolLease``); everything
    else goes to the least-loaded child with a gateway-unique id. A child's sampling / elicitation /
    roots request while it runs only this session's call is relayed to the client on that call's
    stream (its answer goes back to the child). What the session gives up is in docs/protocol-versions.md.
    """

    upstream: PoolLease

    def __init__(self, pool: ChildPool, *args: Any, **kw: Any):
        # All of it before Session.__init__, which asks ``_upstream_for`` for the lease and then makes the
        # outlet: an outlet may ask a session it is given for its pending routes at once.
        self.pool = pool
        self._inflight: dict[Any, Pending] = {}
        #: A child's requests relayed to this client: the id the client saw -> (child, the child's id).
        self._asked: dict[str, tuple[PooledChild, Any]] = {}
        #: The capabilities this client declared in its initialize (the pool's children saw the gateway's).
        self.client_capabilities: dict[str, Any] = {}
        super().__init__(*args, **kw)

    def _upstream_for(self, base: Any) -> PoolLease:
        return PoolLease(self.pool)

    def start(self) -> None:
        self.upstream.listen(self._notification)

    def request(self, msg: dict[str, Any], raw: bytes, route: Any) -> None:
        self.last_seen = self._reactor.seconds()
        id = msg["id"]
        method = msg["method"]
        self.metrics.request(method, len(raw))
        if self.ended:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, self.end_reason))
            return
        if id in self._inflight:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST, f"request id {id!r} is already in flight"))
            return
        if self.max_pending is not None and len(self._inflight) >= self.max_pending:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED,
                                                 f"too many requests in flight on this session (limits.maxPendingRequests={self.max_pending})"))
            return
        if method == "initialize":
            self._initialize(msg, route)
            return
        params = params_of(msg)
        if method in ("ping", "logging/setLevel"):
            route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {}}))
            return
        if method in ("resources/subscribe", "resources/unsubscribe") and isinstance(params.get("uri"), str):
            if method == "resources/subscribe":
                self.upstream.subscribe(params["uri"])
            else:
                self.upstream.unsubscribe(params["uri"])
            route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {}}))
            return
        try:
            self._inflight[id] = self.pool.request(msg, _SessionRoute(self, route, id), on_input=self._relay)
        except PoolFull as e:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}"))

    def _initialize(self, msg: dict[str, Any], route: Any) -> None:
        id = msg["id"]
        params = params_of(msg)
        asked = params.get("protocolVersion")
        version = asked if asked in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]
        declared = params.get("capabilities")
        self.client_capabilities = declared if isinstance(declared, dict) else {}

        def answer(init: dict[str, Any]) -> None:
            self.protocol_version = version
            if self.on_version is not None:
                self.on_version(self)
            route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {**init, "protocolVersion": version}}))

        def failed(f: Any) -> None:
            route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, f.getErrorMessage()))

        self.pool.ready().addCallbacks(answer, failed).addErrback(
            lambda f: self.log.failure("pooled initialize for {session} failed", f, session=self.id))

    def _relay(self, pending: Pending, request: dict[str, Any]) -> bool:
        """The child asks sampling / elicitation / roots while running only this session's call: the
        request goes to the client on that call's stream, under an id of the gateway's. A request for a
        capability this client did not declare never reaches it: the gateway answers the child as the
        client's SDK would (the child itself was told the gateway's capabilities, not the client's)."""
        if pending.child is None:
            return False
        needed = undeclared(request.get("method"), self.client_capabilities)
        if needed is not None:
            pending.child.upstream.send(capability_refusal(request["id"], needed))
            return True
        key = f"{self.pool._prefix}ask-{next(self.pool._ids)}"
        self._asked[key] = (pending.child, request["id"])
        pending.route.deliver(jsonrpc.dumps({**request, "id": key}))
        return True

    def notify(self, msg: dict[str, Any], raw: bytes) -> None:
        """Client notifications and responses: an answer to a relayed child request goes back to that
        child under the child's id; a cancellation reaches the child under the gateway id; the rest
        (initialized, roots/list_changed) stop here."""
        self.last_seen = self._reactor.seconds()
        if "method" not in msg:
            mid = msg.get("id")
            asked = self._asked.pop(mid, None) if isinstance(mid, str) else None
            if asked is not None:
                child, child_id = asked
                child.upstream.send(jsonrpc.dumps({**msg, "id": child_id}))
            return
        if msg.get("method") == "notifications/cancelled":
            params = msg.get("params")
            rid = params.get("requestId") if isinstance(params, dict) else None
            pending = self._inflight.pop(rid, None) if isinstance(rid, (str, int)) else None
            if pending is not None:
                self.pool.cancel(pending, "cancelled by the client")
                pending.route.route.forget(rid)

    def _notification(self, raw: bytes, msg: dict[str, Any]) -> None:
        """A child's notification for every client: list changes, and updates of URIs this session watches."""
        if self.outlet is None or self.ended:
            return
        params = params_of(msg)
        method = msg.get("method")
        if method in SHARED_NOTIFICATIONS or (method == "notifications/resources/updated" and params.get("uri") in self.upstream.uris):
            self.outlet.unbound(raw, msg)

    def has_pending(self) -> bool:
        return bool(self._inflight)

    def pending_routes(self) -> list[Any]:
        return [p.route.route for p in self._inflight.values()]

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.upstream.stop()  # before the calls are cancelled: no notification reaches a session that is ending
        asked, self._asked = self._asked, {}
        for child, child_id in asked.values():
            child.upstream.send(jsonrpc.error_bytes(child_id, jsonrpc.CONNECTION_CLOSED, reason))
        inflight, self._inflight = self._inflight, {}
        for id, pending in inflight.items():
            self.pool.cancel(pending, reason)
            pending.route.route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, reason))
        super()._end(reason)
