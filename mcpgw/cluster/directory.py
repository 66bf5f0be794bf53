"""Who owns a session, and the stand-in for one owned by another instance.

Every session lives in one instance, its *owner*, and its record in the store names it. A client
may reach any instance: there ``Directory.lookup`` reads the record once and keeps a
``RemoteSession``, which has the session interface the transports use and forwards everything to
the owner. An owner that is gone (killed, or stopped) makes its sessions 404, and their records
are deleted, so the client initializes a new session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import mcpgw.cluster.wire as wire
from mcpgw import dispatch, jsonrpc, logs
from mcpgw.cluster.node import Node
from mcpgw.cluster.routes import Routes
from mcpgw.interfaces import IOutlet, IRoute, ISession
from mcpgw.transports.common import HttpError
from mcpgw.transports.streamable import PostExchange, StreamableOutlet


def unavailable(what: str) -> HttpError:
    """A 503 that says what could not be done, never where Redis is or how it failed: the
    connection's own log lines carry that (with its address) for the operator."""
    return HttpError(503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {what}: session store unavailable (Redis)",
                     headers={b"retry-after": b"2"})


@implementer(IRoute, IOutlet)
class RemoteLegacyOutlet:
    """The outlet of an HTTP+SSE session owned elsewhere: its SSE stream is on the owner."""

    #: The stream is the session's outlet, on the owner: no POST's response.
    open_stream = False

    def __init__(self, session: RemoteSession):
        self.session = session

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        """Something the gateway itself answers (``server/discover``): written on the owner's stream."""
        self.session.directory.routes.forward(self.session, wire.Emit, None, raw)

    def deliver(self, raw: bytes) -> None:
        self.session.directory.routes.forward(self.session, wire.Emit, None, raw)

    def forget(self, id: Any) -> None:
        pass

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        pass

    def session_ended(self, reason: str) -> None:
        pass


