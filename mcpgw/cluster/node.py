"""This instance on the bus: what it sends, what it hears, and whom it answers.

``Node`` publishes ``wire`` messages to other instances (``send``, ``tell``, ``call`` for those
that are acknowledged), reads its own channel and hands each message to the handler registered
for its class. A message that cannot be read is logged and dropped: one bad or newer message
never ends the subscription.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger

import mcpgw.cluster.wire as wire
from mcpgw import logs
from mcpgw.cluster.pubsub import IPubSub

#: SSE stream numbers are ``instance * STREAM_BASE + n``: the instance that holds a stream is in its id.
STREAM_BASE = 10**8

M = TypeVar("M", bound=wire.Message)


def holder_of(number: int) -> str | None:
    """The instance that holds SSE stream ``number`` (None: a single-instance number)."""
    instance = number // STREAM_BASE
    return str(instance) if instance else None


class Node:
    """This instance's messaging: its id, its channel, its handlers, the acknowledgements it waits for."""

    log = Logger(observer=logs.observer)

    def __init__(self, instance: str, reactor: Any, pubsub: IPubSub, channel: Callable[[str], str],
                 timeout: float):
        self.instance = instance
        self.reactor = reactor
        self.pubsub = pubsub
        self._channel = channel
        #: How long an acknowledged message waits for its ``Ack``.
        self.call_timeout = 3 * timeout
        self._handlers: dict[type[wire.Message], Callable[[Any], None]] = {wire.Ack: self._on_ack}
        self._acks: dict[int, defer.Deferred[str]] = {}
        self._next_rid = 0
        self._streams = 0
        #: The SessionManager of this instance's own sessions (set by ``Cluster.bind``).
        self.sessions: Any = None
        #: Instances that hold something of a session owned here (a POST, a stream), by session id.
        self.peers: dict[str, set[str]] = {}
        pubsub.subscribe(channel(instance), self.received)

    def handle(self, cls: type[M], handler: Callable[[M], None]) -> None:
        self._handlers[cls] = handler

    # -- sending ---------------------------------------------------------------------

    def send(self, instance: str, message: wire.Message) -> defer.Deferred[int]:
        """Publish ``message`` to ``instance``; fires with how many got it (0: nobody listens)."""
        return self.pubsub.publish(self._channel(instance), wire.encode(message))

    def tell(self, instance: str, message: wire.Message) -> None:
        """``send``, for a message whose delivery nothing waits on."""
        self.send(instance, message).addErrback(
            lambda f: self.log.debug("cluster: {t} to {instance} not sent: {e}", t=message.TYPE, instance=instance,
                                     e=f.getErrorMessage()))

    def call(self, instance: str, message: wire.OpenGet | wire.Attach) -> defer.Deferred[str]:
        """Publish a message that the other instance acknowledges (``Ack``); fires with its status,
        "unreachable" when nobody listens, a connection failure or a timeout otherwise."""
        rid = message.route
        waiting: defer.Deferred[str] = defer.Deferred()
        self._acks[rid] = waiting

        def sent(receivers: int) -> None:
            if receivers == 0 and not waiting.called:
                self._acks.pop(rid, None)
                waiting.callback("unreachable")

        def failed(f: Any) -> None:
            if not waiting.called:
                self._acks.pop(rid, None)
                waiting.errback(f)

        self.send(instance, message).addCallbacks(sent, failed)
        waiting.addTimeout(self.call_timeout, self.reactor)
        waiting.addBoth(lambda r: (self._acks.pop(rid, None), r)[1])
        return waiting

    def _on_ack(self, message: wire.Ack) -> None:
        waiting = self._acks.pop(message.route, None)
        if waiting is not None and not waiting.called:
            waiting.callback(message.status)

    # -- hearing ---------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        try:
            message = wire.decode(data)
        except wire.WireError as e:
            self.log.warn("cluster: message dropped: {error}", error=str(e))  # noqa: G010 (twisted.logger)
            return
        handler = self._handlers.get(type(message))
        if handler is None:
            self.log.warn("cluster: no handler for {t!r}; dropped", t=message.TYPE)  # noqa: G010 (twisted.logger)
            return
        handler(message)

    # -- numbers ---------------------------------------------------------------------

    def new_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    def next_stream(self) -> int:
        self._streams += 1
        return int(self.instance) * STREAM_BASE + self._streams

    # -- the owner's side --------------------------------------------------------------

    def owned(self, message: wire.Post | wire.Emit | wire.Delete | wire.OpenGet) -> Any:
        """The live session owned here that ``message`` (one from another instance) is about, or
        None: then the sender hears that it is gone (unless it was only telling us it let go)."""
        session = self.sessions.sessions.get(message.session)
        if session is None or session.ended:
            if not isinstance(message, wire.Delete):
                self.tell(message.sender, wire.Gone(message.session, message.route))
            return None
        self.peers.setdefault(session.id, set()).add(message.sender)
        return session

    def session_removed(self, session_id: str) -> None:
        """One of our sessions ended: tell the instances that hold something of it."""
        for peer in self.peers.pop(session_id, ()):
            self.tell(peer, wire.Ended(session_id, b"session ended"))
