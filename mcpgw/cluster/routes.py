"""POSTs answered across instances.

On the instance where the client waits, ``Routes`` numbers each waiting Route (a ``PostExchange``)
and forwards the session's messages to its owner; the owner's answers come back as ``Answer``,
``Deliver`` and ``Forget`` for that number. On the owner, ``OwnerRoutes`` takes the forwarded
messages to the live session, with a ``RemoteRoute`` standing in for the waiting POST.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

import mcpgw.cluster.wire as wire
from mcpgw import dispatch, jsonrpc, logs
from mcpgw.cluster.node import Node
from mcpgw.interfaces import IRoute
from mcpgw.transports.streamable import PostExchange

#: A message a receiving instance forwards to a session's owner: its class, called with
#: (session id, this instance, route id, payload) and its optional fields by name.
Forwarded = Callable[..., wire.Message]


class Routes:
    """The receiving side: Routes here waiting on another instance, by route id."""

    log = Logger(observer=logs.observer)

    def __init__(self, node: Node, alive: Callable[..., Any]):
        self.node = node
        #: ``alive(instance, connected=True)``: the instance registry's check.
        self._alive = alive
        self.routes: dict[int, Any] = {}
        #: Route id -> request id -> the route that request's answer goes through: the waiting Route
        #: wrapped for that one request (mcpgw.dispatch's spans, the tool policy's filter).
        self.answerers: dict[int, dict[Any, Any]] = {}
        self._route_session: dict[int, Any] = {}
        #: ``owner_gone(session)``: the session's owner is gone for good (set by the directory).
        self.owner_gone: Callable[[Any], None] = lambda session: None
        node.handle(wire.Answer, self._on_answer)
        node.handle(wire.Deliver, self._on_deliver)
        node.handle(wire.Forget, self._on_forget)

    def add_route(self, route: Any, session: Any) -> int:
        rid = self.node.new_rid()
        self.routes[rid] = route
        self._route_session[rid] = session
        return rid

    def forward(self, session: Any, kind: Forwarded, rid: int | None, payload: bytes, **fields: Any) -> None:
        """Publish a message of ``session`` to its owner; routes fail if it cannot get there."""
        message = kind(session.id, self.node.instance, rid, payload, **fields)
        d = self.node.send(session.instance, message)
        d.addCallbacks(self._forwarded, self._forward_failed, callbackArgs=(session, rid), errbackArgs=(session, rid))

    def _forwarded(self, receivers: int, session: Any, rid: int | None) -> Any:
        if receivers:
            return None
        # Nobody listens on the owner's channel: killed (no heartbeat, or no connection to Redis
        # left), or its pub/sub connection is coming back.
        d = self._alive(session.instance, connected=True)
        d.addCallbacks(self._owner_checked, self._forward_failed, callbackArgs=(session, rid), errbackArgs=(session, rid))
        return d

    def _owner_checked(self, alive: bool, session: Any, rid: int | None) -> None:
        if not alive:
            self.owner_gone(session)
        elif rid is not None:
            self.fail_route(rid, 503, "Service Unavailable: the gateway instance that owns this session "
                                      "is not reachable now; try again")

    def _forward_failed(self, f: Any, session: Any, rid: int | None) -> None:
        self.log.info("cluster: message for session {session} not delivered: {error}", session=session.id,
                      error=f.getErrorMessage())
        if rid is not None:
            self.fail_route(rid, 503, "Service Unavailable: the message could not be passed on to the "
                                      "session's gateway instance; try again")

    def fail_route(self, rid: int, status: int, message: str) -> None:
        route = self.routes.pop(rid, None)
        session = self._route_session.pop(rid, None)
        answerers = self.answerers.pop(rid, {})
        if session is not None:
            session.route_done(route)
        if route is None:
            return
        code = jsonrpc.SESSION_NOT_FOUND if status == 404 else jsonrpc.CONNECTION_CLOSED
        if isinstance(route, PostExchange):
            if status == 503 and not route.request.startedWriting:
                route.request.setHeader(b"retry-after", b"1")
            route.fail(status, code, message)
            for answerer in answerers.values():  # their answers were the error above
                dispatch.settle(answerer, "error", code)
        else:
            for id in list(route.waiting):
                answerers.get(id, route).answer(id, jsonrpc.error_bytes(id, code, message))

    def fail_routes(self, session: Any, status: int, message: str) -> None:
        for rid in list(session.routes):
            self.fail_route(rid, status, message)

    def route_closed(self, session: Any, rid: int) -> None:
        """The client of a POST here went away: the owner sends server messages elsewhere."""
        route = self.routes.get(rid)
        if route is not None and route.waiting and self.node.pubsub.available:
            self.forward(session, wire.RouteClosed, rid, b"")

    def _answerer(self, rid: int, id: Any, route: Any) -> Any:
        """The route the answer to request ``id`` goes through (its own wrapper, else the waiting Route)."""
        answerers = self.answerers.get(rid)
        found = answerers.pop(id, None) if answerers is not None else None
        return route if found is None else found

    def _on_answer(self, message: wire.Answer) -> None:
        route = self.routes.get(message.route)
        if route is not None:
            self._answerer(message.route, message.id, route).answer(message.id, message.payload)
            self._maybe_done(message.route, route)

    def _on_deliver(self, message: wire.Deliver) -> None:
        route = self.routes.get(message.route)
        if route is not None:
            route.deliver(message.payload)

    def _on_forget(self, message: wire.Forget) -> None:
        route = self.routes.get(message.route)
        if route is not None:
            self._answerer(message.route, message.id, route).forget(message.id)
            self._maybe_done(message.route, route)

    def _maybe_done(self, rid: int, route: Any) -> None:
        if not route.waiting:
            self.routes.pop(rid, None)
            self.answerers.pop(rid, None)
            session = self._route_session.pop(rid, None)
            if session is not None:
                session.route_done(route)


# -- the owner's side ---------------------------------------------------------------


@implementer(IRoute)
class RemoteRoute:
    """The owner's Route for a POST waiting on another instance: answers are published to it."""

    def __init__(self, owner: OwnerRoutes, session: Any, instance: str, rid: int):
        self._owner = owner
        self.session = session
        self.instance = instance
        self.rid = rid
        self.waiting: set[Any] = set()
        self.closed = False
        self.lost = False

    @property
    def open_stream(self) -> bool:
        """Server messages may go to it (StreamableOutlet.unbound): its POST still waits."""
        return bool(self.waiting) and not self.closed and not self.lost

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.waiting.discard(id)
        self._send(wire.Answer(self.rid, id, raw))
        self._maybe_done()

    def deliver(self, raw: bytes) -> None:
        self._send(wire.Deliver(self.rid, raw))

    def forget(self, id: Any) -> None:
        self.waiting.discard(id)
        self._send(wire.Forget(self.rid, id))
        self._maybe_done()

    def _send(self, message: wire.Message) -> None:
        if self.lost:
            return
        d = self._owner.node.send(self.instance, message)
        d.addCallbacks(self._sent, lambda f: self.lose(f.getErrorMessage()))

    def _sent(self, receivers: int) -> None:
        if not receivers:
            self.lose("nobody listens there")

    def _maybe_done(self) -> None:
        if not self.waiting:
            self._owner.routes_out.pop((self.instance, self.rid), None)

    def lose(self, why: str) -> None:
        """The instance that waits for this POST is unreachable: cancel its requests at the child."""
        if self.lost:
            return
        self.lost = True
        self._owner.routes_out.pop((self.instance, self.rid), None)
        for id in list(self.waiting):
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                      "params": {"requestId": id, "reason": f"the client's gateway instance is unreachable ({why})"}}
            if not self.session.ended:
                self.session.notify(cancel, jsonrpc.dumps(cancel))
        self.waiting.clear()