@implementer(ISession)
class RemoteSession:
    """A session owned by another instance, as the transports here see it."""

    def __init__(self, directory: Directory, record: Any, server: Any):
        self.directory = directory
        self._routes = directory.routes
        self._clock = directory.node.reactor
        self.id = record.id
        self.server = server
        self.transport = record.transport
        self.protocol_version = record.protocol_version
        self.owner = record.owner
        #: The instance that runs the session's child.
        self.instance = record.instance
        self.metrics = directory.ctx.metrics.bound(record.transport, server.name)
        self.ended = False
        self.end_reason = ""
        #: Its record is being read again (``refresh``).
        self.refreshing = False
        self.last_used = self._clock.seconds()
        #: Route ids of this session's POSTs waiting here.
        self.routes: set[int] = set()
        self._route_ids: dict[Any, int] = {}
        self.outlet: Any = RemoteLegacyOutlet(self) if self.transport == "sse" else directory.remote_outlet(self)

    # What the transports call

    def request(self, msg: dict[str, Any], raw: bytes, route: Any) -> None:
        """Forward a request to the owner; its answer comes back to ``route``.

        ``route`` may be the transport's Route wrapped for this one request (mcpgw.dispatch's spans, the
        tool policy's filter): the waiting Route is numbered once, the wrapper answers this request, and
        dispatch's wrapper gives the message its trace context and client address (``ObservedRoute.hop``)."""
        self.last_used = self._clock.seconds()
        if self.ended:
            route.answer(msg["id"], jsonrpc.error_bytes(msg["id"], jsonrpc.CONNECTION_CLOSED, self.end_reason))
            return
        base = dispatch.base_route(route)
        observed = route if isinstance(route, dispatch.ObservedRoute) else None
        carrier, client_ip = observed.hop() if observed is not None else (None, None)
        if base is self.outlet:
            # Answered on the owner's stream: what the tool policy hides goes with the request.
            hidden = dispatch.hidden_tools(route)
            self._routes.forward(self, wire.Post, None, raw, carrier=carrier, client_ip=client_ip,
                                 hidden=sorted(hidden) if hidden else None)
            if observed is not None:  # answered on the owner's stream, where its own span and audit line end
                observed.settle("ok")
            return
        rid = self._route_ids.get(base)
        if rid is None:
            rid = self._route_ids[base] = self._routes.add_route(base, self)
            self.routes.add(rid)
            if isinstance(base, PostExchange):
                base.request.notifyFinish().addErrback(lambda _: self._routes.route_closed(self, rid))
        if route is not base:
            self._routes.answerers.setdefault(rid, {})[msg["id"]] = route
        self._routes.forward(self, wire.Post, rid, raw, carrier=carrier, client_ip=client_ip)

    def notify(self, msg: dict[str, Any], raw: bytes) -> None:
        self.last_used = self._clock.seconds()
        if not self.ended:
            self._routes.forward(self, wire.Post, None, raw)

    def close(self, reason: str = "session closed") -> defer.Deferred[None]:
        if not self.ended:
            self._routes.forward(self, wire.Delete, None, reason.encode())
            self.directory.forget(self, reason, status=404)
        return defer.succeed(None)

    def has_pending(self) -> bool:
        return bool(self.routes)

    def pending_routes(self) -> list[Any]:
        return [self._routes.routes[rid] for rid in self.routes if rid in self._routes.routes]

    def route_done(self, route: Any) -> None:
        rid = self._route_ids.pop(route, None)
        if rid is not None:
            self.routes.discard(rid)

    def refresh(self) -> None:
        """Read the record again for what the owner learnt after it was first read (the protocol version)."""
        if self.refreshing:
            return
        self.refreshing = True

        def read(record: Any) -> None:
            self.refreshing = False
            if record is not None and record.protocol_version is not None:
                self.protocol_version = record.protocol_version

        def failed(f: Any) -> None:
            self.refreshing = False

        self.directory.store.get(self.id).addCallbacks(read, failed)

    def forgotten(self, reason: str) -> None:
        """This instance has let go of the session (over, or unreachable for good): what the client
        sends it from now on is answered with ``reason``."""
        self.ended = True
        self.end_reason = reason

    def active(self) -> bool:
        """Something here still waits on the owner (a POST, a stream)."""
        if self.routes:
            return True
        outlet = self.outlet
        return isinstance(outlet, StreamableOutlet) and any(
            s.live is not None and not s.done for s in outlet.streams.values())

    # The producer of this session's SSE responses: backpressure stays on the owner.

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Directory:
    """Sessions owned by other instances that this one knows of, and how it finds them."""

    log = Logger(observer=logs.observer)

    def __init__(self, node: Node, routes: Routes, store: Any, registry: Any, config: Any):
        self.node = node
        self.routes = routes
        #: The session records of every instance (RedisSessionStore: get, remove, local).
        self.store = store
        #: The instance registry (``alive``).
        self.registry = registry
        self.config = config
        #: The gateway's context (set by ``Cluster.bind``).
        self.ctx: Any = None
        #: Makes the outlet of a Streamable HTTP session owned elsewhere (set by the cluster).
        self.remote_outlet: Callable[[RemoteSession], Any] = lambda session: None
        self.remote: dict[str, RemoteSession] = {}
        self._looking: dict[str, list[tuple[defer.Deferred[Any], str | None]]] = {}
        routes.owner_gone = self.owner_gone
        node.handle(wire.Gone, self._on_gone)
        node.handle(wire.Ended, self._on_end)

    def lookup(self, session_id: str, identity: str | None) -> defer.Deferred[Any]:
        """The RemoteSession for ``session_id`` as ``identity`` may use it, or None (unknown: 404);
        an HttpError (503) when the store cannot be asked. Fires at once when the session is known
        here (or cannot be: a forged id); the first request for a session owned elsewhere waits for
        its record."""
        remote = self.remote.get(session_id) if session_id else None
        if remote is not None:
            return self._known(remote, identity)
        sessions = self.node.sessions
        if not session_id or not sessions.ids.valid(session_id) or session_id in sessions.sessions:
            return defer.succeed(None)  # forged (never looked up), or ours and another identity's: 404
        if not self.node.pubsub.available:
            return defer.fail(unavailable("cannot look the session up"))
        found: defer.Deferred[Any] = defer.Deferred()
        waiters = self._looking.get(session_id)
        if waiters is not None:
            waiters.append((found, identity))
            return found
        self._looking[session_id] = [(found, identity)]
        d = defer.Deferred.fromCoroutine(self._read(session_id))
        d.addBoth(self._looked_up, session_id)
        d.addErrback(lambda f: self.log.failure("cluster: after looking up session {session}", f, session=session_id))
        return found

    def _known(self, remote: RemoteSession, identity: str | None) -> defer.Deferred[Any]:
        if remote.owner != identity:
            return defer.succeed(None)
        if not self.node.pubsub.available:
            return defer.fail(unavailable("the session is owned by another gateway instance"))
        if remote.protocol_version is None:
            remote.refresh()
        return defer.succeed(remote)

    async def _read(self, session_id: str) -> RemoteSession | None:
        record = await self.store.get(session_id)
        if record is None or record.instance is None:
            return None
        server = self.config.servers.get(record.server)
        if server is None:
            return None
        if record.instance == self.node.instance:  # ours, but not in memory: a leftover
            if session_id not in self.node.sessions.sessions and self.store.local(session_id) is None:
                await self.store.remove(session_id)
            return None
        if not await self.registry.alive(record.instance):
            self.log.info("cluster: session {session} belonged to instance {instance}, which is gone; record removed",
                          session=session_id, instance=record.instance)
            await self.store.remove(session_id)
            return None
        return RemoteSession(self, record, server)

    def _looked_up(self, result: Any, session_id: str) -> None:
        waiters = self._looking.pop(session_id, [])
        if isinstance(result, Failure):
            self.log.info("cluster: lookup of session {session} failed: {error}", session=session_id,
                          error=result.getErrorMessage())
            for found, _ in waiters:
                found.errback(unavailable("cannot look the session up"))
            return
        remote = self.remote.setdefault(session_id, result) if result is not None else None
        for found, identity in waiters:
            if remote is None:
                found.callback(None)
            else:
                self._known(remote, identity).chainDeferred(found)

    def forget(self, session: RemoteSession, reason: str, status: int) -> None:
        """The session is over (or unreachable for good): fail what waits, close the streams here."""
        if self.remote.get(session.id) is session:
            del self.remote[session.id]
        session.forgotten(reason)
        self.routes.fail_routes(session, status, "Session not found" if status == 404 else reason)
        outlet = session.outlet
        if isinstance(outlet, StreamableOutlet):
            outlet.session_ended(reason)

    def owner_gone(self, session: RemoteSession) -> None:
        self.log.info("cluster: instance {instance} (owner of session {session}) is gone", instance=session.instance,
                      session=session.id)
        self.store.remove(session.id).addErrback(lambda f: None)
        self.forget(session, "the gateway instance that owned the session is gone", status=404)

    def _on_gone(self, message: wire.Gone) -> None:
        session = self.remote.get(message.session)
        if session is not None:
            self.forget(session, "Session not found", status=404)
        elif message.route is not None:
            self.routes.fail_route(message.route, 404, "Session not found")

    def _on_end(self, message: wire.Ended) -> None:
        session = self.remote.get(message.session)
        if session is not None:
            self.forget(session, message.payload.decode("utf-8", "replace") or "session ended", status=404)
