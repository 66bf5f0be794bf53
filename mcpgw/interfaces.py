"""The contracts between the gateway's layers: transports, sessions and upstreams.

A transport hands client messages to an ``ISession`` and gets the answers back on an ``IRoute``
(one waiting client exchange) or the session's ``IOutlet`` (whatever no exchange claims). A
session relays to an ``IUpstream`` (a stdio child, a remote server, an aggregate, a pool lease)
and hears from it as its ``IUpstreamDelegate``.

Every provider declares what it provides (``@implementer``) and ``tests/test_interfaces_verify.py``
checks each with ``zope.interface.verify.verifyObject``. This module imports nothing of the
gateway's own, so every layer can name these without importing another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from zope.interface import Attribute, Interface


class IRoute(Interface):
    """A client stream that waits for responses (a POST exchange, an SSE stream, a WebSocket)."""

    open_stream = Attribute(
        "True while the route is a POST's response that is still open to more messages, on this instance or "
        "another: StreamableOutlet.unbound puts a server message no request claims on the newest such route, "
        "where the client is reading already. False for a route that is the session's outlet too "
        "(an HTTP+SSE stream, a WebSocket) or that no client reads (a pool's own fetch)")

    def answer(id: Any, raw: bytes, msg: Any = None) -> None:
        """The response to request ``id`` that this route carried; ``msg``: ``raw`` decoded, when the caller
        has it (a session: what its upstream read), for a route that reads the answer (mcpgw.dispatch's
        ObservedRoute) rather than decoding it again. A route that changes ``raw`` passes on no ``msg``."""

    def deliver(raw: bytes) -> None:
        """Any other message that belongs on this route (progress, related requests)."""

    def forget(id: Any) -> None:
        """Request ``id`` will get no response (cancelled by the client)."""


class IOutlet(Interface):
    """Where a session sends what no pending request claims, and hears of its end."""

    def unbound(raw: bytes, msg: dict[str, Any]) -> None:
        """A server message no pending request claims (notifications, server requests)."""

    def session_ended(reason: str) -> None:
        """The session is over; ``reason`` says why."""


class IUpstreamDelegate(Interface):
    """What an upstream reports to (a session, a pooled child, an aggregate's member, a tool filter).

    A delegate whose ``routes_on_view`` is true takes a large line's message as ``jsonrpc.route_view``
    gives it (values of ``jsonrpc.SMALL_VALUE`` bytes or more ``Undecoded``); any other gets every
    line fully decoded.
    """

    routes_on_view = Attribute("True: a large message may arrive with undecoded values (jsonrpc.route_view)")

    def upstreamMessage(raw: bytes, msg: dict[str, Any]) -> None:
        """One message from upstream, as bytes and decoded."""

    def upstreamProtocolError(reason: str) -> None:
        """Upstream broke the protocol (an unreadable line, a line over the limit)."""

    def upstreamEnded(reason: str) -> None:
        """Upstream is gone for good."""


class IUpstream(Interface):
    """What a session relays to (stdio child, remote server, aggregate, tool filter, pool lease)."""

    ended = Attribute("True once the upstream is gone for good")
    pid = Attribute("the child's process id, or None (no child of its own)")
    metrics = Attribute("the session's BoundMetrics (child gauges)")
    delegate = Attribute("the IUpstreamDelegate it reports to (re-pointed when a warm child is adopted)")

    def spawn() -> None:
        """Start (a child, an SSE stream, the members); may raise if it cannot."""

    def send(raw: bytes, msg: Any = None) -> bool:
        """Relay one client message (``msg``: ``raw`` decoded, when the caller has it: an upstream
        that reads the message need not decode it again); False if it can no longer take it."""

    def stop() -> Any:
        """End it; a Deferred that fires once it is really gone."""

    def pauseProducing() -> None:
        """A slow client: stop reading from upstream."""

    def resumeProducing() -> None:
        """Read from upstream again."""


class ISession(Interface):
    """One client session as the transports see it, whether this instance runs it or another does."""

    id = Attribute("the session id (mcpgw.session.SessionIds)")
    server = Attribute("its ServerConfig")
    transport = Attribute('the client transport: "streamable", "sse", "ws"')
    owner = Attribute("the identity that created it (mcpgw.auth), or None")
    protocol_version = Attribute("the version its handshake settled on, or None before")
    metrics = Attribute("its BoundMetrics")
    ended = Attribute("True once it is over")
    end_reason = Attribute('why it ended ("" while it runs)')
    instance = Attribute("the cluster instance that runs it (mcpgw.cluster), or None: this instance runs it")
    outlet = Attribute("its IOutlet, made with the session for the transport that created it, or None: no "
                       "transport listens (a session made without one, as in unit tests)")

    def request(msg: dict[str, Any], raw: bytes, route: Any) -> None:
        """Relay a client request; its response goes to ``route`` (an IRoute)."""

    def notify(msg: dict[str, Any], raw: bytes) -> None:
        """Relay a client notification, or a response to a server request."""

    def has_pending() -> bool:
        """Requests wait for answers."""

    def pending_routes() -> list[Any]:
        """The routes of the requests that wait."""

    def close(reason: str = "session closed") -> Any:
        """End it; a Deferred that fires once its upstream is gone."""

    def pauseProducing() -> None:
        """A slow client: hold the upstream's output."""

    def resumeProducing() -> None:
        """The client drained: let it flow again."""

    def stopProducing() -> None:
        """A client connection went away (not the end of the session)."""


class ILocalSession(ISession, IUpstreamDelegate):
    """A session this instance runs (its SessionManager's): what the manager, control and admin use."""

    upstream = Attribute("its IUpstream")
    created = Attribute("reactor.seconds() at its start")
    last_seen = Attribute("reactor.seconds() of its client's last message")
    prespawned = Attribute("its child was already running (a warm child): start() does not spawn")
    quota_key = Attribute("whose quota it counts in (limits.maxSessionsPerIdentity), or None")
    max_pending = Attribute("limits.maxPendingRequests, or None")
    request_timeout = Attribute("limits.requestTimeout in seconds, or None")
    on_version = Attribute("called with the session once its protocol version is known, or None")
    on_initialized = Attribute("called once the client said notifications/initialized, or None")
    recorded = Attribute("a Deferred that fires (with None) once the store has its record or failed to write it; "
                         "never for a session whose child could not start (it is not recorded)")
    start_child = Attribute("a lazily started session: starts its child at its first message; else None")

    def start() -> None:
        """Start its upstream (spawn a child, or count a warm one)."""

    def adopt(upstream: Any) -> None:
        """Take a running child (a warm one) in place of the upstream not yet spawned."""


_Kind = TypeVar("_Kind", bound=type)
#: ServerConfig.kind -> the IUpstream class that serves it (``upstream_kind``; mcpgw.upstream.make_upstream).
UPSTREAM_KINDS: dict[str, Callable[..., Any]] = {}


def upstream_kind(kind: str) -> Callable[[_Kind], _Kind]:
    """Class decorator: servers whose ``ServerConfig.kind`` is ``kind`` are served by this class, made as
    ``cls(server, delegate, reactor)``; it must declare ``@implementer(IUpstream)`` (below it)."""

    def register(cls: _Kind) -> _Kind:
        if not IUpstream.implementedBy(cls):
            raise TypeError(f"{cls.__name__} does not declare IUpstream")
        UPSTREAM_KINDS[kind] = cls
        return cls

    return register