class OwnerRoutes:
    """The owner's side: client messages forwarded by other instances, to the live sessions here."""

    log = Logger(observer=logs.observer)

    def __init__(self, node: Node):
        self.node = node
        self.routes_out: dict[tuple[str, int], RemoteRoute] = {}
        #: The GatewayContext of this instance (``Cluster.bind``): its tracer and audit trail.
        self.ctx: Any = None
        node.handle(wire.Post, self._on_post)
        node.handle(wire.Emit, self._on_emit)
        node.handle(wire.Delete, self._on_delete)
        node.handle(wire.RouteClosed, self._on_route_closed)

    def _route(self, session: Any, message: wire.Post) -> Any:
        """Where the responses to the requests in ``message`` go (None: nowhere, they are dropped)."""
        if session.transport == "sse":
            return session.outlet
        if message.route is None:
            return None
        key = (message.sender, message.route)
        route = self.routes_out.get(key)
        if route is None:
            route = self.routes_out[key] = RemoteRoute(self, session, message.sender, message.route)
        return route

    def _on_post(self, message: wire.Post) -> None:
        session = self.node.owned(message)
        if session is None:
            return
        route = self._route(session, message)
        for line in message.payload.split(b"\n"):
            if not line:
                continue
            try:
                msg = jsonrpc.loads(line)
                kind = jsonrpc.classify(msg)
            except (jsonrpc.DecodeError, jsonrpc.MessageError, TypeError):
                self.log.warn("cluster: malformed message for session {session} dropped", session=session.id)  # noqa: G010 (twisted.logger)
                continue
            if kind == jsonrpc.REQUEST:
                if route is None:
                    continue
                if isinstance(route, RemoteRoute):
                    route.waiting.add(msg["id"])
                self._request(session, msg, line, route, message)
            else:
                session.notify(msg, line)

    def _request(self, session: Any, msg: dict[str, Any], line: bytes, route: Any, message: wire.Post) -> None:
        """A forwarded request to the session: its trace goes on from the forwarding instance's span, and
        its audit line is written here, where it is answered (mcpgw.dispatch)."""
        if self.ctx is None:
            session.request(msg, line, route)
            return
        dispatch.forward(self.ctx, session, msg, line, route, transport=session.transport, identity=session.owner,
                         client_ip=message.client_ip, parent=message.carrier, hidden=message.hidden)

    def _on_emit(self, message: wire.Emit) -> None:
        session = self.node.owned(message)
        if session is not None and session.outlet is not None:
            session.outlet.deliver(message.payload)

    def _on_delete(self, message: wire.Delete) -> None:
        session = self.node.owned(message)
        if session is not None:
            session.close(message.payload.decode("utf-8", "replace") or "client ended the session (DELETE)")

    def _on_route_closed(self, message: wire.RouteClosed) -> None:
        route = self.routes_out.get((message.sender, message.route))
        if route is not None:
            route.closed = True

    def lose_all(self, why: str, instance: str | None = None) -> None:
        """The instances waiting for POSTs here (or only ``instance``) cannot be reached."""
        for key, route in list(self.routes_out.items()):
            if instance is None or key[0] == instance:
                route.lose(why)
