"""How instances reach each other: publish to a channel, hear one's own channel.

``RedisPubSub`` runs over the store's ``RedisConnection`` (its command connection publishes,
its subscribed connection listens). ``MemoryBus`` is the same thing inside one process, for
tests that run several gateway instances on one ``Clock``: deliveries are scheduled on the clock
(never synchronous, as with Redis), and an instance can be cut off as a killed process is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from mcpgw.store.redis import RedisConnection


class IPubSub(Interface):
    """The channels between gateway instances."""

    available = Attribute("True while messages can be published and heard")

    def publish(channel: str, data: bytes) -> defer.Deferred[int]:
        """Publish ``data``; fires with how many listeners got it (0: nobody listens there)."""

    def subscribe(channel: str, handler: Callable[[bytes], None]) -> None:
        """Hand every message on ``channel`` to ``handler`` (across reconnects)."""

    def on_change(listener: Callable[[bool], None]) -> None:
        """``listener(available)`` whenever availability changes."""


@implementer(IPubSub)
class RedisPubSub:
    """PUBLISH and SUBSCRIBE on the gateway's Redis connections."""

    def __init__(self, redis: RedisConnection):
        self._redis = redis

    @property
    def available(self) -> bool:
        return bool(self._redis.available)

    def publish(self, channel: str, data: bytes) -> defer.Deferred[int]:
        return self._redis.publish(channel, data)

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        self._redis.subscribe(channel, handler)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        self._redis.on_change(listener)


class MemoryBus:
    """Channels in memory, delivered on ``clock`` (one turn after the publish, in order)."""

    def __init__(self, clock: Any):
        self.clock = clock
        self._handlers: dict[str, list[tuple[MemoryPubSub, Callable[[bytes], None]]]] = {}
        #: Deliveries held back by ``hold()`` (a message in flight), in order.
        self.held: list[tuple[MemoryPubSub, Callable[[bytes], None], bytes]] | None = None

    def connect(self) -> MemoryPubSub:
        return MemoryPubSub(self)

    def hold(self) -> None:
        """Keep what is published in flight until ``release()`` (to play races)."""
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for client, handler, data in held:
            self.clock.callLater(0, client._deliver, handler, data)

    def _publish(self, channel: str, data: bytes) -> int:
        listeners = [(c, h) for c, h in self._handlers.get(channel, []) if c.available]
        for client, handler in listeners:
            if self.held is not None:
                self.held.append((client, handler, data))
            else:
                self.clock.callLater(0, client._deliver, handler, data)
        return len(listeners)

    def _subscribe(self, client: MemoryPubSub, channel: str, handler: Callable[[bytes], None]) -> None:
        self._handlers.setdefault(channel, []).append((client, handler))


@implementer(IPubSub)
class MemoryPubSub:
    """One instance's connection to a MemoryBus."""

    def __init__(self, bus: MemoryBus):
        self._bus = bus
        self.available = True
        self._listeners: list[Callable[[bool], None]] = []

    def publish(self, channel: str, data: bytes) -> defer.Deferred[int]:
        if not self.available:
            return defer.fail(ConnectionError("pub/sub unavailable"))
        return defer.succeed(self._bus._publish(channel, data))

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        self._bus._subscribe(self, channel, handler)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def set_available(self, available: bool, notify: bool = True) -> None:
        """The connection is lost (False: nothing is heard or published) or back; without
        ``notify``, the instance does not hear of it (a killed process)."""
        if available != self.available:
            self.available = available
            for listener in list(self._listeners) if notify else []:
                listener(available)

    def _deliver(self, handler: Callable[[bytes], None], data: bytes) -> None:
        if self.available:
            handler(data)
